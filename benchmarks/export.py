"""Deployment export: image-tower latency of MobileCLIP-S0's MCi0 (256 px) vs ViT-B-16 (224 px), exported the
same way, against PyTorch eager; fp32 / int8 sizes on disk; parity of the exported graphs on the embedded data.

Latency (one CPU thread, batch 1 and batch 32, all arms in one run, interleaved round by round, medians):
- MCi0 eager as trained (multi-branch MobileOne / RepMixer blocks), MCi0 eager reparameterised, MCi0 ONNX
  without reparameterisation, MCi0 ONNX reparameterised (what ``vfmkit export`` writes), MCi0 ONNX int8;
- ViT-B-16 eager, ONNX, ONNX int8 (nothing to reparameterise).
Both towers carry random weights (no CLIP weights install offline here): latency does not depend on the values.
MCi0 is built from open_clip's ``MobileCLIP2-S0`` config, whose image tower is MobileCLIP-S0's MCi0 at 256 px.
Floor: the reparameterised MCi0 export is >= 1.5x faster than its un-reparameterised eager model at batch 1.
The MCi0 / ViT-B-16 ratio is reported beside the paper's (a phone, image + text, MobileCLIP-S0 vs ViT-B/16).

Parity (exported fp32 and int8 graphs vs eager on the embedded Flickr8k held-out / Imagenette val shards):
``--parity-run`` a trained vfmkit run dir (real trained weights: accuracy deltas mean something), and the
MobileCLIP2-S0 architecture with random weights (embedding agreement only: its accuracy is chance).

    python benchmarks/export.py [--rounds 5] [--reps 5] [--parity-run runs/clip_tiny_cnn] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _record import machine, now, record  # noqa: E402

NAME = "export"
FLOOR = 1.5  # reparameterised MCi0 export vs un-reparameterised eager, batch 1
MCI0, VIT = "MobileCLIP2-S0", "ViT-B-16"
PAPER = (
    "MobileCLIP paper: MobileCLIP-S0 about 5x faster than ViT-B/16 (image + text latency on an iPhone, as "
    "issue 19 quotes it; not re-checked here); abstract: MobileCLIP-S2 2.3x faster than the previous best "
    "ViT-B/16 CLIP"
)


def export_image(name: str, bundle, out: Path, reparam: bool) -> dict:
    """The image tower exported as ``vfmkit export`` does (int8 beside it), or without reparameterisation."""
    from vfmkit.models.export import export_clip

    return export_clip(
        bundle.model,
        bundle.tokenizer,
        out,
        name=name,
        image_size=bundle.image_size,
        mean=bundle.mean,
        std=bundle.std,
        towers=("image",),
        quantize="int8" if reparam else None,
        reparam=reparam,
        source={"kind": "open_clip", "pretrained": None, "weights": "random"},
    )


def timed(fn, x, reps: int) -> float:
    """Median seconds of ``reps`` calls."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def latency(args, work: Path) -> tuple[dict, dict, str]:
    from vfmkit.models.export import load_export, reparameterize
    from vfmkit.models.factory import create_clip

    torch.manual_seed(0)
    mci = create_clip(MCI0)
    vit = create_clip(VIT)
    mci.model.eval()
    vit.model.eval()
    deploy, n_rep = reparameterize(mci.model)
    t0 = time.perf_counter()
    man = {
        "mci0": export_image(MCI0, mci, work / "mci0", reparam=True),
        "mci0_noreparam": export_image(MCI0, mci, work / "mci0_noreparam", reparam=False),
        "vit_b16": export_image(VIT, vit, work / "vit_b16", reparam=True),
    }
    export_s = time.perf_counter() - t0
    ex = {k: load_export(work / k, threads=1) for k in man}
    ex8 = {k: load_export(work / k, "int8", threads=1) for k in ("mci0", "vit_b16")}

    def eager(m):
        def f(x):
            with torch.no_grad():
                return m.encode_image(x)

        return f

    def onnx(e):
        return lambda x: e.image.run(x.numpy())

    arms = {  # name -> (callable, image size)
        "mci0/eager": (eager(mci.model), 256),
        "mci0/eager_reparam": (eager(deploy), 256),
        "mci0/onnx_noreparam": (onnx(ex["mci0_noreparam"]), 256),
        "mci0/onnx": (onnx(ex["mci0"]), 256),
        "mci0/onnx_int8": (onnx(ex8["mci0"]), 256),
        "vit_b16/eager": (eager(vit.model), 224),
        "vit_b16/onnx": (onnx(ex["vit_b16"]), 224),
        "vit_b16/onnx_int8": (onnx(ex8["vit_b16"]), 224),
    }
    g = torch.Generator().manual_seed(0)
    inputs = {(s, b): torch.randn(b, 3, s, s, generator=g) for s in (224, 256) for b in args.batches}
    for fn, s in arms.values():  # warm-up (allocators, onnxruntime's first-run planning)
        for b in args.batches:
            fn(inputs[(s, b)])
    per_round: dict[str, list[float]] = {f"{a}@{b}": [] for a in arms for b in args.batches}
    names = list(arms)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate so no arm always runs first
        for b in args.batches:
            for a in order:
                fn, s = arms[a]
                per_round[f"{a}@{b}"].append(
                    timed(fn, inputs[(s, b)], args.reps if b == 1 else args.reps_large)
                )
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    ms = {k: 1000 * statistics.median(v) for k, v in per_round.items()}
    spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in per_round.items()}
    sizes = {
        f"{k}/{f}": e["bytes"] for k, m in man.items() for f, e in m["files"].items() if f.endswith(".onnx")
    }
    res = {
        "ms": ms,
        "per_round_relative_spread": spread,
        "sizes_bytes": sizes,
        "reparameterized_modules_mci0": n_rep,
        "export_seconds_3_image_towers": export_s,
        "params_m": {
            "mci0": sum(p.numel() for p in mci.model.visual.parameters()) / 1e6,
            "mci0_reparam": sum(p.numel() for p in deploy.visual.parameters()) / 1e6,
            "vit_b16": sum(p.numel() for p in vit.model.visual.parameters()) / 1e6,
        },
    }
    lines = [
        "image tower latency, 1 thread, ms per call (median over rounds; random weights):",
        f"{'arm':24s} " + " ".join(f"{'batch ' + str(b):>12s}" for b in args.batches),
    ]
    for a in arms:
        lines.append(f"{a:24s} " + " ".join(f"{ms[f'{a}@{b}']:12.1f}" for b in args.batches))
    ratios = {}
    for b in args.batches:
        ratios[f"mci0_export_vs_eager_noreparam@{b}"] = ms[f"mci0/eager@{b}"] / ms[f"mci0/onnx@{b}"]
        ratios[f"mci0_eager_reparam_vs_eager@{b}"] = ms[f"mci0/eager@{b}"] / ms[f"mci0/eager_reparam@{b}"]
        ratios[f"mci0_onnx_reparam_vs_onnx_noreparam@{b}"] = (
            ms[f"mci0/onnx_noreparam@{b}"] / ms[f"mci0/onnx@{b}"]
        )
        ratios[f"vit_b16_export_vs_eager@{b}"] = ms[f"vit_b16/eager@{b}"] / ms[f"vit_b16/onnx@{b}"]
        ratios[f"vit_b16_over_mci0_onnx@{b}"] = ms[f"vit_b16/onnx@{b}"] / ms[f"mci0/onnx@{b}"]
        ratios[f"vit_b16_over_mci0_onnx_int8@{b}"] = ms[f"vit_b16/onnx_int8@{b}"] / ms[f"mci0/onnx_int8@{b}"]
        ratios[f"vit_b16_over_mci0_eager@{b}"] = ms[f"vit_b16/eager@{b}"] / ms[f"mci0/eager_reparam@{b}"]
    res["ratios"] = ratios
    lines.append("")
    lines += [f"{k:44s} {v:6.2f}x" for k, v in ratios.items()]
    lines.append("")
    lines.append(
        "sizes on disk (image towers): " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
    )
    return res, man, "\n".join(lines)


