"""Task-oriented knowledge transfer for segmentation (arXiv:2311.18237, vfmkit issue 14 item 5): CamVid val mIoU
of a small student (timm resnet10t from scratch + a light ASPP head fusing its stride-8 map, logits at stride 8;
``--no-low-level``: its stride-32 map only) after

- task-oriented transfer: per-pixel KL to the CamVid-fine-tuned Lite0 teacher's stored outputs on the unlabelled
  CamVid train images (``n_aug`` views each), then supervised fine-tuning on the CamVid train labels;
- task-agnostic transfer: the same views, the student's dense features regress the frozen, un-tuned ImageNet
  Lite0 tower's dense features (1 - cosine per location), then the same fine-tuning;
- scratch: the fine-tuning alone for distill + finetune steps (every arm trains the same number of steps).

All arms start from the same seeded student; the stages are ``vfmkit.pipelines.transfer_seg`` (cached in
``--cache``). Floor: task-oriented > task-agnostic on every seed. Headline: the margins over task-agnostic and
over scratch, min over seeds; the time of each stage is printed.

    python benchmarks/transfer_seg.py [DENSE_DATA_ROOT] --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

ARMS = {"task": "task", "task-agnostic": "feature", "scratch": "none"}


def seg_rows(data_root, cache, seeds, **kw) -> tuple[dict, str]:
    """Run the three arms for each seed on ``data_root/camvid_train`` / ``camvid_val`` -> (rows, text).

    ``rows[(seed, arm)]`` is the pipeline's report; ``kw`` are further ``SegTransferOptions`` fields (e.g. the
    teacher folder, step counts)."""
    from vfmkit.pipelines.transfer_seg import SegTransferOptions, run_seg_transfer

    data_root = Path(data_root)
    base = {
        "out": str(cache),
        "transfer": str(data_root / "camvid_train"),
        "labelled": str(data_root / "camvid_train"),
        "val": str(data_root / "camvid_val"),
        **kw,
    }
    rows: dict = {}
    times: dict = {}
    lines: list[str] = []
    t_all = time.perf_counter()
    for seed in seeds:
        for arm, distill in ARMS.items():
            t0 = time.perf_counter()
            rep = run_seg_transfer(SegTransferOptions(**{**base, "seed": seed, "distill": distill}))
            rows[(seed, arm)] = rep
            times[(seed, arm)] = {
                k: (v.get("seconds"), "cached" if v.get("cached") else "run")
                for k, v in rep["stages"].items()
            }
            line = (
                f"seed {seed} {arm}: mIoU {rep['mIoU']} ({time.perf_counter() - t0:.0f} s) "
                f"{json.dumps(times[(seed, arm)])}"
            )
            print(line, flush=True)
    o = SegTransferOptions(**{**base, "seed": seeds[0]})
    lines += [
        f"transfer set: CamVid train images ({data_root / 'camvid_train'}, labels unused), {o.n_aug} stored views "
        f"each ({o.view[0]}x{o.view[1]} student, {o.teacher_view[0]}x{o.teacher_view[1]} teacher); teacher "
        f"{o.teacher_dir}; student timm {o.student} from scratch + ASPP head (width {o.width}"
        f"{', stride-8 map fused: logits at stride 8' if o.low_level else ', stride-32 map only'}); distill "
        f"{o.distill_steps} + finetune {o.finetune_steps} steps (scratch: {o.distill_steps + o.finetune_steps}), "
        f"batch {o.batch_size}; labelled: CamVid train "
        f"{'all' if not o.labelled_limit else o.labelled_limit}; val mIoU on CamVid val at "
        f"{o.eval_size[0]}x{o.eval_size[1]}; seeds {list(seeds)}",
        "| seed | task-oriented | task-agnostic | scratch | task before FT | task-agnostic before FT |",
        "|---|---|---|---|---|---|",
    ]
    margins: dict[str, list[float]] = {"task_vs_agnostic": [], "task_vs_scratch": []}
    for s in seeds:
        r = {arm: rows[(s, arm)] for arm in ARMS}
        m = {arm: r[arm]["mIoU"] for arm in ARMS}
        lines.append(
            f"| {s} | {m['task']} | {m['task-agnostic']} | {m['scratch']} | "
            f"{r['task']['stages']['finetune-student']['mIoU_before_finetune']} | "
            f"{r['task-agnostic']['stages']['finetune-student']['mIoU_before_finetune']} |"
        )
        margins["task_vs_agnostic"].append(round(m["task"] - m["task-agnostic"], 2))
        margins["task_vs_scratch"].append(round(m["task"] - m["scratch"], 2))
    lines.append("margins (mIoU points): " + json.dumps(margins))
    lines.append(
        "stage seconds (seed/arm: stage: [seconds, run|cached]; a cached stage's seconds are those of its first run): "
        + json.dumps({f"{s}/{arm}": v for (s, arm), v in times.items()})
    )
    lines.append(f"total wall {time.perf_counter() - t_all:.0f} s")
    return {"rows": rows, "margins": margins, "times": times}, "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default=str(ROOT.parent / "runs" / "dense_data"))
    ap.add_argument("--teacher", default=str(ROOT.parent / "runs" / "camvid_teacher"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--n-aug", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--labelled-limit", type=int, default=0)
    ap.add_argument(
        "--no-low-level", action="store_true", help="the student's stride-32 map only (no stride-8 fusion)"
    )
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "transfer_seg"))
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()

    import torch
    from _record import machine, now, record

    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    res, text = seg_rows(
        a.data,
        a.cache,
        seeds,
        teacher_dir=a.teacher,
        distill_steps=a.distill_steps,
        finetune_steps=a.finetune_steps,
        n_aug=a.n_aug,
        batch_size=a.batch_size,
        labelled_limit=a.labelled_limit,
        low_level=not a.no_low_level,
    )
    mg = res["margins"]
    met = bool(mg["task_vs_agnostic"]) and all(d > 0 for d in mg["task_vs_agnostic"])
    text += f"\nfloor (task-oriented > task-agnostic mIoU on every seed): {'met' if met else 'MISSED'}"
    print(text)
    out = {
        "headline": (
            f"CamVid val mIoU, {len(seeds)} seed(s): task-oriented minus task-agnostic "
            f"{min(mg['task_vs_agnostic']):.2f} pts, minus scratch {min(mg['task_vs_scratch']):.2f} pts "
            "(min over seeds)"
        ),
        "floor": "task-oriented > task-agnostic on every seed",
        "floor_met": met,
        "margins": mg,
        "mIoU": {f"{s}/{arm}": r["mIoU"] for (s, arm), r in res["rows"].items()},
        "mIoU_before_finetune": {
            f"{s}/{arm}": r["stages"]["finetune-student"]["mIoU_before_finetune"]
            for (s, arm), r in res["rows"].items()
        },
        "stage_seconds": {f"{s}/{arm}": v for (s, arm), v in res["times"].items()},
        "date": now(),
        "machine": machine(),
    }
    if not a.no_record:
        record("transfer_seg", out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
