"""Synthetic captions: top-p sampling, the tiny CoCa trained through the engine, captioner save/load, JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from vfmkit.data.shards import ShardWriter, iter_shard, list_shards
from vfmkit.methods import captions as C
from vfmkit.pipelines.captioner import train_captioner


def _tiny_captioner(captions: list[str], seed: int = 0) -> C.Captioner:
    """A randomly initialised tiny CoCa with the compact vocabulary of ``captions``."""
    vocab = C.build_vocab(captions, open_clip.SimpleTokenizer())
    cfg = json.loads(json.dumps(C.TINY_COCA_CFG))
    cfg["text_cfg"]["vocab_size"] = cfg["multimodal_cfg"]["vocab_size"] = len(vocab)
    torch.manual_seed(seed)
    return C.Captioner(
        C.create_tiny_coca(cfg),
        64,
        open_clip.OPENAI_DATASET_MEAN,
        open_clip.OPENAI_DATASET_STD,
        model_cfg=cfg,
        vocab=vocab,
    )


@pytest.fixture(scope="module")
def flickr(tmp_path_factory) -> tuple[Path, list[torch.Tensor], list[list[str]]]:
    """24 real Flickr8k train samples (embedded subset) re-sharded into 2 tar shards of 12."""
    root = tmp_path_factory.mktemp("flickr")
    with ShardWriter(root, max_count=12) as w:
        for i, s in enumerate(iter_shard(list_shards("builtin:flickr8k/train")[0])):
            if i == 24:
                break
            w.write({"__key__": s["__key__"], "jpg": s["jpg"], "txt": s["txt"], "json": s["json"]})
    images, caps = C.read_image_captions(list_shards(str(root)), 64, None)
    return root, list(images), caps


def test_top_p_filter_matches_transformers_warper():
    from transformers import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        ours = C._top_p_filter(logits.clone(), p)
        ref = TopPLogitsWarper(p)(torch.zeros(6, 1, dtype=torch.long), logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), p
        kept = (~torch.isinf(ours)).sum(-1)
        assert (kept >= 1).all()
    # a tiny top_p keeps exactly the arg-max
    tiny = C._top_p_filter(logits.clone(), 1e-6)
    assert torch.equal(tiny.argmax(-1), logits.argmax(-1)) and ((~torch.isinf(tiny)).sum(-1) == 1).all()


def test_top_p_generate_greedy_limit_equals_stepwise_argmax(flickr):
    """With top_p -> 0 sampling is greedy: the loop must equal an explicit arg-max decode (min length, EOT)."""
    _, images, caps = flickr
    cap = _tiny_captioner([c for cs in caps for c in cs])
    x = cap.preprocess(images[:3])
    ids = C.top_p_generate(
        cap.model, x, top_p=1e-9, seq_len=10, min_seq_len=4, sot_id=cap.sot_id, eot_id=cap.eot_id
    )
    ref = torch.full((3, 1), cap.sot_id)
    with torch.no_grad():
        for _ in range(9):
            logits = cap.model(x, ref, output_labels=False)["logits"][:, -1]
            if ref.shape[1] < 4:
                logits[:, cap.eot_id] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            if ref.shape[1] + 1 == 10:
                nxt[:] = cap.eot_id
            ref = torch.cat([ref, nxt], 1)
    for r in range(3):  # rows stop at their EOT; afterwards the loop pads with 0
        row = ids[r].tolist()
        end = row.index(cap.eot_id) + 1 if cap.eot_id in row else len(row)
        assert row[:end] == ref[r, :end].tolist()
        assert all(t == 0 for t in row[end:])
    assert ids.shape[1] <= 10


def test_generate_n_per_image_seeded(flickr):
    _, images, caps = flickr
    cap = _tiny_captioner([c for cs in caps for c in cs])
    rng_before = torch.get_rng_state()
    a = cap.generate(images[:3], 4, top_p=0.9, seed=7, seq_len=12)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert len(a) == 3 and all(len(x) == 4 and all(isinstance(s, str) for s in x) for x in a)
    assert a == cap.generate(images[:3], 4, top_p=0.9, seed=7, seq_len=12)
    assert any(len(s) > 0 for x in a for s in x)


def test_tiny_coca_trains_through_engine_and_reloads(flickr, tmp_path):
    from vfmkit.config import load_config

    root, images, _ = flickr
    cfg = load_config(
        "coca_tiny",
        [
            f"data.train={root}",
            "data.batch_size=8",
            "train.steps=12",
            "train.log_every=1",
            "train.progress=false",
            "train.ckpt_every=0",
            "optim.warmup_steps=2",
            "optim.lr=0.002",
        ],
    )
    cap = train_captioner(cfg, out_dir=tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [h["caption_loss"] for h in log if "caption_loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # teacher-forced caption loss falls
    saved = tmp_path / "run" / "captioner"
    assert (saved / "captioner.json").is_file() and (saved / "model.safetensors").is_file()
    again = C.load_captioner(str(saved))
    assert again.vocab == cap.vocab
    assert cap.generate(images[:2], 2, seed=3, seq_len=12) == again.generate(
        images[:2], 2, seed=3, seq_len=12
    )


def test_jsonl_roundtrip_and_errors(tmp_path):
    table = {"a.jpg": ["a dog", "a brown dog"], "b.jpg": ["two kids ."]}
    p = tmp_path / "caps.jsonl"
    C.write_captions_jsonl(p, table)
    assert C.read_captions_jsonl(p) == table
    src = C.JsonlCaptions(p, 1)
    assert src(["b.jpg", "a.jpg"]) == [["two kids ."], ["a dog"]]
    with pytest.raises(KeyError, match="b.jpg"):
        C.JsonlCaptions(p, 2)(["b.jpg"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"uid": "x", "captions": ["ok"]}\n{"uid": "y", "captions": "not a list"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        C.read_captions_jsonl(bad)


def test_caption_shards_writes_jsonl_for_every_uid(flickr, tmp_path):
    root, _, caps = flickr
    cap = _tiny_captioner([c for cs in caps for c in cs])
    out = tmp_path / "syn.jsonl"
    n = C.caption_shards(cap, list_shards(str(root))[:1], out, n=2, batch_size=5, seq_len=8)
    table = C.read_captions_jsonl(out)
    uids = [json.loads(s["json"])["uid"] for s in iter_shard(list_shards(str(root))[0])]
    assert n == 12 and list(table) == uids and all(len(v) == 2 for v in table.values())


def test_corrupt_captioner_named(tmp_path, flickr):
    _, _, caps = flickr
    cap = _tiny_captioner([c for cs in caps for c in cs])
    C.save_captioner(cap, tmp_path / "cap")
    (tmp_path / "cap" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        C.load_captioner(str(tmp_path / "cap"))
    with pytest.raises(FileNotFoundError, match="captioner.json"):
        C.load_captioner(str(tmp_path / "nothing"))
