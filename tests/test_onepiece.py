"""The one-of-each helpers (issue 11): atomic writer, image decoder + centre crop, seeded RNG, model-spec
grammar, tar-sample reader key convention, ShardLoader.from_config. Real embedded data only."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vfmkit.config import ConfigError, load_config
from vfmkit.data.decode import (
    decode_float,
    decode_image,
    decode_uint8,
    image_bytes,
    plain_view,
    resize_center_crop,
    square_crop_pil,
)
from vfmkit.data.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, atomic_write_text
from vfmkit.data.loader import ShardLoader
from vfmkit.data.rng import seeded_rng
from vfmkit.data.shards import iter_shard, list_shards
from vfmkit.models.spec import ModelSpecError, parse_model_spec

DATA = Path(__file__).parent / "data"
JPEG = DATA / "flickr8k_1000268201_693b08cb0e_160x120.jpg"


# ---- atomic writer -----------------------------------------------------------------------------------------
def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_round_trip(tmp_path):
    from safetensors.torch import load_file, safe_open

    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_json(tmp_path / "j.json", {"k": "é", "n": [1, 2]}, sort_keys=True)
    lin = torch.nn.Linear(3, 2)
    atomic_save_safetensors(tmp_path / "m.safetensors", lin, metadata={"dims": "[3, 2]"})
    atomic_save_safetensors(tmp_path / "d.safetensors", {"x": torch.arange(6).view(2, 3).t()})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text(encoding="utf-8")) == {"k": "é", "n": [1, 2]}
    sd = load_file(str(tmp_path / "m.safetensors"))
    assert sd.keys() == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight.detach())
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == {"dims": "[3, 2]"}
    assert torch.equal(load_file(str(tmp_path / "d.safetensors"))["x"], torch.arange(6).view(2, 3).t())
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "a") == []


def test_failed_write_leaves_the_old_file_and_no_tmp(tmp_path, monkeypatch):
    p = tmp_path / "report.json"
    atomic_write_json(p, {"v": 1})
    before = p.read_bytes()
    with pytest.raises(TypeError):  # not serialisable: fails before anything is written
        atomic_write_json(p, {"v": object()})
    with pytest.raises(TypeError):  # safetensors metadata must be str -> str
        atomic_save_safetensors(tmp_path / "w.safetensors", {"x": torch.ones(2)}, metadata={"n": 3})

    def boom(src, dst):  # the crash point: data written and fsynced, rename not done
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_json(p, {"v": 2})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert not (tmp_path / "w.safetensors").exists()
    assert _leftovers(tmp_path) == []


# ---- image decoding and the centre crop ----------------------------------------------------------------------
def test_decode_real_jpeg_every_form():
    data = JPEG.read_bytes()
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (160, 120)
    with Image.open(JPEG) as ref:
        want = torch.from_numpy(np.asarray(ref.convert("RGB")).copy()).permute(2, 0, 1)
    u8 = decode_uint8({"__key__": "k", "jpg": data})
    assert u8.dtype == torch.uint8 and torch.equal(u8, want)
    assert torch.equal(decode_float(data), want.float() / 255.0)
    tv = decode_uint8(data, backend="torchvision")
    assert (
        tv.shape == want.shape and (tv.int() - want.int()).abs().float().mean() < 2.0
    )  # libjpeg rounding only
    assert image_bytes({"png": b"p", "jpg": b"j"}) == b"j"
    with pytest.raises(KeyError, match="jpg/jpeg/png/webp"):
        decode_image({"__key__": "k", "txt": b"x"})
    with pytest.raises(ValueError, match="sample-7"):
        decode_image({"__key__": "sample-7", "jpg": data[: len(data) // 3] + b"garbage"})
    with pytest.raises(ValueError, match="backend"):
        decode_uint8(data, backend="cv2")


def test_decode_embedded_shard_sample():
    raw = next(iter_shard(list_shards("builtin:imagenette/val")[0]))
    img = decode_uint8(raw)
    assert img.dtype == torch.uint8 and img.shape[0] == 3 and min(img.shape[1:]) > 32


def test_center_crop_forms_agree():
    u8 = decode_uint8(JPEG.read_bytes())  # 3 x 120 x 160
    f = u8.float() / 255.0
    one = resize_center_crop(f[None], 64, "bicubic")
    assert one.shape == (1, 3, 64, 64) and 0.0 <= one.min() and one.max() <= 1.0
    assert torch.equal(resize_center_crop(f, 64, "bicubic"), one[0])  # [3, H, W] is one image
    assert torch.equal(resize_center_crop(u8, 64, "bicubic"), one[0])  # uint8 is scaled to [0, 1]
    # the centre: cropping the resized image's middle by hand gives the same pixels
    full = torch.nn.functional.interpolate(
        f[None], size=(64, 85), mode="bilinear", antialias=True, align_corners=False
    ).clamp(0, 1)
    assert torch.equal(resize_center_crop(f[None], 64), full[..., :, 10:74])
    assert resize_center_crop(f[None], 48, mode="squash").shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        resize_center_crop(torch.zeros(2, 1, 8, 8), 4)


def test_uint8_views_keep_the_centre():
    data = JPEG.read_bytes()
    u8 = decode_uint8(data)  # 3 x 120 x 160: the centre square is columns 20..139
    assert torch.equal(square_crop_pil(decode_image(data), 120), u8[:, :, 20:140])
    assert torch.equal(plain_view(u8, 120), u8[:, :, 20:140])
    small = square_crop_pil(decode_image(data), 32)
    assert small.shape == (3, 32, 32) and small.dtype == torch.uint8
    assert plain_view(u8, 32).shape == (3, 32, 32)


# ---- the seeded RNG -------------------------------------------------------------------------------------------
def test_seeded_rng_is_the_sha256_of_the_parts():
    digest = hashlib.sha256(b"replay|3|1|uid-9").digest()
    ref = random.Random(int.from_bytes(digest[:8], "little"))
    rng = seeded_rng("replay", 3, 1, "uid-9")
    assert [rng.random() for _ in range(5)] == [ref.random() for _ in range(5)]
    assert seeded_rng(0, "a", 1).random() != seeded_rng(0, "a", 2).random()


# ---- the model-spec grammar -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,want",
    [
        ("openclip:ViT-L-14:datacomp_xl_s13b_b90k", ("openclip", "ViT-L-14", "datacomp_xl_s13b_b90k", None)),
        (
            "openclip:vfm-tiny-vit:/w/tiny.safetensors",
            ("openclip", "vfm-tiny-vit", "/w/tiny.safetensors", None),
        ),
        ("openclip:vfm-tiny-vit", ("openclip", "vfm-tiny-vit", None, None)),
        ("clip:vfm-tiny-vit:CKPT", ("openclip", "vfm-tiny-vit", "CKPT", None)),
        ("clip:vfm-tiny-vit@64", ("openclip", "vfm-tiny-vit", None, 64)),
        ("timm:test_byobnet:random@64", ("timm", "test_byobnet", "random", 64)),
        ("timm:test_resnet:/a/b:c.safetensors", ("timm", "test_resnet", "/a/b:c.safetensors", None)),
        ("timm:resnet18", ("timm", "resnet18", None, None)),
        ("timm:resnet18:pretrained", ("timm", "resnet18", "pretrained", None)),
        ("efficientnet-lite0", ("efficientnet-lite0", "efficientnet-lite0", None, None)),
        ("efficientnet-lite0@128", ("efficientnet-lite0", "efficientnet-lite0", None, 128)),
        ("offline", ("offline", "offline", None, None)),
        ("vfm-tiny-vit", ("name", "vfm-tiny-vit", None, None)),
        ("hf-hub:org/model", ("name", "hf-hub:org/model", None, None)),
        ("ckpt@v2", ("name", "ckpt@v2", None, None)),
    ],
)
def test_spec_grammar_parses_every_spelling(text, want):
    s = parse_model_spec(text)
    assert (s.kind, s.name, s.source, s.size) == want and s.text == text


def test_spec_directories_and_errors(tmp_path):
    s = parse_model_spec(tmp_path)
    assert s.kind == "path" and s.name == str(tmp_path)
    for bad in ("", " timm:x", "openclip:", "timm::ckpt", "offline@32"):
        with pytest.raises(ModelSpecError):
            parse_model_spec(bad)
    with pytest.raises(ModelSpecError, match="expected one of: timm"):
        parse_model_spec("offline").require("timm", what="encoder")
    with pytest.raises(ModelSpecError, match="@SIZE"):
        parse_model_spec("openclip:x@32").require("openclip", size=False)


# ---- the one tar reader's key convention ------------------------------------------------------------------
def test_iter_shard_keys_match_the_training_loader(tmp_path):
    tar = tmp_path / "nested-000000.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in [
            ("d/000.jpg", b"a"),
            ("d/000.json", b"{}"),
            ("d/001.jpg", b"b"),
            ("e/001.seg.png", b"c"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    ours = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_shard(str(tar))]
    theirs = [
        {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
        for s in wds.DataPipeline(wds.SimpleShardList([str(tar)]), wds.tarfile_to_samples())
    ]
    assert ours == theirs
    assert [s["__key__"] for s in ours] == ["d/000", "d/001", "e/001"] and ours[2]["seg.png"] == b"c"


# ---- ShardLoader.from_config ------------------------------------------------------------------------------
def test_loader_from_config_matches_the_constructor():
    cfg = load_config(
        "clip_tiny",
        ["data.train=builtin:flickr8k/heldout", "data.batch_size=8", "data.shuffle_buffer=16", "seed=5"],
    )

    def key(raw):
        return {"key": raw["__key__"]}

    got = ShardLoader.from_config(cfg, key, None)
    ref = ShardLoader(
        cfg.data.train,
        key,
        8,
        shuffle_buffer=16,
        seed=5,
        num_workers=cfg.data.num_workers,
        resampled=cfg.data.resampled,
        on_corrupt=cfg.data.on_corrupt,
        drop_last=True,
    )
    first = [b["key"] for b, _ in zip(got, range(3), strict=False)]
    assert first == [b["key"] for b, _ in zip(ref, range(3), strict=False)] and len(first[0]) == 8
    val = ShardLoader.from_config(
        cfg, key, None, urls="builtin:imagenette/val", batch_size=4, shuffle_buffer=0
    )
    assert val.urls == list_shards("builtin:imagenette/val") and val.batch_size == 4
    with pytest.raises(TypeError, match="bogus"):
        ShardLoader.from_config(cfg, key, None, bogus=1)
    with pytest.raises(
        ConfigError, match="data.on_corrupt"
    ):  # load_config refuses it before anything is built
        load_config("clip_tiny", ["data.on_corrupt=ignore"])
    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_corrupt="ignore"))  # unvalidated
    with pytest.raises(ConfigError, match="data.on_corrupt"):
        ShardLoader.from_config(bad, key, None)
