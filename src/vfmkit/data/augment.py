"""Replayable image augmentations (dataset reinforcement).

Every random augmentation is split into ``sample(rng, image_size) -> params`` and ``apply(img, params) -> img``,
so the parameters drawn once at reinforcement time can be stored (compact JSON, DataCompDR's ``paug.json``
layout) and replayed bit-identically later, at any output resolution.

Coordinate conventions (why: a stored set must serve students of any input size):
- the RandomResizedCrop box ``[i, j, h, w]`` is in SOURCE-image pixels; replay renders it at any size;
- the RandomErasing box, the CutMix box and the Translate magnitudes are in pixels of the recipe's reference
  output size (``recipe.size``, the generation resolution) and are rescaled when replayed at another size
  (at the reference size the result is exactly torchvision's).

Images are tensors ``[C, H, W]`` (uint8 in [0, 255] or float in [0, 1]); a leading batch dimension also works
for every op except the crop. Normalisation and any resize to the student's size are a separate step
(:func:`to_student`), so one stored parameter set serves any student.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import RandAugment as _TVRandAugment
from torchvision.transforms.v2 import functional as F

from vfmkit.data.rng import seeded_rng

# torchvision's RandAugment op names in torchvision's (and DataCompDR's) order: the op index stored in paug.json.
RA_OP_NAMES: tuple[str, ...] = tuple(_TVRandAugment._AUGMENTATION_SPACE.keys())
assert len(RA_OP_NAMES) == 14, RA_OP_NAMES
_RA_SIGNED = {name: signed for name, (_, signed) in _TVRandAugment._AUGMENTATION_SPACE.items()}
_RA_TRANSLATE = {"TranslateX", "TranslateY"}

Box = tuple[int, int, int, int]
RaOp = tuple[int, float]


def make_rng(seed: int, uid: str | int, aug_index: int) -> random.Random:
    """A generator seeded per (seed, sample uid, aug index): stable across processes and machines.

    Why sha256 and not ``hash()``: Python salts str hashes per process, which would break determinism.
    """
    return seeded_rng(int(seed), uid, int(aug_index))


def image_hw(img: torch.Tensor) -> tuple[int, int]:
    """(H, W) of a ``[..., C, H, W]`` tensor."""
    return int(img.shape[-2]), int(img.shape[-1])


def _scale_box(box: Sequence[int], ref: int, hw: tuple[int, int]) -> Box:
    """Map a box given at reference size ``ref x ref`` onto an ``H x W`` image (identity when sizes match)."""
    i, j, h, w = (int(v) for v in box)
    H, W = hw
    if (H, W) == (ref, ref):
        return i, j, h, w
    i2, j2 = round(i * H / ref), round(j * W / ref)
    h2 = max(1, min(H - i2, round(h * H / ref)))
    w2 = max(1, min(W - j2, round(w * W / ref)))
    return i2, j2, h2, w2


def _sample_box(
    rng: random.Random,
    hw: tuple[int, int],
    scale: Sequence[float],
    ratio: Sequence[float],
    ratio_is_h_over_w: bool,
) -> Box | None:
    """torchvision's 10-try area/aspect box sampler, driven by ``rng``; None when no try fits."""
    H, W = hw
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = H * W * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        a, b = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        h, w = (a, b) if ratio_is_h_over_w else (b, a)
        if 0 < h <= H and 0 < w <= W:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    return None


