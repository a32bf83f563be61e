"""TiC-CLIP's multi-step job: for each time step, build the strategy's data mix, train it through the one engine
with a fixed compute budget C (``train.steps``), patch, evaluate on every step's held-out set.

Layout of a run (``out``)::

    out/mixes/<kind>/step-XX/                 data mixes (shared by strategies and seeds; written once)
    out/step0/seed-S/                         step 0 (the same job for every strategy: shared, see below)
    out/<strategy>/seed-S/step-XX/train/      the engine run of that step (checkpoints, log.jsonl)
    out/<strategy>/seed-S/step-XX/model.safetensors, done.json
    out/<strategy>/seed-S/result.json, heatmap.png

Strategies (``STRATEGIES``): Oracle (from scratch on all data so far, budget (t+1)*C), Cumulative-All / -Exp /
-Equal (warm start + all past data / a replay buffer with shares halving with age / equal shares), Sequential
(warm start, new data only), Restart (from scratch on all data, budget C), Patching (Sequential, then weight
interpolation with the previous step's model), LwF (Sequential + distillation from the previous step's model).
Warm start loads the previous step's weights into a fresh engine run: a new optimiser and a new warm-up + cosine
schedule every step.

At step 0 every strategy trains the same job (from scratch, C steps, all of step 0's data, the same seed), so that
run is shared (``out/step0``) and its compute is counted in every strategy's total, since each strategy needs it.

Resume: each step is an ordinary engine run (checkpoints every ``train.ckpt_every`` steps, exact resume); a step
is finished when its ``done.json`` exists, so a rerun of the whole job starts at the step it stopped in.

Compute: ``steps actually run x samples per step x training FLOPs per sample``, the FLOPs measured with
``torch.utils.flop_counter.FlopCounterMode`` on one real batch of the step's job (forward + backward, plus the
teacher's forward for LwF).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from vfmkit.config import ConfigError, RunConfig, to_dict
from vfmkit.data.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json
from vfmkit.data.stream import build_mix, read_stream


@dataclass(frozen=True)
class Strategy:
    mix: str  # vfmkit.data.stream.MIX_KINDS
    warm: bool  # start from the previous step's weights
    budget: str = "C"  # "C" or "cumulative" ((t+1)*C)
    patch: bool = False
    lwf: bool = False


STRATEGIES = {
    "oracle": Strategy("all", False, "cumulative"),
    "cumulative-all": Strategy("all", True),
    "cumulative-exp": Strategy("exp", True),
    "cumulative-equal": Strategy("equal", True),
    "sequential": Strategy("new", True),
    "restart": Strategy("all", False),
    "patching": Strategy("new", True, patch=True),
    "lwf": Strategy("new", True, lwf=True),
}
PIPELINE_KEYS = ("stream", "replay_budget", "patch_alpha")


@dataclass
class TicPipelineArgs:
    stream: str | None = None  # the stream folder (vfmkit tic prepare)
    replay_budget: int | None = None  # replay buffer in samples for -exp/-equal; None: the size of step t
    patch_alpha: float = 0.5  # Patching: theta_t = (1 - alpha) theta_{t-1} + alpha theta_t^seq


def pipeline_args(cfg: RunConfig) -> tuple[TicPipelineArgs, dict]:
    """Split ``method_args`` into the pipeline's keys and the method's (``vfmkit.methods.tic.TicArgs``)."""
    from vfmkit.config import parse_section
    from vfmkit.methods.tic import parse_args

    ma = dict(cfg.method_args)
    p = parse_section(TicPipelineArgs, {k: ma.pop(k) for k in PIPELINE_KEYS if k in ma}, "method_args")
    if not 0.0 <= p.patch_alpha <= 1.0:
        raise ConfigError(f"config key 'method_args.patch_alpha': must be in [0, 1], got {p.patch_alpha}")
    probe = copy.deepcopy(cfg)
    probe.method_args = ma
    parse_args(probe)  # unknown method keys are named now, not at step 3
    return p, ma


def check_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown TiC strategy {name!r} (known: {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def _mix_dir(out: Path, kind: str, budget: int | None, t: int) -> Path:
    return (
        out
        / "mixes"
        / (kind if budget is None or kind in ("all", "new") else f"{kind}-b{budget}")
        / f"step-{t:02d}"
    )


def _step_cfg(
    cfg: RunConfig,
    method_args: dict,
    *,
    out_dir: Path,
    train: Path,
    steps: int,
    seed: int,
    pretrained: str | None,
    lwf_teacher: str | None,
) -> RunConfig:
    c = copy.deepcopy(cfg)
    c.method = "tic"
    c.out_dir = str(out_dir)
    c.data.train = str(train)
    c.train.steps = steps
    c.seed = seed
    c.model.pretrained = pretrained
    c.method_args = {**method_args, "lwf_teacher": lwf_teacher}
    return c


def _flops_per_sample(step_cfg: RunConfig, cache: Path) -> float:
    """Training FLOPs per sample of this step's job, measured once per (model, size, batch, LwF) and cached."""
    from vfmkit.engine import init_distributed
    from vfmkit.methods.registry import build_job
    from vfmkit.methods.tic import train_flops_per_sample

    key = json.dumps(
        [
            step_cfg.model.name,
            step_cfg.data.image_size,
            step_cfg.data.batch_size,
            bool(step_cfg.method_args.get("lwf_teacher")),
        ]
    )
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in table:
        job = build_job(step_cfg, init_distributed())
        batch = next(iter(job.loader))
        table[key] = train_flops_per_sample(job, batch)
        atomic_write_json(cache, table)
    return float(table[key])


