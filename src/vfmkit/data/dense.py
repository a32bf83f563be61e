"""Dense-prediction data: image + per-pixel label shards, mask decoding, paired replayable augmentation.

Shards (``vfmkit data import --dense IMAGES_AND_LABELS``) hold per sample ``<key>.jpg`` (the image), ``<key>.seg.png``
(an 8-bit single-channel PNG of class ids, same size as the image) and ``<key>.json`` with ``uid`` (the source
stem), ``sha256`` (of the jpg bytes), ``seg_sha256`` (of the png bytes), ``width``/``height``. The manifest adds
``kind: "dense"``, ``classes``, ``num_classes`` and ``void`` (the ignored label, e.g. CamVid's 11).

Masks are class ids: they are only ever resampled with nearest neighbour (torchvision v2 dispatches a
``tv_tensors.Mask`` to its nearest-neighbour kernels), never blended. :class:`DenseAugment` draws one set of
parameters (a crop box in SOURCE pixels, a flip, optional photometric jitter that touches only the image) and
applies the same geometry to image and mask; the parameters are JSON (:meth:`DenseAugParams.to_json`) and replay
bit-identically, like ``data/augment.py``'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vfmkit.data.decode import decode_uint8
from vfmkit.data.importer import ImageSource, prepare_jpeg
from vfmkit.data.lock import FolderLock
from vfmkit.data.rng import seeded_rng
from vfmkit.data.shards import ShardWriter

__all__ = [
    "MASK_SUFFIXES",
    "CorruptMaskError",
    "DenseAugParams",
    "DenseAugment",
    "decode_dense",
    "decode_mask",
    "dense_info",
    "encode_mask",
    "import_dense",
    "make_dense_decoder",
]

# A label mask is named like its image with one of these endings instead of the image's extension.
MASK_SUFFIXES = (".label.png", ".seg.png", "_label.png", "_L.png")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class CorruptMaskError(ValueError):
    """A label mask that cannot be used (unreadable, wrong size, out-of-range ids); the message names it."""


# ------------------------------------------------------------------------------------------------ masks


def decode_mask(data: bytes) -> np.ndarray:
    """PNG/any PIL image of class ids -> ``uint8 [H, W]``. 'L' and 'P' (palette index = class id) are accepted.

    Raises :class:`CorruptMaskError` for an unreadable file or a multi-channel image (a colour-coded mask needs a
    palette-to-id conversion first; guessing one would silently mislabel).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise CorruptMaskError(
                    f"mask has mode {im.mode!r}: expected one channel of class ids (L or P)"
                )
            arr = np.asarray(im)
    except CorruptMaskError:
        raise
    except Exception as e:  # PIL raises several types for a broken file
        raise CorruptMaskError(f"mask unreadable: {type(e).__name__}: {e}") from e
    if arr.ndim != 2:
        raise CorruptMaskError(f"mask has shape {arr.shape}: expected [H, W]")
    if arr.max(initial=0) > 255:
        raise CorruptMaskError(f"mask holds id {int(arr.max())} > 255")
    return arr.astype(np.uint8)


def encode_mask(mask: np.ndarray | torch.Tensor) -> bytes:
    """``[H, W]`` class ids (< 256) -> 8-bit greyscale PNG bytes (lossless)."""
    arr = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    out = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode="L").save(out, format="PNG", optimize=True)
    return out.getvalue()


def _check_ids(arr: np.ndarray, num_classes: int | None, void: int | None) -> None:
    if num_classes is None:
        return
    bad = np.unique(arr[(arr >= num_classes) & (arr != (void if void is not None else -1))])
    if bad.size:
        raise CorruptMaskError(
            f"mask holds ids {bad.tolist()[:5]} outside 0..{num_classes - 1} (void {void})"
        )


# ------------------------------------------------------------------------------------------------ import