def parity_section(args, work: Path) -> tuple[dict, str]:
    from vfmkit.models.export import export_model

    out, lines = (
        {},
        [
            "",
            "parity, exported graphs (onnxruntime) vs PyTorch eager, embedded Flickr8k held-out "
            "(retrieval) and Imagenette val (zero-shot):",
        ],
    )
    cases = []
    if args.parity_run:
        cases.append(("run:" + Path(args.parity_run).name, args.parity_run))
    cases.append((f"{MCI0} (random weights)", MCI0))
    for label, spec in cases:
        t0 = time.perf_counter()
        m, par = export_model(spec, work / f"parity_{len(out)}", quantize="int8", check_parity=True)
        out[label] = {
            "model": m["model"],
            "reparameterized_modules": m["reparameterized_modules"],
            "sizes_bytes": {f: e["bytes"] for f, e in m["files"].items() if f.endswith(".onnx")},
            "parity": par,
            "seconds": time.perf_counter() - t0,
        }
        for v, p in par.items():
            lines.append(
                f"{label} [{v}]: image emb max|d| {p['image_embeddings']['max_abs_diff']:.2e} min cos "
                f"{p['image_embeddings']['min_cosine']:.6f}; text emb max|d| {p['text_embeddings']['max_abs_diff']:.2e}"
                f" min cos {p['text_embeddings']['min_cosine']:.6f}; "
                + "; ".join(
                    f"{k} {d['eager']:.2f} -> {d['export']:.2f} ({d['delta']:+.2f})"
                    for k, d in {**p["retrieval"], **{"zs_top1": p["zeroshot"]["top1"]}}.items()
                )
            )
        lines.append(
            f"{label}: sizes "
            + ", ".join(f"{f} {b / 2**20:.1f} MiB" for f, b in out[label]["sizes_bytes"].items())
        )
    return out, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5, help="calls per arm per round at batch 1")
    p.add_argument("--reps-large", type=int, default=1, help="calls per arm per round at batch 32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument(
        "--parity-run", default=None, help="a trained vfmkit run dir to export and check for parity"
    )
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--work", default=None, help="where exports are written (default: a temporary directory)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="vfmkit-export-bench-"))
    res, _, text = latency(args, work)
    print(text, flush=True)
    par, ptext = ({}, "") if args.no_parity else parity_section(args, work)
    print(ptext)
    r = res["ratios"]
    b1 = r["mci0_export_vs_eager_noreparam@1"]
    vit_over = r.get("vit_b16_over_mci0_onnx@1")
    result = {
        "headline": (
            f"MCi0 (MobileCLIP-S0 image tower, 256 px) reparameterised ONNX export vs its "
            f"un-reparameterised eager model, batch 1, 1 CPU thread: {b1:.2f}x (floor {FLOOR}x); "
            f"ViT-B-16 (224 px) / MCi0 exported image-tower latency {vit_over:.2f}x at batch 1, "
            f"{r.get('vit_b16_over_mci0_onnx@32', float('nan')):.2f}x at batch 32 (paper: about 5x, "
            f"phone, image+text); random weights"
        ),
        "floor": FLOOR,
        "floor_met": bool(b1 >= FLOOR),
        "paper": PAPER,
        "weights": "random (latency does not depend on the values)",
        "exporter": "torch.onnx.export(dynamo=True), opset 18, onnxruntime CPUExecutionProvider, 1 intra-op thread",
        "rounds": args.rounds,
        "reps": args.reps,
        "reps_large": args.reps_large,
        **res,
        "parity": par,
        "date": now(),
        "machine": machine(),
    }
    full = (
        text + ("\n" + ptext if ptext else "") + f"\n\n{result['headline']}\nfloor met: {result['floor_met']}"
    )
    if not args.no_record:
        record(NAME, result, full)
    print(f"\n{result['headline']}\nfloor met: {result['floor_met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