def _interpolate(prev: Path, new: Path, alpha: float) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    a, b = load_file(str(prev)), load_file(str(new))
    return {
        k: ((1 - alpha) * a[k].float() + alpha * b[k].float()).to(b[k].dtype)
        if b[k].is_floating_point()
        else b[k]
        for k in b
    }


def evaluate_model(cfg: RunConfig, weights: Path, stream: str) -> list[dict]:
    from vfmkit.engine import init_distributed
    from vfmkit.eval.timematrix import evaluate_steps
    from vfmkit.models.factory import create_clip

    b = create_clip(cfg.model.name, str(weights), image_size=cfg.data.image_size, **cfg.model.kwargs)
    return evaluate_steps(b.model, b.tokenizer, b.preprocess_val, stream, device=init_distributed().device)


def _drop_checkpoints(train_dir: Path) -> None:
    import shutil

    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
        return
    os.replace(tmp, dst)


def _shared_eval(train_dir: Path) -> list[dict]:
    return json.loads((train_dir / "eval.json").read_text())


def run_strategy(
    cfg: RunConfig, strategy: str, out: str | Path, *, stop_at: tuple[int, int] | None = None
) -> dict:
    """Run (or resume) one strategy over every time step; returns its result (also ``result.json``).

    ``cfg`` is a tic recipe: ``train.steps`` is the per-step budget C, ``method_args`` holds the pipeline's keys
    (``TicPipelineArgs``) and the method's. ``stop_at=(t, n)`` stops after ``n`` optimizer steps of step ``t`` (a
    deliberate interruption, as a kill would be) and returns ``{"interrupted": ...}``; rerunning resumes.
    """
    from vfmkit.eval.timematrix import METRICS, heatmap_png, transfer_metrics
    from vfmkit.methods.registry import run

    strat = check_strategy(strategy)
    pargs, margs = pipeline_args(cfg)
    if not pargs.stream:
        raise ConfigError(
            "config key 'method_args.stream': the stream folder is required (vfmkit tic prepare)"
        )
    stream = read_stream(pargs.stream)
    out = Path(out)
    root = out / strategy / f"seed-{cfg.seed}"
    n_steps, C = len(stream["steps"]), cfg.train.steps
    rows: list[dict] = []
    for t in range(n_steps):
        sd = root / f"step-{t:02d}"
        done = sd / "done.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        shared = t == 0  # identical job for every strategy (see the module docstring)
        kind = "all" if shared else strat.mix
        budget = None if kind in ("all", "new") else pargs.replay_budget
        mix = _mix_dir(out, kind, budget, t)
        m = build_mix(pargs.stream, t, kind, mix, budget=budget)
        if m["count"] < cfg.data.batch_size:
            raise ConfigError(f"config key 'data.batch_size': {cfg.data.batch_size} is more than the {m['count']} "
                              f"samples of {strategy}'s mix at step {t}")  # fmt: skip
        prev = root / f"step-{t - 1:02d}" / "model.safetensors" if t > 0 else None
        steps = C * (t + 1) if strat.budget == "cumulative" else C
        train_dir = out / "step0" / f"seed-{cfg.seed}" if shared else sd / "train"
        scfg = _step_cfg(
            cfg,
            margs,
            out_dir=train_dir,
            train=mix,
            steps=steps,
            seed=cfg.seed * 1000 + t,
            pretrained=str(prev) if (strat.warm and prev) else cfg.model.pretrained,
            lwf_teacher=str(prev) if (strat.lwf and prev) else None,
        )
        shared_done = train_dir / "shared.json"
        if shared and shared_done.is_file():  # step 0 trained and scored once, for every strategy
            sh = json.loads(shared_done.read_text())
            steps_run, resumed_from = sh["steps_run"], sh.get("resumed_from")
        else:
            res = run(scfg, stop_after=stop_at[1] if stop_at and stop_at[0] == t else None)
            if res.step < steps:
                return {"interrupted": {"strategy": strategy, "t": t, "step": res.step, "of": steps}}
            # resumed_from: the step of the checkpoint this call resumed from (after a kill), else None
            steps_run, resumed_from = res.step, res.resumed_from
            if shared:
                atomic_write_json(train_dir / "eval.json", evaluate_model(scfg, train_dir / "model.safetensors",
                                                                          pargs.stream))  # fmt: skip
                atomic_write_json(shared_done, {"steps_run": steps_run, "resumed_from": resumed_from})
                _drop_checkpoints(train_dir)
        final = train_dir / "model.safetensors"
        if strat.patch and prev is not None:
            atomic_save_safetensors(sd / "model.safetensors", _interpolate(prev, final, pargs.patch_alpha))
        elif shared:
            _link_or_copy(final, sd / "model.safetensors")
        else:
            os.replace(
                final, sd / "model.safetensors"
            )  # a rerun before done.json rewrites it from the checkpoint
        fps = _flops_per_sample(scfg, out / "flops_per_sample.json")
        samples = steps_run * cfg.data.batch_size * cfg.train.grad_accum
        rec = {
            "t": t,
            "label": stream["steps"][t]["label"],
            "steps_run": steps_run,
            "resumed_from": resumed_from,
            "samples": samples,
            "flops_per_sample": fps,
            "flops": samples * fps,
            "n_mix": m["count"],
            "mix_counts": m["tic_mix"]["tag"]["counts"],
            "warm_start": scfg.model.pretrained,
            "lwf_teacher": scfg.method_args.get("lwf_teacher"),
            "patched": bool(strat.patch and prev),
            "eval": _shared_eval(train_dir)
            if shared
            else evaluate_model(scfg, sd / "model.safetensors", pargs.stream),
        }
        atomic_write_json(done, rec)
        if not shared:
            _drop_checkpoints(
                train_dir
            )  # the step is final: its checkpoints (weights + AdamW state) are not needed
            (train_dir / "model.safetensors").unlink(missing_ok=True)
        rows.append(rec)
    labels = [s["label"] for s in stream["steps"]]
    mats = {
        k: [[r["eval"][j][k] for j in range(n_steps)] for r in rows]
        for k in METRICS
        if k in rows[0]["eval"][0]
    }
    result = {
        "strategy": strategy,
        "seed": cfg.seed,
        "C": C,
        "labels": labels,
        "matrix": mats,
        "transfer": {k: transfer_metrics(E) for k, E in mats.items()},
        "compute_flops": sum(r["flops"] for r in rows),
        "compute_steps": sum(r["steps_run"] for r in rows),
        "steps": [{k: v for k, v in r.items() if k != "eval"} for r in rows],
        "config": to_dict(cfg),
    }
    atomic_write_json(root / "result.json", result)
    heatmap_png(
        mats["retrieval_R@1"],
        labels,
        root / "heatmap.png",
        title=f"{strategy} seed {cfg.seed}: retrieval R@1 (mean i2t/t2i)",
    )
    return result


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per strategy, mean and spread (population std) over seeds of in-domain, backward, forward, final mean
    (retrieval R@1), final zero-shot top-1 and cumulative compute."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["strategy"], []).append(r)
    rows = {}
    for name, rs in by.items():
        row: dict = {"seeds": [r["seed"] for r in rs]}
        vals = {
            k: [r["transfer"]["retrieval_R@1"][k] for r in rs]
            for k in ("in_domain", "backward", "forward", "final_mean")
        }
        if "zeroshot_top1" in rs[0]["transfer"]:
            vals["zeroshot_final_mean"] = [r["transfer"]["zeroshot_top1"]["final_mean"] for r in rs]
            vals["zeroshot_backward"] = [r["transfer"]["zeroshot_top1"]["backward"] for r in rs]
        vals["compute_flops"] = [float(r["compute_flops"]) for r in rs]
        vals["compute_steps"] = [float(r["compute_steps"]) for r in rs]
        for k, v in vals.items():
            v = [x for x in v if x is not None]
            row[k] = statistics.fmean(v) if v else None
            row[f"{k}_std"] = statistics.pstdev(v) if len(v) > 1 else 0.0
            row[f"{k}_all"] = v
        rows[name] = row
    return rows


