"""Dataset Reinforcement on Imagenette at 128 px: plain vs reinforced vs online distillation, equal epochs.

    PYTHONPATH=src python3 benchmarks/dr_imagenette.py [--per-class 40] [--val-per-class 50] [--n-aug 4]
        [--epochs 8] [--seeds 0 1] [--online-seeds 1] [--teacher efficientnet-lite0@128]
        [--student mobilenetv3_small_050]

Real data: a fixed subset of Imagenette train (the first ``--per-class`` images of each class in sorted file
order) and of val (the first ``--val-per-class``), imported with ``import_class_folders`` into
``.cache/bench/dr_imagenette``. The reinforced set is written once by ``vfmkit.pipelines.reinforce`` (the real
ImageNet EfficientNet-Lite0 restricted to Imagenette's 10 classes, ``rrc_flip_ra_re`` at 128 px, top-10,
images stored) and reused by later runs; its generation time is reported separately (one-off).

The three modes are the ``dr_imagenette`` recipe with ``method_args.mode`` switched: same student (from
scratch, same seeded init), optimiser, batch, epochs and augmentation family. Epochs are interleaved (plain,
reinforced, online, plain, ...) through the engine's exact resume (``stop_after`` one epoch, then resume), so
the modes see the same load on this shared CPU; seconds per epoch are the engine's own samples/s of each
one-epoch call, and the median over epochs is compared.

Floors (issue 4): reinforced top-1 >= plain top-1 + 2 points (mean over seeds); reinforced s/epoch <= 1.05 x
plain's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch

from vfmkit.config import derive, load_config
from vfmkit.data.importer import import_class_folders
from vfmkit.data.io import atomic_write_json
from vfmkit.engine import init_distributed, train
from vfmkit.methods.registry import build_job

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # for _record
from _record import machine, now, record  # noqa: E402

ACC_FLOOR, TIME_FLOOR = 2.0, 1.05
MODES = ("plain", "reinforced", "online")


def subset_names(tar_path: Path, per_class: int) -> list[str]:
    """The first ``per_class`` ``<wnid>/<file>`` members of each class, in sorted order (a fixed subset)."""
    with tarfile.open(tar_path) as tf:
        names = sorted(m.name for m in tf if m.isfile() and m.name.count("/") == 1)
    out, seen = [], {}
    for n in names:
        c = n.split("/")[0]
        if seen.get(c, 0) < per_class:
            seen[c] = seen.get(c, 0) + 1
            out.append(n)
    return out


def import_subset(tar_path: Path, out: Path, per_class: int, shards: int = 4) -> int:
    """Import once (a ``subset.json`` records what); returns the sample count."""
    tag = {"source": str(tar_path), "per_class": per_class}
    if (out / "subset.json").is_file() and json.loads((out / "subset.json").read_text()) == tag:
        return json.loads((out / "manifest.json").read_text())["count"]
    shutil.rmtree(out, ignore_errors=True)
    names = subset_names(tar_path, per_class)
    import_class_folders(tar_path, out, shard_size=-(-len(names) // shards), names=names)
    atomic_write_json(out / "subset.json", tag)
    return len(names)


def generate(src: Path, out: Path, args: argparse.Namespace) -> dict:
    """The reinforced set (resumable by the generator itself); returns its one-off generation stats."""
    from vfmkit.data.builtin import parse_class_index
    from vfmkit.pipelines.reinforce import ReinforceArgs, reinforce

    stats_path = out / "generation.json"
    if stats_path.is_file() and (out / "manifest.json").is_file():
        return json.loads(stats_path.read_text())
    rargs = ReinforceArgs(
        mode="classify",
        teachers=[args.teacher],
        n_aug=args.n_aug,
        topk=10,
        images=True,
        class_index=parse_class_index("imagenette"),
        batch_size=64,
        chunk=32,
        recipe={"name": "rrc_flip_ra_re", "size": 128},
    )
    t0 = time.perf_counter()
    res = reinforce(str(src), out, rargs, progress=False)
    secs = time.perf_counter() - t0
    if res["manifest"] is None:
        raise RuntimeError(f"reinforced set {out} is incomplete")
    n = res["manifest"]["count"]
    stats = {
        "seconds": secs,
        "samples": n,
        "n_aug": args.n_aug,
        "teacher": args.teacher,
        "teacher_forwards": n * args.n_aug,
        "ms_per_teacher_forward": 1e3 * secs / max(1, n * args.n_aug),
        "note": "resumed run: seconds cover only this invocation" if res["resumed"] else "",
    }
    atomic_write_json(stats_path, stats)
    return stats


def mode_config(mode: str, seed: int, args: argparse.Namespace, paths: dict, epochs: int):
    """The dr_imagenette recipe with this benchmark's data, student and budget; only the mode differs."""
    sets = {
        "seed": seed,
        "out_dir": str(paths["runs"] / f"{mode}_s{seed}"),
        "model.name": args.student,
        "data.train": str(paths["train"]),
        "data.val": str(paths["val"]),
        "data.batch_size": args.batch,
        "data.image_size": 128,
        "data.shuffle_buffer": 2000,
        "optim.lr": args.lr,
        "optim.warmup_steps": args.warmup,
        "train.progress": False,
        "train.tensorboard": False,
        "train.log_every": 1,
        "method_args.mode": mode,
        "method_args.reinforced": str(paths["dr"]),
        "method_args.epochs": epochs,
    }
    return load_config("dr_imagenette", [f"{k}={v}" for k, v in sets.items()])


