"""Replayable augmentations: apply == replay from (JSON round-tripped) params, on real images."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from vfmkit.data.augment import (
    RA_OP_NAMES,
    RECIPES,
    AugParams,
    AugRecipe,
    HorizontalFlipOp,
    RandAugmentOp,
    RandomErasingOp,
    RandomResizedCropOp,
    ReplayableAugment,
    apply_ra_op,
    make_rng,
    params_from_json,
    params_to_json,
    paug_from_json,
    paug_to_json,
    to_student,
)

DATA = Path(__file__).parent / "data"
# DataCompDR's (ml-mobileclip-dr) RandAugment op list, in its stored index order.
DATACOMPDR_OPS = [
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
]


@pytest.fixture(scope="module")
def flickr() -> torch.Tensor:
    """A real Flickr8k (train split) photo, 160 wide x 120 high, uint8 [3, 120, 160]."""
    return F.pil_to_tensor(Image.open(DATA / "flickr8k_1000268201_693b08cb0e_160x120.jpg").convert("RGB"))


@pytest.fixture(scope="module")
def tench() -> torch.Tensor:
    """A real Imagenette photo, uint8 [3, 128, 128]."""
    return F.pil_to_tensor(
        Image.open(DATA / "imagenette_n01440764_ILSVRC2012_val_00000293.JPEG").convert("RGB")
    )


def _roundtrip(p: AugParams, recipe: AugRecipe) -> AugParams:
    return params_from_json(json.loads(json.dumps(params_to_json(p, recipe))), recipe)


def test_op_names_are_torchvision_and_datacompdr_order():
    assert list(RA_OP_NAMES) == list(v2.RandAugment._AUGMENTATION_SPACE) == DATACOMPDR_OPS


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_every_randaugment_op_matches_torchvision(flickr, dtype):
    img = flickr if dtype == torch.uint8 else flickr.float() / 255
    tv = v2.RandAugment()
    for name in RA_OP_NAMES:
        fn, signed = v2.RandAugment._AUGMENTATION_SPACE[name]
        mags = fn(31, *img.shape[-2:])
        mag = 0.0 if mags is None else float(mags[9])
        for m in [mag, -mag] if signed else [mag]:
            want = tv._apply_image_or_video_transform(
                img, name, m, interpolation=tv.interpolation, fill=tv._fill
            )
            assert torch.equal(apply_ra_op(img, name, m), want), name


def test_randaugment_replays_every_op_exactly(flickr):
    op = RandAugmentOp(ref_size=120)
    img = F.center_crop(flickr, [120, 120])
    for idx, name in enumerate(RA_OP_NAMES):
        fn, signed = v2.RandAugment._AUGMENTATION_SPACE[name]
        mags = fn(31, 120, 120)
        mag = -float(mags[9]) if signed else (0.0 if mags is None else float(mags[9]))
        p = AugParams((0, 0, 120, 120), ra=((idx, mag), None))
        recipe = AugRecipe("rrc_ra", size=120)
        q = _roundtrip(p, recipe)
        assert q == p
        out = op.apply(img, q.ra)
        assert torch.equal(out, op.apply(img, p.ra))
        if name not in ("Identity",):
            assert not torch.equal(out, img) or name in ("Equalize", "AutoContrast", "Sharpness"), name


def test_sampled_params_vary_and_are_deterministic(flickr):
    aug = ReplayableAugment(AugRecipe("rrc_flip_ra_re", size=64, erase_p=0.5))
    hw = tuple(flickr.shape[-2:])
    draws = [aug.sample_for(0, f"uid{u}", a, hw) for u in range(4) for a in range(5)]
    assert len({d.crop for d in draws}) == len(draws)
    assert {d.flip for d in draws} == {True, False}
    assert len({d.ra for d in draws}) > 10
    assert any(d.erase is None for d in draws) and any(d.erase is not None for d in draws)
    assert aug.sample_for(0, "uid1", 3, hw) == aug.sample_for(0, "uid1", 3, hw)
    assert aug.sample_for(1, "uid1", 3, hw) != aug.sample_for(0, "uid1", 3, hw)


def test_rrc_box_respects_scale_and_ratio(flickr):
    op = RandomResizedCropOp(size=64)
    H, W = flickr.shape[-2:]
    for k in range(200):
        i, j, h, w = op.sample(make_rng(3, "x", k), (H, W))
        assert 0 <= i and 0 <= j and i + h <= H and j + w <= W
        area = h * w / (H * W)
        assert 0.05 < area <= 1.0 and 0.6 < w / h < 1.6


def test_rrc_apply_equals_torchvision_transform(flickr):
    op = RandomResizedCropOp(size=64)
    box = op.sample(make_rng(0, "a", 0), tuple(flickr.shape[-2:]))
    tv = v2.RandomResizedCrop(64, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    tv.make_params = lambda flat: dict(top=box[0], left=box[1], height=box[2], width=box[3])
    assert torch.equal(op.apply(flickr, box), tv(flickr))


def test_replay_at_another_resolution_renders_same_box(flickr):
    aug = ReplayableAugment(AugRecipe("rrc_flip", size=64))
    p = _roundtrip(aug.sample_for(0, "u", 0, tuple(flickr.shape[-2:])), aug.recipe)
    for size in (32, 96):
        i, j, h, w = p.crop
        want = F.resize(
            F.crop(flickr, i, j, h, w),
            [size, size],
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        )
        want = F.horizontal_flip(want) if p.flip else want
        assert torch.equal(aug.apply(flickr, p, size=size), want)


def test_erasing_matches_torchvision_and_scales(tench):
    op = RandomErasingOp(p=1.0, ref_size=64)
    img = F.resize(tench, [64, 64])
    box = next(b for k in range(20) if (b := op.sample(make_rng(0, "e", k), (64, 64))) is not None)
    i, j, h, w = box
    assert torch.equal(op.apply(img, box), F.erase(img, i, j, h, w, torch.tensor(0, dtype=torch.uint8)))
    big = op.apply(F.resize(tench, [128, 128]), box)  # replay at 2x: the box doubles
    assert torch.all(big[:, 2 * i : 2 * (i + h), 2 * j : 2 * (j + w)] == 0)
    assert (big == 0).all(0).sum().item() == 4 * h * w


def test_flip_op(flickr):
    op = HorizontalFlipOp(p=0.5)
    assert torch.equal(op.apply(flickr, True), flickr.flip(-1)) and op.apply(flickr, False) is flickr


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_apply_equals_replay_from_json(flickr, tench, name):
    aug = ReplayableAugment(AugRecipe(name, size=64, erase_p=0.5))
    outs = []
    for k in range(6):
        out, p = aug(flickr, make_rng(0, "s", k), partner_img=tench, partner=17)
        q = _roundtrip(p, aug.recipe)
        assert q == p
        assert torch.equal(aug.replay(flickr, q, partner_img=tench), out)
        outs.append(out)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_mixing_replays_with_partner(flickr, tench):
    aug = ReplayableAugment(AugRecipe("rrc_flip_ra_re_mix", size=64, mix_switch_prob=0.5))
    kinds = set()
    for k in range(12):
        p = aug.sample_for(0, "m", k, tuple(flickr.shape[-2:]), partner=5, partner_size=(128, 128))
        assert p.mix is not None and p.mix.partner == 5 and 0.0 <= p.mix.lam <= 1.0
        kinds.add(p.mix.kind)
        a, b = aug.apply(flickr, p), aug.apply(tench, p.mix.partner_params)
        mixed = aug.replay(flickr, _roundtrip(p, aug.recipe), partner_img=tench)
        af, bf = a.float() / 255, b.float() / 255
        if p.mix.kind == "mixup":
            assert torch.allclose(mixed, af * p.mix.lam + bf * (1 - p.mix.lam))
        else:
            i, j, h, w = p.mix.box
            assert torch.equal(mixed[:, i : i + h, j : j + w], bf[:, i : i + h, j : j + w])
            assert math.isclose(p.mix.lam, 1 - h * w / 64**2)
            assert torch.equal(mixed[:, :i], af[:, :i])
        y = aug.mix_labels(torch.eye(3)[0], torch.eye(3)[2], p.mix)
        assert torch.allclose(y, torch.tensor([p.mix.lam, 0.0, 1 - p.mix.lam]))
    assert kinds == {"mixup", "cutmix"}
    with pytest.raises(ValueError, match="source image is needed"):
        aug.replay(flickr, p)


def test_datacompdr_paug_reads_and_writes_exactly():
    text = (
        '{"param_aug": [[[12, 30, 101, 97], [[3, -8.700906753540039], [11, 0.699999988079071]]], '
        "[[0, 0, 160, 160], null], [[5, 6, 70, 80], [null, [13, 0.0]]]]}"
    )
    params = paug_from_json(json.loads(text))
    assert params[0].crop == (12, 30, 101, 97) and params[0].ra == (
        (3, -8.700906753540039),
        (11, 0.699999988079071),
    )
    assert params[1].ra is None and params[2].ra == (None, (13, 0.0))
    assert json.dumps(paug_to_json(params)) == text


def test_malformed_entries_raise():
    for bad in ([[1, 2, 3], None], [[1, 2, 3, 4], [[14, 0.0]]], [[1, 2, 3, 4]], "x"):
        with pytest.raises(ValueError):
            params_from_json(bad, "rrc_ra")
    with pytest.raises(ValueError, match="mix slot"):
        slots = [[[0, 0, 9, 9], [0, 0, 9, 9]], [True, False], [None, None], [None, None]]
        params_from_json([3, *slots, ["blend", 0.5]], "rrc_flip_ra_re_mix")


def test_recipe_dict_round_trip_is_strict():
    r = AugRecipe("rrc_flip_ra_re_mix", size=96, scale=(0.35, 1.0), ra_magnitude=7)
    assert AugRecipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError, match="bogus"):
        AugRecipe.from_dict({**r.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown augmentation recipe"):
        AugRecipe("rrc_everything")


def test_to_student_normalises(flickr):
    x = to_student(flickr, 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= x.min() < 0 < x.max() <= 1.0


def test_translate_rescales_when_replayed_at_another_size(tench):
    op = RandAugmentOp(ref_size=64)
    ix, iy = RA_OP_NAMES.index("TranslateX"), RA_OP_NAMES.index("TranslateY")
    out = op.apply(tench, [(ix, 10.0), (iy, -7.0)])  # 128 px image, magnitudes stored at 64 px
    want = F.affine(tench, angle=0.0, translate=[20, 0], scale=1.0, shear=[0.0, 0.0])
    want = F.affine(want, angle=0.0, translate=[0, -14], scale=1.0, shear=[0.0, 0.0])
    assert torch.equal(out, want)
