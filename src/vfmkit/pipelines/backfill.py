"""The FastFill backfill simulation (arXiv:2303.04766) as a resumable multi-stage job: cache features with the
old and new encoders, train one transformation h per objective (method ``fastfill`` through
``registry.run_job``), simulate partial backfilling, report. ``vfmkit backfill`` only parses flags.

Steps (each resumable; outputs already on disk are reused):
  cache     encode train/gallery/query with the old and new encoders -> OUT/features/*.safetensors
  train     the new model's frozen head (or a linear probe), then h for each objective (fct, fastfill)
  simulate  backfilling curves (mAP, CMC top-1/top-5 vs fraction backfilled) -> OUT/curves.json
  report    AUC table -> OUT/report.json and OUT/backfill.png
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor

from vfmkit.config import ConfigError, RunConfig, to_dict
from vfmkit.methods.fastfill import (
    FastFillArgs,
    _cache_path,
    _gallery_query,
    _load_role,
    _new_classifier,
    apply_transformation,
    load_transformation,
    parse_args,
    save_transformation,
    step_cache,
    train_transformation,
)

STEPS = ("cache", "train", "simulate", "report")


def step_train(cfg: RunConfig, a: FastFillArgs, out: Path) -> dict:
    """Train one h per objective (skipped when its weights exist); returns the new head's train accuracy."""
    paths = {r: _cache_path(out, r, a) for r in ("old_train", "new_train")}
    old, y = _load_role(paths, "old_train", a.normalize)
    new, _ = _load_role(paths, "new_train", a.normalize)
    w, b = _new_classifier(cfg, a, new, y, out)
    info = {"new_head_train_acc": float(((new @ w.T + b).argmax(1) == y).float().mean()) * 100}
    for obj in a.objectives:
        p = out / f"h_{obj}.safetensors"
        if p.is_file():
            continue
        print(
            f"[backfill] training h ({obj}) on {old.shape[0]} pairs, {tuple(old.shape)} -> {tuple(new.shape)}"
        )
        h = train_transformation(cfg, old, new, y, obj, (w, b), out / "runs" / f"h_{obj}", a)
        save_transformation(h, p)
    return info


def step_simulate(cfg: RunConfig, a: FastFillArgs, out: Path) -> dict:
    """Backfilling curves for every ``a.curves`` entry plus old/old and new/new references."""
    from vfmkit.eval import backfill as bf

    g = _gallery_query(a, out)
    n, ex = g["new_g"].shape[0], a.query == "gallery"
    kw = {"exclude_self": ex, "block_size": a.block_size}
    mapped: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    same_dim = g["old_g"].shape[1] == g["new_g"].shape[1]
    mapped["none"] = (g["old_g"] if same_dim else None, None)  # incompatible spaces: old items unsearchable
    for obj in a.objectives:
        z, s = apply_transformation(load_transformation(out / f"h_{obj}.safetensors"), g["old_g"])
        mapped[obj] = (F.normalize(z, dim=1) if a.normalize else z, s)
    curves = {}
    for c in a.curves:
        h, _, order_name = c.partition("/")
        gal_old, s = mapped[h]
        if order_name == "random":
            order = bf.order_random(n, a.order_seed)
        elif order_name == "sigma":
            order = bf.order_by_uncertainty(s)
        else:
            if gal_old is None:
                raise ConfigError(f"curve {c!r}: no oracle without comparable old features")
            order = bf.order_oracle(g["new_g"], gal_old)
        fr = bf.default_fractions(a.fraction_steps)
        curves[c] = bf.backfill_curve(
            g["new_q"], g["y_q"], g["new_g"], gal_old, g["y_g"], order, fractions=fr, **kw
        )
        print(
            f"[backfill] {c:18s} AUC " + " ".join(f"{m} {v:.2f}" for m, v in curves[c]["auc"].items()),
            flush=True,
        )
    refs = {
        "old/old": bf.retrieval_scores(g["old_q"], g["y_q"], g["old_g"], g["y_g"], **kw),
        "new/new": bf.retrieval_scores(g["new_q"], g["y_q"], g["new_g"], g["y_g"], **kw),
    }
    rho = {}
    for obj in a.objectives:
        z, s = mapped[obj]
        refs[f"{obj}(old)/new"] = bf.retrieval_scores(g["new_q"], g["y_q"], z, g["y_g"], **kw)
        if s is not None:  # does sigma predict the real (oracle) error on the gallery, unseen in training?
            rho[obj] = bf.rank_correlation(s, (g["new_g"] - z).pow(2).sum(1))
    result = {"curves": curves, "references": refs, "n_gallery": n, "n_query": int(g["y_q"].shape[0]),
              "exclude_self": ex, "sigma_error_spearman": rho}  # fmt: skip
    bf.save_report(curves, out / "curves.json", {k: v for k, v in result.items() if k != "curves"})
    return result


def step_report(cfg: RunConfig, a: FastFillArgs, out: Path, extra: dict | None = None) -> dict:
    """``report.json`` (AUC table, references, args) and ``backfill.png`` from ``curves.json``."""
    from vfmkit.eval import backfill as bf

    p = out / "curves.json"
    try:
        sim = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {p} (run the simulate step first): {e}") from e
    auc = {name: c["auc"] for name, c in sim["curves"].items()}
    report = {"auc": auc, **{k: v for k, v in sim.items() if k != "curves"}, "curves": sim["curves"],
              "method_args": asdict(a), "config": to_dict(cfg), **(extra or {})}  # fmt: skip
    bf.save_report(sim["curves"], out / "report.json", {k: v for k, v in report.items() if k != "curves"})
    bf.plot_curves(
        sim["curves"], out / "backfill.png", title=f"Backfilling: {a.old_encoder} -> {a.new_encoder}"
    )
    lines = [f"{'curve':18s} " + " ".join(f"{m:>7s}" for m in bf.METRICS)]
    lines += [f"{n:18s} " + " ".join(f"{v[m]:7.2f}" for m in bf.METRICS) for n, v in auc.items()]
    lines += [
        f"{n:18s} " + " ".join(f"{v[m]:7.2f}" for m in bf.METRICS) for n, v in sim["references"].items()
    ]
    report["table"] = "\n".join(lines)
    print(report["table"], flush=True)
    return report


def run_backfill(
    cfg: RunConfig, steps: list[str] | tuple[str, ...] = STEPS, out_dir: str | Path | None = None
) -> dict:
    """Run the pipeline steps in order under ``out_dir`` (default ``cfg.out_dir``); each step is resumable."""
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise ConfigError(f"unknown backfill step(s) {bad} (known: {', '.join(STEPS)})")
    a = parse_args(cfg)
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if "cache" in steps:
        result["features"] = {k: str(v) for k, v in step_cache(cfg, a, out).items()}
    if "train" in steps:
        result["train"] = step_train(cfg, a, out)
    if "simulate" in steps:
        result["simulate"] = step_simulate(cfg, a, out)
    if "report" in steps:
        result["report"] = step_report(
            cfg, a, out, {"train": result.get("train")} if "train" in result else None
        )
    return result