def one_epoch(mode: str, seed: int, args: argparse.Namespace, paths: dict, epochs: int) -> dict:
    """Build the job afresh (as a new process would), run one epoch of it (the engine resumes the rest)."""
    cfg = mode_config(mode, seed, args, paths, epochs)
    di = init_distributed()
    job = build_job(cfg, di)
    cfg = job.cfg or cfg  # dr derives train.steps from its epochs
    spe = cfg.train.steps // epochs
    cfg = derive(
        cfg, {"train": {"ckpt_every": spe}}
    )  # a checkpoint at every epoch end: the next call resumes
    res = train(
        cfg,
        job.model,
        job.loss_fn,
        job.loader,
        out_dir=cfg.out_dir,
        eval_fn=job.eval_fn,
        dist_info=di,
        stop_after=spe,
    )
    return {
        "step": res.step,
        "sec_per_epoch": spe * cfg.data.batch_size / res.samples_per_s,
        "final": res.final_logs if res.step == cfg.train.steps else None,
        "train_loss": next((h["loss"] for h in reversed(res.history) if "loss" in h), None),
    }


def run_seed(seed: int, args: argparse.Namespace, paths: dict) -> dict:
    """Interleave the modes epoch by epoch; returns per mode: epoch times and the final eval."""
    modes = [m for m in MODES if m != "online" or seed in args.seeds[: args.online_seeds]]
    for m in modes:
        shutil.rmtree(paths["runs"] / f"{m}_s{seed}", ignore_errors=True)
    out = {m: {"sec_per_epoch": []} for m in modes}
    for e in range(args.epochs):
        for m in modes:
            r = one_epoch(m, seed, args, paths, args.epochs)
            out[m]["sec_per_epoch"].append(r["sec_per_epoch"])
            if r["final"] is not None:
                out[m].update(
                    {k.removeprefix("eval/"): v for k, v in r["final"].items() if k.startswith("eval/")}
                )
            print(
                f"seed {seed} epoch {e + 1}/{args.epochs} {m:10s} {r['sec_per_epoch']:7.1f} s/epoch "
                f"train loss {r['train_loss'] or float('nan'):.3f}",
                flush=True,
            )
    return out


