"""Readers for image-caption pairs: a Flickr8k folder (``captions.csv``, ``splits.json``, ``images.tar``) or any
shard set whose json holds ``uid`` and ``captions`` (the embedded ``builtin:flickr8k/*``).

Moved here from ``models/offline_teacher.py`` (a model file held these readers); the tar samples are read with
the one shard reader, ``vfmkit.data.shards.iter_shard``.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["read_flickr8k", "read_tar_images", "builtin_uids", "read_shard_pairs", "is_flickr8k_dir"]


def is_flickr8k_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "captions.csv").is_file()


def read_flickr8k(data_dir: str | Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``data_dir`` with captions.csv + splits.json -> (captions by image name, split name -> image names)."""
    d = Path(data_dir)
    for f in ("captions.csv", "splits.json", "images.tar"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"Flickr8k folder {d} lacks {f}")
    caps: dict[str, list[str]] = {}
    with open(d / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["image"], []).append(row["caption"].strip())
    splits = json.loads((d / "splits.json").read_text())
    return caps, splits


def read_tar_images(tar_path: str | Path, names: Sequence[str]) -> dict[str, bytes]:
    """JPEG bytes of ``names`` from a plain image tar (member names = image names, not a sample shard).

    Missing names raise, by name.
    """
    want, out = set(names), {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and base in want:
                out[base] = tf.extractfile(m).read()
    missing = want - set(out)
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing from {tar_path}, e.g. {sorted(missing)[:3]}")
    return out


def read_shard_pairs(spec: str) -> tuple[dict[str, list[str]], dict[str, bytes]]:
    """A shard set with json ``uid`` + ``captions`` and a ``jpg`` -> (captions by uid, jpg bytes by uid)."""
    from vfmkit.data.shards import ShardError, iter_shard, list_shards

    caps: dict[str, list[str]] = {}
    images: dict[str, bytes] = {}
    for url in list_shards(spec):
        for s in iter_shard(url):
            if "json" not in s or "jpg" not in s:
                raise ShardError(f"{url}: sample {s['__key__']!r} lacks json or jpg")
            meta = json.loads(s["json"])
            uid = str(meta.get("uid", s["__key__"]))
            caps[uid] = [str(c).strip() for c in meta.get("captions", [])]
            images[uid] = s["jpg"]
    return caps, images


def builtin_uids(name: str = "flickr8k/heldout") -> list[str]:
    """Source file names (json ``uid``) of an embedded shard set, in shard order."""
    from vfmkit.data.shards import iter_shard, list_shards

    return [
        json.loads(s["json"])["uid"]
        for url in list_shards(f"builtin:{name}")
        for s in iter_shard(url)
        if "json" in s
    ]
