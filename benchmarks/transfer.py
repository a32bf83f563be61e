"""Task-oriented knowledge transfer benchmark (issue 14, arXiv:2311.18237).

Imagenette with ``--per-class`` labels per class (fixed by the seed), evaluated on Imagenette val (every
``--val-every``-th image from offset 0; the student's optional fine-tuning is validated on the images at offset 2,
disjoint); teacher = the real EfficientNet-Lite0 fine-tuned on those labels (LP-FT); student = a small timm model
(``--student``) from scratch at ``--image-size``; pool = Flickr8k train (``--flickr`` images) mixed with a minority
of unlabelled Imagenette train (``--imagenette-pool`` images, none of them labelled). Arms, same steps for every
arm (distill + finetune; scratch trains on the labels for the sum): task-oriented on the retrieval-curated set,
task-oriented on a random pool subset of the same size, task-agnostic (feature distillation from the un-tuned
Lite0) on the curated set, CLIP-pretrained (open_clip CLIP on Flickr8k train captions with the student's trunk),
scratch. Every stage is cached under ``benchmarks/.cache/transfer`` (a rerun resumes). The CamVid segmentation
rows come from ``benchmarks/transfer_seg.py`` (its latest record is quoted).

    python benchmarks/transfer.py [DATA_ROOT] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import machine, now, record  # noqa: E402


def build_pool(
    data: Path, cache: Path, n_flickr: int, n_imnette: int, seed: int, per_class: int
) -> list[str]:
    """Pool shard folders: the first ``n_flickr`` Flickr8k train images (splits.json) and ``n_imnette`` Imagenette
    train images drawn by ``seed`` from those not in the labelled subset (written once, reused)."""
    from vfmkit.data.rng import seeded_rng
    from vfmkit.data.samples import read_samples
    from vfmkit.data.shards import ShardWriter
    from vfmkit.pipelines.transfer import select_labelled

    out = []
    for name, n in (("flickr8k", n_flickr), ("imagenette", n_imnette)):
        folder = cache / f"pool-{name}-{n}-s{seed}"
        out.append(str(folder))
        if (folder / "manifest.json").is_file():
            continue
        if name == "flickr8k":
            train = {
                Path(x).stem for x in json.loads((data / "flickr8k" / "splits.json").read_text())["train"]
            }
            items = [s for s in read_samples(str(data / "flickr8k" / "images.tar")) if s.key in train][:n]
        else:
            items = read_samples(str(data / "imagenette" / "train.tar"))
            labelled = {s.key for s in select_labelled(items, per_class, seed)}
            items = sorted((s for s in items if s.key not in labelled), key=lambda s: s.key)
            items = seeded_rng("transfer-pool", seed).sample(items, n)
        tmp = folder.with_suffix(".tmp")
        with ShardWriter(tmp, prefix="pool", max_count=2000) as w:
            for i, s in enumerate(items):
                w.write({"__key__": f"p{i:07d}", "jpg": s.image, "json": {"uid": s.key.replace("/", "_")}})
        tmp.replace(folder)
    return out


def import_clip_data(data: Path, cache: Path, limit: int) -> str:
    """Flickr8k train images with their 5 captions as caption shards (the CLIP-pretraining arm's data), once."""
    from vfmkit.data.importer import import_captions

    out = cache / f"flickr8k-train-captions-{limit or 'all'}"
    if not (out / "manifest.json").is_file():
        names = sorted(json.loads((data / "flickr8k" / "splits.json").read_text())["train"])
        tmp = out.with_suffix(".tmp")
        import_captions(
            data / "flickr8k" / "images.tar",
            data / "flickr8k" / "captions.csv",
            tmp,
            shard_size=1000,
            names=names[: limit or None],
        )
        tmp.replace(out)
    return str(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--flickr", type=int, default=3000)
    ap.add_argument("--imagenette-pool", type=int, default=600)
    ap.add_argument("--val-every", type=int, default=4)
    ap.add_argument("--teacher-size", type=int, default=128)
    ap.add_argument("--student", default="resnet10t")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--n-aug", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--arms", default="task,random,feature,clip,scratch")
    ap.add_argument(
        "--clip-images", type=int, default=0, help="Flickr8k train images for the CLIP arm (0: all)"
    )
    ap.add_argument(
        "--finetune-keep",
        default="better",
        choices=["always", "better"],
        help="better: keep the student's fine-tuning only if it helps on val[2::val_every] (disjoint from "
        "the reported val[::val_every])",
    )
    ap.add_argument("--teacher-ft-steps", type=int, default=100)
    ap.add_argument("--teacher-ft-lr", type=float, default=3e-4)
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache" / "transfer"))
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from vfmkit.pipelines.transfer import TransferOptions, run_transfer

    data, cache = Path(a.data), Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows, times = {}, {}
    t_all = time.perf_counter()
    for seed in [int(s) for s in a.seeds.split(",")]:
        pool = build_pool(data, cache, a.flickr, a.imagenette_pool, seed, a.per_class)
        base = dict(
            out=str(cache / f"seed{seed}"),
            labelled=str(data / "imagenette" / "train.tar"),
            val=str(data / "imagenette" / "val.tar"),
            val_every=a.val_every,
            pool=pool,
            per_class=a.per_class,
            label_seed=seed,
            seed=seed,
            teacher=f"efficientnet-lite0@{a.teacher_size}",
            k=a.k,
            n_aug=a.n_aug,
            student=a.student,
            image_size=a.image_size,
            distill_steps=a.distill_steps,
            finetune_steps=a.finetune_steps,
            batch_size=a.batch_size,
            teacher_ft_steps=a.teacher_ft_steps,
            finetune_keep=a.finetune_keep,
            select_offset=2,
            teacher_ft_lr=a.teacher_ft_lr,
        )
        arms = {
            "task": dict(distill="task", curation="retrieval"),
            "random": dict(distill="task", curation="random"),
            "feature": dict(distill="feature", curation="retrieval"),
            "scratch": dict(distill="none"),
            "clip": dict(distill="clip"),
        }
        if "clip" in a.arms.split(","):
            arms["clip"]["clip_data"] = import_clip_data(data, cache, a.clip_images)
        for arm in a.arms.split(","):
            t0 = time.perf_counter()
            rep = run_transfer(TransferOptions(**{**base, **arms[arm]}))
            rows[(seed, arm)] = rep
            times[(seed, arm)] = {k: v.get("seconds") for k, v in rep["stages"].items()}
            print(
                f"seed {seed} {arm}: top1 {rep['top1']} ({time.perf_counter() - t0:.0f} s) "
                f"{json.dumps(times[(seed, arm)])}",
                flush=True,
            )
    seeds = sorted({s for s, _ in rows})
    lines = [
        f"pool: Flickr8k train {a.flickr} + unlabelled Imagenette train {a.imagenette_pool} "
        f"({100 * a.imagenette_pool / (a.flickr + a.imagenette_pool):.0f}% in-domain); {a.per_class} labels/class; "
        f"student {a.student}@{a.image_size} from scratch; distill {a.distill_steps} + finetune "
        f"{a.finetune_steps} steps (scratch: {a.distill_steps + a.finetune_steps}), batch {a.batch_size}; "
        f"val every {a.val_every}th Imagenette val image; seeds {seeds}",
        "| seed | teacher LP | teacher LP-FT | task (curated) | task (random) | task-agnostic | CLIP-pretrained | "
        "scratch | task before student FT | student FT kept | curated set |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = {"task_vs_agnostic": [], "task_vs_scratch": [], "curated_vs_random": []}
    for s in seeds:
        r = {arm: rows.get((s, arm)) for arm in ("task", "random", "feature", "clip", "scratch")}
        t = r["task"]["stages"]
        comp = t["build-transfer-set"]["composition"]
        top = {k: (v["top1"] if v else None) for k, v in r.items()}
        kept = ", ".join(
            f"{k}: {v['stages']['finetune-student'].get('kept', 'finetuned')}" for k, v in r.items() if v
        )
        lines.append(
            f"| {s} | {t['finetune-teacher'].get('lp_top1')} | {t['finetune-teacher'].get('ft_top1')} | "
            f"{top['task']} | {top['random'] or 'not run'} | {top['feature'] or 'not run'} | "
            f"{top['clip'] or 'not run'} | {top['scratch'] or 'not run'} | {t['finetune-student']['top1_before_finetune']} | "
            f"{kept} | {comp['n']} ({json.dumps(comp['per_source'])}) |"
        )
        for key, other in (
            ("task_vs_agnostic", "feature"),
            ("task_vs_scratch", "scratch"),
            ("curated_vs_random", "random"),
        ):
            floors[key].append(None if top[other] is None else round(top["task"] - top[other], 2))
    need = {"task_vs_agnostic": 2, "task_vs_scratch": 10, "curated_vs_random": 2}
    # a floor whose arm did not run is not met (null in the margins)
    met = {k: bool(v) and all(d is not None and d >= need[k] for d in v) for k, v in floors.items()}
    lines.append("margins (points; null: arm not run): " + json.dumps(floors))
    lines.append("floors (>= 2, >= 10, >= 2 on every seed): " + json.dumps(met))
    lines.append("stage seconds: " + json.dumps({f"{s}/{arm}": v for (s, arm), v in times.items()}))
    lines.append(f"total wall {time.perf_counter() - t_all:.0f} s")
    missing = [
        arm for arm in ("task", "random", "feature", "clip", "scratch") if arm not in a.arms.split(",")
    ]
    lines.append(f"not run: arms {missing}")
    seg_path = ROOT / "benchmarks" / "results" / "transfer_seg.json"
    seg = json.loads(seg_path.read_text()) if seg_path.is_file() else None
    lines.append(
        "segmentation rows (CamVid val mIoU; benchmarks/transfer_seg.py, recorded "
        f"{seg['date'] if seg else 'never'}): {seg['headline'] if seg else 'not run'}"
    )
    text = "\n".join(lines)
    print(text)

    def _m(k):
        v = [d for d in floors[k] if d is not None]
        return f"{min(v):.1f}" if v else "not run"

    res = {
        "headline": (
            f"{len(seeds)} seed(s): task-oriented minus task-agnostic {_m('task_vs_agnostic')} pts, minus scratch "
            f"{_m('task_vs_scratch')}, curated minus random {_m('curated_vs_random')} (min over seeds)"
        ),
        "floor": {"task_vs_agnostic": 2, "task_vs_scratch": 10, "curated_vs_random": 2},
        "floor_met": bool(all(met.values())),
        "floors_met": met,
        "margins": floors,
        "seeds": seeds,
        "rows": {
            f"{s}/{arm}": {
                "top1": r["top1"],
                "stages": {
                    k: {kk: vv for kk, vv in v.items() if kk != "dir"} for k, v in r["stages"].items()
                },
            }
            for (s, arm), r in rows.items()
        },
        "segmentation": (
            {k: seg.get(k) for k in ("headline", "floor", "floor_met", "date", "mIoU", "margins")}
            if seg
            else None
        ),
        "date": now(),
        "machine": machine(),
    }
    if not a.no_record:
        record("transfer", res, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
