"""DR for classifiers, training side: reinforced / plain / online modes in the one engine, on a tiny
reinforced set made here from real embedded Imagenette photos with the real EfficientNet-Lite0 teacher.

(Replay equality, top-k densify, generation resume and the teacher's accuracy are tested in test_augment.py,
test_reinforced.py, test_reinforce.py and test_teachers.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vfmkit.config import ConfigError, load_config
from vfmkit.data.augment import AugRecipe, ReplayableAugment, to_student
from vfmkit.data.shards import ShardWriter, list_shards
from vfmkit.engine import init_distributed, train
from vfmkit.methods import dr
from vfmkit.methods.registry import build_job

STUDENT = {"name": "resnet10t", "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
SIZE = 32  # student resolution: tiny, so a test trains in seconds on a shared CPU


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU spinning OpenMP threads run far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dset(tmp_path_factory) -> dict:
    """30 real Imagenette train photos (3 per class, 2 shards) and their reinforced set (2 augmentations each,
    EfficientNet-Lite0 at 128 px, top-5; images not stored, so training joins them by uid)."""
    from vfmkit.data.builtin import parse_class_index
    from vfmkit.pipelines.reinforce import ReinforceArgs, iter_shard, reinforce

    root = tmp_path_factory.mktemp("dr")
    by_label: dict[int, list[dict]] = {}
    for url in list_shards("builtin:imagenette/train"):
        for s in iter_shard(url):
            lab = json.loads(s["json"])["label"]
            if len(by_label.setdefault(lab, [])) < 3:
                by_label[lab].append({k: v for k, v in s.items() if k != "__url__"})
    samples = [s for lab in sorted(by_label) for s in by_label[lab]]
    with ShardWriter(root / "src", max_count=15) as w:
        for s in samples:
            w.write(s)
    args = ReinforceArgs(
        mode="classify",
        teachers=["efficientnet-lite0@128"],
        n_aug=2,
        topk=5,
        class_index=parse_class_index("imagenette"),
        batch_size=30,
        chunk=15,
        recipe={"name": "rrc_flip", "size": 64, "scale": [0.35, 1.0]},
    )
    reinforce(str(root / "src"), root / "dr", args, progress=False)
    return {"root": root, "src": str(root / "src"), "dr": str(root / "dr"), "samples": samples}


def _cfg(dset: dict, out: Path | None = None, **method_args) -> object:
    return load_config(
        {
            "method": "dr",
            "seed": 0,
            "out_dir": str(out or dset["root"] / "run"),
            "model": STUDENT,
            "data": {
                "train": dset["src"],
                "val": dset["src"],
                "batch_size": 10,
                "image_size": SIZE,
                "shuffle_buffer": 30,
            },
            "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
            "train": {"steps": 12, "log_every": 3, "progress": False, "tensorboard": False},
            "method_args": {"reinforced": dset["dr"], **method_args},
        }
    )


# ------------------------------------------------------------------------------------------------ losses
def test_losses_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    logits, t_logits = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    target = t_logits.softmax(-1)
    manual = (target * (target.log() - F.log_softmax(logits, -1))).sum(-1).mean()
    torch.testing.assert_close(dr.kl_loss(logits, target), manual)
    assert dr.kl_loss(t_logits, target).abs() < 1e-6  # zero iff the student matches the target
    manual_t = 4.0 * (target * (target.log() - F.log_softmax(logits / 2, -1))).sum(-1).mean()
    torch.testing.assert_close(dr.kl_loss(logits, target, 2.0), manual_t)
    labels = torch.tensor([0, 3, 9, 1, 1, 2])
    one_hot = F.one_hot(labels, 10).float()
    torch.testing.assert_close(dr.soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    torch.testing.assert_close(
        dr.soft_cross_entropy(logits, one_hot, 0.1), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )


def test_config_errors_name_the_key(dset):
    di = init_distributed()
    cases = [
        ({"mode": "distil"}, "method_args.mode"),
        ({"temprature": 2.0}, "method_args.temprature"),
        ({"p": 1.5}, "method_args.p"),
        ({"recipe": {"name": "rrc_flip"}}, "method_args.recipe"),
        ({"teachers": ["efficientnet-lite0"]}, "method_args.teachers"),
    ]
    for kw, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_job(_cfg(dset, **kw), di)
    cfg = _cfg(dset, mode="reinforced")
    cfg.method_args["reinforced"] = None
    with pytest.raises(ConfigError, match="needs the reinforced set"):
        build_job(cfg, di)
    cfg.method_args["reinforced"] = dset["src"]  # a plain shard folder has no reinforced.json
    with pytest.raises(ConfigError, match="no reinforced.json"):
        build_job(cfg, di)


# ---------------------------------------------------------------------------------------- plain / online data
def test_fresh_augment_draws_one_augmentation_for_both_views(dset):
    """plain/online draw new params each epoch from the same family; the student and the teacher view are the
    same draw at two sizes; p=0 falls back to the plain view and the one-hot label."""
    from vfmkit.data.decode import decode_uint8 as decode_image

    recipe = AugRecipe("rrc_flip_ra_re", size=64)
    aug = ReplayableAugment(recipe)
    dec = dr.FreshAugment(recipe, SIZE, 10, p=1.0, seed=3, teacher_size=64)
    raw = dset["samples"][4]
    meta = json.loads(raw["json"])
    src = decode_image(raw["jpg"])
    outs = []
    for epoch in (0, 1):
        dec.set_epoch(epoch)
        out = dec(dict(raw))
        rng = dr.fresh_rng(3, epoch, meta["uid"])
        rng.random()  # the p draw
        params = aug.sample_single(rng, tuple(src.shape[-2:]))
        assert torch.equal(out["teacher_image"], aug.apply(src, params, 64))
        want = to_student(aug.apply(src, params, SIZE), SIZE, dr.IMAGENET_MEAN, dr.IMAGENET_STD)
        torch.testing.assert_close(out["image"], want)
        assert out["label"] == meta["label"] and torch.equal(out["target"], torch.eye(10)[meta["label"]])
        outs.append(out["image"])
    assert not torch.equal(outs[0], outs[1])  # a fresh draw every epoch
    dec.set_epoch(0)
    assert torch.equal(dec(dict(raw))["image"], outs[0])  # ... yet reproducible (exact resume)
    plain = dr.FreshAugment(recipe, SIZE, 10, p=0.0)(dict(raw))
    torch.testing.assert_close(
        plain["image"], to_student(dr.plain_view(src, SIZE), SIZE, dr.IMAGENET_MEAN, dr.IMAGENET_STD)
    )
    with pytest.raises(KeyError, match="label"):
        dec({"__key__": "x", "jpg": raw["jpg"], "json": b"{}"})


def test_mix_collate_mixes_images_teacher_views_and_labels(dset):
    recipe = AugRecipe("rrc_flip_ra_re_mix", size=48, mix_p=0.7)
    dec = dr.FreshAugment(recipe, SIZE, 10, p=1.0, teacher_size=48)
    samples = [dec(dict(s)) for s in dset["samples"][::3]]  # 10 samples, one per class
    kinds = [s["mix_kind"] for s in samples]
    assert 0 in kinds and any(k in (1, 2) for k in kinds)
    batch = dr.MixCollate(recipe)(samples)
    n = len(samples)
    for i, s in enumerate(samples):
        j, lam = n - 1 - i, s["mix_lam"]
        if s["mix_kind"] == 0:
            assert torch.equal(batch["image"][i], s["image"]) and torch.equal(batch["target"][i], s["target"])
            continue
        torch.testing.assert_close(batch["target"][i], lam * s["target"] + (1 - lam) * samples[j]["target"])
        if s["mix_kind"] == 1:  # MixUp of the partner's un-mixed image, on both views
            torch.testing.assert_close(batch["image"][i], lam * s["image"] + (1 - lam) * samples[j]["image"])
            t_mix = lam * s["teacher_image"].float() + (1 - lam) * samples[j]["teacher_image"].float()
            torch.testing.assert_close(batch["teacher_image"][i], t_mix / 255)
        else:  # CutMix: the box (reference pixels, rescaled) comes from the partner, the rest is untouched
            ii, jj, hh, ww = (round(int(v) * SIZE / 48) for v in s["mix_box"])
            assert torch.equal(
                batch["image"][i][:, ii : ii + hh, jj : jj + ww],
                samples[j]["image"][:, ii : ii + hh, jj : jj + ww],
            )
    assert torch.allclose(batch["target"].sum(-1), torch.ones(n))


# ------------------------------------------------------------------------------------------------ training
def _replay_batches(dset: dict, n_epochs: int = 2) -> list[dict]:
    """Fixed reinforced batches (stored augmentations, p=1) for before/after comparisons."""
    from vfmkit.data.reinforced import ImageIndex, read_metadata
    from vfmkit.data.replay import ClassificationReplay, ReplayShardLoader

    meta = read_metadata(Path(dset["dr"]) / "reinforced.json")
    dec = ClassificationReplay(
        meta, SIZE, p=1.0, images=ImageIndex(dset["src"]), mean=dr.IMAGENET_MEAN, std=dr.IMAGENET_STD
    )
    loader = ReplayShardLoader(dset["dr"], dec, 10, shuffle_buffer=0)
    out = []
    for e in range(n_epochs):
        loader.set_epoch(e)
        out += list(loader)
    return out


@torch.no_grad()
def _mean_kl(model: torch.nn.Module, batches: list[dict]) -> float:
    model.eval()
    return sum(float(dr.kl_loss(model(b["image"]), b["target"])) for b in batches) / len(batches)


def test_reinforced_training_through_cli_lowers_kl(dset, tmp_path, capsys):
    """`vfmkit train dr_imagenette` on the reinforced set: the KL to the stored teacher targets drops, and the
    final eval reports top-1, ECE and NLL over every val image."""
    from safetensors.torch import load_file

    from vfmkit.cli import main
    from vfmkit.models.factory import create_classifier

    out = tmp_path / "run"
    sets = {
        "model.name": STUDENT["name"],
        "model.kwargs": json.dumps(STUDENT["kwargs"]),
        "data.train": dset["src"],
        "data.val": dset["src"],
        "data.batch_size": 10,
        "data.image_size": SIZE,
        "data.shuffle_buffer": 30,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 3,
        "optim.weight_decay": 0.0,
        "train.progress": False,
        "train.tensorboard": False,
        "train.log_every": 3,
        "method_args.reinforced": dset["dr"],
        "method_args.epochs": 15,
    }
    argv = ["train", "dr_imagenette", "--out", str(out)]
    argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 15 * 3  # epochs x (30 images // batch 10)
    assert final["eval/n"] == 30 and 0 <= final["eval/top1"] <= 100 and 0 <= final["eval/ece"] <= 100
    assert final["eval/nll"] > 0
    batches = _replay_batches(dset)
    torch.manual_seed(0)
    init = create_classifier(STUDENT["name"], 10, **STUDENT["kwargs"])  # the build's seeded initialisation
    trained = create_classifier(STUDENT["name"], 10, **STUDENT["kwargs"])
    trained.load_state_dict(load_file(str(out / "model.safetensors")))
    before, after = _mean_kl(init, batches), _mean_kl(trained, batches)
    print(f"KL before {before:.3f} after {after:.3f}")
    assert after < 0.8 * before, (before, after)
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss", "acc", "teacher_agree"} <= set(logs[0])


def test_plain_mode_resumes_exactly(dset, tmp_path):
    """plain mode (fresh draws per epoch, cross-entropy): stopped mid-epoch and resumed gives the
    uninterrupted weights (the decoder's epoch and the loader position come back)."""
    from safetensors.torch import load_file

    di = init_distributed()
    ref_cfg = _cfg(dset, tmp_path / "ref", mode="plain")
    job = build_job(ref_cfg, di)
    ref = train(ref_cfg, job.model, job.loss_fn, job.loader, out_dir=tmp_path / "ref", dist_info=di)
    assert ref.step == 12 and ref.history[-1]["epoch"] == 3
    cfg = _cfg(dset, tmp_path / "cut", mode="plain")
    cfg.train.ckpt_every = 4
    job = build_job(cfg, di)
    r1 = train(cfg, job.model, job.loss_fn, job.loader, out_dir=tmp_path / "cut", dist_info=di, stop_after=5)
    assert r1.step == 5
    job = build_job(cfg, di)  # a fresh process would rebuild everything
    r2 = train(cfg, job.model, job.loss_fn, job.loader, out_dir=tmp_path / "cut", dist_info=di)
    assert r2.resumed_from == 4 and r2.step == 12
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0
    from vfmkit.models.factory import create_classifier

    # the build's seeded initialisation: training moved away from it, so the equality is not trivial
    torch.manual_seed(0)
    init = create_classifier(STUDENT["name"], 10, **STUDENT["kwargs"]).state_dict()
    assert max((a[k].float() - init[k].float()).abs().max().item() for k in a) > 1e-3


def test_online_mode_distils_from_the_sets_teacher(dset):
    """online: the reinforced set's teacher (from its metadata) runs on the batch's teacher view (the recipe's
    reference size), and the loss is the same KL as reinforced training."""
    di = init_distributed()
    cfg = _cfg(dset, mode="online", epochs=2)
    job = build_job(cfg, di)
    setup = job.extra["setup"]
    assert setup.teachers == ["efficientnet-lite0@128"] and setup.recipe.name == "rrc_flip"
    assert (
        job.cfg.train.steps == 2 * 3 and cfg.train.steps != job.cfg.train.steps
    )  # epochs x batches; cfg untouched
    batch = next(iter(job.loader))
    assert batch["teacher_image"].shape == (10, 3, 64, 64) and batch["image"].shape == (10, 3, SIZE, SIZE)
    loss, logs = job.loss_fn(job.model, batch, 0)
    with torch.no_grad():
        probs = job.extra["teacher"](batch["teacher_image"])
    torch.testing.assert_close(loss, dr.kl_loss(job.model(batch["image"]), probs))
    # the real teacher on real photos: it mostly names the true class, so the target carries the label
    assert (probs.argmax(-1) == batch["label"]).float().mean() >= 0.6
    loss.backward()
    assert all(p.grad is None for p in job.extra["teacher"].parameters())  # the teacher stays frozen


# ------------------------------------------------------------------------------------------- reinforced data
def test_reinforced_mode_replays_the_set_as_generated(dset):
    """The reinforced mode's loader decodes with ClassificationReplay set up from the set: images joined by uid
    (the set stores none), the set's densify mode, the student's normalisation; its first batch is each image's
    drawn stored augmentation (or plain view) with the stored teacher target."""
    from vfmkit.data.augment import ReplayableAugment
    from vfmkit.data.decode import decode_uint8 as decode_image
    from vfmkit.data.reinforced import ImageIndex, decode_classification, densify
    from vfmkit.data.replay import ClassificationReplay, replay_rng
    from vfmkit.pipelines.reinforce import iter_shard

    job = build_job(_cfg(dset, mode="reinforced", p=0.6), init_distributed())
    dec, meta = job.loader.decode_fn, job.extra["setup"].meta
    assert isinstance(dec, ClassificationReplay) and dec.images is not None and dec.partners is None
    assert (dec.p, dec.seed, dec.size, dec.densify_mode) == (0.6, 0, SIZE, meta.extra["densify"])
    mean, std, _ = dr.student_norm(job.model)
    assert (dec.mean, dec.std) == (mean, std)
    batch = next(iter(job.loader))  # epoch 0, shuffled: match the rows by label and image
    index, aug = ImageIndex(dset["src"]), ReplayableAugment(meta.recipe)
    want = {}
    for raw in (r for u in list_shards(dset["dr"]) for r in iter_shard(u)):
        rec = decode_classification(index.attach(raw), meta)
        rng = replay_rng(0, 0, rec.uid)
        src = decode_image(index.read(rec.uid))
        if rng.random() >= 0.6:
            a, img, target = -1, dr.plain_view(src, SIZE), torch.eye(10)[rec.label]
        else:
            a = rng.randrange(meta.n_aug)
            img = aug.replay(src, rec.params[a], SIZE)
            target = densify(rec.values[a], rec.indices[a], 10, meta.extra["densify"])
        want[rec.uid] = (a, rec.label, to_student(img, SIZE, mean, std), target)
    seen = set()
    for b in range(len(batch["label"])):
        match = [w for w in want.values() if torch.equal(w[2], batch["image"][b])]
        assert len(match) == 1, b
        a, label, _, target = match[0]
        assert int(batch["aug_index"][b]) == a and int(batch["label"][b]) == label
        assert torch.equal(batch["target"][b], target)
        seen.add(a >= 0)
    assert seen == {True, False}