def run_all(cfg: RunConfig, strategies: list[str], seeds: list[int], out: str | Path) -> dict:
    """Every strategy x seed (each resumable), then the summary (``summary.json``) and the compute plot."""
    from vfmkit.eval.timematrix import compute_plot_png

    for s in strategies:
        check_strategy(s)
    out = Path(out)
    results = []
    for seed in seeds:
        for s in strategies:
            c = copy.deepcopy(cfg)
            c.seed = seed
            results.append(run_strategy(c, s, out))
    summary = {"strategies": summarize(results), "seeds": seeds, "C": cfg.train.steps}
    atomic_write_json(out / "summary.json", summary)
    compute_plot_png(summary["strategies"], out / "compute_vs_accuracy.png")
    return summary


def report(out: str | Path) -> dict:
    """Summary of every finished ``result.json`` under ``out`` (for ``vfmkit tic report``)."""
    from vfmkit.eval.timematrix import compute_plot_png

    out = Path(out)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed-*/result.json"))]
    if not results:
        raise FileNotFoundError(f"no finished TiC runs (*/seed-*/result.json) under {str(out)!r}")
    summary = {"strategies": summarize(results), "seeds": sorted({r["seed"] for r in results})}
    atomic_write_json(out / "summary.json", summary)
    compute_plot_png(summary["strategies"], out / "compute_vs_accuracy.png")
    return summary


