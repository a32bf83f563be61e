"""SAM-CLIP-style merging benchmark (issue 15): one backbone keeping teacher A's retrieval and teacher B's CamVid
segmentation, vs the weight-interpolation baseline, and zero-shot segmentation from text.

    python benchmarks/merge.py [--shards runs/dense_data] [--teacher-b runs/camvid_teacher] [--seeds 0 1]

Teacher A: the shipped offline CLIP teacher; teacher B: the CamVid seg run (``vfmkit train camvid_teacher``).
Shards (made by ``vfmkit data import``, see docs/dense.md and docs/merge.md from ``../shared/data``):
``SHARDS/flickr_train`` (stream A), ``SHARDS/flickr_val`` (A's retrieval, first ``--retrieval-max`` images),
``SHARDS/camvid_train`` (stream B, labels unused), ``SHARDS/camvid_val`` (B's mIoU, zero-shot segmentation).
Each seed runs ``vfmkit.pipelines.merge.run_merge`` in its own single-thread process (resumable: a rerun reuses
finished stages and evaluations under ``--work``).

Floors: the merged model keeps >= 90% of A's mean retrieval R@1 and >= 95% of B's CamVid mIoU at once; no alpha
of the interpolation baseline keeps both; merged zero-shot CamVid mIoU above teacher A's own dense features' and
above the majority-class baseline. All on the mean over seeds (each seed shown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def one_seed(a: argparse.Namespace, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    from vfmkit.pipelines.merge import MergeOptions, run_merge

    s = Path(a.shards)
    o = MergeOptions(
        out_dir=str(Path(a.work) / f"seed{seed}"),
        teacher_b=a.teacher_b,
        train=str(s / "flickr_train"),
        retrieval_val=str(s / "flickr_val"),
        dense_train=str(s / "camvid_train"),
        dense_val=str(s / "camvid_val"),
        seed=seed,
        stage1_steps=a.stage1_steps,
        stage1_epochs=a.stage1_epochs,
        batch_stage1=a.batch_stage1,
        stage1_cache="" if a.no_stage1_cache else str(Path(a.work) / "stage1_cache"),  # shared by the seeds
        stage1_eval_every=a.stage1_eval_every,
        stage2_steps=a.stage2_steps,
        baseline_steps=a.baseline_steps,
        batch_a=a.batch_a,
        batch_b=a.batch_b,
        retrieval_max=a.retrieval_max,
        stage2_keep=a.stage2_keep,
        forget_every=a.forget_every,
        forget_probe_a=_probe_a(a),
        forget_probe_b=_probe_b(a),
        forget_n=a.forget_n,
        forget_tol_b=a.forget_tol_b,
        forget_w_a=a.forget_w_a,
        forget_w_b=a.forget_w_b,
        lr_stage1=a.lr_stage1,
        lr_stage2=a.lr_stage2,
        method_args={"lr_mult_backbone": a.lr_mult_backbone, "lr_mult_head_b": a.lr_mult_head_b},
    )
    run_merge(o, log=lambda m: print(f"[seed {seed}] {m}", flush=True))


def _forgetting_on(a: argparse.Namespace) -> bool:
    return a.stage2_keep != "last" or a.forget_every > 0


def _probe_a(a: argparse.Namespace) -> str:
    """A's forgetting probe: Flickr8k val images after the ``--retrieval-max`` the evaluation scores."""
    return str(Path(a.work) / f"probe_a_{a.retrieval_max}_{a.forget_n}") if _forgetting_on(a) else ""


