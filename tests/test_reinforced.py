"""Reinforced records: DataCompDR samples written by hand from the public schema, uid join, top-k targets."""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vfmkit.data.augment import AugRecipe
from vfmkit.data.reinforced import (
    ImageIndex,
    ImageMismatchError,
    JoinReport,
    ReinforcedMeta,
    TeacherSpec,
    decode_classification,
    decode_multimodal,
    densify,
    encode_classification,
    encode_multimodal,
    join_by_uid,
    read_metadata,
    sample_params,
    storage_breakdown,
    storage_bytes_per_sample,
    topk_encode,
    write_metadata,
)
from vfmkit.data.shards import iter_shard

DATA = Path(__file__).parent / "data"
JPGS = [
    DATA / "flickr8k_1000268201_693b08cb0e_160x120.jpg",
    DATA / "imagenette_n01440764_ILSVRC2012_val_00000293.JPEG",
]
TEACHERS = (TeacherSpec("teacher-a", 4, 100.0), TeacherSpec("teacher-b", 3, 70.0))


def _meta(n_aug=2, n_syn=2, storage="npz") -> ReinforcedMeta:
    return ReinforcedMeta("multimodal", AugRecipe("rrc_ra"), n_aug, TEACHERS, n_syn=n_syn, storage=storage)


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _handwritten_datacompdr(
    uid: str, sha: str, image_emb: np.ndarray, text_emb: np.ndarray, key: str, storage: str = "npz"
) -> dict[str, bytes]:
    """One sample exactly as DataCompDR's public schema describes it (no jpg)."""
    paug = (
        '{"param_aug": [[[10, 4, 90, 120], [[5, -9.0], [11, 0.699999988079071]]], '
        "[[0, 20, 120, 100], [[0, 0.0], null]]]}"
    )
    if storage == "npz":
        buf = io.BytesIO()
        np.savez(buf, image_emb=image_emb, text_emb=text_emb)
        emb = buf.getvalue()
    else:
        buf = io.BytesIO()
        torch.save(
            {
                "image_emb": torch.from_numpy(image_emb).bfloat16(),
                "text_emb": torch.from_numpy(text_emb).bfloat16(),
            },
            buf,
        )
        emb = gzip.compress(buf.getvalue())
    return {
        f"{key}.url.txt": b"http://example.invalid/x.jpg",
        f"{key}.syn.json": json.dumps({"syn_text": ["a dog on grass", "a brown dog"]}).encode(),
        f"{key}.paug.json": paug.encode(),
        f"{key}.{storage}": emb,
        f"{key}.json": json.dumps({"uid": uid, "sha256": sha}).encode(),
    }


def _embs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    # bf16-representable values so the pth.gz variant compares exactly
    return (g.integers(-8, 8, (2, 7)) / 8).astype(np.float32), (g.integers(-8, 8, (3, 7)) / 8).astype(
        np.float32
    )


@pytest.mark.parametrize("storage", ["npz", "pth.gz"])
def test_handwritten_datacompdr_sample_decodes(tmp_path, storage):
    img, txt = _embs(0)
    tar = _write_tar(
        tmp_path / "dr-000.tar", _handwritten_datacompdr("u-1", "ab" * 32, img, txt, "000000001", storage)
    )
    (raw,) = list(iter_shard(str(tar)))
    rec = decode_multimodal(raw, _meta(storage=storage))
    assert rec.uid == "u-1" and rec.sha256 == "ab" * 32 and rec.jpg is None
    assert rec.syn_text == ["a dog on grass", "a brown dog"]
    assert rec.params[0].crop == (10, 4, 90, 120) and rec.params[0].ra == ((5, -9.0), (11, 0.699999988079071))
    assert rec.params[1].ra == ((0, 0.0), None)
    assert torch.equal(rec.image_emb, torch.from_numpy(img)) and torch.equal(
        rec.text_emb, torch.from_numpy(txt)
    )
    assert rec.image_emb.dtype == torch.float32
    with pytest.raises(ValueError, match="metadata says"):
        decode_multimodal(raw, _meta(n_aug=3, storage=storage))
    with pytest.raises(KeyError):
        decode_multimodal({k: v for k, v in raw.items() if k != "syn.json"}, _meta(storage=storage))


