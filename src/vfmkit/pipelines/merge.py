"""SAM-CLIP-style merging as a multi-stage resumable job: Stage I (Head_A probing) -> Stage II (multi-task), the
weight-interpolation baseline (B's weights with the Stage I Head_A <-> a model fine-tuned from them on A's
distillation only, alpha swept 0..1), and the evaluation of every model on both teachers' metrics and zero-shot
segmentation (``vfmkit merge run``).

Every stage is a ``merge`` method run through the one engine (``registry.run_job``), in its own folder under
``out_dir`` (``stage1``, ``stage2``, ``a_only``), so a killed pipeline resumes the stage it was in from its last
checkpoint and skips finished ones; every evaluation is stored (``eval/<name>.json``, atomically) and not redone.
``report.json`` collects them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vfmkit.config import load_config
from vfmkit.data.io import atomic_write_json

__all__ = ["MergeOptions", "run_merge", "interpolate", "held_out_slice", "stage1_steps_for"]


@dataclass
class MergeOptions:
    out_dir: str = "runs/merge"
    teacher_a: str = "offline"
    teacher_b: str = "runs/camvid_teacher"
    train: str = "builtin:flickr8k/train"  # image-text shards (stream A)
    retrieval_val: str = "builtin:flickr8k/heldout"  # A's metric: retrieval on these
    dense_train: str = "builtin:camvid/train"  # stream B (labels unused)
    dense_val: str = "builtin:camvid/val"  # B's metric and zero-shot segmentation
    seed: int = 0
    stage1_steps: int = 100
    stage1_epochs: float = 0.0  # > 0: Stage I runs this many epochs of `train` (overrides stage1_steps)
    batch_stage1: int = 0  # Stage I batch (0: batch_a)
    # Stage I on maps computed once per image (method_args.probe_cache): "auto" = OUT/stage1_cache, "" = none
    # (the full forward every step), or a folder (shared by runs with the same backbone, teacher A and data)
    stage1_cache: str = "auto"
    stage1_eval_every: int = 0  # > 0: A's retrieval R@1 every N Stage I steps (the probe's curve, log.jsonl)
    stage2_steps: int = 200
    baseline_steps: int = 100
    batch_a: int = 16
    batch_b: int = 4
    lr_stage1: float = 8e-4  # the paper's Stage I lr
    lr_stage2: float = 4e-4
    w_b: float = 10.0
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    retrieval_max: int = 0  # evaluate retrieval on the first N images only (0: all)
    zeroshot_val: str = "builtin:imagenette/val"  # A's second metric: zero-shot top-1 on these class shards
    zeroshot_classes: str = ""  # their classes file (eval.zeroshot.class_names_for); empty: found beside them
    # Stage II early stopping on forgetting (methods.merge.ForgettingTracker): probes held out from the evaluation
    stage2_keep: str = "last"  # last | best | tolerance
    forget_every: int = 0  # measure forgetting every N Stage II steps (train.eval_every)
    forget_probe_a: str = ""  # image shards: A's forgetting (cosine distance of Head_A to A)
    forget_probe_b: str = ""  # dense shards: B's forgetting (per-pixel KL of Head_B to B)
    forget_n: int = 32
    forget_tol_b: float = 0.0
    forget_w_a: float = 1.0
    forget_w_b: float = 1.0
    method_args: dict = field(default_factory=dict)  # extra merge method args for every stage


def _stage_cfg(
    o: MergeOptions,
    name: str,
    stage: str,
    steps: int,
    lr: float,
    margs: dict,
    eval_every: int = 0,
    batch: int = 0,
    val: str | None = None,
) -> Any:
    data = {"train": o.train, "batch_size": batch or o.batch_a, "shuffle_buffer": 200}
    if val:
        data["val"] = val
    recipe = {
        "method": "merge",
        "seed": o.seed,
        "out_dir": str(Path(o.out_dir) / name),
        "data": data,
        "optim": {"lr": lr, "weight_decay": 1e-4, "warmup_steps": max(1, steps // 10)},
        "train": {
            "steps": steps,
            "log_every": max(1, steps // 10),
            "progress": False,
            "tensorboard": False,
            "grad_clip": 1.0,
            "ckpt_every": max(10, steps // 4),
            "eval_every": eval_every,
        },
        "method_args": {
            "teacher_a": o.teacher_a,
            "teacher_b": o.teacher_b,
            "dense_train": o.dense_train,
            "batch_b": o.batch_b,
            "w_b": o.w_b,
            "stage": stage,
            **o.method_args,
            **margs,
        },
    }
    return load_config(recipe)


def interpolate(sd0: dict, sd1: dict, alpha: float) -> dict:
    """``(1 - alpha) * sd0 + alpha * sd1`` for floating tensors; integer buffers (BN counters) from ``sd0``."""
    return {k: (v0 * (1 - alpha) + sd1[k] * alpha) if v0.is_floating_point() else v0 for k, v0 in sd0.items()}


def run_merge(o: MergeOptions, log=print) -> dict:
    """Run (or resume) the whole job; returns the report (also ``out_dir/report.json``)."""
    from safetensors.torch import load_file

    from vfmkit.data.dense import dense_info
    from vfmkit.eval.dense import evaluate_segmentation
    from vfmkit.eval.zeroshot import class_names_for, zeroshot_eval_encoders
    from vfmkit.eval.zeroshot_seg import (
        class_text_embeddings,
        evaluate_zeroshot_seg,
        majority_baseline,
        teacher_dense_features,
    )
    from vfmkit.methods.merge import FORGET_FILE, evaluate_merged, load_teacher_b, retrieval_r1
    from vfmkit.methods.registry import run_job
    from vfmkit.methods.seg import ordered_dense_loader
    from vfmkit.models.teachers import load_teacher

    out = Path(o.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = out / "options.json"
    if opts.is_file() and json.loads(opts.read_text(encoding="utf-8")) != json.loads(json.dumps(asdict(o))):
        raise ValueError(f"merge: {out} holds a run with other options (options.json); use a new out_dir")
    atomic_write_json(opts, asdict(o))
    info = dense_info(o.dense_train)
    k, void, names = int(info["num_classes"]), info["void"], info["classes"]
    ta = load_teacher(o.teacher_a)
    tb = load_teacher_b(o.teacher_b, num_classes=k, seed=o.seed)
    teachers = {"teacher_a": ta, "teacher_b": tb}
    memo: dict[str, torch.Tensor] = {}

    def encode_text(texts: list[str]) -> torch.Tensor:  # captions and prompts are embedded once
        todo = [t for t in dict.fromkeys(texts) if t not in memo]
        if todo:
            for t, e in zip(todo, ta.encode_text(todo), strict=True):
                memo[t] = e
        return torch.stack([memo[t] for t in texts])

    class _TextA(torch.nn.Module):  # teacher A seen through the text cache
        embed_dim = ta.embed_dim
        logit_scale = ta.logit_scale

        def encode_text(self, texts):
            return encode_text(texts)

    text_a = _TextA()
    val = o.retrieval_val
    if o.retrieval_max:
        val = _first_n(o.retrieval_val, o.retrieval_max, out / f"retrieval_val_{o.retrieval_max}")

    def cached(name: str, fn) -> dict:
        p = out / "eval" / f"{name}.json"
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
        log(f"merge: evaluating {name}")
        res = fn()
        atomic_write_json(p, res)
        return res

    def dense_batches():
        return ordered_dense_loader(o.dense_val, 16, None, k, void)

    def eval_teachers() -> dict:
        r = retrieval_r1(ta.encode_image, encode_text, val, ta.image_size)
        zc = {}
        if o.zeroshot_val:
            z = zeroshot_eval_encoders(
                ta.encode_image,
                encode_text,
                o.zeroshot_val,
                class_names_for(o.zeroshot_val, o.zeroshot_classes or None),
                ta.image_size,
                ta.logit_scale,
            )
            zc = {f"a/zs_{k_}": v for k_, v in z.items()}
        seg = evaluate_segmentation(tb, dense_batches(), k, void, names)
        text = class_text_embeddings(encode_text, names)
        zs = evaluate_zeroshot_seg(teacher_dense_features(ta), dense_batches(), text, k, void, names)
        maj = majority_baseline(
            (b["mask"] for b in ordered_dense_loader(o.dense_train, 16, None, k, void)),
            (b["mask"] for b in dense_batches()),
            k,
            void,
        )
        return {
            "a/R@1": r["R@1"],
            "a/retrieval": r,
            **zc,
            "b/mIoU": seg["mIoU"],
            "b/pixel_acc": seg["pixel_acc"],
            "zs_teacher_a/mIoU": zs["mIoU"],
            "majority/mIoU": maj["mIoU"],
            "majority/class": names[maj["class"]],
        }

    report: dict[str, Any] = {"options": asdict(o), "teachers": cached("teachers", eval_teachers)}

    times_p = out / "times.json"  # wall seconds of each stage's training run (the first, uninterrupted run)
    times: dict[str, float] = json.loads(times_p.read_text(encoding="utf-8")) if times_p.is_file() else {}

    def train_stage(name, stage, steps, lr, margs, eval_every=0, batch=0, val=None):
        cfg = _stage_cfg(o, name, stage, steps, lr, margs, eval_every, batch, val)
        if not (Path(cfg.out_dir) / "model.safetensors").is_file():
            log(f"merge: stage {name} ({stage}, {steps} steps)")
            t0 = time.perf_counter()
            job, _ = run_job(cfg, build_kwargs=teachers)
            times[name] = time.perf_counter() - t0
            atomic_write_json(times_p, times)
            model = job.model
        else:
            from vfmkit.methods.registry import build_job

            model = build_job(cfg, _one_process(), **teachers).model
            model.load_state_dict(load_file(str(Path(cfg.out_dir) / "model.safetensors")), strict=True)
        return model.eval()

    def eval_model(model) -> dict:
        model.attach_text(text_a)
        return evaluate_merged(
            model,
            text_a,
            retrieval_val=val,
            dense_val=o.dense_val,
            image_size_a=ta.image_size,
            zeroshot_cls=o.zeroshot_val or None,
            zeroshot_classes=o.zeroshot_classes or None,
        )

    b1 = o.batch_stage1 or o.batch_a
    s1_steps = o.stage1_steps
    if o.stage1_epochs > 0:
        s1_steps = stage1_steps_for(o.train, o.stage1_epochs, b1)
    s1_margs = {}
    cache_dir = None
    if o.stage1_cache:
        cache_dir = out / "stage1_cache" if o.stage1_cache == "auto" else Path(o.stage1_cache)
        s1_margs["probe_cache"] = str(cache_dir)
    s1 = train_stage(
        "stage1",
        "probe",
        s1_steps,
        o.lr_stage1,
        s1_margs,
        o.stage1_eval_every,
        b1,
        val if o.stage1_eval_every else None,
    )
    report["stage1"] = cached("stage1", lambda: eval_model(s1))
    report["stage1_steps"] = s1_steps
    report["stage1_curve"] = _eval_curve(out / "stage1" / "log.jsonl")
    if cache_dir is not None and (cache_dir / "cache.json").is_file():
        c = json.loads((cache_dir / "cache.json").read_text(encoding="utf-8"))
        report["stage1_cache"] = {"dir": str(cache_dir), "n": c.get("n"), "build_s": c.get("build_s")}
    init = {"init_from": str(out / "stage1")}
    forget = {}
    if o.stage2_keep != "last" or o.forget_probe_a or o.forget_probe_b:
        forget = {
            "keep": o.stage2_keep,
            "forget_probe_a": o.forget_probe_a,
            "forget_probe_b": o.forget_probe_b,
            "forget_n": o.forget_n,
            "forget_tol_b": o.forget_tol_b,
            "forget_w_a": o.forget_w_a,
            "forget_w_b": o.forget_w_b,
        }
    s2 = train_stage("stage2", "multitask", o.stage2_steps, o.lr_stage2, {**init, **forget}, o.forget_every)
    report["merged"] = cached("stage2", lambda: eval_model(s2))
    fj = out / "stage2" / FORGET_FILE
    if fj.is_file():  # which Stage II step the merged model is, and the forgetting curve
        report["stage2_forgetting"] = json.loads(fj.read_text(encoding="utf-8"))
    ft = train_stage(
        "a_only",
        "a_only",
        o.baseline_steps,
        o.lr_stage2,
        {**init, "lr_mult_backbone": 1.0, "lr_mult_head_b": 1.0, "lr_mult_head_a": 1.0},
    )
    sd0, sd1 = {k_: v.clone() for k_, v in s1.state_dict().items()}, ft.state_dict()
    curve = []
    for alpha in o.alphas:

        def ev(alpha=alpha):
            s1.load_state_dict(interpolate(sd0, sd1, alpha))
            return eval_model(s1)

        if alpha == 0.0:  # (1 - 0) * w0 + 0 * w1 is w0 exactly: the Stage I model, already scored
            res = report["stage1"]
        else:
            res = cached(f"interp_{alpha:g}", ev)
        curve.append({"alpha": alpha, **res})
    s1.load_state_dict(sd0)
    report["interpolation"] = curve
    report["times"] = times
    atomic_write_json(out / "report.json", report)
    return report


def stage1_steps_for(train: str, epochs: float, batch: int) -> int:
    """Steps of ``epochs`` epochs over the shards ``train`` at ``batch`` (full batches, as the loaders drop the
    last partial one)."""
    from vfmkit.data.shards import list_shards, shard_counts

    counts = shard_counts(list_shards(train))
    if counts is None:
        raise ValueError(
            f"merge: stage1_epochs needs sample counts for {train} (a manifest); set stage1_steps"
        )
    per_epoch = sum(counts.values()) // batch
    if per_epoch < 1:
        raise ValueError(f"merge: {train} holds fewer than one batch of {batch}")
    return max(1, round(epochs * per_epoch))


def _eval_curve(log_path: Path) -> list[dict]:
    """The eval lines of a stage's log.jsonl (step and metrics), in step order."""
    if not log_path.is_file():
        return []
    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if any(k.startswith("eval/") for k in r)]


def _one_process():
    from vfmkit.engine.distributed import DistInfo

    return DistInfo()


def _first_n(spec: str, n: int, out: Path, skip: int = 0) -> str:
    """Samples ``skip`` .. ``skip + n - 1`` of ``spec`` (shard order) as shards in ``out`` (written once): the
    first ``n`` by default (the retrieval subset); with ``skip``, e.g. a held-out forgetting probe after it."""
    from vfmkit.data.shards import ShardWriter, iter_shard, list_shards

    if (out / "sizes.json").is_file():
        return str(out)
    with ShardWriter(out, max_count=100000) as w:
        i = 0
        for url in list_shards(spec):
            for s in iter_shard(url):
                if i >= skip + n:
                    break
                if i >= skip:
                    w.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
                i += 1
    return str(out)


def held_out_slice(spec: str, skip: int, n: int, out: str | Path) -> str:
    """Samples ``skip`` .. ``skip + n - 1`` of ``spec`` as shards in ``out`` (e.g. a forgetting probe from the
    val images a ``retrieval_max`` evaluation does not score)."""
    return _first_n(spec, n, Path(out), skip)
