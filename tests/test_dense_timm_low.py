"""A timm tower's opt-in stride-8 map (``eval.dense.TimmTower(low_level=True)``, ``seg`` ``timm_low_level``):
the head fuses it and predicts at stride 8; it is recorded in ``dense.json`` so ``load_dense_model`` rebuilds the
same model, and a run saved without it (no key in its ``dense.json``) loads as before. Real timm resnet10t, real
embedded CamVid shards, a few training steps."""

from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)

TRAIN, VAL = "builtin:camvid/train", "builtin:camvid/val"


def _pair(seed: int = 0):
    from vfmkit.eval.dense import build_seg_model

    torch.manual_seed(seed)
    plain = build_seg_model("timm:resnet10t", 11, "aspp", True, 32, True)
    torch.manual_seed(seed)
    low = build_seg_model("timm:resnet10t", 11, "aspp", True, 32, True, timm_low_level=True)
    return plain.eval(), low.eval()


def test_low_level_map_is_stride_8_and_the_head_predicts_at_stride_8():
    plain, low = _pair()
    assert plain.tower.low_channels is None and plain.head.low is None
    # resnet10t: layer2 (128 ch) is its stride-8 stage (timm feature_info)
    assert low.tower.low_channels == 128 and low.head.low is not None
    x = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    with torch.no_grad():
        fp, fl = plain.tower(x), low.tower(x)
        assert set(fp) == {"out"} and set(fl) == {"out", "low"}
        assert tuple(fl["low"].shape) == (2, 128, 12, 16)
        # the same trunk: the last map is unchanged by asking for the stride-8 one too
        assert torch.equal(fp["out"], fl["out"]) and tuple(fl["out"].shape) == (2, 512, 3, 4)
        assert tuple(plain.head(fp).shape[-2:]) == (3, 4)
        logits = low.head(fl)
        assert tuple(logits.shape) == (2, 11, 12, 16)
        # the head sees the stride-8 map: changing it changes the logits
        other = low.head({"out": fl["out"], "low": torch.zeros_like(fl["low"])})
        assert not torch.allclose(logits, other)
        assert tuple(low(x).shape) == (2, 11, 96, 128)


def test_low_level_needs_a_stride_8_map_and_a_timm_tower():
    from vfmkit.eval.dense import load_tower

    with pytest.raises(ValueError, match="no stride-8 feature map"):
        load_tower("timm:vit_tiny_patch16_224", timm_low_level=True)
    with pytest.raises(ValueError, match="timm: towers only"):
        load_tower("efficientnet-lite0", timm_low_level=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vfmkit.methods.seg import dense_probe

    root = tmp_path_factory.mktemp("timm_low")
    out = {}
    for name, on in (("plain", False), ("low", True)):
        out[name] = dense_probe(
            "timm:resnet10t",
            TRAIN,
            VAL,
            out_dir=root / name,
            head="aspp",
            finetune=True,
            steps=6,
            batch_size=4,
            method_args={"width": 16, "crop": [64, 96], "input_size": [72, 96], "timm_low_level": on},
        )
    return root, out


def _score(model) -> float:
    from vfmkit.eval.dense import evaluate_segmentation
    from vfmkit.methods.seg import ordered_dense_loader

    return evaluate_segmentation(model, ordered_dense_loader(VAL, 8, [72, 96], 11, 11), 11, 11)["mIoU"]


def test_saved_run_with_low_level_reloads_the_same_model(runs):
    from vfmkit.eval.dense import load_dense_model

    root, m = runs
    meta = json.loads((root / "low" / "dense.json").read_text())
    assert meta["timm_low_level"] is True
    model = load_dense_model(root / "low")
    assert model.tower.low_channels == 128 and model.head.low is not None
    x = torch.randint(0, 256, (1, 3, 72, 96), dtype=torch.uint8)
    with torch.no_grad():
        assert tuple(model.head(model.tower(x)).shape[-2:]) == (9, 12)  # stride 8 (72x96 -> 36 -> 18 -> 9)
    assert _score(model) == pytest.approx(m["low"]["mIoU"], abs=1e-3)


def test_saved_run_without_the_option_loads_as_before(runs):
    from vfmkit.eval.dense import load_dense_model

    root, m = runs
    meta_path = root / "plain" / "dense.json"
    meta = json.loads(meta_path.read_text())
    assert meta["timm_low_level"] is False
    # a run saved before the option existed has no such key: it must rebuild the stride-32-only model
    del meta["timm_low_level"]
    meta_path.write_text(json.dumps(meta))
    model = load_dense_model(root / "plain")  # strict state-dict load: no extra / missing head weights
    assert model.tower.low_channels is None and model.head.low is None
    x = torch.randint(0, 256, (1, 3, 72, 96), dtype=torch.uint8)
    with torch.no_grad():
        assert set(model.tower(x)) == {"out"}
        assert tuple(model.head(model.tower(x)).shape[-2:]) == (3, 3)  # stride 32
    assert _score(model) == pytest.approx(m["plain"]["mIoU"], abs=1e-3)