def _pair_names(names: Iterable[str]) -> tuple[dict[str, tuple[str, str]], list[dict]]:
    """Relative file names -> ({stem: (image name, mask name)}, unpaired entries with a reason)."""
    masks, images = {}, {}
    for n in names:
        low = n.lower()
        suf = next((s for s in MASK_SUFFIXES if low.endswith(s.lower())), None)
        if suf is not None:
            masks[n[: -len(suf)]] = n
        elif low.endswith(_IMAGE_SUFFIXES):
            images[os.path.splitext(n)[0]] = n
    pairs, unpaired = {}, []
    for stem in sorted(set(images) | set(masks)):
        if stem in images and stem in masks:
            pairs[stem] = (images[stem], masks[stem])
        elif stem in images:
            unpaired.append({"uid": stem, "reason": f"no label mask for image {images[stem]!r}"})
        else:
            unpaired.append({"uid": stem, "reason": f"no image for label mask {masks[stem]!r}"})
    return pairs, unpaired


def import_dense(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    *,
    classes: str | os.PathLike | Sequence[str] | None = None,
    void: int | None = None,
    names: Iterable[str] | None = None,
    max_size: int | None = None,
    quality: int = 85,
    compress: bool = False,
) -> dict:
    """A folder or tar of image + label-mask pairs -> dense shards in ``out_dir``; returns the manifest.

    Pairs share a stem: ``x.jpg`` + ``x.label.png`` (or ``.seg.png``, ``_label.png``, ``_L.png``). ``classes`` is a
    ``classes.json`` (``{"classes": [...], "void_label": 11}``, CamVid's) or a list of names; with it, ids outside
    ``0..num_classes-1`` other than ``void`` make a sample corrupt. ``names`` restricts the import to those stems.
    Keys are 9-digit indices into the sorted stems. A pair whose image or mask does not decode, whose sizes
    differ, or that lacks its partner is skipped, named (``skipped``: ``[{"uid", "key", "reason"}]``) and counted
    (``n_skipped``). Images keep their JPEG bytes when no resize is asked; ``max_size`` downscales the shorter side
    of both (the mask with nearest neighbour only).
    """
    class_names: list[str] | None = None
    if isinstance(classes, str | os.PathLike):
        meta = json.loads(Path(classes).read_text(encoding="utf-8"))
        class_names = list(meta["classes"] if isinstance(meta, dict) else meta)
        if void is None and isinstance(meta, dict) and "void_label" in meta:
            void = int(meta["void_label"])
    elif classes is not None:
        class_names = list(classes)
    num_classes = len(class_names) if class_names is not None else None
    source = ImageSource(src)
    lock = None
    try:
        pairs, unpaired = _pair_names(source.names())
        stems = sorted(pairs)
        if names is not None:
            wanted = set(names)
            stems = [s for s in stems if s in wanted or os.path.basename(s) in wanted]
            unpaired = [u for u in unpaired if u["uid"] in wanted]
        skipped = [{"uid": u["uid"], "key": None, "reason": u["reason"]} for u in unpaired]
        extra = {
            "kind": "dense",
            "source": str(src),
            "classes": class_names,
            "num_classes": num_classes,
            "void": void,
        }
        lock = FolderLock(out_dir, "vfmkit data import --dense").acquire()  # one writer per folder
        with ShardWriter(out_dir, max_count=shard_size, extra=extra, compress=compress) as w:
            for i, stem in enumerate(stems):
                key = f"{i:09d}"
                img_name, mask_name = pairs[stem]
                try:
                    sample = _dense_sample(
                        key,
                        stem,
                        source.read(img_name),
                        source.read(mask_name),
                        num_classes,
                        void,
                        max_size,
                        quality,
                    )
                except (CorruptMaskError, ValueError) as e:
                    skipped.append({"uid": stem, "key": key, "reason": str(e)})
                    continue
                w.write(sample)
            w.extra.update(n_skipped=len(skipped), skipped=skipped)
        return {"format": "vfmkit-shards/1", "shards": w.shards, "count": w.count, **w.extra}
    finally:
        if lock is not None:
            lock.release()
        source.close()


