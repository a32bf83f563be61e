"""Teachers on real weights and real (embedded) data: EfficientNet-Lite0 on Imagenette, the shipped offline
CLIP-like teacher on held-out Flickr8k pairs, open_clip teachers from local checkpoints, ensembles."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F

from vfmkit.data.builtin import imagenette_classes
from vfmkit.data.decode import decode_float
from vfmkit.data.shards import list_shards
from vfmkit.eval.retrieval import retrieval_metrics
from vfmkit.models.offline_teacher import (
    OfflineHeads,
    load_offline_heads,
    save_offline_teacher,
)
from vfmkit.models.teachers import (
    ClassifierEnsemble,
    TeacherEnsemble,
    load_classifier,
    load_classifier_ensemble,
    load_ensemble,
    load_teacher,
    resize_center_crop,
)


def builtin_samples(name: str, limit: int | None = None) -> list[dict]:
    """Samples of an embedded shard set: {"key", "jpg": bytes, "json": dict}, in shard order."""
    out: dict[str, dict] = {}
    for url in list_shards(f"builtin:{name}"):
        with tarfile.open(url) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = m.name.rsplit(".", 1)
                data = tf.extractfile(m).read()
                out.setdefault(key, {"key": key})[ext] = json.loads(data) if ext == "json" else data
    samples = [out[k] for k in sorted(out)]
    return samples[:limit] if limit else samples


def images_of(samples: list[dict]) -> torch.Tensor:
    return torch.stack([decode_float(s["jpg"], name=s["key"]) for s in samples])


# ----------------------------------------------------------------------------------------- real classifier


@pytest.fixture(scope="module")
def imagenette_val() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    classes = imagenette_classes()  # sorted wnids; labels index into this order
    samples = builtin_samples("imagenette/val")
    labels = torch.tensor([s["json"]["label"] for s in samples])
    assert [classes[s["json"]["wnid"]]["imagenet_index"] for s in samples[:1]]  # label/wnid metadata present
    return images_of(samples), labels, [c["imagenet_index"] for c in classes.values()]


def test_efficientnet_lite0_imagenette_top1(imagenette_val) -> None:
    images, labels, index = imagenette_val
    teacher = load_classifier("efficientnet-lite0", class_index=index)
    with torch.no_grad():
        logits = torch.cat([teacher(images[s : s + 50]) for s in range(0, len(images), 50)])
    assert logits.shape == (len(images), 10)
    top1 = (logits.argmax(-1) == labels).float().mean().item()
    assert len(images) >= 100
    # The embedded val keeps Imagenette's source 128-px JPEG bytes (a 112-px downscale cost ~2 points: 94.5%).
    print(f"EfficientNet-Lite0 top-1 on the embedded Imagenette val: {top1:.4f}")
    assert top1 >= 0.95, f"EfficientNet-Lite0 top-1 on embedded Imagenette val: {top1:.3f}"


# ----------------------------------------------------------------------------------------- shipped teacher


def test_shipped_offline_teacher_ranks_heldout_captions() -> None:
    teacher = load_teacher("offline")
    assert teacher.embed_dim > 0 and 1.0 < teacher.logit_scale <= 100.0
    n = 60  # embedded held-out pairs: Flickr8k train-split photos the shipped teacher's build excluded
    samples = builtin_samples("flickr8k/heldout", limit=n)
    zi = teacher.encode_image(images_of(samples))
    texts = [c for s in samples for c in s["json"]["captions"][:5]]
    zt = teacher.encode_text(texts)
    assert zi.shape == (n, teacher.embed_dim) and zt.shape == (5 * n, teacher.embed_dim)
    assert torch.allclose(zi.norm(dim=-1), torch.ones(n), atol=1e-4)
    assert torch.allclose(zt.norm(dim=-1), torch.ones(5 * n), atol=1e-4)
    m = retrieval_metrics(zi, zt, torch.arange(n).repeat_interleave(5))
    # chance: t2i R@1 = 1/60 = 1.7%, i2t R@1 = 5/300 = 1.7%
    assert m["t2i_R@1"] >= 15.0, m
    assert m["i2t_R@1"] >= 20.0, m
    # matching pairs score above the mean non-matching pair for most images
    sim = zi @ zt.view(n, 5, -1).mean(1).T
    assert (sim.diag() > (sim.sum(1) - sim.diag()) / (n - 1)).float().mean() > 0.9


# ----------------------------------------------------------------------------------------- open_clip path


TINY_CLIP = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip_ckpt(tmp_path_factory) -> tuple[str, str]:
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("occfg")
    (d / "vfmtest-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("vfmtest-tiny-clip")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # distinct from the init so we see the checkpoint's value is used
    path = d / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return "vfmtest-tiny-clip", str(path)


def test_openclip_teacher_from_local_checkpoint(tiny_clip_ckpt) -> None:
    import open_clip

    name, path = tiny_clip_ckpt
    t = load_teacher(f"openclip:{name}:{path}")
    assert (t.embed_dim, t.image_size) == (24, 32)
    assert t.logit_scale == pytest.approx(float(torch.tensor(3.0).exp()), rel=1e-5)
    images = decode_float(builtin_samples("flickr8k/heldout", limit=1)[0]["jpg"])[None].repeat(2, 1, 1, 1)
    zi, zt = t.encode_image(images), t.encode_text(["a dog runs", "two children play in water", "x"])
    assert zi.shape == (2, 24) and zt.shape == (3, 24)
    assert torch.allclose(zi.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(zt.norm(dim=-1), torch.ones(3), atol=1e-5)
    # Same numbers as the model with its own preprocess config (mean/std/size), done by hand.
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=path)
    pp = model.visual.preprocess_cfg
    x = resize_center_crop(images, 32, "bicubic")
    x = (x - torch.tensor(pp["mean"]).view(1, 3, 1, 1)) / torch.tensor(pp["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(model.eval().encode_image(x), dim=-1)
    assert torch.allclose(zi, ref, atol=1e-5)


def test_ensemble_concatenates_normalised_blocks(tiny_clip_ckpt) -> None:
    name, path = tiny_clip_ckpt
    ens = load_ensemble([f"openclip:{name}:{path}", f"openclip:{name}:{path}"])
    assert isinstance(ens, TeacherEnsemble)
    assert ens.dims == [24, 24] and ens.image_sizes == [32, 32]
    d = ens.describe()
    assert set(d) >= {"names", "dims", "logit_scales", "image_sizes"} and len(d["names"]) == 2
    images = torch.rand(3, 3, 48, 40)
    z = ens.encode_image(images)
    assert z.shape == (3, 48)
    for block in ens.split(z):
        assert torch.allclose(block.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(ens.split(z)[0], ens.teachers[0].encode_image(images))
    zt = ens.encode_text(["a", "b"])
    assert zt.shape == (2, 48)


def test_bad_specs_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown teacher spec"):
        load_teacher("nonsense-teacher")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_teacher(f"openclip:ViT-B-32:{tmp_path}/missing.safetensors")
    with pytest.raises(ValueError, match="unknown classifier spec"):
        load_classifier("resnet-foo")


# ----------------------------------------------------------------------------------------- classifier ensemble


@pytest.fixture(scope="module")
def tiny_timm_ckpts(tmp_path_factory) -> list[str]:
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("timm")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = timm.create_model("test_resnet", num_classes=20)
        p = d / f"test_resnet_{seed}.safetensors"
        save_file(m.state_dict(), str(p))
        paths.append(f"timm:test_resnet:{p}")
    return paths


def test_classifier_ensemble_averages_tempered_probs(tiny_timm_ckpts) -> None:
    index = [3, 7, 11, 19]
    images = images_of(builtin_samples("imagenette/val", limit=4))
    ens = load_classifier_ensemble(tiny_timm_ckpts, class_index=index, temperature=2.0)
    assert isinstance(ens, ClassifierEnsemble)
    probs = ens(images)
    assert probs.shape == (4, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)
    # by hand: each teacher's full 20-way logits, select columns, soften by T, softmax, average
    full = [load_classifier(s)(images) for s in tiny_timm_ckpts]
    assert full[0].shape == (4, 20) and not torch.allclose(full[0], full[1])
    ref = torch.stack([torch.softmax(f[:, index] / 2.0, -1) for f in full]).mean(0)
    assert torch.allclose(probs, ref, atol=1e-5)
    # a higher temperature flattens the target (higher entropy)
    cold = load_classifier_ensemble(tiny_timm_ckpts, class_index=index, temperature=0.5)(images)
    ent = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1)  # noqa: E731
    assert (ent(probs) > ent(cold)).all()
    with pytest.raises(ValueError, match="temperature"):
        load_classifier_ensemble(tiny_timm_ckpts, class_index=index, temperature=0.0)


# ----------------------------------------------------------------------------------------- save / load / build


def test_offline_teacher_save_load_roundtrip_and_corrupt_file(tmp_path) -> None:
    torch.manual_seed(0)
    heads = OfflineHeads(embed_dim=32, hidden=16)
    with torch.no_grad():
        heads.logit_scale.fill_(2.5)
    save_offline_teacher(tmp_path / "t", heads, {"image_size": 96})
    loaded, cfg = load_offline_heads(tmp_path / "t")
    assert cfg["image_size"] == 96 and cfg["logit_scale"] == pytest.approx(float(torch.tensor(2.5).exp()))
    for k, v in heads.state_dict().items():
        tol = 0 if k == "logit_scale" else 1e-3 * max(1.0, v.abs().max().item())  # fp16 on disk
        assert torch.allclose(loaded.state_dict()[k], v, atol=tol), k
    (tmp_path / "t" / "heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="heads.safetensors"):
        load_offline_heads(tmp_path / "t")


def _flickr_fixture(root, n_train: int, n_val: int) -> None:
    """A tiny Flickr8k-layout folder (images.tar, captions.csv, splits.json) from embedded real pairs."""
    samples = builtin_samples("flickr8k/train", limit=n_train + n_val)
    root.mkdir()
    with tarfile.open(root / "images.tar", "w") as tf:
        for s in samples:
            info = tarfile.TarInfo(s["json"]["uid"])
            info.size = len(s["jpg"])
            tf.addfile(info, io.BytesIO(s["jpg"]))
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for s in samples:
            for c in s["json"]["captions"]:
                w.writerow([s["json"]["uid"], c])
    names = [s["json"]["uid"] for s in samples]
    (root / "splits.json").write_text(json.dumps({"train": names[:n_train], "val": names[n_train:]}))


def test_cli_build_trains_heads_with_engine_and_loads(tmp_path, capsys) -> None:
    from vfmkit.cli import main

    _flickr_fixture(tmp_path / "f8k", n_train=48, n_val=4)
    out = tmp_path / "teacher"
    args = ["teacher", "build", "--data", str(tmp_path / "f8k"), "--out", str(out), "--image-size", "64"]
    args += ["--views", "2", "--steps", "40", "--batch-size", "16", "--dim", "64", "--lr", "3e-3", "--no-val"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "cached img_lite0_s64_v1_seed0" in first  # the augmented second view was computed
    cfg = json.loads((out / "teacher.json").read_text())
    assert cfg["image_size"] == 64 and cfg["build"]["n_train_images"] == 48 and cfg["build"]["n_views"] == 2
    log = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0]  # the engine ran and the contrastive loss went down
    teacher = load_teacher(str(out))
    assert teacher.image_size == 64 and teacher.embed_dim == 64
    heads_before = (out / "heads.safetensors").read_bytes()
    # a rerun resumes from the feature cache and the finished engine checkpoint: nothing is recomputed
    assert main(args) == 0
    assert "cached " not in capsys.readouterr().out
    assert (out / "heads.safetensors").read_bytes() == heads_before
