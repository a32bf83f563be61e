"""CLIP vs CLIPTeX: the same tiny student (vfm-tiny-vit, 64 px), data, steps and seeds; CLIPTeX adds light heads
trained on stored expert pseudo-labels (the shipped MediaPipe person expert + the CamVid seg teacher).

    python benchmarks/cliptex.py [--data ../shared/data] [--teacher runs/camvid_teacher] [--n-images 1024]
                                 [--steps 200] [--seeds 3]

Stages, each cached under benchmarks/.cache/cliptex (a rerun skips what is done): data (imported as
benchmarks/dense.py does, shared with its cache), pseudo-labels (``vfmkit.pipelines.pseudolabel``: generation
cost per image), CLIP and CLIPTeX students (same seeds), then per student: Flickr8k val retrieval, Imagenette val
zero-shot, and the CamVid val linear-probe mIoU of its image tower (``methods.seg.dense_probe``, frozen tower).
Person segmentation on the 1000 held-out Flickr8k val images: the shipped person expert's mask (p > 0.5) is the
reference; CLIPTeX's person head is scored against it, and so is CLIP + probe (the frozen CLIP student with a
person head trained on the same pseudo-labels, loss, steps and batch: ``cliptex`` with
``method_args.freeze_clip``), IoU mean over images and pooled (``eval.dense.mask_iou``). Step overhead: CLIP and
CLIPTeX jobs built side by side, interleaved rounds of timed steps (``benchmarks/_paired.py``, as
``mobileclip_overhead.py``), median of the per-round paired ratios (not cached: measured by the recording run).
Floors: CLIPTeX's probe mIoU above CLIP's by more than the seed spread (max of the two std); retrieval R@1 and
zero-shot top-1 not below CLIP's by more than the spread (person IoU and step overhead are reported, no floor).
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
import torch  # noqa: E402

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


RECIPES = {"clip": "clip_tiny", "cliptex": "cliptex_tiny", "probe": "cliptex_tiny"}


def overrides(method: str, train_spec: str, out: Path, seed: int, steps: int, batch: int, clip_run=None):
    """The config overrides of one student (the same data, seed, steps and batch for every method).

    ``probe``: the frozen CLIP student ``clip_run`` + a person head trained on the same pseudo-labels with the
    same loss, steps and optimiser as CLIPTeX's head (the CLIP baseline's person comparator)."""
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
    if method == "probe":
        over += [
            f"model.pretrained={Path(clip_run) / 'model.safetensors'}",
            "method_args.freeze_clip=true",
            "method_args.tasks=[person]",
            "method_args.weights={person: 1.0}",
            "method_args.lam=1.0",
        ]
    return over


def train(
    method: str, train_spec: str, work: Path, seed: int, steps: int, batch: int, clip_run=None
) -> tuple[Path, float]:
    from vfmkit.config import load_config
    from vfmkit.methods.registry import run

    out = work / "students" / f"{method}_s{seed}"
    done = out / "bench_train.json"
    if done.is_file():
        return out, json.loads(done.read_text())["samples_per_s"]
    over = overrides(method, train_spec, out, seed, steps, batch, clip_run)
    t = time.perf_counter()
    res = run(load_config(RECIPES[method], over))
    log(
        f"trained {method} seed {seed}: {steps} steps in {time.perf_counter() - t:.0f} s "
        f"({res.samples_per_s:.1f} samples/s)"
    )
    done.write_text(json.dumps({"samples_per_s": res.samples_per_s}))
    return out, res.samples_per_s


def val_person(flickr_val: str) -> tuple:
    """The held-out Flickr8k val images (``uint8 [N, 3, H, W]``, as imported) and the shipped person expert's
    mask on each (probability > 0.5, at the image size): the reference of the person IoU."""
    from vfmkit.data.decode import decode_uint8
    from vfmkit.data.shards import iter_shard, list_shards
    from vfmkit.models.experts import PersonExpert

    imgs = torch.stack([decode_uint8(raw) for u in list_shards(flickr_val) for raw in iter_shard(u)])
    expert = PersonExpert()
    return imgs, torch.stack([expert(im) > 0.5 for im in imgs])


def person_iou(run_dir: Path, images, ref) -> dict:
    """IoU (mean over images, pooled) of a run's person head (sigmoid > 0.5) against the expert's masks."""
    from vfmkit.eval.dense import mask_iou
    from vfmkit.methods.cliptex import load_cliptex, predict_masks

    cache = run_dir / "bench_person.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model, bundle = load_cliptex(run_dir)
    r = mask_iou(predict_masks(model, bundle, images, "person"), ref)
    res = {k: r[k] for k in ("mean", "pooled", "n_images", "n_empty")}
    cache.write_text(json.dumps(res))
    log(
        f"person IoU {run_dir.name}: mean {res['mean']:.2f} pooled {res['pooled']:.2f} ({res['n_images']} images)"
    )
    return res


def step_overhead(src: str, pl: str, work: Path, batch: int, rounds: int, steps: int, warmup: int) -> dict:
    """Interleaved paired step throughput of CLIP and CLIPTeX (same student, data subset, batch; fresh seed-0
    jobs built through the registry, their real loaders included): samples/s per arm per round and the median of
    the per-round ratios CLIPTeX / CLIP."""
    from _paired import Arm, build, interleave, paired_ratio

    from vfmkit.config import load_config

    arms = []
    for name, method, spec in (("CLIP", "clip", src), ("CLIPTeX", "cliptex", pl)):
        over = overrides(method, spec, work / "overhead" / method, 0, steps, batch)
        arms.append(Arm(name, *build(load_config(RECIPES[method], over))))
    sps = interleave(arms, rounds, steps, warmup)
    ratio, per_round = paired_ratio(sps, "CLIPTeX", "CLIP")
    return {"rounds": sps, "ratio": ratio, "per_round": per_round, "steps": steps, "warmup": warmup}


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
    ap.add_argument("--overhead-rounds", type=int, default=9, help="step overhead: interleaved rounds")
    ap.add_argument(
        "--overhead-steps", type=int, default=12, help="step overhead: timed steps per arm per round"
    )
    ap.add_argument("--overhead-warmup", type=int, default=3)
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
    sps: dict[str, list[float]] = {"clip": [], "cliptex": [], "probe": []}
    iou: dict[str, list[dict]] = {"cliptex": [], "probe": []}
    images, ref = val_person(paths["flickr_val"])
    for seed in range(a.seeds) if a.only_seed is None else [a.only_seed]:
        runs = {}
        for method, spec in (("clip", src), ("cliptex", str(pl))):
            runs[method], s = train(method, spec, work, seed, a.steps, a.batch)
            sps[method].append(s)
            rows[method].append(evaluate(runs[method], method, paths, work, a.probe_steps))
        runs["probe"], s = train("probe", str(pl), work, seed, a.steps, a.batch, clip_run=runs["clip"])
        sps["probe"].append(s)
        for method in iou:
            iou[method].append(person_iou(runs[method], images, ref))
    if a.only_seed is not None:
        return 0
    from vfmkit.eval.dense import mask_iou

    every = mask_iou(torch.ones_like(ref), ref)  # "person everywhere": the IoU of no information
    n_empty_ref = int((ref.flatten(1).sum(1) == 0).sum())
    iou_summ = {m: {k: spread([r[k] for r in iou[m]]) for k in ("mean", "pooled")} for m in iou}
    ov = step_overhead(src, str(pl), work, a.batch, a.overhead_rounds, a.overhead_steps, a.overhead_warmup)
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
    overhead = ov["ratio"]
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
        f"person IoU vs the expert's mask (> 0.5) on {ref.shape[0]} held-out Flickr8k val images "
        f"({ref.shape[-2]}x{ref.shape[-1]}; IoU mean over images, leaving out those where both masks are empty "
        f"(the expert's is empty on {n_empty_ref}), and pooled over all pixels); expert = 100 by definition; "
        f"person everywhere: {every['pooled']:.2f}"
    )
    lines += ["| person head | seed IoU mean | seed IoU pooled | mean | pooled |", "|---|---|---|---|---|"]
    for m, what in (
        ("cliptex", "CLIPTeX (trained jointly)"),
        ("probe", "CLIP + probe (frozen CLIP, same steps)"),
    ):
        per_mean = ", ".join(f"{r['mean']:.2f}" for r in iou[m])
        per_pooled = ", ".join(f"{r['pooled']:.2f}" for r in iou[m])
        sm, sp_ = iou_summ[m]["mean"], iou_summ[m]["pooled"]
        lines.append(
            f"| {what} | {per_mean} | {per_pooled} | {sm['mean']:.2f} +- {sm['std']:.2f} | "
            f"{sp_['mean']:.2f} +- {sp_['std']:.2f} |"
        )
    lines.append(
        f"training step overhead (interleaved, {a.overhead_rounds} rounds x {a.overhead_steps} steps per arm after "
        f"{a.overhead_warmup} warm-up, batch {a.batch}, data loading included): CLIPTeX step throughput = "
        f"{overhead:.3f} of CLIP's ({(1 - overhead) * 100:.1f}% slower); per-round ratios "
        + ", ".join(f"{x:.3f}" for x in ov["per_round"])
    )
    lines.append(
        "samples/s per round: CLIP "
        + ", ".join(f"{x:.1f}" for x in ov["rounds"]["CLIP"])
        + "; CLIPTeX "
        + ", ".join(f"{x:.1f}" for x in ov["rounds"]["CLIPTeX"])
    )
    text = "\n".join(lines)
    from _record import machine, now, record

    res = {
        "headline": f"CamVid probe mIoU CLIPTeX {d['seg_mIoU']:+.2f} vs CLIP (spread {sp['seg_mIoU']:.2f}); "
        f"R@1 {d['R@1']:+.2f}, zero-shot {d['zeroshot_top1']:+.2f}; person IoU vs expert (pooled) CLIPTeX "
        f"{iou_summ['cliptex']['pooled']['mean']:.1f} vs CLIP+probe {iou_summ['probe']['pooled']['mean']:.1f}; "
        f"CLIPTeX step throughput {overhead:.3f} of CLIP's",
        "floor": "seg diff > spread; R@1 and zero-shot diff >= -spread",
        "floor_met": bool(floor_seg and floor_ret and floor_zs),
        "floors": {"seg": bool(floor_seg), "retrieval": bool(floor_ret), "zeroshot": bool(floor_zs)},
        "summary": summ,
        "diff": d,
        "spread": sp,
        "run_samples_per_s": sps,  # whole-run averages (runs not interleaved): not the overhead
        "step_throughput_ratio": overhead,  # CLIPTeX / CLIP samples/s, median of interleaved paired rounds
        "step_overhead": ov,
        "person_iou": {
            "per_seed": iou,
            "summary": iou_summ,
            "person_everywhere": {k: every[k] for k in ("mean", "pooled", "n_images", "n_empty")},
            "n_val_images": int(ref.shape[0]),
            "n_empty_expert_masks": n_empty_ref,
        },
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
