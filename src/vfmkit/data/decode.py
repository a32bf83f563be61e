"""The one image decoder module and the one centre-crop view.

Decoding (PIL; every output is RGB):

- :func:`image_bytes`: the encoded image of a raw webdataset sample (first of ``jpg/jpeg/png/webp``) or the
  bytes themselves; ``KeyError`` naming the extensions when a sample has none.
- :func:`decode_image`: a raw sample or bytes -> ``PIL.Image`` RGB (fully loaded). A file PIL cannot read
  raises ``ValueError`` naming ``name`` (or the sample's ``__key__``).
- :func:`decode_uint8`: -> ``uint8 [3, H, W]``; :func:`decode_float`: -> ``float [3, H, W]`` in ``[0, 1]``.
  ``backend="torchvision"`` decodes with ``torchvision.io.decode_image`` instead of PIL (the reinforcement
  generator's decoder; its pixels can differ from PIL's by the JPEG library's rounding).

Centre-crop views (the eval transforms; short side to ``size``, then the central ``size x size``):

- :func:`resize_center_crop`: float (or uint8, scaled to ``[0, 1]``) ``[B, 3, H, W]`` or ``[3, H, W]`` ->
  float in ``[0, 1]``, antialiased ``F.interpolate`` (open_clip's eval transform; ``mode="squash"`` resizes
  both sides instead). The teachers, encoders, caption models and feature caches use it.
- :func:`plain_view`: ``uint8 [3, H, W]`` -> ``uint8 [3, S, S]`` with torchvision v2 (bicubic, antialiased)
  resize + centre crop: the classification replay's un-augmented view, kept in uint8 so it goes through the
  same ``to_student`` path as the stored augmentations.
- :func:`square_crop_pil`: a PIL image -> ``uint8 [3, S, S]``: the central square of the short side, then a
  PIL bicubic resize (the weight-subcloning readers' view).

The three give slightly different pixels (float vs uint8 rounding, torchvision's vs floor centring, crop
before vs after resize: up to a few grey levels); each caller keeps the one its recorded results used.
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGE_EXTS",
    "image_bytes",
    "decode_image",
    "decode_uint8",
    "decode_float",
    "resize_center_crop",
    "plain_view",
    "square_crop_pil",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def image_bytes(raw_sample_or_bytes: Any, ext: tuple[str, ...] = IMAGE_EXTS) -> bytes:
    """The encoded image of a raw sample (first member in ``ext``), or ``raw_sample_or_bytes`` if it is bytes."""
    if isinstance(raw_sample_or_bytes, bytes | bytearray | memoryview):
        return bytes(raw_sample_or_bytes)
    for e in ext:
        if e in raw_sample_or_bytes:
            return raw_sample_or_bytes[e]
    raise KeyError(f"no image member ({'/'.join(ext)})")


def _name_of(raw_sample_or_bytes: Any, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(raw_sample_or_bytes, dict):
        return str(raw_sample_or_bytes.get("__key__", "?"))
    return "?"


def decode_image(raw_sample_or_bytes: Any, ext: tuple[str, ...] = IMAGE_EXTS, *, name: str | None = None):
    """Raw sample or encoded bytes -> fully loaded ``PIL.Image`` in RGB; ``ValueError`` naming a bad file."""
    from PIL import Image

    data = image_bytes(raw_sample_or_bytes, ext)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for a broken file
        raise ValueError(f"cannot decode image {_name_of(raw_sample_or_bytes, name)}: {e}") from e


def decode_uint8(
    raw_sample_or_bytes: Any,
    ext: tuple[str, ...] = IMAGE_EXTS,
    *,
    name: str | None = None,
    backend: str = "pil",
) -> Tensor:
    """Raw sample or bytes -> ``uint8 [3, H, W]`` RGB (``backend``: ``"pil"`` or ``"torchvision"``)."""
    if backend == "torchvision":
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode

        data = image_bytes(raw_sample_or_bytes, ext)
        try:
            return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except Exception as e:
            raise ValueError(f"cannot decode image {_name_of(raw_sample_or_bytes, name)}: {e}") from e
    if backend != "pil":
        raise ValueError(f"backend must be 'pil' or 'torchvision', got {backend!r}")
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(decode_image(raw_sample_or_bytes, ext, name=name))


def decode_float(
    raw_sample_or_bytes: Any,
    ext: tuple[str, ...] = IMAGE_EXTS,
    *,
    name: str | None = None,
    backend: str = "pil",
) -> Tensor:
    """Raw sample or bytes -> ``float [3, H, W]`` in ``[0, 1]``."""
    return decode_uint8(raw_sample_or_bytes, ext, name=name, backend=backend).float().div_(255.0)


def resize_center_crop(
    images: Tensor, size: int, interpolation: str = "bilinear", mode: str = "shortest"
) -> Tensor:
    """Images ``[B, 3, H, W]`` (or one ``[3, H, W]``), float in ``[0, 1]`` or uint8 -> float ``[.., 3, size, size]``.

    ``mode="shortest"`` resizes the short side to ``size`` and centre-crops (open_clip's eval transform);
    ``"squash"`` resizes both sides. Antialiased, so downscaling does not alias; clamped because bicubic overshoots.
    """
    if images.dim() == 3 and images.shape[0] == 3:
        return resize_center_crop(images[None], size, interpolation, mode)[0]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    if mode == "squash" or h == w:
        out_hw = (size, size)
    else:
        scale = size / min(h, w)
        out_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    interp = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    kw = {"antialias": True, "align_corners": False} if interp != "nearest" else {}
    x = F.interpolate(images.float(), size=out_hw, mode=interp, **kw).clamp_(0.0, 1.0)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def plain_view(img: Tensor, size: int) -> Tensor:
    """``uint8 [3, H, W]`` -> ``uint8 [3, size, size]``: torchvision bicubic short-side resize, then centre crop."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(img, [size, size])


def square_crop_pil(img: Any, size: int) -> Tensor:
    """PIL image (RGB) -> ``uint8 [3, size, size]``: centre square of side ``min(W, H)``, PIL bicubic resize."""
    from PIL import Image

    w, h = img.size
    c = min(w, h)
    img = img.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c)).resize(
        (size, size), Image.BICUBIC
    )
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