def prepare(
    out: str | Path,
    *,
    emoji: str | Path | None = None,
    shards: str | None = None,
    by: str = "year",
    boundaries: list | None = None,
    timestamps_csv: str | None = None,
    eval_frac: float = 0.2,
) -> dict:
    """A stream folder from the emoji source (``emoji``: a folder with ``images.tar`` + ``emoji.csv``; the default
    is the embedded subset) or from any shards with times (``shards``); returns ``stream.json``'s dict."""
    if shards:
        from vfmkit.data.stream import tag_stream

        return tag_stream(shards, out, by=by, boundaries=boundaries, timestamps_csv=timestamps_csv,
                          eval_frac=eval_frac)  # fmt: skip
    from vfmkit.data.builtin import assets_root
    from vfmkit.data.emoji import EMOJI_CUTS, import_emoji

    return import_emoji(emoji or assets_root() / "emoji", out, cuts=tuple(boundaries or EMOJI_CUTS),
                        eval_frac=eval_frac)  # fmt: skip


def format_table(rows: dict[str, dict]) -> str:
    """One line per strategy: in-domain, backward, forward, final mean (retrieval R@1, mean +- std over seeds),
    final zero-shot top-1 and cumulative compute (FLOPs, and relative to Oracle when it ran)."""
    ref = rows.get("oracle", {}).get("compute_flops")
    head = (f"{'strategy':<17} {'in-domain':>12} {'backward':>12} {'forward':>12} {'final mean':>12} "
            f"{'zs final':>12} {'compute':>10} {'x oracle':>8}")  # fmt: skip
    lines = [head]

    def cell(r, k):
        return "n/a" if r.get(k) is None else f"{r[k]:.2f}+-{r.get(k + '_std', 0):.2f}"

    for name, r in rows.items():
        rel = f"{r['compute_flops'] / ref:.3f}" if ref else "n/a"
        lines.append(f"{name:<17} {cell(r, 'in_domain'):>12} {cell(r, 'backward'):>12} {cell(r, 'forward'):>12} "
                     f"{cell(r, 'final_mean'):>12} {cell(r, 'zeroshot_final_mean'):>12} "
                     f"{r['compute_flops']:>10.3g} {rel:>8}")  # fmt: skip
    return "\n".join(lines)


def build_mixes(cfg: RunConfig, strategies: list[str], out: str | Path) -> list[Path]:
    """Write every data mix the strategies need (seed-independent), e.g. before running seeds in parallel."""
    pargs, _ = pipeline_args(cfg)
    n = len(read_stream(pargs.stream)["steps"])
    dirs = []
    for kind in sorted({"all"} | {check_strategy(s).mix for s in strategies}):
        budget = None if kind in ("all", "new") else pargs.replay_budget
        for t in range(1 if kind != "all" else 0, n):
            d = _mix_dir(Path(out), kind, budget, t)
            build_mix(pargs.stream, t, kind, d, budget=budget)
            dirs.append(d)
    return dirs