def _dense_sample(
    key: str,
    uid: str,
    img_raw: bytes | None,
    mask_raw: bytes | None,
    num_classes: int | None,
    void: int | None,
    max_size: int | None,
    quality: int,
) -> dict:
    if img_raw is None or mask_raw is None:
        raise ValueError("missing image or mask file")
    try:
        jpg, width, height = prepare_jpeg(img_raw, max_size, quality)
    except Exception as e:  # PIL raises several types for bad files; all mean "corrupt"
        raise ValueError(f"corrupt image: {type(e).__name__}: {e}") from e
    mask = decode_mask(mask_raw)
    if max_size is not None and mask.shape != (height, width):
        t = TF.resize(
            tv_tensors.Mask(torch.from_numpy(mask)[None]),
            [height, width],
            interpolation=InterpolationMode.NEAREST,
        )
        mask = t[0].numpy()
    if mask.shape != (height, width):
        raise CorruptMaskError(f"mask {mask.shape[1]}x{mask.shape[0]} != image {width}x{height} (WxH)")
    _check_ids(mask, num_classes, void)
    with Image.open(io.BytesIO(mask_raw)) as im:
        keep = im.format == "PNG" and im.mode in ("L", "P") and max_size is None
    png = mask_raw if keep else encode_mask(mask)
    info = {
        "uid": uid,
        "sha256": hashlib.sha256(jpg).hexdigest(),
        "seg_sha256": hashlib.sha256(png).hexdigest(),
        "width": width,
        "height": height,
    }
    return {"__key__": key, "jpg": jpg, "seg.png": png, "json": info}


def dense_info(spec: str | os.PathLike) -> dict:
    """``classes``, ``num_classes``, ``void`` and ``count`` of a dense shard directory (or ``builtin:NAME``)."""
    from vfmkit.data.builtin import builtin_path
    from vfmkit.data.shards import read_manifest

    s = str(spec)
    path = builtin_path(s[len("builtin:") :]) if s.startswith("builtin:") else Path(s)
    m = read_manifest(path)
    if m.get("kind") != "dense":
        raise ValueError(f"{s!r} is not a dense shard directory (manifest kind {m.get('kind')!r})")
    return {
        "classes": m.get("classes"),
        "num_classes": m.get("num_classes"),
        "void": m.get("void"),
        "count": m.get("count"),
    }


# ------------------------------------------------------------------------------------------------ decode


def decode_dense(raw: dict, num_classes: int | None = None, void: int | None = None) -> dict[str, Any]:
    """Raw webdataset sample -> ``{"image": uint8 [3, H, W], "mask": int64 [H, W]}``.

    Raises :class:`CorruptMaskError` naming the problem when the mask is missing, unreadable, not the image's
    size, or (with ``num_classes``) holds ids outside the class range other than ``void``; the loader then names
    the sample and counts it.
    """
    mask_raw = raw.get("seg.png", raw.get("label.png"))
    if mask_raw is None:
        raise CorruptMaskError("no mask member (seg.png)")
    img = decode_uint8(raw, ("jpg", "jpeg", "png", "webp"))
    mask = decode_mask(mask_raw)
    if mask.shape != tuple(img.shape[-2:]):
        raise CorruptMaskError(
            f"mask {mask.shape[1]}x{mask.shape[0]} != image {img.shape[2]}x{img.shape[1]} (WxH)"
        )
    _check_ids(mask, num_classes, void)
    return {"image": img, "mask": torch.from_numpy(mask.astype(np.int64))}


# ------------------------------------------------------------------------------------------------ augment


@dataclass(frozen=True)
class DenseAugParams:
    """One paired augmentation: ``crop`` ``(i, j, h, w)`` in source pixels, ``flip``, image-only ``jitter``
    ``(brightness, contrast, saturation)`` factors or None."""

    crop: tuple[int, int, int, int]
    flip: bool = False
    jitter: tuple[float, float, float] | None = None

    def to_json(self) -> list:
        return [list(self.crop), bool(self.flip), list(self.jitter) if self.jitter is not None else None]

    @classmethod
    def from_json(cls, x: Sequence) -> DenseAugParams:
        crop, flip, jitter = x
        if len(crop) != 4:
            raise ValueError(f"dense aug params: crop must be [i, j, h, w], got {crop!r}")
        return cls(
            tuple(int(v) for v in crop),
            bool(flip),
            tuple(float(v) for v in jitter) if jitter is not None else None,
        )


