"""Data layer on real data: importer -> shards -> loader, corrupt samples, exact resume, rank splits."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import read_builtin_samples  # tests/ is on sys.path (pytest rootdir conftest, no package)
from PIL import Image

from vfmkit.cli import main as cli_main
from vfmkit.data.builtin import builtin_path, imagenette_classes
from vfmkit.data.importer import import_captions, import_class_folders
from vfmkit.data.loader import CorruptSampleError, ShardLoader, TensorLoader
from vfmkit.data.shards import (
    ShardError,
    ShardWriter,
    list_shards,
    read_manifest,
    sha256_file,
    shard_counts,
    verify_shards,
)


def keyed(raw: dict) -> dict:
    """Cheap decode for position tests: key + first caption (no image decode)."""
    return {"key": raw["__key__"], "txt": raw["txt"].decode()}


def decode_image_text(raw: dict) -> dict:
    """Real decode: JPEG -> uint8 [3, H, W] tensor, caption text; KeyError('txt') when the caption is missing."""
    img = Image.open(io.BytesIO(raw["jpg"])).convert("RGB")
    img.load()
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return {
        "key": raw["__key__"],
        "image": x.permute(2, 0, 1)[:, :32, :32].contiguous(),
        "txt": raw["txt"].decode(),
    }


def all_keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def take(loader, n_batches: int) -> tuple[list[str], dict]:
    """Consume ``n_batches`` and return their keys and the loader state right after them."""
    it = iter(loader)
    keys = [k for _ in range(n_batches) for k in next(it)["key"]]
    state = loader.state_dict()
    del it
    return keys, state


# ---------------- import -> shards ----------------


def test_import_captions_round_trip(tmp_path, caption_folder):
    img_dir, csv_path, caps = caption_folder
    m = import_captions(img_dir, csv_path, tmp_path / "out", shard_size=5)
    assert m["count"] == 12 and [s["count"] for s in m["shards"]] == [5, 5, 2] and m["n_skipped"] == 0
    assert read_manifest(tmp_path / "out")["count"] == 12 and verify_shards(tmp_path / "out") == []
    names = sorted(caps)
    loader = ShardLoader(
        str(tmp_path / "out"),
        lambda r: {
            "key": r["__key__"],
            "json": json.loads(r["json"]),
            "txt": r["txt"].decode(),
            "sha": hashlib.sha256(r["jpg"]).hexdigest(),
        },
        batch_size=4,
        shuffle_buffer=0,
        drop_last=False,
        collate_fn=list,
    )
    got = [s for b in loader for s in b]
    assert [s["key"] for s in got] == [f"{i:09d}" for i in range(12)]
    for s, name in zip(got, names, strict=True):
        assert s["json"]["uid"] == name and s["json"]["captions"] == caps[name] and s["txt"] == caps[name][0]
        # JPEGs that need no resize are stored byte for byte: the hash matches the source file
        assert s["sha"] == s["json"]["sha256"] == hashlib.sha256((img_dir / name).read_bytes()).hexdigest()
    # a tar of the same images gives byte-identical shards (deterministic keys, fixed tar headers)
    tar_path = tmp_path / "images.tar"
    with tarfile.open(tar_path, "w") as t:
        for p in sorted(img_dir.iterdir()):
            t.add(p, arcname=p.name)
    m2 = import_captions(tar_path, csv_path, tmp_path / "out2", shard_size=5)
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m["shards"]]


def test_import_reports_missing_and_corrupt_by_name(tmp_path, caption_folder):
    img_dir, csv_path, caps = caption_folder
    victim = sorted(caps)[3]
    (img_dir / victim).write_bytes((img_dir / victim).read_bytes()[:300])  # truncated JPEG
    with open(csv_path, "a", encoding="utf-8") as f:
        f.write('zz_missing.jpg,"A caption, with a comma"\n')
    m = import_captions(img_dir, csv_path, tmp_path / "out", shard_size=100, max_size=64)
    assert m["count"] == 11 and m["n_skipped"] == 2
    reasons = {s["uid"]: (s["key"], s["reason"]) for s in m["skipped"]}
    assert reasons["zz_missing.jpg"] == ("000000012", "missing image")
    assert reasons[victim][0] == "000000003" and reasons[victim][1].startswith("corrupt image")
    assert read_manifest(tmp_path / "out")["skipped"] == m["skipped"]
    # max_size re-encodes: shorter side 64
    s = read_builtin_samples_from(tmp_path / "out")[0]
    assert Image.open(io.BytesIO(s["jpg"])).size == (64, 64)


def read_builtin_samples_from(path: Path) -> list[dict]:
    import webdataset as wds

    return list(wds.DataPipeline(wds.SimpleShardList(list_shards(str(path))), wds.tarfile_to_samples()))


def test_import_class_folders_from_tar(tmp_path):
    samples = read_builtin_samples("imagenette/val", 100)
    tar_path = tmp_path / "tree.tar"
    with tarfile.open(tar_path, "w") as t:
        for s in samples[::10]:
            meta = json.loads(s["json"])
            info = tarfile.TarInfo(meta["uid"])
            info.size = len(s["jpg"])
            t.addfile(info, io.BytesIO(s["jpg"]))
    m = import_class_folders(tar_path, tmp_path / "out", shard_size=3, compress=True)
    classes = sorted({json.loads(s["json"])["class"] for s in samples[::10]})
    assert m["classes"] == classes and m["count"] == 10 and len(m["shards"]) == 4
    assert all(s["name"].endswith(".tar.gz") for s in m["shards"])
    for s in read_builtin_samples_from(tmp_path / "out"):
        meta = json.loads(s["json"])
        assert meta["label"] == classes.index(meta["class"]) and meta["wnid"] == meta["class"]
        assert meta["uid"].startswith(meta["class"] + "/")


def test_shard_writer_is_atomic_and_strict(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path / "w", max_count=2) as w:
        for i in range(3):
            w.write({"__key__": f"{i:09d}", "txt": "x"})
        raise RuntimeError("boom")
    files = sorted(p.name for p in (tmp_path / "w").iterdir())
    assert files == ["shard-000000.tar"]  # the full shard only: no .tmp, no manifest claiming partial data
    with ShardWriter(tmp_path / "v") as w:
        w.write({"__key__": "a", "txt": "x"})
        with pytest.raises(ValueError, match="duplicate"):
            w.write({"__key__": "a", "txt": "y"})
        with pytest.raises(ValueError, match="without dots"):
            w.write({"__key__": "a.b", "txt": "y"})
    m = read_manifest(tmp_path / "v")
    assert m["count"] == 1 and m["shards"][0]["sha256"] == sha256_file(tmp_path / "v" / "shard-000000.tar")


def test_list_shards_specs_and_bad_paths(tmp_path):
    train = list_shards("builtin:flickr8k/train")
    assert len(train) == 4 and train == list_shards(builtin_path("flickr8k/train"))
    plain = tmp_path / "plain"  # img2dataset-style: tars + _stats.json, no manifest
    plain.mkdir()
    for i in range(3):
        with ShardWriter(tmp_path / "tmp", prefix=f"p{i}") as w:
            w.write({"__key__": f"{i:05d}0001", "txt": "x"})
        (tmp_path / "tmp" / f"p{i}-000000.tar").rename(plain / f"{i:05d}.tar")
    (plain / "00000_stats.json").write_text('{"successes": 1}')
    (plain / "00000.parquet").write_bytes(b"PAR1")
    urls = [str(plain / f"{i:05d}.tar") for i in range(3)]
    assert list_shards(str(plain)) == urls
    assert list_shards(str(plain / "{00000..00002}.tar")) == urls
    assert list_shards(urls[1]) == urls[1:2]
    assert shard_counts(urls) is None  # only one shard has img2dataset stats: length unknown, not guessed
    for i in (1, 2):
        (plain / f"{i:05d}_stats.json").write_text('{"successes": 1}')
    assert shard_counts(urls) == dict.fromkeys(urls, 1) and len(ShardLoader(urls, keyed, 1)) == 3
    for bad in (
        "/nonexistent/dir",
        str(plain / "{00000..00005}.tar"),
        "builtin:nope/none",
        str(tmp_path / "x.tar"),
    ):
        with pytest.raises(FileNotFoundError, match=re.escape(bad.removeprefix("builtin:"))):
            list_shards(bad)
    with pytest.raises(FileNotFoundError, match="/nonexistent/shards"):
        ShardLoader("/nonexistent/shards", keyed, 4)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json"):
        list_shards(str(tmp_path / "m"))


def test_builtin_assets_are_what_they_claim():
    counts = {
        n: read_manifest(builtin_path(n))["count"]
        for n in ("flickr8k/train", "flickr8k/heldout", "imagenette/train", "imagenette/val")
    }
    assert counts == {
        "flickr8k/train": 1000,
        "flickr8k/heldout": 200,
        "imagenette/train": 400,
        "imagenette/val": 200,
    }
    for n in counts:
        assert verify_shards(builtin_path(n)) == [], n
    uids = {
        n: {json.loads(s["json"])["uid"] for s in read_builtin_samples(n, 10_000)}
        for n in ("flickr8k/train", "flickr8k/heldout")
    }
    assert len(uids["flickr8k/train"]) == 1000 and not uids["flickr8k/train"] & uids["flickr8k/heldout"]
    labels = [json.loads(s["json"])["label"] for s in read_builtin_samples("imagenette/val", 1000)]
    assert sorted(set(labels)) == list(range(10)) and all(labels.count(c) == 20 for c in range(10))
    assert list(imagenette_classes()) == read_manifest(builtin_path("imagenette/val"))["classes"]


# ---------------- loader ----------------


def _corrupt_shards(tmp_path: Path) -> tuple[list[str], str, str]:
    """Two shards of real samples with a truncated JPEG and a sample without caption in the second."""
    samples = read_builtin_samples("flickr8k/heldout", 20)
    with ShardWriter(tmp_path / "c", max_count=10) as w:
        for i, s in enumerate(samples):
            s = {k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": f"{i:09d}"}
            if i == 13:
                s["jpg"] = s["jpg"][:200]
            if i == 17:
                del s["txt"]
            w.write(s)
    return list_shards(str(tmp_path / "c")), "000000013", "000000017"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_skip_counted_and_named(tmp_path, caplog, num_workers):
    urls, bad_jpg, no_txt = _corrupt_shards(tmp_path)
    loader = ShardLoader(
        urls, decode_image_text, 3, shuffle_buffer=5, seed=3, num_workers=num_workers, drop_last=False
    )
    with caplog.at_level(logging.WARNING, logger="vfmkit.data"):
        keys = all_keys(loader)
    assert sorted(keys) == sorted(f"{i:09d}" for i in range(20) if i not in (13, 17))
    assert loader.n_corrupt == 2
    by_key = {key: (url, err) for url, key, err in loader.corrupt}
    assert set(by_key) == {bad_jpg, no_txt} and by_key[no_txt][1] == "KeyError: 'txt'"
    assert by_key[bad_jpg][0].endswith("shard-000001.tar")
    assert bad_jpg in caplog.text and no_txt in caplog.text


def test_corrupt_after_last_full_batch_is_counted(tmp_path):
    urls, bad_jpg, no_txt = _corrupt_shards(tmp_path)
    # in order, batches of 4 end at sample 16: sample 17 (no caption) lies in the dropped tail
    loader = ShardLoader(urls, decode_image_text, 4, shuffle_buffer=0, drop_last=True)
    assert all_keys(loader)[-1] == "000000016"
    assert sorted(k for _, k, _ in loader.corrupt) == [bad_jpg, no_txt]


def test_corrupt_sample_raise_names_shard_and_key(tmp_path):
    urls, bad_jpg, _ = _corrupt_shards(tmp_path)
    loader = ShardLoader(urls, decode_image_text, 3, shuffle_buffer=0, on_corrupt="raise")
    with pytest.raises(CorruptSampleError, match=rf"{bad_jpg}.*shard-000001\.tar"):
        all_keys(loader)


def test_truncated_shard_is_named(tmp_path):
    urls, _, _ = _corrupt_shards(tmp_path)
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="shard-000001.tar"):
        all_keys(ShardLoader(urls, keyed, 2, shuffle_buffer=0))


def test_resume_is_exact_without_workers():
    spec = "builtin:flickr8k/train"
    full = all_keys(ShardLoader(spec, keyed, 16, seed=7, shuffle_buffer=200))
    assert len(full) == 992 and len(set(full)) == 992
    first, state = take(ShardLoader(spec, keyed, 16, seed=7, shuffle_buffer=200), 5)
    calls = []
    resumed = ShardLoader(spec, lambda r: calls.append(1) or keyed(r), 16, seed=7, shuffle_buffer=200)
    resumed.load_state_dict(state)
    rest = all_keys(resumed)
    assert first + rest == full  # sample for sample, same order
    assert len(calls) == 1000 - 80  # the 80 delivered samples were skipped before decoding
    assert resumed.epoch == 1  # the finished epoch advances


def test_resume_with_two_workers_neither_repeats_nor_skips(tmp_path):
    spec = "builtin:flickr8k/train"
    full = all_keys(ShardLoader(spec, keyed, 16, seed=7, num_workers=2))
    first, state = take(ShardLoader(spec, keyed, 16, seed=7, num_workers=2), 5)
    torch.save(state, tmp_path / "state.pt")
    resumed = ShardLoader(spec, keyed, 16, seed=7, num_workers=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    rest = all_keys(resumed)
    assert len(first + rest) == len(set(first + rest)) == len(full)
    assert set(first + rest) == set(full)
    with pytest.raises(ValueError, match="num_workers"):
        ShardLoader(spec, keyed, 16, seed=7, num_workers=0).load_state_dict(state)


def test_resume_keeps_corrupt_count_exact(tmp_path):
    urls, _, _ = _corrupt_shards(tmp_path)
    mk = lambda: ShardLoader(urls, decode_image_text, 2, shuffle_buffer=4, seed=1)  # noqa: E731
    ref = mk()
    full = all_keys(ref)
    for k in range(1, 9):
        first, state = take(mk(), k)
        resumed = mk()
        resumed.load_state_dict(state)
        assert first + all_keys(resumed) == full
        assert sorted(resumed.corrupt) == sorted(ref.corrupt), k


@pytest.mark.parametrize(
    ("spec", "num_workers"),
    [
        ("builtin:flickr8k/train", 0),  # 4 shards >= 2 slots
        ("builtin:flickr8k/heldout", 2),
    ],
)  # 2 shards < 4 slots
def test_rank_split_disjoint_and_complete(spec, num_workers):
    every = set(all_keys(ShardLoader(spec, keyed, 8, shuffle_buffer=0, drop_last=False)))
    per_rank = [
        all_keys(
            ShardLoader(
                spec, keyed, 8, seed=2, rank=r, world_size=2, num_workers=num_workers, drop_last=False
            )
        )
        for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == every and sum(map(len, per_rank)) == len(every)
    # with drop_last every rank gets the same number of batches (DDP lockstep), and len() says so
    lens = []
    for r in range(2):
        ld = ShardLoader(spec, keyed, 8, seed=2, rank=r, world_size=2, num_workers=num_workers)
        n = sum(1 for _ in ld)
        assert n == len(ShardLoader(spec, keyed, 8, seed=2, rank=r, world_size=2, num_workers=num_workers))
        lens.append(n)
    assert lens[0] == lens[1] > 0


def test_epochs_shuffle_differently_and_seeds_reproduce():
    spec = "builtin:imagenette/val"
    dec = lambda r: {"key": r["__key__"]}  # noqa: E731
    ld = ShardLoader(spec, dec, 10, seed=5)
    e0, e1 = all_keys(ld), all_keys(ld)  # the second pass is epoch 1
    assert sorted(e0) == sorted(e1) and e0 != e1
    again = ShardLoader(spec, dec, 10, seed=5)
    assert all_keys(again) == e0
    again.set_epoch(1)
    assert all_keys(again) == e1
    assert all_keys(ShardLoader(spec, dec, 10, seed=6)) != e0
    assert all_keys(ShardLoader(spec, dec, 10, shuffle_buffer=0)) == [f"{i:09d}" for i in range(200)]


def test_resampled_is_seeded_and_resumable():
    spec = "builtin:imagenette/train"
    dec = lambda r: {"key": r["__key__"]}  # noqa: E731
    full = all_keys(ShardLoader(spec, dec, 10, seed=1, resampled=True, shuffle_buffer=50))
    assert len(full) == 400 and len(set(full)) < 400  # shards drawn with replacement (seed 1 repeats one)
    assert all_keys(ShardLoader(spec, dec, 10, seed=1, resampled=True, shuffle_buffer=50)) == full
    first, state = take(ShardLoader(spec, dec, 10, seed=1, resampled=True, shuffle_buffer=50), 7)
    resumed = ShardLoader(spec, dec, 10, seed=1, resampled=True, shuffle_buffer=50)
    resumed.load_state_dict(state)
    assert first + all_keys(resumed) == full


def test_tensor_loader_resume_ranks_and_epochs():
    x = torch.arange(50).float().unsqueeze(1)  # [50, 1]
    data = {"x": x, "y": torch.arange(50)}
    ld = TensorLoader(data, batch_size=8, seed=3)
    full = [b["y"] for b in ld]
    assert len(full) == 6 == len(ld) and all(
        torch.equal(b.float(), bx)
        for b, bx in zip(full, [b["x"][:, 0] for b in TensorLoader(data, batch_size=8, seed=3)], strict=True)
    )
    ld2 = TensorLoader(data, batch_size=8, seed=3)
    it = iter(ld2)
    first = [next(it)["y"] for _ in range(2)]
    state = ld2.state_dict()
    ld3 = TensorLoader(data, batch_size=8, seed=3)
    ld3.load_state_dict(state)
    assert torch.equal(torch.cat(first + [b["y"] for b in ld3]), torch.cat(full))
    e1 = torch.cat([b["y"] for b in ld3])  # epoch 1 now
    assert not torch.equal(e1, torch.cat(full))
    ranks = [
        torch.cat([b["y"] for b in TensorLoader(data, 5, seed=3, rank=r, world_size=2, drop_last=False)])
        for r in range(2)
    ]
    assert sorted(torch.cat(ranks).tolist()) == list(range(50)) and not set(ranks[0].tolist()) & set(
        ranks[1].tolist()
    )


def test_cli_import_and_info(tmp_path, caption_folder, capsys):
    img_dir, csv_path, caps = caption_folder
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": sorted(caps)[:7], "val": sorted(caps)[7:]}))
    rc = cli_main(
        [
            "data",
            "import",
            "--captions",
            str(csv_path),
            "--images",
            str(img_dir),
            "--out",
            str(tmp_path / "o"),
            "--shard-size",
            "3",
            "--split-file",
            str(splits),
            "--split",
            "train",
        ]
    )
    assert rc == 0 and read_manifest(tmp_path / "o")["count"] == 7
    assert cli_main(["data", "info", str(tmp_path / "o"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "7 samples in 3 shards" in out and "all shards match" in out
    assert cli_main(["data", "info", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def _uids(spec) -> list[str]:
    pipe = wds.DataPipeline(wds.SimpleShardList(list_shards(spec)), wds.tarfile_to_samples())
    return [json.loads(s["json"])["uid"] for s in pipe]


def test_exclude_uids_keeps_the_rest_unchanged_and_reruns_reuse(tmp_path):
    from vfmkit.data.shards import exclude_uids

    src = read_builtin_samples("flickr8k/heldout", 30)
    uids = [json.loads(s["json"])["uid"] for s in src]
    drop = set(uids[::3]) | {"not-in-the-data.jpg"}
    m = exclude_uids("builtin:flickr8k/heldout", tmp_path / "f", drop, max_count=64)
    all_uids = _uids("builtin:flickr8k/heldout")
    assert m["dropped"] == len(drop & set(all_uids)) == 10 and m["kept"] == len(all_uids) - 10
    assert _uids(str(tmp_path / "f")) == [
        u for u in all_uids if u not in drop
    ]  # order kept, nothing else lost
    out = {
        s["__key__"]: s
        for s in wds.DataPipeline(
            wds.SimpleShardList(list_shards(str(tmp_path / "f"))), wds.tarfile_to_samples()
        )
    }
    for s in src:  # members are copied byte for byte
        if s["__key__"] in out:
            assert out[s["__key__"]]["jpg"] == s["jpg"] and out[s["__key__"]]["json"] == s["json"]
    mtime = (tmp_path / "f" / "manifest.json").stat().st_mtime_ns
    assert exclude_uids("builtin:flickr8k/heldout", tmp_path / "f", drop, max_count=64) == m
    assert (tmp_path / "f" / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    other = exclude_uids("builtin:flickr8k/heldout", tmp_path / "f", set(uids[:1]), max_count=64)
    assert other["dropped"] == 1  # a different drop set is recomputed