@pytest.mark.parametrize("storage", ["npz", "pth.gz"])
def test_encode_decode_round_trip(storage):
    meta = _meta(storage=storage)
    jpg = JPGS[0].read_bytes()
    params = sample_params(meta, 0, "u-7", (120, 160))
    img = torch.nn.functional.normalize(torch.randn(2, 7), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 7), dim=-1)
    raw = encode_multimodal("k7", "u-7", params, ["x", "y"], img, txt, meta, jpg=jpg, caption="a dog")
    assert set(raw) == {"__key__", "paug.json", "syn.json", storage, "json", "jpg", "txt"}
    rec = decode_multimodal(raw, meta)
    assert rec.params == params and rec.caption == "a dog" and rec.jpg == jpg
    assert rec.sha256 == hashlib.sha256(jpg).hexdigest()
    atol = 0 if storage == "npz" else 4e-3  # bf16 keeps ~3 significant digits
    assert torch.allclose(rec.image_emb, img, atol=atol, rtol=0) and torch.allclose(
        rec.text_emb, txt, atol=atol
    )
    with pytest.raises(ValueError, match="metadata says"):
        encode_multimodal("k", "u", params, ["x"], img, txt, meta)


def test_sample_params_are_deterministic_and_vary():
    meta = _meta(n_aug=5)
    a, b = sample_params(meta, 0, "u1", (120, 160)), sample_params(meta, 0, "u2", (120, 160))
    assert a == sample_params(meta, 0, "u1", (120, 160)) and a != b and len({p.crop for p in a}) == 5


def test_join_by_uid_reports_sha256_mismatch(tmp_path, caplog):
    jpgs = [p.read_bytes() for p in JPGS]
    shas = [hashlib.sha256(b).hexdigest() for b in jpgs]
    members = {}
    for n, (b, s) in enumerate(zip(jpgs, shas, strict=True)):
        members[f"{n:09d}.jpg"] = b
        members[f"{n:09d}.json"] = json.dumps({"uid": f"img{n}", "sha256": s}).encode()
    images = _write_tar(tmp_path / "images-000.tar", members)
    img, txt = _embs(1)
    dr = {}
    dr.update(_handwritten_datacompdr("img0", shas[0], img, txt, "000000000"))
    dr.update(_handwritten_datacompdr("img1", shas[0], img, txt, "000000001"))  # wrong bytes for img1
    dr.update(_handwritten_datacompdr("img9", shas[1], img, txt, "000000002"))  # no such image
    reinforced = _write_tar(tmp_path / "dr-000.tar", dr)

    index = ImageIndex([str(images)])
    assert len(index) == 2 and "img1" in index and index.read("img1") == jpgs[1]
    report = JoinReport()
    joined = list(join_by_uid(str(reinforced), index, report))
    assert [json.loads(r["json"])["uid"] for r in joined] == ["img0"] and joined[0]["jpg"] == jpgs[0]
    assert report.joined == 1 and report.mismatched == ["img1"] and report.missing == ["img9"]
    assert "img1" in caplog.text
    raw1 = next(r for r in iter_shard(str(reinforced)) if r["__key__"] == "000000001")
    with pytest.raises(ImageMismatchError, match="img1"):
        index.attach(raw1)
    assert decode_multimodal(joined[0], _meta()).jpg == jpgs[0]


def test_metadata_round_trip_atomic_and_strict(tmp_path):
    meta = dataclasses.replace(_meta(), extra={"teacher_note": "real"})
    path = tmp_path / "reinforced.json"
    write_metadata(path, meta)
    assert os.listdir(tmp_path) == ["reinforced.json"]  # no temp file left behind
    back = read_metadata(path)
    assert back == meta and back.teacher_slices() == [slice(0, 4), slice(4, 7)] and back.emb_dim == 7
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "n_augs": 3}))
    with pytest.raises(ValueError, match="reinforced.json.*n_augs"):
        read_metadata(path)
    path.write_text(json.dumps({**d, "format": "vfmkit-reinforced/99"}))
    with pytest.raises(ValueError, match="unsupported"):
        read_metadata(path)


