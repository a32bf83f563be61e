"""The step's fast paths (issue 20) give exactly what the slow paths give: length-bucketed text encoding vs
open_clip's own, memoised tokenisation vs the tokenizer, and the fast tar reader vs tarfile / webdataset."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import pytest
import torch
import webdataset as wds
from open_clip.model import CLIP, CustomTextCLIP

from vfmkit.data.shards import fast_tar_samples, iter_shard, list_shards
from vfmkit.models.factory import create_clip
from vfmkit.models.text_fast import BucketedCLIP, BucketedCustomTextCLIP, buckets
from vfmkit.text.tokens import TokenCache


def _captions(n: int) -> list[str]:
    caps: list[str] = []
    for raw in iter_shard(list_shards("builtin:flickr8k/train")[0]):
        caps += json.loads(raw["json"])["captions"]
        if len(caps) >= n:
            break
    return caps[:n]


@pytest.mark.parametrize(
    ("name", "cls"), [("vfm-tiny-cnn", BucketedCLIP), ("vfm-tiny-mci", BucketedCustomTextCLIP)]
)
def test_bucketed_text_equals_open_clip(name, cls):
    torch.manual_seed(0)
    b = create_clip(name)
    fast = b.model
    assert type(fast) is cls  # create_clip switched it on
    ref = copy.deepcopy(fast)
    ref.__class__ = cls.__mro__[2]  # open_clip's own CLIP / CustomTextCLIP (after the mixin)
    assert type(ref) in (CLIP, CustomTextCLIP)  # the reference really is open_clip's path
    assert type(copy.deepcopy(fast)) is cls and fast.state_dict().keys() == ref.state_dict().keys()
    tok = b.tokenizer(_captions(70))  # real captions of many lengths; 70 rows -> 4 buckets, one odd-sized
    lengths = tok.argmax(-1) + 1
    assert lengths.max() < tok.shape[1] and lengths.min() < lengths.max()  # padding exists to be skipped
    weights = torch.randn(70, 1)
    outs = []
    for m in (ref, fast):
        m.train()
        m.zero_grad(set_to_none=True)
        f = m.encode_text(tok, normalize=True)
        (f * weights).pow(2).sum().backward()
        outs.append((f.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
    (f_ref, g_ref), (f_fast, g_fast) = outs
    torch.testing.assert_close(f_fast, f_ref, rtol=1e-5, atol=1e-6)
    assert g_ref.keys() == g_fast.keys() and "token_embedding.weight" in "".join(g_ref)
    for k in g_ref:
        torch.testing.assert_close(g_fast[k], g_ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # a single caption (one bucket) and the eval path agree too
    with torch.no_grad():
        torch.testing.assert_close(fast.encode_text(tok[:1]), ref.encode_text(tok[:1]), rtol=1e-5, atol=1e-6)


def test_buckets_partition_rows_by_length():
    lengths = torch.tensor([5, 30, 7, 12, 9, 30, 2, 18] * 10)
    groups = buckets(lengths)
    assert 1 < len(groups) <= 4
    rows = torch.cat(groups)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    maxima = [int(lengths[g].max()) for g in groups]
    assert maxima == sorted(maxima) and maxima[0] < 30  # short captions are run short
    assert len(buckets(lengths[:10])) == 1  # too few rows to split


def test_token_cache_gives_the_tokenizer_rows():
    tokenizer = create_clip("vfm-tiny-cnn").tokenizer
    caps = _captions(20)
    cache = TokenCache(tokenizer, max_entries=8)
    batch = caps[:5] + caps[:3]
    assert torch.equal(cache(batch), tokenizer(batch))
    assert cache.misses == 5 and cache.hits == 3
    for c in caps:
        assert torch.equal(cache([c])[0], tokenizer([c])[0])
    assert len(cache._rows) == 8  # bounded
    assert cache.context_length == tokenizer.context_length  # everything else is the tokenizer's


def _write_tar(path, members, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _slow(url):
    """tarfile's own reading, as iter_shard did before the fast path (for the comparison)."""
    out, cur = [], None
    with tarfile.open(url, "r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            d, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            key = f"{d}/{stem}" if d else stem
            data = tar.extractfile(m).read()
            if cur is None or cur["__key__"] != key:
                cur = {"__key__": key, "__url__": url}
                out.append(cur)
            cur[ext] = data
    return out


def test_fast_tar_reader_equals_tarfile_and_webdataset(tmp_path):
    urls = list_shards("builtin:flickr8k/train")[:1]  # the embedded .tar.gz shards
    plain = tmp_path / "plain.tar"
    _write_tar(
        plain,
        [
            (f"dir/{i:04d}.{e}", f"{i}{e}".encode() * (i + 1))
            for i in range(30)
            for e in ("jpg", "Seg.PNG", "json")
        ],
    )
    urls.append(str(plain))
    for url in urls:
        assert fast_tar_samples(url) is not None  # the fast path is taken
        assert list(iter_shard(url)) == _slow(url)
        ref = list(wds.tarfile_to_samples()(iter([{"url": url}])))
        assert (
            list(fast_tar_samples(url)) == ref
        )  # the loader's samples: webdataset's, extensions lower-cased


def test_fast_tar_reader_falls_back_and_reports_corruption(tmp_path):
    long = tmp_path / "pax.tar"  # a member name over 100 bytes needs a pax header: tarfile reads it
    _write_tar(long, [("x" * 120 + ".jpg", b"a"), ("y.txt", b"b")], fmt=tarfile.PAX_FORMAT)
    assert fast_tar_samples(str(long)) is None
    assert [s["__key__"] for s in iter_shard(str(long))] == ["x" * 120, "y"]
    good = tmp_path / "good.tar"
    _write_tar(good, [(f"{i}.txt", b"z" * 600) for i in range(3)])
    raw = bytearray(good.read_bytes())
    bad = tmp_path / "badsum.tar"
    raw2 = bytearray(raw)
    raw2[512 + 1024 + 100] ^= 0xFF  # the second header (after the first header and its 2 data blocks)
    bad.write_bytes(bytes(raw2))
    with pytest.raises(ValueError, match="badsum.tar"):
        list(iter_shard(str(bad)))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(bytes(raw[: 512 + 300]))  # the first member's data cut short
    with pytest.raises(ValueError, match="cut.tar"):
        list(iter_shard(str(cut)))
