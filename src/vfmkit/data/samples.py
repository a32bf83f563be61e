"""Real samples for small in-memory training runs (weight subcloning): shard specs, plain image tars, class
trees, image folders and caption files, read in stored order into :class:`Sample` records, and decoded into
``uint8`` tensors. Moved here from ``commands/subclone.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

IMG_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    key: str
    image: bytes | None = None
    texts: tuple[str, ...] = ()
    label: int | None = None


def _wnid_index() -> dict[str, int]:
    from vfmkit.data.builtin import imagenette_classes

    return {w: i for i, w in enumerate(imagenette_classes())}


def _finish(key: str, parts: dict[str, bytes], wnids: dict[str, int], src: str) -> Sample | None:
    img = next((parts[e] for e in parts if e.lower() in IMG_EXTS), None)
    meta: dict = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt json in sample {key!r} of {src}: {e}") from e
    texts = tuple(meta.get("captions") or ([parts["txt"].decode()] if "txt" in parts else []))
    label = meta.get("label")
    if label is None and "/" in key:  # raw class tree (<wnid>/<file>.JPEG)
        label = wnids.get(key.split("/")[-2])
    if img is None and not texts:
        return None
    return Sample(key, img, texts, label)


def _iter_tar(path: str, wnids: dict[str, int]) -> Iterator[Sample]:
    """webdataset layout (``key.ext`` members grouped by key) or a plain tar of images, through the one tar
    reader (``shards.iter_shard``: webdataset's key convention, a bad file named)."""
    from vfmkit.data.shards import iter_shard

    for raw in iter_shard(path):
        if (s := _finish(raw["__key__"], raw, wnids, path)) is not None:
            yield s


def read_samples(spec: str, limit: int = 0) -> list[Sample]:
    """Real samples from a shard spec (``builtin:NAME``, shard dir, tar), an image folder, or captions
    (``.csv`` with a ``caption`` column, ``.txt`` one a line). ``limit`` 0 reads all, in stored order."""
    p = Path(spec)
    if p.suffix in (".csv", ".txt") and p.is_file():
        texts = _read_texts(p)
        return [Sample(f"{p.name}:{i}", texts=(t,)) for i, t in enumerate(texts[: limit or None])]
    if p.is_dir() and not any(p.glob("*.tar*")) and not (p / "manifest.json").exists():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower().lstrip(".") in IMG_EXTS)
        return [Sample(str(f.relative_to(p)), image=f.read_bytes()) for f in files[: limit or None]]
    from vfmkit.data.shards import list_shards

    out: list[Sample] = []
    wnids = _wnid_index()
    for url in list_shards(spec):
        for s in _iter_tar(url, wnids):
            out.append(s)
            if limit and len(out) >= limit:
                return out
    return out


def _read_texts(p: Path) -> list[str]:
    if p.suffix == ".txt":
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    import csv

    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "caption" not in rows[0]:
        raise ValueError(f"{p}: expected a CSV with a 'caption' column")
    return [r["caption"] for r in rows]


def decode_images(samples: list[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG bytes -> ``uint8 [N, 3, size, size]`` (resize shorter side + centre crop) and labels ``[N]`` (-1: none)."""
    from vfmkit.data.decode import decode_image, square_crop_pil

    imgs, labels = [], []
    for s in samples:
        if s.image is None:
            continue
        try:
            im = decode_image(s.image, name=repr(s.key))
        except ValueError as e:
            raise ValueError(f"corrupt image in sample {s.key!r}: {e}") from e
        imgs.append(square_crop_pil(im, size))
        labels.append(-1 if s.label is None else int(s.label))
    if not imgs:
        raise ValueError("no images in the given samples")
    return torch.stack(imgs).contiguous(), torch.tensor(labels)


def normalize(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """``uint8 [B, 3, H, W]`` -> normalised float."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s