def test_storage_cost_matches_datacompdr_figures():
    vitl = (TeacherSpec("ViT-L-14", 768), TeacherSpec("ViT-L-14", 768))
    m12 = ReinforcedMeta("multimodal", AugRecipe("rrc_ra"), 30, vitl, n_syn=5)
    m1b = dataclasses.replace(m12, n_aug=10)
    assert storage_breakdown(m12)["embeddings"] == 216 * 1024  # METHODS: ~216 KiB/sample (12M, float32)
    assert storage_breakdown(m1b)["embeddings"] == 96 * 1024
    assert storage_breakdown(dataclasses.replace(m12, storage="pth.gz"))["embeddings"] == 108 * 1024
    assert storage_bytes_per_sample(m12) > 216 * 1024  # params and captions on top
    cls = ReinforcedMeta("classification", AugRecipe("rrc_flip_ra_re"), 10, num_classes=1000, topk=10)
    assert storage_breakdown(cls)["topk"] == 10 * 10 * 4


def test_topk_round_trip_and_densify():
    probs = torch.softmax(torch.randn(6, 20) * 3, dim=-1)
    values, indices = topk_encode(probs, 5)
    assert values.shape == (6, 5) and torch.equal(values, probs.gather(-1, indices))
    assert torch.all(values[:, :-1] >= values[:, 1:])
    smooth, zeros = densify(values, indices, 20, "smooth"), densify(values, indices, 20, "zeros")
    for d in (smooth, zeros):
        assert torch.allclose(d.sum(-1), torch.ones(6))
        assert torch.equal(d.topk(5).indices.sort().values, indices.sort().values)
    assert torch.allclose(smooth.gather(-1, indices), values)
    rest = (1 - values.sum(-1, keepdim=True)) / 15
    mask = torch.ones(6, 20, dtype=torch.bool).scatter(-1, indices, False)
    assert torch.allclose(smooth[mask].view(6, 15), rest.expand(6, 15))
    assert torch.all(zeros[mask] == 0)
    assert torch.allclose(densify(*topk_encode(probs, 20), 20), probs, atol=1e-6)
    with pytest.raises(ValueError):
        densify(values, indices, 20, "uniform")


def test_classification_record_round_trip():
    meta = ReinforcedMeta("classification", AugRecipe("rrc_flip_ra_re"), 3, num_classes=10, topk=4)
    probs = torch.softmax(torch.randn(3, 10), dim=-1)
    v, i = topk_encode(probs, 4)
    params = sample_params(meta, 0, "n01440764_293", (128, 128))
    raw = encode_classification("k0", "n01440764_293", 0, params, v, i, meta, jpg=JPGS[1].read_bytes())
    rec = decode_classification(raw, meta)
    assert rec.label == 0 and rec.params == params and torch.equal(rec.indices, i)
    assert torch.allclose(rec.values, v, atol=1e-3) and rec.jpg == JPGS[1].read_bytes()
    assert torch.allclose(densify(rec.values, rec.indices, 10).sum(-1), torch.ones(3))


# ------------------------------------------------------------------------------------------------ replay
def _mm_shards(tmp_path, with_jpg: bool, bad_sha_for: str | None = None):
    from vfmkit.data.shards import ShardWriter

    meta = _meta(n_aug=3, n_syn=2)
    jpgs = [p.read_bytes() for p in JPGS]
    g = torch.Generator().manual_seed(0)
    with ShardWriter(tmp_path / "dr", max_count=10) as w:
        for n, jpg in enumerate(jpgs):
            uid = f"img{n}"
            sha = hashlib.sha256(b"other" if uid == bad_sha_for else jpg).hexdigest()
            params = sample_params(meta, 0, uid, decode_image_size(jpg))
            w.write(
                encode_multimodal(
                    f"{n:09d}",
                    uid,
                    params,
                    [f"syn a {n}", f"syn b {n}"],
                    torch.randn(3, 7, generator=g),
                    torch.randn(3, 7, generator=g),
                    meta,
                    sha256=sha,
                    jpg=jpg if with_jpg else None,
                    caption=f"real {n}",
                )
            )
    return meta, jpgs