@dataclass(frozen=True)
class DenseAugment:
    """Random scaled crop + flip (+ optional colour jitter) applied to image and mask together.

    ``size`` is the output ``(H, W)``; the crop box has area ``scale`` of the source and aspect ``ratio`` times the
    output's (so the content is not distorted much). The image is resampled with ``interpolation`` (bilinear,
    antialiased), the mask always with nearest neighbour (it is a ``tv_tensors.Mask``).
    """

    size: tuple[int, int] = (180, 240)
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (0.8, 1.25)
    flip_p: float = 0.5
    jitter: float = 0.0  # max relative change of brightness/contrast/saturation; 0: off
    interpolation: str = "bilinear"

    def sample(self, rng: random.Random, image_hw: tuple[int, int]) -> DenseAugParams:
        H, W = image_hw
        out_ar = self.size[1] / self.size[0]
        crop = None
        for _ in range(10):
            area = H * W * rng.uniform(*self.scale)
            ar = out_ar * float(np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1]))))
            w, h = int(round((area * ar) ** 0.5)), int(round((area / ar) ** 0.5))
            if 0 < h <= H and 0 < w <= W:
                crop = (rng.randint(0, H - h), rng.randint(0, W - w), h, w)
                break
        if crop is None:
            crop = (0, 0, H, W)
        flip = rng.random() < self.flip_p
        jit = None
        if self.jitter > 0:
            jit = tuple(round(rng.uniform(1 - self.jitter, 1 + self.jitter), 6) for _ in range(3))
        return DenseAugParams(crop, flip, jit)

    def sample_for(self, seed: int, uid: str, index: int, image_hw: tuple[int, int]) -> DenseAugParams:
        """Parameters drawn from ``seeded_rng("dense", seed, uid, index)``: the same on every process and machine."""
        return self.sample(seeded_rng("dense", seed, uid, index), image_hw)

    def apply(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        params: DenseAugParams,
        size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [3, H, W]`` (uint8 or float), ``mask [H, W]`` -> the same geometry on both at ``size``."""
        out = list(size or self.size)
        i, j, h, w = params.crop
        img = tv_tensors.Image(image)
        msk = tv_tensors.Mask(mask[None] if mask.ndim == 2 else mask)
        img = TF.resized_crop(
            img, i, j, h, w, out, interpolation=InterpolationMode(self.interpolation), antialias=True
        )
        msk = TF.resized_crop(msk, i, j, h, w, out)  # a Mask: nearest neighbour, whatever is asked
        if params.flip:
            img, msk = TF.horizontal_flip(img), TF.horizontal_flip(msk)
        if params.jitter is not None:
            b, c, s = params.jitter
            img = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)[0]

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor, rng: random.Random
    ) -> tuple[torch.Tensor, torch.Tensor, DenseAugParams]:
        p = self.sample(rng, (int(image.shape[-2]), int(image.shape[-1])))
        img, msk = self.apply(image, mask, p)
        return img, msk, p


def make_dense_decoder(
    augment: DenseAugment | None = None,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    void: int | None = None,
    size: tuple[int, int] | None = None,
):
    """A ``decode_fn`` for :class:`~vfmkit.data.loader.ShardLoader`: decode, then (optionally) augment.

    With ``augment`` each sample draws fresh parameters from torch's generator (seeded by the engine, so a
    resumed run continues the same stream) and the drawn parameters are returned as JSON text in ``aug``.
    Without it, ``size`` (H, W) resizes both (mask by nearest neighbour) or keeps the native size.
    """

    def decode(raw: dict) -> dict:
        s = decode_dense(raw, num_classes, void)
        img, mask = s["image"], s["mask"]
        if augment is not None:
            rng = random.Random(int(torch.randint(0, 2**62, (1,))) ^ seed)
            img, mask, p = augment(img, mask, rng)
            return {"image": img, "mask": mask, "aug": json.dumps(p.to_json())}
        if size is not None and tuple(img.shape[-2:]) != tuple(size):
            img = TF.resize(img, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
            mask = TF.resize(tv_tensors.Mask(mask[None]), list(size))[0].as_subclass(torch.Tensor)
        return {"image": img, "mask": mask}

    return decode
