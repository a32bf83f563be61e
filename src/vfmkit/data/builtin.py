"""The embedded default data that ships inside the package (``vfmkit/assets``).

A small real subset, built by ``scripts/build_embedded.py`` from Flickr8k and Imagenette (research use only,
see ``assets/LICENSE-DATA.md``):

- ``flickr8k/train``: ~1,000 Flickr8k TRAIN-split photos at 112 px with all 5 captions (json ``captions``).
- ``flickr8k/heldout``: ~200 other TRAIN-split photos, disjoint from ``flickr8k/train`` (held-out retrieval).
- ``imagenette/train``: ~40 Imagenette train images per class; ``imagenette/val``: ~20 per class from val.
  json holds ``label`` (index in sorted wnids), ``class``/``wnid``.
- ``imagenette/classes.json``: wnid -> ``{"imagenet_index", "name"}``.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

BUILTIN_NAMES = (
    "flickr8k/train",
    "flickr8k/heldout",
    "imagenette/train",
    "imagenette/val",
    "imagenette/classes.json",
)


def assets_root() -> Path:
    """Directory of the embedded assets inside the installed package."""
    return Path(str(importlib.resources.files("vfmkit") / "assets"))


def builtin_path(name: str) -> Path:
    """Path of an embedded dataset directory (or file) such as ``"flickr8k/train"``.

    Raises ``FileNotFoundError`` naming the request and the available names.
    """
    name = name.strip("/")
    if not name or ".." in Path(name).parts:
        raise FileNotFoundError(f"no builtin data {name!r}; available: {', '.join(BUILTIN_NAMES)}")
    p = assets_root() / name
    if not p.exists():
        raise FileNotFoundError(
            f"no builtin data {name!r} at {str(p)!r}; available: {', '.join(BUILTIN_NAMES)}"
        )
    return p


def imagenette_classes() -> dict[str, dict]:
    """wnid -> ``{"imagenet_index": int, "name": str}`` for the 10 Imagenette classes, in sorted wnid order."""
    data = json.loads(builtin_path("imagenette/classes.json").read_text(encoding="utf-8"))
    return {k: data[k] for k in sorted(data)}


def parse_class_index(spec: str | None) -> list[int] | None:
    """'imagenette' | a classes.json path (wnid -> {"imagenet_index"}) | '1,2,3' -> indices in label order.

    Label order is the sorted wnid order, which is how ``vfmkit data import --class-folders`` numbers labels.
    """
    if spec is None:
        return None
    if spec == "imagenette":
        return [v["imagenet_index"] for v in imagenette_classes().values()]
    if Path(spec).is_file():
        data = json.loads(Path(spec).read_text(encoding="utf-8"))
        return [int(data[k]["imagenet_index"]) for k in sorted(data)]
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--class-index {spec!r}: not 'imagenette', a classes.json file or integers") from e