def decode_image_size(jpg: bytes) -> tuple[int, int]:
    from vfmkit.data.decode import decode_uint8 as decode_image

    return tuple(decode_image(jpg).shape[-2:])


def test_multimodal_replay_through_loader(tmp_path):
    from vfmkit.data.augment import ReplayableAugment, to_student
    from vfmkit.data.decode import decode_uint8 as decode_image
    from vfmkit.data.replay import MultimodalReplay, ReplayShardLoader

    meta, jpgs = _mm_shards(tmp_path, with_jpg=True)
    dec = MultimodalReplay(meta, 32, seed=3)
    loader = ReplayShardLoader(str(tmp_path / "dr"), dec, batch_size=2, shuffle_buffer=0, seed=3)
    picks = []
    for epoch in range(6):
        assert loader.epoch == epoch  # the loader advances by itself; the decoder follows it
        (batch,) = list(loader)
        assert batch["image"].shape == (2, 3, 32, 32) and batch["image_emb"].shape == (2, 7)
        picks.append(tuple(batch["aug_index"].tolist()))
        raws = list(iter_shard(loader.urls[0]))
        for b, raw in enumerate(raws):
            rec = decode_multimodal(raw, meta)
            a, s = int(batch["aug_index"][b]), int(batch["syn_index"][b])
            want = to_student(
                ReplayableAugment(meta.recipe).apply(decode_image(jpgs[b]), rec.params[a], 32), 32
            )
            assert torch.equal(batch["image"][b], want)
            assert torch.equal(batch["image_emb"][b], rec.image_emb[a])
            assert torch.equal(batch["syn_text_emb"][b], rec.text_emb[1 + s])
            assert batch["syn_caption"][b] == rec.syn_text[s] and batch["caption"][b] == f"real {b}"
    assert len(set(picks)) > 1  # the stored augmentation changes with the epoch
    again = ReplayShardLoader(
        str(tmp_path / "dr"), MultimodalReplay(meta, 32, seed=3), 2, shuffle_buffer=0, seed=3
    )
    assert tuple(next(iter(again))["aug_index"].tolist()) == picks[0]


def test_multimodal_replay_first_n_augmentations(tmp_path):
    """method_args.n_aug (the stored-augmentation lever): only the first n stored augmentations are replayed."""
    from vfmkit.data.replay import MultimodalReplay, ReplayShardLoader

    meta, _ = _mm_shards(tmp_path, with_jpg=True)
    assert meta.n_aug > 1
    dec = MultimodalReplay(meta, 32, seed=3, n_aug=1)
    loader = ReplayShardLoader(str(tmp_path / "dr"), dec, batch_size=2, shuffle_buffer=0, seed=3)
    for _epoch in range(4):
        (batch,) = list(loader)
        assert batch["aug_index"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="store 3|store"):
        MultimodalReplay(meta, 32, n_aug=meta.n_aug + 1)


def test_multimodal_replay_joins_images_and_skips_mismatch(tmp_path):
    from vfmkit.data.replay import MultimodalReplay, ReplayShardLoader
    from vfmkit.data.shards import ShardWriter

    meta, jpgs = _mm_shards(tmp_path, with_jpg=False, bad_sha_for="img1")
    with ShardWriter(tmp_path / "images") as w:
        for n, jpg in enumerate(jpgs):
            w.write({"__key__": f"{n:09d}", "jpg": jpg, "json": {"uid": f"img{n}"}})
    dec = MultimodalReplay(meta, 24, images=ImageIndex(str(tmp_path / "images")))
    loader = ReplayShardLoader(str(tmp_path / "dr"), dec, batch_size=1, shuffle_buffer=0)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["caption"] == ["real 0"]
    assert loader.n_corrupt == 1 and "img1" in loader.corrupt[0][2] and "sha256" in loader.corrupt[0][2]


