#!/usr/bin/env python3
"""Build the embedded default data (``src/vfmkit/assets``) from the real Flickr8k / Imagenette copies.

    PYTHONPATH=src python3 scripts/build_embedded.py [--data /work/shared/data]

Selection is deterministic (sorted names, then a seeded shuffle) and uses only the Flickr8k TRAIN split:
``flickr8k/heldout`` is drawn from the same shuffled list right after ``flickr8k/train``, so the two never overlap.
Rebuilding gives byte-identical shards (fixed tar headers, deterministic JPEG encoding).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tarfile
from pathlib import Path

from vfmkit.data.importer import import_captions, import_class_folders
from vfmkit.data.io import atomic_write_bytes, atomic_write_json
from vfmkit.data.shards import read_manifest

ASSETS = Path(__file__).resolve().parents[1] / "src" / "vfmkit" / "assets"

LICENSE_NOTE = """# Embedded data: research use only

The shards under this folder are small, downscaled (112 px, JPEG q=85) subsets of two public research datasets.
They ship so that vfmkit's tests and default commands run offline. They are NOT covered by vfmkit's Apache-2.0
licence.

- `flickr8k/`: Flickr8k (M. Hodosh, P. Young, J. Hockenmaier, "Framing Image Description as a Ranking Task:
  Data, Models and Evaluation Metrics", JAIR 47, 2013). Photos from Flickr with crowd-sourced captions, distributed
  for research purposes only. Only images of the official TRAIN split are included; `val` is never shipped.
- `imagenette/`: Imagenette (J. Howard, fast.ai), a 10-class subset of ImageNet (ILSVRC 2012). ImageNet images are
  subject to the ImageNet terms of access: non-commercial research and educational use only.

Use for anything other than non-commercial research is the user's responsibility. Rebuild with
`scripts/build_embedded.py` from the original data.
"""


def _pick(names: list[str], n: int, seed: int, offset: int = 0) -> list[str]:
    """Deterministic subset: sort, shuffle with a fixed seed, slice [offset, offset + n)."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    return sorted(order[offset : offset + n])


def _per_class(tar_path: Path, per_class: int, seed: int) -> list[str]:
    with tarfile.open(tar_path) as t:
        names = [m.name for m in t.getmembers() if m.isreg()]
    by_cls: dict[str, list[str]] = {}
    for n in names:
        by_cls.setdefault(n.split("/")[0], []).append(n)
    return sorted(x for c in sorted(by_cls) for x in _pick(by_cls[c], per_class, seed))


def _build(name: str, fn, subset: dict) -> None:
    """Build into ``<name>.building`` then swap in, so a failed build never leaves half an asset."""
    final = ASSETS / name
    tmp = final.with_name(final.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    m = fn(tmp)
    m = read_manifest(tmp)
    m.update(subset=subset)
    for k in ("source_images", "source_captions"):  # machine-specific absolute paths: keep only the file name
        if k in m:
            m[k] = Path(m[k]).name
    atomic_write_json(tmp / "manifest.json", m)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    print(f"{name}: {m['count']} samples in {len(m['shards'])} shards, skipped {m['n_skipped']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--flickr-train", type=int, default=1000)
    ap.add_argument("--flickr-heldout", type=int, default=200)
    ap.add_argument("--imagenette-train", type=int, default=40, help="images per class")
    ap.add_argument("--imagenette-val", type=int, default=20, help="images per class")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--quality", type=int, default=85)
    ap.add_argument(
        "--imagenette-val-size",
        type=int,
        default=128,
        help="Imagenette val keeps its source 128 px bytes: the teacher-accuracy test (>= 95%%) "
        "measures the real model on real val images, not on a downscaled copy",
    )
    ap.add_argument("--only", default=None, help="rebuild only this subset, e.g. imagenette/val")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    fk, inet = a.data / "flickr8k", a.data / "imagenette"
    train_names = json.loads((fk / "splits.json").read_text())["train"]  # never the val split
    common = dict(max_size=a.size, quality=a.quality, compress=True)  # gzip drops ~40% tar overhead
    subsets = {
        "flickr8k/train": (_pick(train_names, a.flickr_train, a.seed), 250),
        "flickr8k/heldout": (_pick(train_names, a.flickr_heldout, a.seed, offset=a.flickr_train), 100),
    }
    assert not set(subsets["flickr8k/train"][0]) & set(subsets["flickr8k/heldout"][0])
    for name, (names, shard) in subsets.items():
        if a.only and name != a.only:
            continue
        _build(
            name,
            lambda out, names=names, shard=shard: import_captions(
                fk / "images.tar", fk / "captions.csv", out, shard, names=names, **common
            ),
            {"split": "train", "n": len(names), "seed": a.seed, "size": a.size, "quality": a.quality},
        )
    for split, per in (("train", a.imagenette_train), ("val", a.imagenette_val)):
        if a.only and f"imagenette/{split}" != a.only:
            continue
        names = _per_class(inet / f"{split}.tar", per, a.seed)
        size = a.imagenette_val_size if split == "val" else a.size
        opts = {**common, "max_size": size}
        _build(
            f"imagenette/{split}",
            lambda out, names=names, split=split, opts=opts: import_class_folders(
                inet / f"{split}.tar", out, 100, names=names, **opts
            ),
            {"split": split, "per_class": per, "seed": a.seed, "size": size, "quality": a.quality},
        )
    atomic_write_bytes(ASSETS / "imagenette" / "classes.json", (inet / "classes.json").read_bytes())
    atomic_write_bytes(ASSETS / "LICENSE-DATA.md", LICENSE_NOTE.encode())
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    print(f"assets total {total / 1e6:.2f} MB in {ASSETS}")


if __name__ == "__main__":
    main()
