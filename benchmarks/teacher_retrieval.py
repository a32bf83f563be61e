"""The shipped offline teacher's image-text retrieval on Flickr8k VAL vs untrained (random-projection) heads.

Both are the same frozen EfficientNet-Lite0 + MiniLM towers; only the heads differ, so one pass of the towers
over the 1,000 val images and 5,000 captions serves both (``--cache DIR`` reuses tower features from a
previous run or a ``vfmkit teacher build``; by default they are computed fresh in a temporary folder). The
shipped path is also checked end to end: ``load_teacher("offline").encode_image/encode_text`` on a few val pairs
must equal the heads applied to the cached features.

    PYTHONPATH=src python3 benchmarks/teacher_retrieval.py [--data /work/shared/data/flickr8k] [--cache DIR]

Floor: shipped text->image R@1 >= 10% (100x chance) and mean R@1 >= 10x the random-projection baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vfmkit.data.flickr8k import read_flickr8k, read_tar_images
from vfmkit.methods.teacher_align import cache_image_features, cache_text_features, retrieval_on_features
from vfmkit.models.offline_teacher import OfflineHeads, decode_image, load_offline_heads, shipped_teacher_dir
from vfmkit.models.teachers import load_teacher

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (for _record)
from _record import machine, now, record  # noqa: E402

FLOOR = {"t2i_R@1_min": 10.0, "mean_R@1_ratio_min": 10.0}


def mean_r1(m: dict) -> float:
    return 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])


def check_end_to_end(heads: OfflineHeads, images: dict, names: list, caps: dict, img_f, txt_f) -> float:
    """Max |difference| between the teacher API and heads(cached features) on 8 val pairs."""
    teacher = load_teacher("offline")
    x = torch.stack([decode_image(images[n], n) for n in names[:8]])
    texts = [caps[n][0] for n in names[:8]]
    with torch.no_grad():
        ref_i = F.normalize(heads.image_head(img_f[:8]), dim=-1)
        ref_t = F.normalize(heads.text_head(txt_f[:8, 0]), dim=-1)
    return max(
        (teacher.encode_image(x) - ref_i).abs().max().item(),
        (teacher.encode_text(texts) - ref_t).abs().max().item(),
    )


def compare_sizes(args: argparse.Namespace, sizes: list[int]) -> dict:
    """Heads trained (same engine, same steps) on the first ``--cmp-train`` train images at each size, scored on the
    first ``--cmp-val`` val images (5 captions each) at that size. A small-subset comparison, reported as such."""
    from vfmkit.methods.teacher_align import split_names
    from vfmkit.pipelines.teacher import train_heads

    caps, train, val, _ = split_names(args.data, ("flickr8k/heldout",))
    train, val = train[: args.cmp_train], val[: args.cmp_val]
    images = read_tar_images(Path(args.data) / "images.tar", train + val)
    cache = Path(args.cache or tempfile.mkdtemp())
    ttr = cache_text_features([c for n in train for c in caps[n][:5]], cache).view(len(train), 5, -1)
    tva = cache_text_features([c for n in val for c in caps[n][:5]], cache).view(len(val), 5, -1)
    rows = {}
    for size in sizes:
        itr = cache_image_features(images, train, size, 0, cache)[:, None]
        iva = cache_image_features(images, val, size, 0, cache)
        with tempfile.TemporaryDirectory() as run:
            heads, _ = train_heads(itr, ttr, run, steps=args.cmp_steps, batch_size=128, seed=args.seed)
        rows[str(size)] = retrieval_on_features(heads, iva, tva)
        print(f"size {size}: mean R@1 {mean_r1(rows[str(size)]):.1f}", json.dumps(rows[str(size)]))
    return {"n_train": len(train), "n_val": len(val), "steps": args.cmp_steps, "by_size": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/flickr8k")
    ap.add_argument("--cache", default=None, help="tower-feature cache dir (default: fresh temporary dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--compare-sizes", default="", help="e.g. 160,224: also run the small resolution comparison"
    )
    ap.add_argument("--cmp-train", type=int, default=400)
    ap.add_argument("--cmp-val", type=int, default=200)
    ap.add_argument("--cmp-steps", type=int, default=300)
    args = ap.parse_args()
    t0 = time.time()
    heads, cfg = load_offline_heads(shipped_teacher_dir())
    size = int(cfg["image_size"])
    caps, splits = read_flickr8k(args.data)
    val = sorted(splits["val"])
    images = read_tar_images(Path(args.data) / "images.tar", val)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or tmp)
        img_f = cache_image_features(images, val, size, 0, cache, log=lambda m: None)
        txt_f = cache_text_features([c for n in val for c in caps[n][:5]], cache, log=lambda m: None)
    txt_f = txt_f.view(len(val), 5, -1)
    diff = check_end_to_end(heads, images, val, caps, img_f, txt_f)
    assert diff < 1e-3, f"teacher API and cached-feature path disagree by {diff}"
    shipped = retrieval_on_features(heads, img_f, txt_f)
    torch.manual_seed(args.seed)
    random_heads = OfflineHeads(heads.embed_dim, heads.hidden).eval()  # same towers, untrained projections
    baseline = retrieval_on_features(random_heads, img_f, txt_f)
    ratio = mean_r1(shipped) / max(mean_r1(baseline), 1e-9)
    met = shipped["t2i_R@1"] >= FLOOR["t2i_R@1_min"] and ratio >= FLOOR["mean_R@1_ratio_min"]
    res = {
        "headline": (
            f"shipped offline teacher (Lite0@{size}+MiniLM, trained heads) vs random-projection heads on Flickr8k "
            f"val (1000 images, 5000 captions): mean R@1 {mean_r1(shipped):.1f} vs {mean_r1(baseline):.1f} "
            f"= {ratio:.1f}x; t2i R@1 {shipped['t2i_R@1']:.1f} (chance 0.1)"
        ),
        "floor": FLOOR,
        "floor_met": bool(met),
        "shipped": shipped,
        "random_projection": baseline,
        "chance": {"t2i_R@1": 0.1, "i2t_R@1": 0.5},
        "ratio_mean_R@1": ratio,
        "image_size": size,
        "teacher_build": cfg.get("build", {}),
        "end_to_end_max_abs_diff": diff,
        "seconds": time.time() - t0,
        "date": now(),
        "machine": machine(),
    }
    if args.compare_sizes:
        res["resolution_comparison"] = compare_sizes(args, [int(x) for x in args.compare_sizes.split(",")])
    text = "\n".join(
        [
            f"{res['headline']} | floor {FLOOR} met: {met}",
            "shipped  " + json.dumps({k: round(v, 2) for k, v in shipped.items()}),
            "random   " + json.dumps({k: round(v, 2) for k, v in baseline.items()}),
            f"end-to-end API vs cached path max |diff| {diff:.2e}; {res['seconds']:.0f}s",
            f"date {res['date']}, machine {res['machine']}",
        ]
    )
    print(text)
    record("teacher_retrieval", res, text)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