def test_classification_replay_targets(tmp_path):
    from vfmkit.data.replay import ClassificationReplay, ReplayShardLoader
    from vfmkit.data.shards import ShardWriter

    meta = ReinforcedMeta("classification", AugRecipe("rrc_flip_ra_re", size=48), 4, num_classes=10, topk=3)
    jpg = JPGS[1].read_bytes()
    probs = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(1)), -1)
    v, i = topk_encode(probs, 3)
    with ShardWriter(tmp_path / "cls") as w:
        for n in range(4):
            uid = f"tench{n}"
            w.write(
                encode_classification(
                    f"{n:09d}", uid, 0, sample_params(meta, 0, uid, (128, 128)), v, i, meta, jpg=jpg
                )
            )
    seen = set()
    for p in (1.0, 0.0):
        loader = ReplayShardLoader(
            str(tmp_path / "cls"), ClassificationReplay(meta, 40, p=p), 4, shuffle_buffer=0
        )
        for _ in range(3):
            (b,) = list(loader)
            assert b["image"].shape == (4, 3, 40, 40) and torch.allclose(b["target"].sum(-1), torch.ones(4))
            for t, a in zip(b["target"], b["aug_index"].tolist(), strict=True):
                if p == 0.0:
                    assert a == -1 and torch.equal(t, torch.eye(10)[0])
                else:
                    assert 0 <= a < 4 and torch.allclose(t, densify(v[a], i[a], 10), atol=1e-3)
                    seen.add(a)
    assert len(seen) > 1
    with pytest.raises(ValueError, match="partners"):
        ClassificationReplay(dataclasses.replace(meta, recipe=AugRecipe("rrc_flip_ra_re_mix")), 40)