@dataclass(frozen=True)
class RandomResizedCropOp:
    """RandomResizedCrop; params: the box ``(i, j, h, w)`` in source pixels (torchvision's algorithm)."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"

    def sample(self, rng: random.Random, image_size: tuple[int, int]) -> Box:
        box = _sample_box(rng, image_size, self.scale, self.ratio, ratio_is_h_over_w=False)
        if box is not None:
            return box
        # Fallback to a central crop clipped to the ratio range, as torchvision does.
        H, W = image_size
        in_ratio = W / H
        if in_ratio < min(self.ratio):
            w, h = W, int(round(W / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = H, int(round(H * max(self.ratio)))
        else:
            h, w = H, W
        return (H - h) // 2, (W - w) // 2, h, w

    def apply(self, img: torch.Tensor, params: Sequence[int], size: int | None = None) -> torch.Tensor:
        """``[C, H, W]`` source -> ``[C, size, size]`` (``size`` defaults to the recipe's reference size)."""
        s = int(size or self.size)
        i, j, h, w = (int(v) for v in params)
        return F.resized_crop(
            img, i, j, h, w, [s, s], interpolation=InterpolationMode(self.interpolation), antialias=True
        )


@dataclass(frozen=True)
class HorizontalFlipOp:
    """Horizontal flip with probability ``p``; params: a bool."""

    p: float = 0.5

    def sample(self, rng: random.Random, image_size: tuple[int, int]) -> bool:
        return rng.random() < self.p

    def apply(self, img: torch.Tensor, params: bool) -> torch.Tensor:
        return F.horizontal_flip(img) if params else img


def _ra_magnitude(name: str, bin_index: int, num_bins: int, hw: tuple[int, int]) -> float:
    """Unsigned magnitude of torchvision's RandAugment op ``name`` at bin ``bin_index`` for an H x W image."""
    fn, _ = _TVRandAugment._AUGMENTATION_SPACE[name]
    mags = fn(num_bins, hw[0], hw[1])
    return 0.0 if mags is None else float(mags[bin_index])


def apply_ra_op(
    img: torch.Tensor, name: str, magnitude: float, interpolation: str = "nearest", fill: float | None = None
) -> torch.Tensor:
    """One RandAugment op with torchvision's semantics, through the public ``v2.functional`` API."""
    interp = InterpolationMode(interpolation)
    fill_ = None if fill is None else [float(fill)]
    if name == "Identity":
        return img
    if name in ("ShearX", "ShearY"):
        sh = math.degrees(math.atan(magnitude))
        shear = [sh, 0.0] if name == "ShearX" else [0.0, sh]
        return F.affine(
            img,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=shear,
            interpolation=interp,
            fill=fill_,
            center=[0, 0],
        )
    if name in _RA_TRANSLATE:
        t = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return F.affine(
            img, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0], interpolation=interp, fill=fill_
        )
    if name == "Rotate":
        return F.rotate(img, angle=magnitude, interpolation=interp, fill=fill_)
    simple = {
        "Brightness": F.adjust_brightness,
        "Color": F.adjust_saturation,
        "Contrast": F.adjust_contrast,
        "Sharpness": F.adjust_sharpness,
    }
    if name in simple:
        return simple[name](img, 1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(img, int(magnitude))
    if name == "Solarize":
        bound = 1.0 if img.is_floating_point() else 255.0
        return F.solarize(img, bound * magnitude)
    unary = {"AutoContrast": F.autocontrast, "Equalize": F.equalize}
    if name in unary:
        return unary[name](img)
    raise ValueError(f"unknown RandAugment op {name!r}")


@dataclass(frozen=True)
class RandAugmentOp:
    """torchvision RandAugment made replayable.

    params: None (whole RandAugment skipped, probability ``1 - p``) or a list of ``num_ops`` entries
    ``(op_index, signed_magnitude)``; an entry may be None (op skipped). ``op_index`` indexes :data:`RA_OP_NAMES`;
    the magnitude is the value torchvision uses at bin ``magnitude`` (signed with probability 1/2 for signed
    ops), computed at the reference size ``ref_size`` (Translate magnitudes are pixels, rescaled on replay).
    """

    num_ops: int = 2
    magnitude: int = 9
    num_bins: int = 31
    p: float = 1.0
    interpolation: str = "nearest"
    fill: float | None = None
    ref_size: int = 224

    def sample(self, rng: random.Random, image_size: tuple[int, int]) -> list[RaOp | None] | None:
        if rng.random() >= self.p:
            return None
        ops: list[RaOp | None] = []
        for _ in range(self.num_ops):
            idx = rng.randrange(len(RA_OP_NAMES))
            name = RA_OP_NAMES[idx]
            mag = _ra_magnitude(name, self.magnitude, self.num_bins, image_size)
            if _RA_SIGNED[name] and rng.random() < 0.5:
                mag = -mag
            ops.append((idx, mag))
        return ops

    def apply(self, img: torch.Tensor, params: Sequence[Sequence[float] | None] | None) -> torch.Tensor:
        if params is None:
            return img
        H, W = image_hw(img)
        for op in params:
            if op is None:
                continue
            name, mag = RA_OP_NAMES[int(op[0])], float(op[1])
            if name == "TranslateX" and W != self.ref_size:
                mag = mag * W / self.ref_size
            elif name == "TranslateY" and H != self.ref_size:
                mag = mag * H / self.ref_size
            img = apply_ra_op(img, name, mag, self.interpolation, self.fill)
        return img


@dataclass(frozen=True)
class RandomErasingOp:
    """RandomErasing; params: None or the box ``(i, j, h, w)`` at the reference size.

    ``value`` is in [0, 1] image units (scaled to 255 for uint8 images); torchvision's default 0 (black).
    """

    p: float = 0.25
    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float = 0.0
    ref_size: int = 224

    def sample(self, rng: random.Random, image_size: tuple[int, int]) -> Box | None:
        if rng.random() >= self.p:
            return None
        box = _sample_box(rng, image_size, self.scale, self.ratio, ratio_is_h_over_w=True)
        # torchvision requires a strictly smaller box; else it erases nothing.
        if box is None or box[2] >= image_size[0] or box[3] >= image_size[1]:
            return None
        return box

    def apply(self, img: torch.Tensor, params: Sequence[int] | None) -> torch.Tensor:
        if params is None:
            return img
        i, j, h, w = _scale_box(params, self.ref_size, image_hw(img))
        v = self.value if img.is_floating_point() else round(self.value * 255)
        out = img.clone()
        out[..., i : i + h, j : j + w] = v
        return out


@dataclass(frozen=True)
class MixParams:
    """One MixUp or CutMix draw: ``lam`` weights this image (the label weight), ``box`` the CutMix box at the
    reference size (None for MixUp), ``partner`` the partner's id (batch index or uid), ``partner_params`` the
    partner image's own per-image augmentation (so the mixed image can be replayed exactly)."""

    kind: str
    lam: float
    box: Box | None = None
    partner: int | str | None = None
    partner_params: AugParams | None = None


@dataclass(frozen=True)
class MixOp:
    """MixUp (lam ~ Beta(a, a)) or CutMix (box of area 1 - lam), chosen with ``switch_prob``; applied with
    probability ``p``. The CutMix ``lam`` is corrected to the box's real area (as timm does)."""

    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    p: float = 1.0
    ref_size: int = 224

    def sample(self, rng: random.Random, image_size: tuple[int, int]) -> tuple[str, float, Box | None] | None:
        if rng.random() >= self.p:
            return None
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        if not use_cutmix:
            return "mixup", rng.betavariate(self.mixup_alpha, self.mixup_alpha), None
        lam = rng.betavariate(self.cutmix_alpha, self.cutmix_alpha)
        H, W = image_size
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = rng.randint(0, H - 1), rng.randint(0, W - 1)
        i0, i1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        j0, j1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        lam = 1.0 - (i1 - i0) * (j1 - j0) / (H * W)
        return "cutmix", lam, (i0, j0, i1 - i0, j1 - j0)

    def apply(self, img: torch.Tensor, partner: torch.Tensor, mix: MixParams) -> torch.Tensor:
        """Mix ``img`` with the already-augmented ``partner`` (same shape); returns float in [0, 1] for both kinds
        (why: a batch mixes mixed and unmixed samples, and MixUp of uint8 is not uint8)."""
        a, b = _as_unit_float(img), _as_unit_float(partner)
        if mix.kind == "mixup":
            return a * mix.lam + b * (1.0 - mix.lam)
        if mix.kind != "cutmix" or mix.box is None:
            raise ValueError(f"bad mix params {mix}")
        i, j, h, w = _scale_box(mix.box, self.ref_size, image_hw(img))
        a[..., i : i + h, j : j + w] = b[..., i : i + h, j : j + w]
        return a


def _as_unit_float(img: torch.Tensor) -> torch.Tensor:
    """A float copy in [0, 1] (uint8 / 255)."""
    return img.float().clone() if img.is_floating_point() else img.float() / 255.0


@dataclass(frozen=True)
class AugParams:
    """The parameters of one replayable augmentation of one image.

    ``flip``/``ra``/``erase``/``mix`` are None when the recipe lacks the stage or the draw skipped it.
    """

    crop: Box
    flip: bool | None = None
    ra: tuple[RaOp | None, ...] | None = None
    erase: Box | None = None
    mix: MixParams | None = None


RECIPES = {
    # Crop only: with scale (0.9, 1.0) this is open_clip's own training augmentation (the plain CLIP baseline's).
    "rrc": (),
    "rrc_flip": ("flip",),
    "rrc_flip_ra_re": ("flip", "ra", "erase"),
    "rrc_flip_ra_re_mix": ("flip", "ra", "erase", "mix"),
    # DataCompDR-12M's image augmentation: RandomResizedCrop (bicubic, 224) + RandAugment(p=1), no flip.
    "rrc_ra": ("ra",),
}


@dataclass(frozen=True)
class AugRecipe:
    """An augmentation recipe and all its hyper-parameters; ``size`` is the generation (reference) size."""

    name: str = "rrc_flip_ra_re"
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    flip_p: float = 0.5
    ra_num_ops: int = 2
    ra_magnitude: int = 9
    ra_num_bins: int = 31
    ra_p: float = 1.0
    ra_interpolation: str = "nearest"
    erase_p: float = 0.25
    erase_scale: tuple[float, float] = (0.02, 0.33)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    erase_value: float = 0.0
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    mix_switch_prob: float = 0.5
    mix_p: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown augmentation recipe {self.name!r}; known: {sorted(RECIPES)}")

    @property
    def stages(self) -> tuple[str, ...]:
        """Enabled stages after the crop, in the fixed order flip, ra, erase, mix."""
        return RECIPES[self.name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugRecipe:
        """Strict inverse of :meth:`to_dict`: unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown augmentation recipe keys: {unknown}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


def json_safe(x: Any) -> Any:
    """Tuples -> lists recursively (JSON has no tuples)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class ReplayableAugment:
    """Compose the recipe's ops in the fixed order RRC, flip, RandAugment, RandomErasing, then mixing.

    ``sample`` draws an :class:`AugParams`; ``apply`` renders the per-image stages at any size; mixing needs the
    partner image (``apply_mix`` / ``replay``) and the labels are mixed by ``mix_labels``.
    """

    def __init__(self, recipe: AugRecipe | str = "rrc_flip_ra_re") -> None:
        r = AugRecipe(name=recipe) if isinstance(recipe, str) else recipe
        self.recipe = r
        self.crop = RandomResizedCropOp(r.size, tuple(r.scale), tuple(r.ratio), r.interpolation)
        st = r.stages
        self.flip = HorizontalFlipOp(r.flip_p) if "flip" in st else None
        self.ra = (
            RandAugmentOp(
                r.ra_num_ops, r.ra_magnitude, r.ra_num_bins, r.ra_p, r.ra_interpolation, None, r.size
            )
            if "ra" in st
            else None
        )
        self.erase = (
            RandomErasingOp(r.erase_p, tuple(r.erase_scale), tuple(r.erase_ratio), r.erase_value, r.size)
            if "erase" in st
            else None
        )
        self.mix = (
            MixOp(r.mixup_alpha, r.cutmix_alpha, r.mix_switch_prob, r.mix_p, r.size) if "mix" in st else None
        )

    def sample_single(self, rng: random.Random, image_size: tuple[int, int]) -> AugParams:
        """Per-image params (no mixing) for a source image of ``image_size = (H, W)``."""
        ref = (self.recipe.size, self.recipe.size)
        crop = self.crop.sample(rng, image_size)
        flip = self.flip.sample(rng, ref) if self.flip else None
        ra = self.ra.sample(rng, ref) if self.ra else None
        erase = self.erase.sample(rng, ref) if self.erase else None
        return AugParams(crop, flip, None if ra is None else tuple(ra), erase)

    def sample(
        self,
        rng: random.Random,
        image_size: tuple[int, int],
        partner: int | str | None = None,
        partner_size: tuple[int, int] | None = None,
    ) -> AugParams:
        """Full params; with a mixing recipe and a ``partner`` id, also the partner's own params and the mix."""
        p = self.sample_single(rng, image_size)
        if self.mix is None or partner is None:
            return p
        pp = self.sample_single(rng, partner_size or image_size)
        draw = self.mix.sample(rng, (self.recipe.size, self.recipe.size))
        if draw is None:
            return p
        kind, lam, box = draw
        return dataclasses.replace(p, mix=MixParams(kind, lam, box, partner, pp))

    def sample_for(
        self,
        seed: int,
        uid: str | int,
        aug_index: int,
        image_size: tuple[int, int],
        partner: int | str | None = None,
        partner_size: tuple[int, int] | None = None,
    ) -> AugParams:
        """Deterministic draw for (seed, uid, aug_index)."""
        return self.sample(make_rng(seed, uid, aug_index), image_size, partner, partner_size)

    def apply(self, img: torch.Tensor, params: AugParams, size: int | None = None) -> torch.Tensor:
        """Per-image stages (no mixing): ``[C, H, W]`` source -> ``[C, size, size]``."""
        out = self.crop.apply(img, params.crop, size)
        if self.flip is not None and params.flip is not None:
            out = self.flip.apply(out, params.flip)
        if self.ra is not None:
            out = self.ra.apply(out, params.ra)
        if self.erase is not None:
            out = self.erase.apply(out, params.erase)
        return out

    def apply_mix(self, img: torch.Tensor, partner_img: torch.Tensor, mix: MixParams | None) -> torch.Tensor:
        """Mix two already-augmented images of the same shape ``[C, S, S]``."""
        if mix is None:
            return img
        if self.mix is None:
            raise ValueError(f"recipe {self.recipe.name!r} has no mixing stage")
        return self.mix.apply(img, partner_img, mix)

    @staticmethod
    def mix_labels(y: torch.Tensor, y_partner: torch.Tensor, mix: MixParams | None) -> torch.Tensor:
        """``lam * y + (1 - lam) * y_partner`` for label vectors ``[..., num_classes]`` (float)."""
        if mix is None:
            return y
        return y.float() * mix.lam + y_partner.float() * (1.0 - mix.lam)

    def replay(
        self,
        img: torch.Tensor,
        params: AugParams,
        size: int | None = None,
        partner_img: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Everything, mixing included: ``partner_img`` is the partner's SOURCE image (needed iff mixed)."""
        out = self.apply(img, params, size)
        if params.mix is None:
            return out
        if partner_img is None or params.mix.partner_params is None:
            raise ValueError(f"params mix with partner {params.mix.partner!r}: its source image is needed")
        other = self.apply(partner_img, params.mix.partner_params, size)
        return self.apply_mix(out, other, params.mix)

    def __call__(
        self,
        img: torch.Tensor,
        rng: random.Random,
        partner_img: torch.Tensor | None = None,
        partner: int | str | None = None,
    ) -> tuple[torch.Tensor, AugParams]:
        """Sample then replay (what generation does): returns ``(image [C, S, S], params)``."""
        p_size = image_hw(partner_img) if partner_img is not None else None
        params = self.sample(rng, image_hw(img), partner if partner_img is not None else None, p_size)
        return self.replay(img, params, partner_img=partner_img), params


# ---------------------------------------------------------------------------------------------- compact JSON
def _box_json(box: Sequence[int] | None) -> list[int] | None:
    return None if box is None else [int(v) for v in box]


def _ra_json(ra: Sequence[Sequence[float] | None] | None) -> list | None:
    if ra is None:
        return None
    return [None if op is None else [int(op[0]), float(op[1])] for op in ra]


def _single_json(p: AugParams, stages: tuple[str, ...]) -> list[Any]:
    out: list[Any] = [_box_json(p.crop)]
    if "flip" in stages:
        out.append(bool(p.flip))
    if "ra" in stages:
        out.append(_ra_json(p.ra))
    if "erase" in stages:
        out.append(_box_json(p.erase))
    return out


def params_to_json(params: AugParams, recipe: AugRecipe | str = "rrc_ra") -> list[Any]:
    """Compact positional JSON entry for one augmentation.

    Layout: ``[partner?, crop, flip?, ra?, erase?, mix?]`` with only the recipe's stages present. For DataCompDR's
    recipe (``rrc_ra``) this is exactly its ``paug.json`` entry ``[[i, j, h, w], [[op, mag], [op, mag]]]``. A mixing
    recipe prefixes the partner id (null when not mixed); when mixed, every per-image slot becomes the pair
    ``[own, partner's]`` (DataCompDR's pair layout) and the last slot is ``["mixup", lam]`` or
    ``["cutmix", lam, [i, j, h, w]]``.
    """
    r = AugRecipe(name=recipe) if isinstance(recipe, str) else recipe
    stages = tuple(s for s in r.stages if s != "mix")
    own = _single_json(params, stages)
    if "mix" not in r.stages:
        return own
    m = params.mix
    if m is None:
        return [None, *own, None]
    if m.partner_params is None:
        raise ValueError("mixed params need partner_params to be stored")
    other = _single_json(m.partner_params, stages)
    mix = ["mixup", float(m.lam)] if m.kind == "mixup" else ["cutmix", float(m.lam), _box_json(m.box)]
    return [m.partner, *[[a, b] for a, b in zip(own, other, strict=True)], mix]


def _box_from(x: Any, what: str) -> Box | None:
    if x is None:
        return None
    if not (isinstance(x, list) and len(x) == 4 and all(isinstance(v, (int, float)) for v in x)):
        raise ValueError(f"{what}: expected [i, j, h, w], got {x!r}")
    return tuple(int(v) for v in x)  # type: ignore[return-value]


def _ra_from(x: Any) -> tuple[RaOp | None, ...] | None:
    if x is None:
        return None
    if not isinstance(x, list):
        raise ValueError(f"RandAugment: expected a list of [op_index, magnitude], got {x!r}")
    ops: list[RaOp | None] = []
    for op in x:
        if op is None:
            ops.append(None)
            continue
        if not (isinstance(op, list) and len(op) == 2 and 0 <= int(op[0]) < len(RA_OP_NAMES)):
            raise ValueError(f"RandAugment op: expected [op_index in 0..13, magnitude], got {op!r}")
        ops.append((int(op[0]), float(op[1])))
    return tuple(ops)


def _single_from(slots: list[Any], stages: tuple[str, ...]) -> AugParams:
    it = iter(slots)
    crop = _box_from(next(it), "crop")
    if crop is None:
        raise ValueError("crop box missing")
    flip = bool(next(it)) if "flip" in stages else None
    ra = _ra_from(next(it)) if "ra" in stages else None
    erase = _box_from(next(it), "erase") if "erase" in stages else None
    return AugParams(crop, flip, ra, erase)


def params_from_json(entry: list[Any], recipe: AugRecipe | str = "rrc_ra") -> AugParams:
    """Inverse of :func:`params_to_json`; a malformed entry raises ``ValueError`` saying what is wrong."""
    r = AugRecipe(name=recipe) if isinstance(recipe, str) else recipe
    stages = tuple(s for s in r.stages if s != "mix")
    n = 1 + len(stages) + (2 if "mix" in r.stages else 0)
    if not isinstance(entry, list) or len(entry) != n:
        raise ValueError(f"recipe {r.name!r} expects a list of {n} slots, got {entry!r}")
    if "mix" not in r.stages:
        return _single_from(entry, stages)
    partner, slots, mix = entry[0], entry[1:-1], entry[-1]
    if partner is None or mix is None:
        return _single_from(slots, stages)
    own = _single_from([s[0] for s in slots], stages)
    other = _single_from([s[1] for s in slots], stages)
    if mix[0] == "mixup" and len(mix) == 2:
        m = MixParams("mixup", float(mix[1]), None, partner, other)
    elif mix[0] == "cutmix" and len(mix) == 3:
        m = MixParams("cutmix", float(mix[1]), _box_from(mix[2], "cutmix"), partner, other)
    else:
        raise ValueError(f"mix slot: expected ['mixup', lam] or ['cutmix', lam, box], got {mix!r}")
    return dataclasses.replace(own, mix=m)


def paug_to_json(params: Sequence[AugParams], recipe: AugRecipe | str = "rrc_ra") -> dict[str, list]:
    """``{"param_aug": [entry, ...]}``: DataCompDR's ``paug.json`` object."""
    return {"param_aug": [params_to_json(p, recipe) for p in params]}


def paug_from_json(obj: dict[str, Any], recipe: AugRecipe | str = "rrc_ra") -> list[AugParams]:
    """Parse a ``paug.json`` object (DataCompDR's or vfmkit's extended layout)."""
    if not isinstance(obj, dict) or "param_aug" not in obj:
        raise ValueError("paug.json: expected an object with key 'param_aug'")
    return [params_from_json(e, recipe) for e in obj["param_aug"]]


# ---------------------------------------------------------------------------------------------- student step
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def to_student(
    img: torch.Tensor,
    size: int | None = None,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> torch.Tensor:
    """The separate step after replay: ``[C, H, W]`` (uint8 or float in [0, 1]) -> normalised float
    ``[C, size, size]`` (resized only when the replayed size differs)."""
    if size is not None and image_hw(img) != (size, size):
        img = F.resize(img, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.normalize(_as_unit_float(img).clamp(0.0, 1.0), list(mean), list(std))