def _probe_b(a: argparse.Namespace) -> str:
    """B's forgetting probe: CamVid train images (labels unused; the evaluation scores CamVid val only)."""
    return str(Path(a.shards) / "camvid_train") if _forgetting_on(a) else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default=str(ROOT / "runs" / "dense_data"))
    p.add_argument("--teacher-b", default=str(ROOT / "runs" / "camvid_teacher"))
    p.add_argument("--work", default=str(ROOT / "benchmarks" / ".cache" / "merge"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--stage1-steps", type=int, default=30)
    p.add_argument("--stage1-epochs", type=float, default=0.0, help="> 0: Stage I epochs (overrides steps)")
    p.add_argument("--batch-stage1", type=int, default=0, help="Stage I batch (0: --batch-a)")
    p.add_argument(
        "--no-stage1-cache",
        action="store_true",
        help="Stage I without the cached maps (full forward per step)",
    )
    p.add_argument(
        "--stage1-eval-every", type=int, default=0, help="A's R@1 every N Stage I steps (the curve)"
    )
    p.add_argument("--stage2-keep", default="last", choices=("last", "best", "tolerance"))
    p.add_argument("--forget-every", type=int, default=0, help="measure forgetting every N Stage II steps")
    p.add_argument("--forget-n", type=int, default=32)
    p.add_argument("--forget-tol-b", type=float, default=0.0)
    p.add_argument("--forget-w-a", type=float, default=1.0)
    p.add_argument("--forget-w-b", type=float, default=1.0)
    p.add_argument("--stage2-steps", type=int, default=60)
    p.add_argument("--baseline-steps", type=int, default=30)
    p.add_argument("--lr-stage1", type=float, default=8e-4, help="Stage I lr (the paper's 8e-4)")
    p.add_argument("--lr-stage2", type=float, default=4e-4, help="Stage II and A-only baseline base lr")
    p.add_argument(
        "--lr-mult-backbone", type=float, default=0.1, help="Stage II lr multiplier of the shared backbone"
    )
    p.add_argument("--lr-mult-head-b", type=float, default=0.1, help="Stage II lr multiplier of Head_B")
    p.add_argument("--batch-a", type=int, default=8)
    p.add_argument("--batch-b", type=int, default=4)
    p.add_argument("--retrieval-max", type=int, default=200)
    p.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one_seed is not None:
        one_seed(a, a.one_seed)
        return
    for need in ("flickr_train", "flickr_val", "camvid_train", "camvid_val"):
        if not (Path(a.shards) / need).is_dir():
            sys.exit(
                f"benchmarks/merge.py: no shards {Path(a.shards) / need} (vfmkit data import, docs/merge.md)"
            )
    if _forgetting_on(a):  # the held-out A probe, made once before the seeds start
        from vfmkit.pipelines.merge import held_out_slice

        held_out_slice(str(Path(a.shards) / "flickr_val"), a.retrieval_max, a.forget_n, _probe_a(a))
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--one-seed", str(s)], env=env)
        for s in a.seeds
    ]
    if any(pr.wait() != 0 for pr in procs):
        sys.exit("benchmarks/merge.py: a seed's run failed (rerun resumes it)")
    reports = [json.loads((Path(a.work) / f"seed{s}" / "report.json").read_text()) for s in a.seeds]
    report(a, reports, time.time() - t0)


def _mean(xs):
    return sum(xs) / len(xs)


def _zs(m: dict) -> str:
    """Imagenette zero-shot top-1 of one evaluation ('-' in a report from before it was measured)."""
    return f"{m['a/zs_top1']:.2f}" if "a/zs_top1" in m else "-"


def report(a, reports, wall: float) -> None:
    from _record import machine, now, record

    r0 = reports[0]
    s1_steps = r0.get("stage1_steps", a.stage1_steps)
    b1 = a.batch_stage1 or a.batch_a
    s1_what = f"{s1_steps} steps of batch {b1}" + (
        f" ({a.stage1_epochs:g} epochs)" if a.stage1_epochs > 0 else ""
    )
    cache = r0.get("stage1_cache")
    s1_what += f" on cached maps of {cache['n']} images" if cache else " (uncached: full forward per step)"
    keep = (
        f"; Stage II keep={a.stage2_keep} on forgetting every {a.forget_every} steps"
        if _forgetting_on(a)
        else ""
    )
    lines = [
        f"SAM-CLIP-style merge on CPU: Stage I {s1_what}, lr {a.lr_stage1:g}; Stage II {a.stage2_steps} steps, "
        f"lr {a.lr_stage2:g} (backbone x{a.lr_mult_backbone:g}, Head_B x{a.lr_mult_head_b:g}), A-only "
        f"baseline {a.baseline_steps} (batch A {a.batch_a}, B {a.batch_b}){keep}; seeds {a.seeds}; "
        f"wall {wall / 60:.1f} min",
        "",
        "| seed | model | A R@1 (keep) | A Imagenette zero-shot top-1 | B mIoU (keep) | zero-shot mIoU |",
        "|---|---|---|---|---|---|",
    ]
    per = []
    for s, r in zip(a.seeds, reports, strict=True):
        t = r["teachers"]
        ra, rb = t["a/R@1"], t["b/mIoU"]
        lines.append(
            f"| {s} | teacher A / B | {ra:.2f} | {_zs(t)} | {rb:.2f} | A's own dense: "
            f"{t['zs_teacher_a/mIoU']:.2f}, majority ({t['majority/class']}): {t['majority/mIoU']:.2f} |"
        )
        rows = [("Stage I (probe)", r["stage1"]), ("merged (Stage II)", r["merged"])]
        rows += [(f"interp alpha={c['alpha']:g}", c) for c in r["interpolation"]]
        for name, m in rows:
            lines.append(
                f"| {s} | {name} | {m['a/R@1']:.2f} ({m['a/R@1'] / ra:.3f}) | {_zs(m)} | {m['b/mIoU']:.2f} "
                f"({m['b/mIoU'] / rb:.3f}) | {m['zs/mIoU']:.2f} |"
            )
        kept = r.get("stage2_forgetting", {})
        if "kept_step" in kept:
            lines.append(
                f"| {s} | (Stage II kept step {kept['kept_step']} of {kept['last_step']}: {kept['why']}) "
                "| | | | |"
            )
        per.append(
            {
                "seed": s,
                "zs_top1": r["merged"].get("a/zs_top1"),
                "zs_top1_teacher_a": t.get("a/zs_top1"),
                "keep_a": r["merged"]["a/R@1"] / ra,
                "keep_b": r["merged"]["b/mIoU"] / rb,
                "zs": r["merged"]["zs/mIoU"],
                "zs_teacher_a": t["zs_teacher_a/mIoU"],
                "majority": t["majority/mIoU"],
                "curve": [
                    {"alpha": c["alpha"], "keep_a": c["a/R@1"] / ra, "keep_b": c["b/mIoU"] / rb}
                    for c in r["interpolation"]
                ],
            }
        )
    keep_a, keep_b = _mean([p["keep_a"] for p in per]), _mean([p["keep_b"] for p in per])
    zs, zs_a, maj = (
        _mean([p["zs"] for p in per]),
        _mean([p["zs_teacher_a"] for p in per]),
        _mean([p["majority"] for p in per]),
    )
    have_zs = all(p["zs_top1"] is not None and p["zs_top1_teacher_a"] is not None for p in per)
    zs_top1 = _mean([p["zs_top1"] for p in per]) if have_zs else None
    zs_top1_a = _mean([p["zs_top1_teacher_a"] for p in per]) if have_zs else None
    alphas = [c["alpha"] for c in per[0]["curve"]]
    curve = [
        {
            "alpha": al,
            "keep_a": _mean([p["curve"][i]["keep_a"] for p in per]),
            "keep_b": _mean([p["curve"][i]["keep_b"] for p in per]),
        }
        for i, al in enumerate(alphas)
    ]
    both_interp = [c["alpha"] for c in curve if c["keep_a"] >= 0.90 and c["keep_b"] >= 0.95]
    floors = {
        "merged keeps >= 0.90 of A's R@1 and >= 0.95 of B's mIoU": keep_a >= 0.90 and keep_b >= 0.95,
        "no interpolation alpha keeps both": not both_interp,
        "merged zero-shot mIoU > teacher A's own and > majority": zs > zs_a and zs > maj,
    }
    lines += [
        "",
        f"mean over seeds: merged keeps {keep_a:.3f} of A's R@1 (floor 0.90) and {keep_b:.3f} of B's mIoU "
        f"(floor 0.95); zero-shot mIoU merged {zs:.2f} vs teacher A's own {zs_a:.2f} vs majority {maj:.2f}",
        *(
            [
                f"Imagenette zero-shot top-1 (A's second metric): merged {zs_top1:.2f} vs teacher A {zs_top1_a:.2f}"
            ]
            if zs_top1 is not None
            else []
        ),
        "interpolation curve (mean keep A / keep B): "
        + ", ".join(f"alpha {c['alpha']:g}: {c['keep_a']:.3f}/{c['keep_b']:.3f}" for c in curve),
        *[f"floor {'met' if v else 'MISSED'}: {k}" for k, v in floors.items()],
    ]
    lines += ["", "Stage I probe curve (A's mean R@1 on the retrieval val, keep = / teacher A's):"]
    for s, r in zip(a.seeds, reports, strict=True):
        ra = r["teachers"]["a/R@1"]
        pts = [e for e in r.get("stage1_curve", []) if "eval/a/R@1" in e]
        if pts:
            lines.append(
                f"  seed {s}: "
                + ", ".join(
                    f"step {e['step']} (epoch {e['step'] * b1 / cache['n']:.1f}): {e['eval/a/R@1']:.2f} "
                    f"({e['eval/a/R@1'] / ra:.3f})"
                    if cache
                    else f"step {e['step']}: {e['eval/a/R@1']:.2f} ({e['eval/a/R@1'] / ra:.3f})"
                    for e in pts
                )
            )
    lines += ["", "stage wall times (s, per seed; the seeds ran in parallel on the shared cores):"]
    for s, r in zip(a.seeds, reports, strict=True):
        t = r.get("times", {})
        c = r.get("stage1_cache") or {}
        lines.append(
            f"  seed {s}: "
            + ", ".join(f"{k} {v:.0f}" for k, v in t.items())
            + (f"; Stage I cache built once for both seeds in {c['build_s']:.0f}" if c.get("build_s") else "")
        )
    text = "\n".join(lines)
    print(text)
    record(
        "merge",
        {
            "headline": f"merged backbone keeps {keep_a:.3f} of A's retrieval R@1 and {keep_b:.3f} of B's CamVid mIoU; "
            f"zero-shot CamVid mIoU {zs:.2f} (teacher A {zs_a:.2f}, majority {maj:.2f})",
            "floor": {"keep_a": 0.90, "keep_b": 0.95},
            "floor_met": bool(all(floors.values())),
            "floors": floors,
            "keep_a": keep_a,
            "keep_b": keep_b,
            "zeroshot_mIoU": zs,
            "zeroshot_teacher_a_mIoU": zs_a,
            "majority_mIoU": maj,
            "imagenette_zeroshot_top1": zs_top1,
            "imagenette_zeroshot_top1_teacher_a": zs_top1_a,
            "interpolation_curve": curve,
            "interpolation_alphas_keeping_both": both_interp,
            "stage1": {
                "steps": s1_steps,
                "batch": b1,
                "epochs": a.stage1_epochs,
                "cache": cache,
                "curves": {str(s): r.get("stage1_curve", []) for s, r in zip(a.seeds, reports, strict=True)},
            },
            "stage2_forgetting": {
                str(s): r.get("stage2_forgetting") for s, r in zip(a.seeds, reports, strict=True)
            },
            "times": {str(s): r.get("times") for s, r in zip(a.seeds, reports, strict=True)},
            "args": vars(a),
            "per_seed": per,
            "wall_s": wall,
            "date": now(),
            "machine": machine(),
        },
        text,
    )


if __name__ == "__main__":
    main()