def test_classification_replay_equals_full_record_decode(tmp_path):
    """ClassificationReplay reads only what a draw needs (one paug.json entry, the top-k via read_npz), yet gives
    exactly what the straightforward computation gives: decode the whole record (np.load, every param), draw,
    replay (mixing with the partner photo), densify; for stored and joined images and both densify modes."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from vfmkit.data.augment import ReplayableAugment, to_student
    from vfmkit.data.decode import decode_uint8 as decode_image
    from vfmkit.data.replay import ClassificationReplay, replay_rng
    from vfmkit.data.shards import ShardWriter

    jpgs = [p.read_bytes() for p in JPGS]
    with ShardWriter(tmp_path / "images") as w:
        for n, jpg in enumerate(jpgs):
            w.write({"__key__": f"{n:09d}", "jpg": jpg, "json": {"uid": f"img{n}"}})
    index = ImageIndex(str(tmp_path / "images"))
    g = torch.Generator().manual_seed(2)
    for name in ("rrc_flip_ra_re", "rrc_flip_ra_re_mix"):
        meta = ReinforcedMeta("classification", AugRecipe(name, size=48), 3, num_classes=10, topk=4)
        aug = ReplayableAugment(meta.recipe)
        raws = []
        for n, jpg in enumerate(jpgs):  # each photo's mixing partner is the other one
            params = [
                aug.sample_for(
                    0,
                    f"img{n}",
                    k,
                    decode_image_size(jpg),
                    partner=f"img{1 - n}",
                    partner_size=decode_image_size(jpgs[1 - n]),
                )
                for k in range(3)
            ]
            v, i = topk_encode(torch.softmax(3 * torch.randn(3, 10, generator=g), -1), 4)
            raws.append(
                encode_classification(
                    f"{n:09d}", f"img{n}", 3 + n, params, v, i, meta, jpg=jpg if n == 0 else None
                )
            )  # img1's image is joined by uid
        partners = index if "mix" in name else None
        kinds = set()
        for mode in ("smooth", "zeros"):
            dec = ClassificationReplay(
                meta, 40, p=0.5, densify_mode=mode, partners=partners, images=index, seed=4
            )
            for epoch in range(4):
                dec.set_epoch(epoch)
                for n, raw in enumerate(raws):
                    out = dec(dict(raw))
                    rec = decode_classification(index.attach(raw), meta)
                    src = decode_image(jpgs[n])
                    rng = replay_rng(4, epoch, f"img{n}")
                    if rng.random() >= 0.5:  # plain view: short side to 40, centre crop; one-hot label
                        a, kind = -1, "plain"
                        img = F.resize(src, 40, interpolation=InterpolationMode.BICUBIC, antialias=True)
                        img, target = F.center_crop(img, [40, 40]), torch.eye(10)[3 + n]
                    else:
                        a = rng.randrange(3)
                        prm = rec.params[a]
                        kind = "stored" if prm.mix is None else "mixed"
                        partner = decode_image(jpgs[1 - n]) if prm.mix is not None else None
                        img = aug.replay(src, prm, 40, partner_img=partner)
                        target = densify(rec.values[a], rec.indices[a], 10, mode)
                    assert out["aug_index"] == a and out["label"] == 3 + n
                    assert torch.equal(out["image"], to_student(img, 40)) and torch.equal(
                        out["target"], target
                    )
                    kinds.add(kind)
        assert kinds == ({"plain", "mixed"} if partners else {"plain", "stored"})
    dec.p = 1.0
    for part, bad in (("topk.npz", raws[0]["topk.npz"][:100]), ("paug.json", b'{"param_aug": []}')):
        with pytest.raises(ValueError, match="'000000000' \\(uid 'img0'\\)"):
            dec({**raws[0], part: bad})


def test_read_npz_equals_np_load():
    """read_npz (replay's top-k and embedding read) returns np.load's arrays: plain stored entries are parsed in place
    (read-only views of the bytes); compressed, Fortran-order or structured ones go through np.load; object
    arrays are refused, never unpickled."""
    from vfmkit.data.reinforced import read_npz

    rng = np.random.default_rng(0)
    plain = {
        "values": rng.random((3, 5)).astype(np.float16),
        "indices": np.arange(15, dtype=np.int16).reshape(3, 5),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 4), np.int32),
        "big_endian": np.arange(4, dtype=">i4"),
        "flags": np.array([True, False]),
        "text": np.array(["ab", "c"]),
    }
    other = {
        "fortran": np.asfortranarray(rng.random((3, 2))),
        "record": np.zeros(2, [("a", "<i4"), ("b", "<f8")]),
    }
    for save, arrays, in_place in (
        (np.savez, plain, True),
        (np.savez_compressed, plain, False),
        (np.savez, {**plain, **other}, False),
    ):
        buf = io.BytesIO()
        save(buf, **arrays)
        got = read_npz(buf.getvalue())
        with np.load(io.BytesIO(buf.getvalue()), allow_pickle=False) as z:
            want = {k: z[k] for k in z.files}
        assert list(got) == list(want) == list(arrays)
        for k, w in want.items():
            assert got[k].dtype == w.dtype and got[k].shape == w.shape and np.array_equal(got[k], w), k
            assert got[k].flags.writeable is not in_place, k  # which path it took
    buf = io.BytesIO()
    np.savez(buf, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        read_npz(buf.getvalue())


def test_image_index_reads_embedded_compressed_shards():
    from vfmkit.data.builtin import builtin_path
    from vfmkit.data.shards import list_shards

    urls = list_shards(str(builtin_path("imagenette/val")))[:1]
    assert urls[0].endswith(".tar.gz")
    index = ImageIndex(urls)
    raws = list(iter_shard(urls[0]))[:3]
    assert len(index) >= len(raws) > 0
    for raw in raws:
        info = json.loads(raw["json"])
        assert index.read(info["uid"]) == raw["jpg"]
        assert (
            hashlib.sha256(index.attach({k: v for k, v in raw.items() if k != "jpg"})["jpg"]).hexdigest()
            == info["sha256"]
        )


@pytest.mark.parametrize("storage", ["npz", "pth.gz"])
def test_truncated_embeddings_are_reported_by_sample(storage):
    meta = _meta(storage=storage)
    raw = encode_multimodal(
        "k3",
        "u-3",
        sample_params(meta, 0, "u-3", (120, 160)),
        ["x", "y"],
        torch.zeros(2, 7),
        torch.zeros(3, 7),
        meta,
    )
    for bad in (raw[storage][: len(raw[storage]) // 2], b"garbage"):
        with pytest.raises(ValueError, match="'k3'.*u-3"):
            decode_multimodal({**raw, storage: bad}, meta)
