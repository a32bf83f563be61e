"""Reinforcement generation: DataCompDR records (recomputed independently), ImageNet+ records with the real
EfficientNet-Lite0, rank split, metadata guard, corrupt samples, and kill -9 / resume byte-for-byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

import vfmkit
from vfmkit.data.augment import ReplayableAugment
from vfmkit.data.decode import decode_uint8
from vfmkit.data.reinforced import decode_classification, decode_multimodal, read_metadata, sha256_hex
from vfmkit.data.shards import ShardWriter, list_shards
from vfmkit.methods.captions import (
    Captioner,
    CoCaCaptions,
    build_vocab,
    create_tiny_coca,
    write_captions_jsonl,
)
from vfmkit.pipelines.reinforce import (
    DONE_SUFFIX,
    ReinforceArgs,
    Reinforcer,
    iter_shard,
    reinforce,
)


def decode_tv(sample):
    """The generator's decode: uint8 [3, H, W] through torchvision."""
    return decode_uint8(sample, backend="torchvision")


def _reshard(src: str, out: Path, n: int, per_shard: int) -> list[dict]:
    """First ``n`` real samples of an embedded dataset, re-sharded into tars of ``per_shard``."""
    samples = []
    for url in list_shards(src):
        for s in iter_shard(url):
            samples.append({k: v for k, v in s.items() if k != "__url__"})
            if len(samples) == n:
                break
        if len(samples) == n:
            break
    with ShardWriter(out, max_count=per_shard) as w:
        for s in samples:
            w.write(s)
    return samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Flickr8k shards (3 x 4 real samples), a tiny open_clip teacher checkpoint, a JSONL of real captions."""
    root = tmp_path_factory.mktemp("reinforce")
    samples = _reshard("builtin:flickr8k/train", root / "src", 12, 4)
    torch.manual_seed(0)
    from safetensors.torch import save_file

    from vfmkit.models.factory import create_clip

    model = create_clip("vfm-tiny-vit").model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny.safetensors"))
    # "synthetic" captions from a JSONL: the other real Flickr captions of each image
    caps = {json.loads(s["json"])["uid"]: json.loads(s["json"])["captions"][1:] for s in samples}
    write_captions_jsonl(root / "syn.jsonl", caps)
    return root, samples, caps


def _clip_args(root: Path, **kw) -> ReinforceArgs:
    base = dict(
        mode="clip",
        teachers=[f"openclip:vfm-tiny-vit:{root}/tiny.safetensors"],
        n_aug=3,
        recipe={"name": "rrc_ra", "size": 64},
        captions=str(root / "syn.jsonl"),
        n_syn=2,
        batch_size=5,
        chunk=3,
    )
    return ReinforceArgs(**{**base, **kw})


def test_clip_records_match_independent_recomputation(setup, tmp_path, capsys):
    root, samples, caps = setup
    args = _clip_args(root, images=True)
    gen = Reinforcer(args)
    res = reinforce(str(root / "src"), tmp_path / "out", args, progress=False, reinforcer=gen)
    assert "KiB/sample" in capsys.readouterr().out  # the storage cost is printed up front
    assert res["samples"] == 12 and res["manifest"]["count"] == 12
    assert [os.path.basename(u) for u in list_shards(str(tmp_path / "out"))] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    meta = read_metadata(tmp_path / "out" / "reinforced.json")
    assert meta.kind == "multimodal" and meta.n_aug == 3 and meta.n_syn == 2 and meta.emb_dim == 128
    teacher = gen.teachers.teachers[0]
    aug = ReplayableAugment(meta.recipe)
    records = [decode_multimodal(r, meta) for u in list_shards(str(tmp_path / "out")) for r in iter_shard(u)]
    assert [r.uid for r in records] == [
        json.loads(s["json"])["uid"] for s in samples
    ]  # none lost, none doubled
    for rec, src in zip(records, samples, strict=True):
        assert rec.jpg == src["jpg"] and rec.sha256 == sha256_hex(src["jpg"])
        assert rec.syn_text == caps[rec.uid][:2] and rec.caption == src["txt"].decode()
        img = decode_tv(src)
        # params are the seeded draws for (seed, uid, aug index), and the embeddings those of their replay
        want = [aug.sample_for(0, rec.uid, a, tuple(img.shape[-2:])) for a in range(3)]
        assert rec.params == want
        x = torch.stack([aug.replay(img, p, size=64).float() / 255 for p in rec.params])
        torch.testing.assert_close(rec.image_emb, teacher.encode_image(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            rec.text_emb, teacher.encode_text([rec.caption, *rec.syn_text]), atol=1e-5, rtol=1e-4
        )
        assert torch.allclose(rec.image_emb.norm(dim=-1), torch.ones(3), atol=1e-4)


def test_coca_captioner_path_and_bf16_storage(setup, tmp_path):
    root, samples, _ = setup
    caps = [c for s in samples for c in json.loads(s["json"])["captions"]]
    vocab = build_vocab(caps, open_clip.SimpleTokenizer())
    cfg = json.loads(json.dumps(__import__("vfmkit.methods.captions", fromlist=["x"]).TINY_COCA_CFG))
    cfg["text_cfg"]["vocab_size"] = cfg["multimodal_cfg"]["vocab_size"] = len(vocab)
    torch.manual_seed(0)
    captioner = Captioner(
        create_tiny_coca(cfg),
        64,
        open_clip.OPENAI_DATASET_MEAN,
        open_clip.OPENAI_DATASET_STD,
        model_cfg=cfg,
        vocab=vocab,
    )
    args = _clip_args(root, captions=None, n_syn=2, storage="pth.gz", n_aug=2)
    gen = Reinforcer(args, captions=CoCaCaptions(captioner, 2, top_p=0.9, seq_len=10))
    reinforce(list_shards(str(root / "src"))[:1], tmp_path / "out", args, progress=False, reinforcer=gen)
    meta = read_metadata(tmp_path / "out" / "reinforced.json")
    assert meta.storage == "pth.gz" and meta.extra["captions"]["source"] == "coca"
    recs = [decode_multimodal(r, meta) for r in iter_shard(str(tmp_path / "out" / "shard-000000.tar"))]
    assert len(recs) == 4
    teacher = gen.teachers.teachers[0]
    for rec in recs:
        assert len(rec.syn_text) == 2 and all(isinstance(t, str) and t for t in rec.syn_text)
        # bf16 storage: close to the float32 teacher output, not equal
        torch.testing.assert_close(
            rec.text_emb, teacher.encode_text([rec.caption, *rec.syn_text]), atol=1e-2, rtol=1e-2
        )


def test_classify_with_real_efficientnet_lite0(tmp_path):
    from vfmkit.data.builtin import parse_class_index

    samples = _reshard("builtin:imagenette/train", tmp_path / "src", 6, 6)
    ci = parse_class_index("imagenette")
    args = ReinforceArgs(
        mode="classify",
        teachers=["efficientnet-lite0"],
        class_index=ci,
        n_aug=2,
        recipe={"name": "rrc_flip_ra_re_mix", "size": 224, "scale": [0.5, 1.0], "mix_p": 0.5},
        topk=5,
        batch_size=6,
        chunk=6,
    )
    gen = Reinforcer(args)
    # the teacher scores the augmented view as stored, not an eval-protocol centre crop of it
    assert all(getattr(t, "crop_pct", 1.0) == 1.0 for t in gen.teachers.teachers)
    reinforce(str(tmp_path / "src"), tmp_path / "out", args, progress=False, reinforcer=gen)
    meta = read_metadata(tmp_path / "out" / "reinforced.json")
    assert meta.kind == "classification" and meta.num_classes == 10 and meta.topk == 5
    recs = [decode_classification(r, meta) for r in iter_shard(str(tmp_path / "out" / "shard-000000.tar"))]
    uids = [json.loads(s["json"])["uid"] for s in samples]
    assert [r.uid for r in recs] == uids
    aug = ReplayableAugment(meta.recipe)
    for rec, src in zip(recs, samples, strict=True):
        assert rec.label == json.loads(src["json"])["label"]
        assert (rec.values[:, :-1] >= rec.values[:, 1:]).all() and (rec.values.sum(-1) <= 1.001).all()
        for p in rec.params:  # mixing partners are other samples of the same shard, stored by uid
            if p.mix is not None:
                assert p.mix.partner in uids and p.mix.partner != rec.uid
    # recompute sample 0's targets from its stored params (partner included) with the same teacher
    rec, img = recs[0], decode_tv(samples[0])
    xs = []
    for p in rec.params:
        partner = decode_tv(samples[uids.index(p.mix.partner)]) if p.mix is not None else None
        x = aug.replay(img, p, partner_img=partner)  # uint8, or float in [0, 1] when mixed
        xs.append(x.float() / 255 if x.dtype == torch.uint8 else x)
    probs = gen.teachers(torch.stack(xs))
    torch.testing.assert_close(rec.values, probs.topk(5, -1).values, atol=2e-3, rtol=1e-2)  # stored as fp16
    # a real ImageNet model on real Imagenette photos: the un-mixed crops are mostly classified correctly
    plain = [r.indices[a, 0] == r.label for r in recs for a, p in enumerate(r.params) if p.mix is None]
    assert plain and sum(bool(x) for x in plain) >= 0.7 * len(plain)
    labels = {r.uid: r.label for r in recs}  # a mixed image's top-2 holds one of the two labels
    mixed = [
        bool({r.label, labels[p.mix.partner]} & set(r.indices[a, :2].tolist()))
        for r in recs
        for a, p in enumerate(r.params)
        if p.mix is not None
    ]
    assert mixed and sum(mixed) >= 0.7 * len(mixed)


def test_rank_split_equals_single_run(setup, tmp_path):
    root, _, _ = setup
    args = _clip_args(root, n_aug=2)
    gen = Reinforcer(args)
    reinforce(str(root / "src"), tmp_path / "single", args, progress=False, reinforcer=gen)
    r1 = reinforce(
        str(root / "src"), tmp_path / "dist", args, rank=1, world_size=2, progress=False, reinforcer=gen
    )
    assert r1["done"] == ["shard-000001.tar"] and r1["manifest"] is None  # rank 0's shards are not done yet
    r0 = reinforce(
        str(root / "src"), tmp_path / "dist", args, rank=0, world_size=2, progress=False, reinforcer=gen
    )
    assert r0["done"] == ["shard-000000.tar", "shard-000002.tar"] and r0["manifest"]["count"] == 12
    for name in (
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
        "manifest.json",
        "reinforced.json",
    ):
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "dist" / name).read_bytes(), name


def test_metadata_guard_and_corrupt_sample(setup, tmp_path):
    root, samples, _ = setup
    src = tmp_path / "src"
    bad = dict(samples[1], jpg=b"\xff\xd8 not a jpeg")
    with ShardWriter(src, max_count=10) as w:
        for s in [samples[0], bad, samples[2]]:
            w.write(s)
    args = _clip_args(root, n_aug=1)
    res = reinforce(str(src), tmp_path / "out", args, progress=False)
    assert res["manifest"]["count"] == 2
    assert len(res["manifest"]["skipped"]) == 1 and bad["__key__"] in res["manifest"]["skipped"][0]
    with pytest.raises(ValueError, match="reinforced.json"):
        reinforce(str(src), tmp_path / "out", _clip_args(root, n_aug=2), progress=False)


def test_kill_9_then_resume_is_byte_identical(setup, tmp_path, capsys):
    """A CLI run is killed with SIGKILL after its first shard lands; rerunning the same command completes it,
    and every file equals an uninterrupted run's byte for byte (no sample lost, none doubled, no leftovers)."""
    from vfmkit.cli import main

    root, samples, _ = setup
    src = tmp_path / "src"
    with ShardWriter(src, max_count=2) as w:  # 6 shards of 2, so the kill lands mid-run
        for s in samples:
            w.write(s)

    def argv(out: Path) -> list[str]:
        return [
            "reinforce",
            "clip",
            str(src),
            "--out",
            str(out),
            "--teacher",
            f"openclip:vfm-tiny-vit:{root}/tiny.safetensors",
            "--captions",
            str(root / "syn.jsonl"),
            "--n-syn",
            "2",
            "--n-aug",
            "4",
            "--size",
            "64",
            "--chunk",
            "2",
            "--batch-size",
            "4",
            "--no-progress",
        ]

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(vfmkit.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    assert main(argv(tmp_path / "ref")) == 0  # the uninterrupted reference, in this process
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfmkit.cli", *argv(tmp_path / "out")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = tmp_path / "out" / ("shard-000000.tar" + DONE_SUFFIX)
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (tmp_path / "out").glob("*" + DONE_SUFFIX))
    assert first.exists() and len(done) < 6, f"the kill did not land mid-run: {done}"
    assert not (tmp_path / "out" / "manifest.json").exists()
    capsys.readouterr()
    assert main(argv(tmp_path / "out")) == 0  # the same command resumes
    assert f"{len(done)} already done" in capsys.readouterr().out
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ref_files  # no .work-* / tmp leftovers
    for name in ref_files:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["count"] == 12 and len(manifest["shards"]) == 6
