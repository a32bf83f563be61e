"""Replaying stored augmentation parameters vs. torchvision's on-the-fly augmentation, same images and machine.

Data: the first N photos of the real Flickr8k TRAIN split (160 px JPEGs), decoded once to uint8 tensors.
  - peer: torchvision v2 ``Compose`` of the same recipe (RandomResizedCrop(224, bicubic) + RandAugment for
    DataCompDR's ``rrc_ra``; + flip + RandomErasing(0.25) for ImageNet+'s ``rrc_flip_ra_re``), drawing fresh params.
  - vfmkit: ``paug.json`` entry -> ``params_from_json`` -> ``ReplayableAugment.apply`` (what training does).
  Rounds alternate; the median time per image of each side. Also checked: every replay is bit-identical to the
  generation-time render (count must be N), and the mean stored bytes per ``paug.json`` entry.
  Floor: replay speed >= 0.8x torchvision's (replaying stored params must not cost more than drawing new ones,
  within noise).

    PYTHONPATH=src python3 benchmarks/augment_replay.py [--data /work/shared/data] [--n 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vfmkit.data.augment import AugRecipe, ReplayableAugment, make_rng, params_from_json, params_to_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (for _record)
from _record import machine, now, record  # noqa: E402

FLOOR = 0.8


def load_images(data: Path, n: int) -> list[torch.Tensor]:
    """First ``n`` Flickr8k train photos (never val) as uint8 [3, H, W]."""
    train = set(json.loads((data / "flickr8k" / "splits.json").read_text())["train"])
    out = []
    with tarfile.open(data / "flickr8k" / "images.tar") as tf:
        for m in tf:
            if m.isfile() and Path(m.name).name in train:
                out.append(F.pil_to_tensor(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                if len(out) == n:
                    break
    return out


def torchvision_peer(recipe: AugRecipe) -> v2.Compose:
    ts = [
        v2.RandomResizedCrop(
            recipe.size,
            scale=recipe.scale,
            ratio=recipe.ratio,
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        )
    ]
    if "flip" in recipe.stages:
        ts.append(v2.RandomHorizontalFlip(recipe.flip_p))
    ts.append(v2.RandAugment(recipe.ra_num_ops, recipe.ra_magnitude, recipe.ra_num_bins))
    if "erase" in recipe.stages:
        ts.append(v2.RandomErasing(recipe.erase_p, recipe.erase_scale, recipe.erase_ratio, value=0))
    return v2.Compose(ts)


def timed(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return (time.perf_counter() - t0) / len(items)


def bench_recipe(name: str, images: list[torch.Tensor], rounds: int) -> dict:
    recipe = AugRecipe(name, size=224)
    aug, peer = ReplayableAugment(recipe), torchvision_peer(recipe)
    entries, renders = [], []
    for k, img in enumerate(images):  # generation: draw, render, store the compact entry
        out, p = aug(img, make_rng(0, f"flickr{k}", 0))
        entries.append(json.dumps(params_to_json(p, recipe), separators=(",", ":")))
        renders.append(out)
    pairs = list(zip(images, entries, strict=True))

    def replay(pair):
        return aug.apply(pair[0], params_from_json(json.loads(pair[1]), recipe))

    identical = sum(torch.equal(replay(pr), r) for pr, r in zip(pairs, renders, strict=True))
    t_peer, t_replay = [], []
    for _ in range(rounds):
        t_peer.append(timed(peer, images))
        t_replay.append(timed(replay, pairs))
    tp, tr = statistics.median(t_peer), statistics.median(t_replay)
    return {
        "recipe": name,
        "n": len(images),
        "torchvision_ms": 1e3 * tp,
        "replay_ms": 1e3 * tr,
        "speed_ratio": tp / tr,
        "identical": identical,
        "paug_entry_bytes": sum(len(e) for e in entries) / len(entries),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-sample augmentation runs in single-threaded loader workers
    images = load_images(Path(args.data), args.n)
    rows = [bench_recipe(n, images, args.rounds) for n in ("rrc_ra", "rrc_flip_ra_re")]
    lines = [
        f"{r['recipe']:>15}: torchvision {r['torchvision_ms']:.2f} ms/img, replay {r['replay_ms']:.2f} ms/img, "
        f"speed ratio {r['speed_ratio']:.2f}x, bit-identical {r['identical']}/{r['n']}, "
        f"paug entry {r['paug_entry_bytes']:.0f} B"
        for r in rows
    ]
    worst = min(r["speed_ratio"] for r in rows)
    met = bool(worst >= FLOOR and all(r["identical"] == r["n"] for r in rows))
    res = {
        "headline": f"replay from stored paug.json vs torchvision v2 on-the-fly augmentation (224 px, "
        f"{args.n} Flickr8k train photos): speed ratio {worst:.2f}x (worst recipe), "
        f"bit-identical {min(r['identical'] for r in rows)}/{args.n}",
        "floor": FLOOR,
        "floor_met": met,
        "rows": rows,
        "date": now(),
        "machine": machine(),
    }
    lines += [
        f"{res['headline']} | floor {FLOOR} met: {met}",
        f"date {res['date']}, machine {res['machine']}",
    ]
    text = "\n".join(lines)
    print(text)
    record("augment_replay", res, text)


if __name__ == "__main__":
    main()
