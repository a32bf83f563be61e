"""Dense-prediction benchmark (issue 12): CamVid val mIoU of frozen-tower probes, the dense teacher, and the
caption-quality study.

Rows (CamVid val, 101 images at 240x180, void ignored; linear = per-pixel linear probe, aspp = light
DeepLabV3-style head, both on the FROZEN tower, fitted through the one engine on the 367 train images):

- a random tower (EfficientNet-Lite0 architecture, fresh weights, BN statistics from the train images);
- the real ImageNet-pretrained EfficientNet-Lite0;
- the dense teacher (``vfmkit train camvid_teacher``): its own val mIoU, and probes on its fine-tuned tower;
- the caption study: the same tiny CLIP student (``vfm-tiny-cnn``, 64 px) pretrained on Flickr8k train with
  (a) the human captions, (b) synthetic captions of the project's tiny CoCa captioner (trained here on the
  same Flickr8k train captions), (c) degraded captions (the bag of nouns of each human caption), same steps and
  seeds; each tower also through Flickr8k val retrieval and Imagenette val zero-shot.

Floors: pretrained Lite0 linear probe >= random tower + 10 mIoU; dense teacher >= 40 mIoU. The caption study has
no floor: it is reported with its seeds and their spread, whatever it shows.

    python benchmarks/dense.py [--data ../shared/data] [--teacher runs/camvid_teacher] [--seeds 1 2 3]

Every stage caches its output under ``--work`` (default ``benchmarks/.cache/dense``): a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/
from _record import machine, now, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("human", "synthetic", "nouns")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data


def import_data(data: Path, work: Path) -> dict[str, str]:
    from vfmkit.data.dense import import_dense
    from vfmkit.data.importer import import_captions, import_class_folders

    d = work / "data"
    out = {
        k: str(d / k) for k in ("camvid_train", "camvid_val", "flickr_train", "flickr_val", "imagenette_val")
    }
    classes = data / "camvid" / "classes.json"
    for split in ("train", "val"):
        if not (d / f"camvid_{split}" / "manifest.json").is_file():
            import_dense(data / "camvid" / f"{split}.tar", d / f"camvid_{split}", classes=classes)
    splits = json.loads((data / "flickr8k" / "splits.json").read_text())
    for split in ("train", "val"):
        if not (d / f"flickr_{split}" / "manifest.json").is_file():
            import_captions(
                data / "flickr8k" / "images.tar",
                data / "flickr8k" / "captions.csv",
                d / f"flickr_{split}",
                names=splits[split],
                max_size=64,
            )
    if not (d / "imagenette_val" / "manifest.json").is_file():
        import_class_folders(data / "imagenette" / "val.tar", d / "imagenette_val", max_size=64)
    return out


# ------------------------------------------------------------------------------------------------ probes


def probe(
    tower: str,
    paths: dict,
    work: Path,
    name: str,
    head: str,
    steps: int,
    random_init: bool = False,
    seed: int = 0,
) -> dict:
    from vfmkit.methods.seg import dense_probe

    t = time.perf_counter()
    lr = 1e-3 if head == "linear" else 2e-3
    m = dense_probe(
        tower,
        paths["camvid_train"],
        paths["camvid_val"],
        out_dir=work / "probes" / f"{name}_{head}",
        head=head,
        random_init=random_init,
        steps=steps,
        lr=lr,
        batch_size=16,
        seed=seed,
    )
    log(
        f"probe {name} {head}: mIoU {m['mIoU']:.2f} pixel acc {m['pixel_acc']:.2f} ({time.perf_counter() - t:.0f} s)"
    )
    return {k: v for k, v in m.items() if not k.startswith("n_")}


def teacher_eval(teacher: Path, paths: dict) -> dict | None:
    from vfmkit.data.dense import dense_info
    from vfmkit.eval.dense import evaluate_segmentation, load_dense_model
    from vfmkit.methods.seg import ordered_dense_loader

    if not (teacher / "model.safetensors").is_file():
        log(f"no dense teacher at {teacher} (run: vfmkit train camvid_teacher)")
        return None
    model = load_dense_model(teacher)
    info = dense_info(paths["camvid_val"])
    loader = ordered_dense_loader(paths["camvid_val"], 16, None, info["num_classes"], info["void"])
    return evaluate_segmentation(model, loader, info["num_classes"], info["void"], info["classes"])


# ------------------------------------------------------------------------------------------------ caption study


def caption_sets(
    paths: dict, work: Path, captioner_steps: int, n_syn: int, n_images: int | None, seq_len: int
) -> dict[str, str]:
    """Three Flickr8k train shard sets, the same images and keys, differing only in their captions.

    ``n_images``: the first N train images in shard order (None: all 6,091); the captioner trains on all of them.
    """
    from vfmkit.config import load_config
    from vfmkit.data.shards import iter_shard, list_shards
    from vfmkit.methods.captions import caption_shards, load_captioner, read_captions_jsonl
    from vfmkit.pipelines.captioner import train_captioner

    cdir = work / (f"captions_n{n_images}" if n_images else "captions")
    sets = {
        "human": str(cdir / "human") if n_images else paths["flickr_train"],
        "synthetic": str(cdir / "synthetic"),
        "nouns": str(cdir / "nouns"),
    }
    cap_dir = work / "captioner"
    if not (cap_dir / "captioner" / "captioner.json").is_file():
        t = time.perf_counter()
        cfg = load_config(
            "coca_tiny",
            [
                f"data.train={paths['flickr_train']}",
                f"train.steps={captioner_steps}",
                f"out_dir={cap_dir}",
                "train.progress=false",
            ],
        )
        train_captioner(cfg, out_dir=cap_dir)
        log(f"captioner trained ({captioner_steps} steps, {time.perf_counter() - t:.0f} s)")
    samples = [s for u in list_shards(paths["flickr_train"]) for s in iter_shard(u)][: n_images or None]
    metas = [json.loads(s["json"]) for s in samples]
    if n_images and not (Path(sets["human"]) / "manifest.json").is_file():
        _write_set(samples, metas, [m["captions"] for m in metas], sets["human"], "human")
    syn_file = cdir / "synthetic.jsonl"
    if not syn_file.is_file():
        t = time.perf_counter()
        caption_shards(
            load_captioner(str(cap_dir / "captioner")),
            list_shards(sets["human"]),
            syn_file,
            n=n_syn,
            batch_size=64,
            seq_len=seq_len,
        )
        log(f"synthetic captions written ({time.perf_counter() - t:.0f} s)")
    syn = read_captions_jsonl(syn_file)
    if not (Path(sets["nouns"]) / "manifest.json").is_file():
        from vfmkit.text.nouns import CaptionTagger

        t = time.perf_counter()
        tagger = CaptionTagger(backend="spacy", compounds=False)
        flat = [c for m in metas for c in m["captions"]]
        nouns = iter(tagger.nouns(flat))
        bags = []
        for m in metas:
            per = [" ".join(sorted(set(next(nouns)))) for _ in m["captions"]]
            bags.append([b for b in per if b] or ["photo"])
        _write_set(samples, metas, bags, sets["nouns"], "nouns")
        log(f"noun-bag captions written ({time.perf_counter() - t:.0f} s)")
    if not (Path(sets["synthetic"]) / "manifest.json").is_file():
        _write_set(samples, metas, [syn[m["uid"]] for m in metas], sets["synthetic"], "synthetic")
    return sets


def _write_set(samples: list, metas: list, captions: list, out: str, kind: str) -> None:
    import hashlib

    from vfmkit.data.shards import ShardWriter

    with ShardWriter(out, max_count=1000, extra={"kind": "captions", "captions_from": kind}) as w:
        for s, m, caps in zip(samples, metas, captions, strict=True):
            assert hashlib.sha256(s["jpg"]).hexdigest() == m["sha256"], m["uid"]
            w.write(
                {"__key__": s["__key__"], "jpg": s["jpg"], "txt": caps[0], "json": {**m, "captions": caps}}
            )


def train_student(train: str, work: Path, name: str, seed: int, steps: int, batch: int) -> Path:
    from vfmkit.config import load_config
    from vfmkit.methods.registry import run

    out = work / "students" / name
    if not (out / "model.safetensors").is_file():
        t = time.perf_counter()
        cfg = load_config(
            "clip_tiny",
            [
                "model.name=vfm-tiny-cnn",
                f"data.train={train}",
                f"seed={seed}",
                f"train.steps={steps}",
                f"data.batch_size={batch}",
                f"out_dir={out}",
                "train.progress=false",
                "train.tensorboard=false",
                "train.ckpt_every=50",
                f"optim.warmup_steps={max(1, steps // 10)}",
            ],
        )
        run(cfg)
        log(f"student {name} trained ({steps} steps x {batch}, {time.perf_counter() - t:.0f} s)")
    return out


def student_eval(
    run_dir: Path, paths: dict, work: Path, name: str, probe_steps: int, heads: list[str]
) -> dict:
    try:
        from vfmkit.eval.clip import evaluate_clip
    except ImportError:  # before issue 11 moved it out of the command
        from vfmkit.commands.eval import evaluate_clip
    from vfmkit.data.builtin import builtin_path
    from vfmkit.data.io import atomic_write_json
    from vfmkit.models.factory import create_clip

    cache = run_dir / "eval_dense_bench.json"
    res = json.loads(cache.read_text()) if cache.is_file() else {}
    if "retrieval/t2i_R@1" not in res:
        bundle = create_clip("vfm-tiny-cnn", str(run_dir / "model.safetensors"))
        classes = str(Path(builtin_path("imagenette")) / "classes.json")
        res.update(
            evaluate_clip(
                bundle, ["retrieval", "zeroshot"], paths["flickr_val"], paths["imagenette_val"], None, classes
            )
        )
        atomic_write_json(cache, res)
    for head in heads:
        if f"seg_{head}/mIoU" not in res:
            m = probe(
                f"openclip:vfm-tiny-cnn:{run_dir / 'model.safetensors'}", paths, work, name, head, probe_steps
            )
            res.update({f"seg_{head}/{k}": v for k, v in m.items()})
            atomic_write_json(cache, res)
    return res


def spread(xs: list[float]) -> dict:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "values": xs,
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "dense")
    ap.add_argument("--teacher", type=Path, default=ROOT / "runs" / "camvid_teacher")
    ap.add_argument("--probe-steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--clip-steps", type=int, default=150)
    ap.add_argument("--clip-batch", type=int, default=32)
    ap.add_argument("--captioner-steps", type=int, default=200)
    ap.add_argument("--n-syn", type=int, default=2, help="synthetic captions per image")
    ap.add_argument(
        "--study-images", type=int, default=None, help="study: first N Flickr8k train images (all)"
    )
    ap.add_argument("--syn-seq-len", type=int, default=30, help="study: max tokens of a synthetic caption")
    ap.add_argument("--study-heads", nargs="+", default=["linear", "aspp"])
    ap.add_argument(
        "--study-probe-steps",
        type=int,
        default=None,
        help="probe steps of the study (default: --probe-steps)",
    )
    ap.add_argument(
        "--zeroshot-data",
        default=None,
        help="zero-shot shards of the study (default: the whole Imagenette val, imported from --data)",
    )
    ap.add_argument("--skip-study", action="store_true")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help="caption sets of the study to run (a final run of all of them reuses cached results)",
    )
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["probes", "teacher", "study"],
        help="which parts to run (separate processes may run disjoint parts at once; a final run of "
        "all parts reuses their cached results)",
    )
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    t_all, cpu0 = time.perf_counter(), time.process_time()
    work = args.work
    paths = import_data(args.data, work)
    log("data ready")

    rows: dict[str, dict] = {}
    for name, init in (("random_lite0", True), ("lite0", False)) if "probes" in args.parts else ():
        for head in ("linear", "aspp"):
            rows.setdefault(name, {})[head] = probe(
                "efficientnet-lite0", paths, work, name, head, args.probe_steps, random_init=init
            )
    teacher = teacher_eval(args.teacher, paths) if "teacher" in args.parts else None
    if teacher is not None:
        rows["dense_teacher"] = {"own": {k: v for k, v in teacher.items() if not k.startswith("n_")}}
        for head in ("linear", "aspp"):
            rows["dense_teacher"][head] = probe(
                str(args.teacher), paths, work, "dense_teacher", head, args.probe_steps
            )
    cpu_probes = time.process_time() - cpu0

    study: dict[str, dict] = {}
    if not args.skip_study and "study" in args.parts:
        cpu1 = time.process_time()
        # reference: the same student architecture untrained (random weights, BN statistics from CamVid train)
        study["untrained"] = {
            f"seg_linear/{k}": spread([v])
            for k, v in probe(
                "openclip:vfm-tiny-cnn",
                paths,
                work,
                "untrained_tiny_cnn",
                "linear",
                args.study_probe_steps or args.probe_steps,
                random_init=True,
            ).items()
            if "/" not in k
        }
        sets = caption_sets(
            paths, work, args.captioner_steps, args.n_syn, args.study_images, args.syn_seq_len
        )
        for v in args.variants:
            per_seed = []
            for seed in args.seeds:
                name = f"clip_{v}_n{args.study_images}_s{seed}" if args.study_images else f"clip_{v}_s{seed}"
                run_dir = train_student(sets[v], work, name, seed, args.clip_steps, args.clip_batch)
                r = student_eval(
                    run_dir,
                    paths | {"imagenette_val": args.zeroshot_data or paths["imagenette_val"]},
                    work,
                    name,
                    args.study_probe_steps or args.probe_steps,
                    args.study_heads,
                )
                per_seed.append(r)
                log(
                    f"{name}: "
                    + ", ".join(
                        f"{k} {r[k]:.2f}"
                        for k in sorted(r)
                        if "/iou/" not in k and ("mIoU" in k or "R@1" in k or "top1" in k)
                    )
                )
            keys = [k for k in per_seed[0] if "/iou/" not in k and isinstance(per_seed[0][k], (int, float))]
            study[v] = {k: spread([r[k] for r in per_seed]) for k in keys}
        study["_cpu_s"] = time.process_time() - cpu1

    if "probes" not in args.parts:
        print(json.dumps(study, indent=1))
        return 0
    lite_lin, rnd_lin = rows["lite0"]["linear"]["mIoU"], rows["random_lite0"]["linear"]["mIoU"]
    teach = rows.get("dense_teacher", {}).get("own", {}).get("mIoU")
    floor_probe = lite_lin >= rnd_lin + 10
    floor_teacher = teach is not None and teach >= 40
    lines = [
        "CamVid val mIoU (101 images, 240x180, void ignored); probes on frozen towers, fitted through the engine",
        "| tower | linear probe mIoU | aspp head mIoU | own (fine-tuned) |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        own = f"{r['own']['mIoU']:.2f}" if "own" in r else "-"
        lines.append(f"| {name} | {r['linear']['mIoU']:.2f} | {r['aspp']['mIoU']:.2f} | {own} |")
    lines.append(
        f"pretrained Lite0 linear - random linear = {lite_lin - rnd_lin:+.2f} mIoU (floor +10: "
        f"{'met' if floor_probe else 'MISSED'}); dense teacher "
        + (
            f"{teach:.2f} mIoU (floor 40: {'met' if floor_teacher else 'MISSED'})"
            if teach is not None
            else "not found (floor 40: MISSED)"
        )
    )
    if study:
        lines += [
            "",
            f"Caption study: vfm-tiny-cnn CLIP, Flickr8k train, {args.clip_steps} steps x {args.clip_batch}, "
            f"seeds {args.seeds}; mean +- std (min..max) over seeds",
            "| captions | seg linear mIoU | seg aspp mIoU | Flickr8k val t2i R@1 | i2t R@1 | Imagenette zero-shot top1 |",
            "|---|---|---|---|---|---|",
        ]
        for v in [v for v in (*VARIANTS, "untrained") if v in study]:
            s = study[v]

            def f(k, s=s):
                if k not in s:
                    return "-"
                x = s[k]
                return f"{x['mean']:.2f} +- {x['std']:.2f} ({x['min']:.2f}..{x['max']:.2f})"

            lines.append(
                f"| {v} | {f('seg_linear/mIoU')} | {f('seg_aspp/mIoU')} | {f('retrieval/t2i_R@1')} | "
                f"{f('retrieval/i2t_R@1')} | {f('zeroshot/top1')} |"
            )
        lines.append(f"caption study CPU time in this process: {study['_cpu_s']:.0f} s")
    lines.append(
        f"wall {time.perf_counter() - t_all:.0f} s, CPU {time.process_time() - cpu0:.0f} s "
        f"(probes + teacher {cpu_probes:.0f} s)"
    )
    text = "\n".join(lines)
    print(text)
    headline = (
        f"CamVid val mIoU: pretrained Lite0 linear probe {lite_lin:.1f} vs random tower {rnd_lin:.1f} "
        f"({lite_lin - rnd_lin:+.1f}, floor +10); dense teacher "
        + (f"{teach:.1f} (floor 40)" if teach is not None else "missing (floor 40)")
    )
    if study:
        headline += "; caption study seg linear mIoU " + ", ".join(
            f"{v} {study[v]['seg_linear/mIoU']['mean']:.1f}+-{study[v]['seg_linear/mIoU']['std']:.1f}"
            for v in VARIANTS
            if v in study and "seg_linear/mIoU" in study[v]
        )
    result = {
        "headline": headline,
        "floor": {"lite0_minus_random_linear_mIoU": 10.0, "teacher_mIoU": 40.0},
        "floor_met": bool(floor_probe and floor_teacher),
        "floor_probe_met": bool(floor_probe),
        "floor_teacher_met": bool(floor_teacher),
        "rows": rows,
        "study": study,
        "settings": vars(args)
        | {"data": str(args.data), "work": str(args.work), "teacher": str(args.teacher)},
        "date": now(),
        "machine": machine(),
    }
    if not args.no_record:
        record("dense", result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
