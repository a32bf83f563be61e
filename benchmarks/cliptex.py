"""CLIP vs CLIPTeX: the same tiny student (vfm-tiny-vit, 64 px), data, steps and seeds; CLIPTeX adds light heads
trained on stored expert pseudo-labels (the shipped MediaPipe person expert + the CamVid seg teacher).

    python benchmarks/cliptex.py [--data ../shared/data] [--teacher runs/camvid_teacher] [--n-images 1024]
                                 [--steps 200] [--seeds 3]

Stages, each cached under benchmarks/.cache/cliptex (a rerun skips what is done): data (imported as
benchmarks/dense.py does, shared with its cache), pseudo-labels (``vfmkit.pipelines.pseudolabel``: generation
cost per image), CLIP and CLIPTeX students (same seeds; samples/s of each gives the step-overhead ratio), then per
student: Flickr8k val retrieval, Imagenette val zero-shot, and the CamVid val linear-probe mIoU of its image tower
(``methods.seg.dense_probe``, frozen tower). Floors: CLIPTeX's probe mIoU above CLIP's by more than the seed
spread (max of the two std); retrieval R@1 and zero-shot top-1 not below CLIP's by more than the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(msg: str) -> None:
    print(f"[cliptex {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def subset(src: str, out: Path, n: int) -> str:
    from vfmkit.data.shards import ShardWriter, iter_shard, list_shards

    if (out / "manifest.json").is_file():
        return str(out)
    with ShardWriter(out, prefix="shard", max_count=256) as w:
        k = 0
        for u in list_shards(src):
            for raw in iter_shard(u):
                w.write({key: v for key, v in raw.items() if key != "__url__"})
                k += 1
                if k == n:
                    return str(out)
    return str(out)


def train(method: str, train_spec: str, work: Path, seed: int, steps: int, batch: int) -> tuple[Path, float]:
    from vfmkit.config import load_config
    from vfmkit.methods.registry import run

    out = work / "students" / f"{method}_s{seed}"
    done = out / "bench_train.json"
    if done.is_file():
        return out, json.loads(done.read_text())["samples_per_s"]
    recipe = "cliptex_tiny" if method == "cliptex" else "clip_tiny"
    over = [
        f"data.train={train_spec}",
        f"seed={seed}",
        f"train.steps={steps}",
        f"data.batch_size={batch}",
        "data.image_size=64",
        "model.name=vfm-tiny-vit",
        "train.progress=false",
        "train.tensorboard=false",
        f"train.ckpt_every={max(steps // 2, 1)}",
        "train.eval_every=0",
        f"train.log_every={max(steps // 4, 1)}",
        "method_args.caption=random",
        f"out_dir={out}",
    ]
    if method == "cliptex":
        over += ["method_args.weights={person: 1.0, camvid: 1.0}", "method_args.lam=1.0"]
    t = time.perf_counter()
    res = run(load_config(recipe, over))
    log(
        f"trained {method} seed {seed}: {steps} steps in {time.perf_counter() - t:.0f} s "
        f"({res.samples_per_s:.1f} samples/s)"
    )
    done.write_text(json.dumps({"samples_per_s": res.samples_per_s}))
    return out, res.samples_per_s


def evaluate(run_dir: Path, method: str, paths: dict, work: Path, probe_steps: int) -> dict:
    from vfmkit.data.builtin import builtin_path
    from vfmkit.eval.clip import evaluate_clip
    from vfmkit.methods.seg import dense_probe
    from vfmkit.models.factory import create_clip

    cache = run_dir / "bench_eval.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    weights = run_dir / ("clip/model.safetensors" if method == "cliptex" else "model.safetensors")
    bundle = create_clip("vfm-tiny-vit", str(weights))
    classes = str(Path(builtin_path("imagenette")) / "classes.json")
    r = evaluate_clip(
        bundle, ["retrieval", "zeroshot"], paths["flickr_val"], paths["imagenette_val"], None, classes
    )
    m = dense_probe(
        f"openclip:vfm-tiny-vit:{weights}",
        paths["camvid_train"],
        paths["camvid_val"],
        out_dir=work / "probes" / run_dir.name,
        head="linear",
        steps=probe_steps,
        lr=1e-3,
        batch_size=16,
        seed=0,
    )
    res = {
        "R@1": r["retrieval/R@1"]
        if "retrieval/R@1" in r
        else (r["retrieval/t2i_R@1"] + r["retrieval/i2t_R@1"]) / 2,
        "zeroshot_top1": r.get("zeroshot/top1", r.get("zeroshot/acc1")),
        "seg_mIoU": m["mIoU"],
        "raw": {k: v for k, v in r.items() if isinstance(v, (int, float))},
    }
    cache.write_text(json.dumps(res))
    log(
        f"eval {run_dir.name}: R@1 {res['R@1']:.2f} zero-shot {res['zeroshot_top1']} CamVid probe mIoU "
        f"{res['seg_mIoU']:.2f}"
    )
    return res


def spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--teacher", type=Path, default=ROOT / "runs" / "camvid_teacher")
    ap.add_argument("--dense-cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "dense")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "cliptex")
    ap.add_argument("--n-images", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--probe-steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--only-seed",
        type=int,
        default=None,
        help="train/evaluate this seed only and stop (to run seeds in parallel processes; a final "
        "run without it reads every stage from the cache and records)",
    )
    a = ap.parse_args(argv)

    from dense import import_data

    from vfmkit.models.experts import PersonExpert, SegRunExpert
    from vfmkit.pipelines.pseudolabel import PseudoLabelArgs, pseudolabel

    paths = import_data(a.data, a.dense_cache)
    work = a.work
    src = subset(paths["flickr_train"], work / f"flickr_n{a.n_images}", a.n_images)
    pl = work / f"pseudo_n{a.n_images}"
    gen = work / f"pseudo_n{a.n_images}.bench.json"
    if not gen.is_file():
        experts = [PersonExpert(), SegRunExpert(a.teacher, name="camvid")]
        r = pseudolabel(src, pl, experts, PseudoLabelArgs())
        gen.write_text(
            json.dumps({"s_per_image": r["s_per_image"], "storage": r["storage"], "samples": r["samples"]})
        )
    g = json.loads(gen.read_text())
    log(
        f"pseudo-labels: {g['samples']} images, {1000 * g['s_per_image']:.1f} ms/image (both experts); {g['storage']}"
    )

    rows: dict[str, list[dict]] = {"clip": [], "cliptex": []}
    sps: dict[str, list[float]] = {"clip": [], "cliptex": []}
    for seed in range(a.seeds) if a.only_seed is None else [a.only_seed]:
        for method, spec in (("clip", src), ("cliptex", str(pl))):
            run_dir, s = train(method, spec, work, seed, a.steps, a.batch)
            sps[method].append(s)
            rows[method].append(evaluate(run_dir, method, paths, work, a.probe_steps))
    if a.only_seed is not None:
        return 0
    summ = {
        m: {k: spread([float(r[k]) for r in rows[m]]) for k in ("seg_mIoU", "R@1", "zeroshot_top1")}
        for m in rows
    }
    sp = {
        k: max(summ["clip"][k]["std"], summ["cliptex"][k]["std"])
        for k in ("seg_mIoU", "R@1", "zeroshot_top1")
    }
    d = {k: summ["cliptex"][k]["mean"] - summ["clip"][k]["mean"] for k in sp}
    floor_seg = d["seg_mIoU"] > sp["seg_mIoU"]
    floor_ret = d["R@1"] >= -sp["R@1"]
    floor_zs = d["zeroshot_top1"] >= -sp["zeroshot_top1"]
    overhead = statistics.fmean(sps["clip"]) / statistics.fmean(sps["cliptex"])
    lines = [
        f"CLIP vs CLIPTeX, vfm-tiny-vit 64 px, {a.n_images} Flickr8k train images, {a.steps} steps x batch "
        f"{a.batch}, seeds {a.seeds}",
        "| metric | CLIP | CLIPTeX | diff | seed spread | floor |",
        "|---|---|---|---|---|---|",
    ]
    for k, ok, what in (
        ("seg_mIoU", floor_seg, "diff > spread"),
        ("R@1", floor_ret, "diff >= -spread"),
        ("zeroshot_top1", floor_zs, "diff >= -spread"),
    ):
        lines.append(
            f"| {k} | {summ['clip'][k]['mean']:.2f} +- {summ['clip'][k]['std']:.2f} | "
            f"{summ['cliptex'][k]['mean']:.2f} +- {summ['cliptex'][k]['std']:.2f} | {d[k]:+.2f} | {sp[k]:.2f} "
            f"| {what}: {'met' if ok else 'MISSED'} |"
        )
    lines.append(
        f"pseudo-label generation: {1000 * g['s_per_image']:.1f} ms/image (person + CamVid experts, one core, "
        f"incl. decode and PNG encode); {g['storage']}"
    )
    lines.append(
        f"training step overhead: CLIPTeX {overhead:.2f}x CLIP's time per sample (CLIP "
        f"{statistics.fmean(sps['clip']):.1f}, CLIPTeX {statistics.fmean(sps['cliptex']):.1f} samples/s)"
    )
    text = "\n".join(lines)
    from _record import machine, now, record

    res = {
        "headline": f"CamVid probe mIoU CLIPTeX {d['seg_mIoU']:+.2f} vs CLIP (spread {sp['seg_mIoU']:.2f}); "
        f"R@1 {d['R@1']:+.2f}, zero-shot {d['zeroshot_top1']:+.2f}; step overhead {overhead:.2f}x",
        "floor": "seg diff > spread; R@1 and zero-shot diff >= -spread",
        "floor_met": bool(floor_seg and floor_ret and floor_zs),
        "floors": {"seg": bool(floor_seg), "retrieval": bool(floor_ret), "zeroshot": bool(floor_zs)},
        "summary": summ,
        "diff": d,
        "spread": sp,
        "samples_per_s": sps,
        "step_overhead": overhead,
        "generation_ms_per_image": 1000 * g["s_per_image"],
        "storage": g["storage"],
        "settings": vars(a)
        | {
            "data": str(a.data),
            "teacher": str(a.teacher),
            "dense_cache": str(a.dense_cache),
            "work": str(a.work),
        },
        "date": now(),
        "machine": machine(),
    }
    print(text)
    record("cliptex", res, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