def summarize(per_seed: list[dict], gen: dict, args: argparse.Namespace, counts: dict) -> dict:
    modes = [m for m in MODES if any(m in r for r in per_seed)]
    rows = {}
    for m in modes:
        secs = [s for r in per_seed if m in r for s in r[m]["sec_per_epoch"]]
        runs = [r[m] for r in per_seed if m in r]
        rows[m] = {k: statistics.mean(r[k] for r in runs) for k in ("top1", "ece", "nll")}
        rows[m].update(
            {
                "top1_per_seed": [r["top1"] for r in runs],
                "n_seeds": len(runs),
                "median_sec_per_epoch": statistics.median(secs),
                "sec_per_epoch": secs,
            }
        )
    gain = rows["reinforced"]["top1"] - rows["plain"]["top1"]
    ratio = rows["reinforced"]["median_sec_per_epoch"] / rows["plain"]["median_sec_per_epoch"]
    rf, pl = rows["reinforced"], rows["plain"]
    online = ""
    if "online" in rows:
        on = rows["online"]
        on_ratio = on["median_sec_per_epoch"] / pl["median_sec_per_epoch"]
        online = (
            f"; online distillation {on['top1']:.1f}% at {on_ratio:.2f}x plain's epoch time "
            f"({on['n_seeds']} seed)"
        )
    headline = (
        f"Imagenette 128 px, {args.student} from scratch, {args.epochs} epochs, "
        f"{counts['train']} train imgs, seeds {args.seeds}: reinforced {rf['top1']:.1f}% vs plain "
        f"{pl['top1']:.1f}% top-1 ({gain:+.1f} pts), ECE {rf['ece']:.1f} vs {pl['ece']:.1f}; "
        f"epoch time ratio reinforced/plain {ratio:.3f}{online}"
    )
    floor = {"top1_gain_pts": ACC_FLOOR, "epoch_time_ratio_max": TIME_FLOOR}
    return {
        "headline": headline,
        "floor": floor,
        "floor_met": bool(gain >= ACC_FLOOR and ratio <= TIME_FLOOR),
        "floor_detail": {
            "top1_gain_pts": gain,
            "top1_gain_met": bool(gain >= ACC_FLOOR),
            "epoch_time_ratio": ratio,
            "epoch_time_met": bool(ratio <= TIME_FLOOR),
        },
        "modes": rows,
        "generation": gen,
        "setup": {**vars(args), **counts},
        "seeds": per_seed,
        "date": now(),
        "machine": f"{machine()}, load avg {os.getloadavg()[0]:.1f} at end",
    }


def report(res: dict) -> str:
    lines = [f"{'mode':10s} {'top1 %':>7s} {'ECE %':>7s} {'NLL':>6s} {'s/epoch (median)':>17s}"]
    for m, r in res["modes"].items():
        lines.append(
            f"{m:10s} {r['top1']:7.2f} {r['ece']:7.2f} {r['nll']:6.3f} {r['median_sec_per_epoch']:17.1f}"
        )
    g = res["generation"]
    lines.append(
        f"reinforced set generation (one-off): {g['seconds']:.0f} s for {g['samples']} images x "
        f"{g['n_aug']} augmentations ({g['ms_per_teacher_forward']:.0f} ms per teacher forward, "
        f"{g['teacher']}) {g.get('note', '')}".rstrip()
    )
    d = res["floor_detail"]
    lines.append(res["headline"])
    lines.append(
        f"floors: top-1 gain {d['top1_gain_pts']:+.2f} >= {ACC_FLOOR} pts: {d['top1_gain_met']}; "
        f"epoch time ratio {d['epoch_time_ratio']:.3f} <= {TIME_FLOOR}: {d['epoch_time_met']}"
    )
    lines.append(f"date {res['date']}, machine {res['machine']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "imagenette")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench" / "dr_imagenette")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--n-aug", type=int, default=4)
    ap.add_argument("--teacher", default="efficientnet-lite0@128")
    ap.add_argument("--student", default="mobilenetv3_small_050")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--online-seeds",
        type=int,
        default=1,
        help="run online distillation for the first N seeds only (~3x an epoch here); 0: skip it",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: best on an oversubscribed CPU)")
    ap.add_argument("--no-record", dest="record", action="store_false", help="do not write results files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = args.work
    paths = {
        "train": w / f"train_{args.per_class}",
        "val": w / f"val_{args.val_per_class}",
        "runs": w / "runs",
        "dr": w / f"dr_{args.per_class}_{args.n_aug}_{args.teacher.replace('@', '_')}",
    }
    counts = {
        "train": import_subset(args.data / "train.tar", paths["train"], args.per_class),
        "val": import_subset(args.data / "val.tar", paths["val"], args.val_per_class),
    }
    print(f"data: {counts['train']} train / {counts['val']} val images (Imagenette, 128 px)", flush=True)
    gen = generate(paths["train"], paths["dr"], args)
    print(f"reinforced set: {gen['samples']} x {gen['n_aug']} in {gen['seconds']:.0f} s", flush=True)
    per_seed = [run_seed(s, args, paths) for s in args.seeds]
    res = summarize(per_seed, gen, args, counts)
    text = report(res)
    print(text)
    if args.record:
        res["setup"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in res["setup"].items()}
        record("dr_imagenette", res, text)


if __name__ == "__main__":
    main()
