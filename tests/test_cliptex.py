"""CLIPTeX (issue 16): expert pseudo-labels (``vfmkit reinforce dense``) and the multi-task CLIP method.

Pseudo-labels are bit-identical on a rerun and after a kill -9 + resume; a jpg that is not the one the labels
were made from is a named corrupt sample, not trained on; the stored label follows the replayed crop; the loss
equals ``L_CLIP + lam * sum_t w_t L_t`` recomputed by hand; the shipped MediaPipe person expert on a real embedded
Flickr8k image agrees (IoU > 0.5) with a mask drawn by hand (``tests/data/..._person_mask.png``, checked by eye
against the image); a tiny CamVid ``seg`` run plugs in as a class-id expert.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfmkit.data.shards import ShardWriter, iter_shard, list_shards
from vfmkit.models.experts import FunctionExpert, PersonExpert, SegRunExpert, decode_output, encode_output
from vfmkit.pipelines.pseudolabel import PseudoLabelArgs, pseudolabel

DATA = Path(__file__).parent / "data"
HAND_MASK = DATA / "flickr8k_1142847777_2a0c1c2551_person_mask.png"


def pix_classes(img: torch.Tensor) -> torch.Tensor:
    """A pixel-wise 'expert': the red channel in 4 bins (so f(crop) == crop(f))."""
    return (img[0] // 64).long()


def pix_depth(img: torch.Tensor) -> torch.Tensor:
    return 1.0 + img.float().mean(0) / 255.0


def experts(crop_too: bool = True):
    out = [
        PersonExpert(),
        FunctionExpert("pix", "classes", pix_classes, num_classes=4),
        FunctionExpert("depth", "depth", pix_depth),
    ]
    if crop_too:
        out.append(FunctionExpert("pixc", "classes", pix_classes, num_classes=4, crop=True))
    return out


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """2 shards x 5 real held-out Flickr8k samples."""
    out = tmp_path_factory.mktemp("in")
    src = iter_shard(list_shards("builtin:flickr8k/heldout")[0])
    with ShardWriter(out, prefix="shard", max_count=5) as w:
        for _, raw in zip(range(10), src, strict=False):
            w.write({k: v for k, v in raw.items() if k != "__url__"})
    return out


def _tars(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.tar"))}


def test_person_expert_matches_hand_checked_mask():
    raw = next(
        r for r in iter_shard(list_shards("builtin:flickr8k/heldout")[0]) if r["__key__"] == "000000004"
    )
    assert json.loads(raw["json"])["uid"] == "1142847777_2a0c1c2551.jpg"
    from vfmkit.data.decode import decode_uint8
    from vfmkit.eval.dense import mask_iou

    p = PersonExpert()(decode_uint8(raw))
    hand = np.array(Image.open(HAND_MASK)) > 127
    pred = p.numpy() > 0.5
    iou = (hand & pred).sum() / (hand | pred).sum()
    assert iou > 0.5, iou
    # the benchmark's metric on the same real image: the same number, one image so mean == pooled
    r = mask_iou(torch.from_numpy(pred), torch.from_numpy(hand))
    assert r["n_images"] == 1 and r["n_empty"] == 0
    assert r["mean"] == pytest.approx(100 * iou) and r["pooled"] == pytest.approx(100 * iou)
    # and it is not just "everything is a person": the background corner is not
    assert pred[:, :20].mean() < 0.2


def test_mask_iou_hand_built():
    from vfmkit.eval.dense import mask_iou

    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True  # 4 px
    target[0, :2, :3] = True  # 6 px, the 4 above inside: IoU 4/6
    pred[1, 0, 0] = True  # 1 px, disjoint from the 2 of the target: IoU 0
    target[1, 3, 2:] = True
    # image 2: both empty -> no IoU, left out of the mean
    r = mask_iou(pred, target)
    assert r["n_images"] == 2 and r["n_empty"] == 1
    assert r["per_image"][:2] == pytest.approx([100 * 4 / 6, 0.0]) and np.isnan(r["per_image"][2])
    assert r["mean"] == pytest.approx(100 * (4 / 6 + 0) / 2)
    assert r["pooled"] == pytest.approx(100 * 4 / (6 + 3))  # intersections 4 + 0, unions 6 + 3
    assert mask_iou(target, target)["pooled"] == 100.0
    with pytest.raises(ValueError):
        mask_iou(pred, target[:2])


def test_frozen_clip_person_probe_and_its_masks(tmp_path):
    """method_args.freeze_clip + tasks: a head-only run (the benchmark's CLIP + probe comparator) leaves the
    pretrained CLIP bit-identical, trains only the person head, and load_cliptex / predict_masks give that head's
    mask on real held-out images (sigmoid > 0.5 of the training-time forward)."""
    from safetensors.torch import load_file, save_file

    from vfmkit.config import load_config
    from vfmkit.data.decode import decode_uint8
    from vfmkit.methods.cliptex import load_cliptex, predict_masks
    from vfmkit.methods.registry import run
    from vfmkit.models.factory import create_clip

    torch.manual_seed(1)
    clip = create_clip("vfm-tiny-vit", image_size=64).model
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    over = [
        "train.steps=3",
        "data.batch_size=8",
        "data.image_size=64",
        "train.progress=false",
        "train.tensorboard=false",
        f"model.pretrained={tmp_path / 'clip.safetensors'}",
        "method_args.freeze_clip=true",
        "method_args.tasks=[person]",
        "method_args.weights={person: 1.0}",
        f"out_dir={tmp_path / 'probe'}",
    ]
    run(load_config("cliptex_tiny", over))
    sd = load_file(str(tmp_path / "probe" / "model.safetensors"))
    assert {k.split(".")[1] for k in sd if k.startswith("heads.")} == {"person"}
    before = load_file(str(tmp_path / "clip.safetensors"))
    assert all(torch.equal(before[k], sd[f"clip.{k}"]) for k in before)

    model, bundle = load_cliptex(tmp_path / "probe")
    raws = list(iter_shard(list_shards("builtin:flickr8k/heldout")[0]))[:4]
    imgs = torch.stack([decode_uint8(r) for r in raws])
    imgs = torch.nn.functional.interpolate(imgs.float(), size=(64, 64), mode="nearest").to(torch.uint8)
    masks = predict_masks(model, bundle, imgs, "person")
    assert masks.shape == (4, 64, 64) and masks.dtype == torch.bool
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    with torch.no_grad():
        o = model((imgs.float() / 255 - mean) / std, bundle.tokenizer(["a photo"] * 4))
    assert torch.equal(masks, torch.sigmoid(o["dense"]["person"][:, 0]) > 0.5)
    with pytest.raises(ValueError):
        predict_masks(model, bundle, imgs, "camvid")


def test_storage_round_trip():
    ids = torch.tensor([[0, 3], [11, 1]])
    assert torch.equal(decode_output("classes", encode_output("classes", ids)), ids)
    p = torch.tensor([[0.0, 0.5], [0.999, 1.0]])
    assert (decode_output("prob", encode_output("prob", p)) - p).abs().max() <= 0.5 / 255 + 1e-6
    d = torch.tensor([[1.5, 2.25], [10.0, 0.1]])
    assert torch.allclose(decode_output("depth", encode_output("depth", d)), d.half().float())


def test_rerun_and_kill_resume_bit_identical(small_shards, tmp_path, capsys):
    args = PseudoLabelArgs(n_aug=2, size=(48, 48))
    a = pseudolabel(small_shards, tmp_path / "a", experts(), args)
    assert a["samples"] == 10 and a["manifest"]["count"] == 10
    assert "KiB/sample of pseudo-labels" in a["storage"]
    pseudolabel(small_shards, tmp_path / "b", experts(), args)
    ta = _tars(tmp_path / "a")
    assert len(ta) == 2 and ta == _tars(tmp_path / "b")
    # a rerun into the finished folder resumes everything and changes nothing
    r = pseudolabel(small_shards, tmp_path / "a", experts(), args)
    assert r["resumed"] == 2 and r["samples"] == 0 and _tars(tmp_path / "a") == ta
    # a rerun with other settings is refused by name
    with pytest.raises(ValueError, match="n_aug"):
        pseudolabel(small_shards, tmp_path / "a", experts(), PseudoLabelArgs(n_aug=1, size=(48, 48)))
    # kill -9 in the middle of the second shard, then resume
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_cliptex as t
from vfmkit.models.experts import FunctionExpert
from vfmkit.pipelines.pseudolabel import PseudoLabelArgs, pseudolabel
n = [0]
def fn(img):
    n[0] += 1
    if n[0] == 8:
        os.kill(os.getpid(), signal.SIGKILL)
    return t.pix_classes(img)
ex = t.experts()
ex[1] = FunctionExpert("pix", "classes", fn, num_classes=4, identity="pix_classes")
pseudolabel({str(small_shards)!r}, {str(tmp_path / "c")!r}, ex, PseudoLabelArgs(n_aug=2, size=(48, 48)))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    c = tmp_path / "c"
    assert (c / "shard-000000.tar.done.json").is_file() and not (c / "shard-000001.tar").exists()
    ex = experts()
    ex[1] = FunctionExpert("pix", "classes", pix_classes, num_classes=4, identity="pix_classes")
    ex_a = experts()
    ex_a[1] = FunctionExpert("pix", "classes", pix_classes, num_classes=4, identity="pix_classes")
    pseudolabel(small_shards, tmp_path / "d", ex_a, args)  # uninterrupted, same expert identities
    r = pseudolabel(small_shards, c, ex, args)
    assert r["resumed"] == 1 and r["samples"] == 5
    assert _tars(c) == _tars(tmp_path / "d")
    assert not list(c.glob(".work-*"))
    uids = [
        json.loads(s["labels.json"])["uid"]
        for n in ("shard-000000.tar", "shard-000001.tar")
        for s in iter_shard(str(c / n))
    ]
    assert len(uids) == len(set(uids)) == 10


@pytest.fixture(scope="module")
def labelled(small_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pl")
    pseudolabel(small_shards, out, experts(), PseudoLabelArgs(n_aug=1, size=(48, 48)), verbose=False)
    return out


_DECODERS: dict = {}


def _decoder(out: Path, size):
    key = (str(out), tuple(size))
    if key not in _DECODERS:
        _DECODERS[key] = _make_decoder(out, size)
    return _DECODERS[key]


def _make_decoder(out: Path, size):
    from torchvision.transforms import v2

    from vfmkit.methods.cliptex import make_cliptex_decoder, read_tasks
    from vfmkit.models.factory import create_clip

    b = create_clip("vfm-tiny-vit", image_size=32)
    return make_cliptex_decoder(read_tasks(str(out)), size, v2.Normalize(b.mean, b.std), b.tokenizer), b


def test_stored_label_follows_the_replayed_crop(labelled):
    from vfmkit.data.decode import decode_uint8
    from vfmkit.data.dense import DenseAugParams

    raws = [s for n in ("shard-000000.tar", "shard-000001.tar") for s in iter_shard(str(labelled / n))]
    flips = set()
    for raw in raws:
        meta = json.loads(raw["labels.json"])
        p = DenseAugParams.from_json(meta["paug"][0])
        i, j, h, w = p.crop
        full = pix_classes(decode_uint8(raw))
        want = full[i : i + h, j : j + w]
        want = want.flip(-1) if p.flip else want
        flips.add(p.flip)
        # at the crop's own size: both the whole-image label (replayed) and the crop expert's label equal the crop
        dec, _ = _decoder(labelled, (h, w))
        s = dec(raw)
        assert torch.equal(s["label_pix"], want) and torch.equal(s["label_pixc"], want)
        assert (h, w) != tuple(full.shape)  # a real crop, not the whole image
        # at a training size both still agree (the same nearest resize of the same pixels)
        dec, _ = _decoder(labelled, (32, 32))
        s = dec(raw)
        assert torch.equal(s["label_pix"], s["label_pixc"]) and s["image"].shape == (3, 32, 32)
        assert s["label_person"].dtype == torch.float32 and s["label_depth"].min() >= 1.0
    assert flips == {True, False}


def test_sha256_mismatch_is_reported_and_not_trained_on(labelled, tmp_path):
    from vfmkit.data.loader import CorruptSampleError, ShardLoader
    from vfmkit.methods.cliptex import LabelMismatchError

    raws = list(iter_shard(str(labelled / "shard-000000.tar")))
    raws[2]["jpg"] = raws[3]["jpg"]  # the image swapped after labelling
    bad = tmp_path / "bad"
    with ShardWriter(bad, prefix="shard", max_count=100) as w:
        for r in raws:
            w.write({k: v for k, v in r.items() if k != "__url__"})
    (bad / "pseudolabels.json").write_bytes((labelled / "pseudolabels.json").read_bytes())
    dec, _ = _decoder(bad, (32, 32))
    uid = json.loads(raws[2]["labels.json"])["uid"]
    with pytest.raises(LabelMismatchError, match="sha256") as e:
        dec(raws[2])
    assert uid in str(e.value)
    urls = list_shards(str(bad))
    ld = ShardLoader(urls, dec, batch_size=1, shuffle_buffer=0, drop_last=False, on_corrupt="skip")
    seen = [b["label_pix"] for b in ld]
    assert ld.n_corrupt == 1 and len(seen) == 4
    ld = ShardLoader(urls, dec, batch_size=1, shuffle_buffer=0, drop_last=False, on_corrupt="raise")
    with pytest.raises(CorruptSampleError, match="sha256"):
        list(ld)


def test_multitask_loss_equals_its_formula(labelled):
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from vfmkit.methods.cliptex import CliptexArgs, CliptexModel, make_loss_fn, read_tasks

    torch.manual_seed(0)
    dec, b = _decoder(labelled, (32, 32))
    tasks = read_tasks(str(labelled))
    raws = list(iter_shard(str(labelled / "shard-000000.tar")))
    samples = [dec(r) for r in raws[:4]]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    model = CliptexModel(b.model, tasks, "linear", 16)
    args = CliptexArgs(
        lam=0.7, weights={"person": 2.0, "pix": 0.5, "depth": 1.5, "pixc": 1.0}, dice_weight=0.3
    )
    value, logs = make_loss_fn(ClipLoss(), tasks, args)(model, batch, 0)

    # by hand
    o = model(batch["image"], batch["text"])
    logits = o["logit_scale"] * o["image_features"] @ o["text_features"].T
    lab = torch.arange(4)
    l_clip = (-(logits.log_softmax(1)[lab, lab]).mean() - (logits.T.log_softmax(1)[lab, lab]).mean()) / 2
    terms = {}
    for n in ("pix", "pixc"):
        lp = o["dense"][n].log_softmax(1)
        terms[n] = -lp.gather(1, batch[f"label_{n}"][:, None]).mean()
    z, t = o["dense"]["person"][:, 0], batch["label_person"]
    bce = -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z)).mean()
    p = torch.sigmoid(z)
    dice = (1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)).mean()
    terms["person"] = bce + 0.3 * dice
    d = o["dense"]["depth"][:, 0] - batch["label_depth"].log()
    terms["depth"] = (d**2).mean() - 0.5 * d.mean() ** 2
    want = l_clip + 0.7 * sum(args.weights[n] * v for n, v in terms.items())
    assert torch.allclose(value, want, rtol=1e-4, atol=1e-5), (float(value), float(want))
    assert abs(logs["loss_clip"] - float(l_clip.detach())) < 1e-4
    for n, v in terms.items():
        assert abs(logs[f"loss_{n}"] - float(v.detach())) < 1e-4, n


def test_seg_run_is_a_class_expert(tmp_path):
    """A tiny CamVid seg run (2 steps on the embedded pairs: mechanics only) as a class-id expert."""
    from vfmkit.cli import main

    run = tmp_path / "seg"
    over = [
        "method_args.tower=timm:test_byobnet:random",
        "train.steps=2",
        "data.batch_size=4",
        "train.log_every=1",
        "train.progress=false",
        "train.tensorboard=false",
        "train.ckpt_every=0",
        "train.eval_every=0",
    ]
    assert main(["train", "dense_probe", "--out", str(run), *[a for o in over for a in ("--set", o)]]) == 0
    e = SegRunExpert(run, name="camvid")
    assert e.kind == "classes" and e.num_classes == 11
    src = tmp_path / "in"
    with ShardWriter(src, prefix="shard", max_count=10) as w:
        for _, raw in zip(range(2), iter_shard(list_shards("builtin:flickr8k/heldout")[0]), strict=False):
            w.write({k: v for k, v in raw.items() if k != "__url__"})
    out = tmp_path / "pl"
    assert main(["reinforce", "dense", str(src), "--out", str(out), "--expert", f"camvid={run}"]) == 0
    s = next(iter_shard(str(out / "shard-000000.tar")))
    m = decode_output("classes", s["camvid.png"])
    assert m.shape == (112, 112) and int(m.max()) < 11
    assert json.loads((out / "pseudolabels.json").read_text())["experts"][0]["num_classes"] == 11
    with tarfile.open(out / "shard-000000.tar") as tf:
        assert sorted(n.split(".", 1)[1] for n in tf.getnames() if n.startswith(s["__key__"])) == [
            "camvid.png",
            "jpg",
            "json",
            "labels.json",
            "txt",
        ]


def test_builtin_pseudo_set_is_current():
    """The embedded pseudo-labelled set (recipe cliptex_tiny) holds labels the shipped expert gives today."""
    from vfmkit.data.decode import decode_uint8

    urls = list_shards("builtin:flickr8k/pseudo_person")
    e = PersonExpert()
    for raw in list(iter_shard(urls[0]))[:3]:
        got = encode_output("prob", e(decode_uint8(raw)))
        assert np.array_equal(
            np.array(Image.open(io.BytesIO(got))), np.array(Image.open(io.BytesIO(raw["person.png"])))
        )
