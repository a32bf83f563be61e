"""Task-oriented knowledge transfer (issue 14): curation, kNN, losses, the staged pipeline on the embedded data.

One session fixture runs the three arms (task-oriented, task-agnostic, scratch) on the embedded Imagenette (4
labels per class) with a pool of embedded Flickr8k + unlabelled embedded Imagenette, a real EfficientNet-Lite0
teacher at 64 px and a tiny resnet10t student at 32 px, for a few steps: mechanics, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vfmkit.data.curate import curate, faiss_available, knn, knn_blockwise
from vfmkit.methods.transfer import feature_loss, task_kl

torch.set_num_threads(1)


def _opts(out: Path, **kw):
    from vfmkit.pipelines.transfer import TransferOptions

    base = dict(
        out=str(out),
        per_class=4,
        pool=["builtin:flickr8k/train", "builtin:imagenette/train"],
        pool_limits=[60, 40],
        val_every=2,
        teacher="efficientnet-lite0@64",
        teacher_lp_steps=30,
        teacher_ft_steps=20,
        k=5,
        n_aug=2,
        student="resnet10t",
        image_size=32,
        distill_steps=4,
        finetune_steps=4,
        batch_size=16,
    )
    return TransferOptions(**{**base, **kw})


@pytest.fixture(scope="session")
def arms(tmp_path_factory):
    from vfmkit.pipelines.transfer import run_transfer

    out = tmp_path_factory.mktemp("transfer")
    reports = {d: run_transfer(_opts(out, distill=d)) for d in ("task", "feature", "none")}
    return out, reports


# ---------------------------------------------------------------------------------------------- curation
def _brute(q, p, k):
    qn = q / q.norm(dim=1, keepdim=True)
    pn = p / p.norm(dim=1, keepdim=True)
    s = qn @ pn.T
    idx = [sorted(range(p.shape[0]), key=lambda j: (-float(s[i, j]), j))[:k] for i in range(q.shape[0])]
    return torch.tensor(idx)


def test_knn_blockwise_equals_brute_force_on_real_embeddings(arms):
    from vfmkit.data.samples import decode_images, read_samples
    from vfmkit.pipelines.transfer import _tnorm, load_teacher_weights

    out, reports = arms
    t_dir = Path(reports["task"]["stages"]["finetune-teacher"]["dir"])
    teacher = load_teacher_weights(t_dir / "model.safetensors", "efficientnet-lite0@64", 10)
    x, _ = decode_images(read_samples("builtin:imagenette/val", limit=90), 64)
    with torch.no_grad():
        emb = teacher.features(_tnorm(teacher, x))
    q, p = emb[:10], emb[10:]
    want = _brute(q, p, 7)
    for block in (3, 16, 1000):
        _, got = knn_blockwise(q, p, 7, block=block)
        assert torch.equal(got, want), block
    s, i, used = knn(q, p, 7, backend="exact")
    assert used == "exact" and torch.equal(i, want)
    assert torch.all(s[:, :-1] >= s[:, 1:])


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed")
def test_faiss_equals_exact():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(8, 16, generator=g), torch.randn(300, 16, generator=g)
    _, i_exact, _ = knn(q, p, 5, backend="exact")
    _, i_faiss, used = knn(q, p, 5, backend="faiss")
    assert used == "faiss" and torch.equal(i_exact, i_faiss)


def test_knn_ties_go_to_lower_index():
    p = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])  # rows 0, 1, 3: the same direction
    _, i = knn_blockwise(torch.tensor([[1.0, 0.0]]), p, 3, block=2)
    assert i.tolist() == [[0, 1, 3]]


def test_curate_deterministic_balanced_deduplicated():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 8, generator=g) * 3
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    queries = centers[labels] + 0.1 * torch.randn(6, 8, generator=g)
    pool = torch.cat([centers[c] + torch.randn(n, 8, generator=g) for c, n in ((0, 30), (1, 12), (2, 20))])
    pool = torch.cat([pool, pool[:5]])  # exact copies of five pool items
    a = curate(queries, labels, pool, 10, dedup_threshold=0.999)
    b = curate(queries, labels, pool, 10, dedup_threshold=0.999)
    assert a.indices == b.indices and a.classes == b.classes
    assert len(set(a.indices)) == len(a.indices)
    counts = [a.classes.count(c) for c in range(3)]
    assert counts[0] == counts[1] == counts[2] > 0
    unit = pool[a.indices] / pool[a.indices].norm(dim=1, keepdim=True)
    sim = unit @ unit.T - 2 * torch.eye(len(a.indices))
    assert float(sim.max()) <= 0.999  # no near-duplicates kept
    assert a.composition["per_class"] == {"0": counts[0], "1": counts[1], "2": counts[2]}
    # per-query k: a query with k=0 adds nothing; per_class caps every class
    c = curate(queries, labels, pool, [3, 0, 3, 0, 3, 0], balance=True, per_class=2)
    assert [c.classes.count(x) for x in range(3)] == [2, 2, 2]
    d = curate(queries, labels, pool, [4, 0, 0, 0, 0, 0], balance=False)
    assert len(d.indices) == 4 and set(d.classes) == {0}
    with pytest.raises(ValueError, match="entries"):
        curate(queries, labels, pool, [1, 2])


# ---------------------------------------------------------------------------------------------- losses
def test_task_kl_matches_formula_per_image_and_per_pixel():
    from vfmkit.methods.dr import kl_loss

    g = torch.Generator().manual_seed(0)
    logits, t_logits = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    p = t_logits.softmax(1)
    for T in (1.0, 2.0):
        q = (logits / T).softmax(1)
        want = sum(float((p[b] * (p[b] / q[b]).log()).sum()) for b in range(4)) / 4 * T * T
        assert abs(float(task_kl(logits, p, T)) - want) < 1e-5
        assert abs(float(task_kl(logits, p, T)) - float(kl_loss(logits, p, T))) < 1e-5
    dl, dt = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g).softmax(1)
    ignore = torch.zeros(2, 4, 5, dtype=torch.bool)
    ignore[0, :2] = True
    total, n = 0.0, 0
    for b in range(2):
        for h in range(4):
            for w in range(5):
                if ignore[b, h, w]:
                    continue
                pt, q = dt[b, :, h, w], dl[b, :, h, w].softmax(0)
                total += float((pt * (pt / q).log()).sum())
                n += 1
    assert abs(float(task_kl(dl, dt, ignore=ignore)) - total / n) < 1e-5
    assert float(task_kl(t_logits, p)) < 1e-6  # KL of a distribution with itself
    f = torch.randn(3, 6, generator=g)
    assert float(feature_loss(f, 2 * f)) < 1e-6 and abs(float(feature_loss(f, -f)) - 2.0) < 1e-5


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_arms_composition_and_teacher(arms):
    out, reports = arms
    task, feat, scratch = reports["task"], reports["feature"], reports["none"]
    t = task["stages"]["finetune-teacher"]
    # the real Lite0, fine-tuned on the 40 labels, beats its own (untuned backbone) linear probe
    assert t["ft_top1"] > t["lp_top1"], t
    # the two distillations share the teacher and the stored transfer set (computed once)
    assert feat["stages"]["finetune-teacher"]["cached"] and feat["stages"]["build-transfer-set"]["cached"]
    s_dir = Path(task["stages"]["build-transfer-set"]["dir"])
    comp = json.loads((s_dir / "composition.json").read_text())
    assert comp["pool"] == 100 and comp["pool_per_source"] == {"flickr8k/train": 60, "imagenette/train": 40}
    per_class = comp["retrieval"]["per_class"]
    assert len(set(per_class.values())) == 1 and sum(per_class.values()) == comp["n"]
    assert json.loads((s_dir / "reinforced" / "reinforced.json").read_text())["kind"] == "classification"
    assert "finetune-teacher" not in scratch["stages"]
    for r in (task, feat, scratch):
        assert 0.0 <= r["top1"] <= 100.0


def test_stages_resume_from_their_caches(arms):
    from vfmkit.pipelines.transfer import run_transfer

    out, reports = arms
    again = run_transfer(_opts(out, distill="task"))
    assert all(s["cached"] for s in again["stages"].values())
    assert again["top1"] == reports["task"]["top1"]
    # a run killed after the student trained but before its stage record: the rerun gives the same result
    f_dir = Path(reports["task"]["stages"]["finetune-student"]["dir"])
    (f_dir / "stage.json").unlink()
    redo = run_transfer(_opts(out, distill="task"))
    assert not redo["stages"]["finetune-student"]["cached"]
    assert redo["top1"] == reports["task"]["top1"]
    assert redo["stages"]["distill"]["cached"]


def test_swapped_teacher_and_transfer_set(arms, tmp_path):
    from vfmkit.pipelines.transfer import run_transfer

    out, reports = arms
    t_dir = Path(reports["task"]["stages"]["finetune-teacher"]["dir"])
    s_dir = Path(reports["task"]["stages"]["build-transfer-set"]["dir"])
    r = run_transfer(
        _opts(tmp_path, teacher_weights=str(t_dir / "model.safetensors"), transfer_set=str(s_dir / "shards")),
        stop_after="build-transfer-set",
    )
    assert r["stages"]["finetune-teacher"]["given"] == str(t_dir / "model.safetensors")
    got = Path(r["stages"]["build-transfer-set"]["dir"]) / "reinforced"
    names = sorted(p.name for p in got.glob("*.tar"))
    assert names == sorted(p.name for p in (s_dir / "reinforced").glob("*.tar"))
    for n in names:  # same teacher, same images, same seed: the same stored outputs
        assert (got / n).read_bytes() == (s_dir / "reinforced" / n).read_bytes()


def test_feature_memo_equals_recomputed_teacher_features(arms):
    """The task-agnostic arm memoises the frozen teacher's features by (uid, stored augmentation): a replayed
    view is the same tensor in every epoch, so the memo's answer equals running the teacher again."""
    from vfmkit.config import load_config
    from vfmkit.engine.distributed import DistInfo
    from vfmkit.methods import dr
    from vfmkit.methods.transfer import FeatureMemo

    out, reports = arms
    rein = str(Path(reports["task"]["stages"]["build-transfer-set"]["dir"]) / "reinforced")
    cfg = load_config(
        {
            "method": "dr",
            "out_dir": str(out / "memo"),
            "model": {"name": "resnet10t"},
            "data": {"train": rein, "batch_size": 8, "image_size": 32},
            "method_args": {"mode": "reinforced", "reinforced": rein, "p": 1.0},
        }
    )
    args = dr.parse_args(cfg)
    loader = dr.make_train_loader(
        cfg, args, dr.resolve_setup(args, 32), 32, ((0.5,) * 3, (0.5,) * 3), DistInfo()
    )
    torch.manual_seed(0)
    proj = torch.nn.Conv2d(3, 5, 3)
    teacher = lambda x: proj(x).mean((2, 3))  # noqa: E731  a deterministic stand-in for the frozen tower
    memo, seen, n_batches = FeatureMemo(teacher, capacity=10_000), {}, 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            x, uids, augs = batch["image"], batch["uid"], batch["aug_index"].tolist()
            with torch.no_grad():
                got, direct = memo(x, uids, augs), teacher(x)
            torch.testing.assert_close(got, direct, rtol=0, atol=1e-6)
            for i, key in enumerate(zip(uids, augs, strict=True)):
                if key in seen:  # the premise: the same (uid, aug) replays the identical view
                    assert torch.equal(seen[key], x[i])
                seen[key] = x[i].clone()
            n_batches += 1
    assert n_batches > 2 and memo.computed == len(seen) == len(memo.store)
    assert len(seen) < 3 * reports["task"]["stages"]["build-transfer-set"]["composition"]["n"]


def test_clip_pretrained_student_arm(arms):
    """distill=clip: CLIP pretraining of the student's timm trunk on the embedded captions, then fine-tuning;
    the student's trunk starts from the CLIP run's weights, its head from the seeded fresh init."""
    from vfmkit.models.factory import load_state_dict
    from vfmkit.pipelines.transfer import load_student, run_transfer

    out, reports = arms
    opts = _opts(out, distill="clip")
    rep = run_transfer(opts)
    assert "finetune-teacher" not in rep["stages"] and 0.0 <= rep["top1"] <= 100.0
    d_dir = Path(rep["stages"]["distill"]["dir"])
    clip_state = load_state_dict(str(d_dir / "model.safetensors"))
    student = load_student(opts, 10, d_dir)
    fresh = load_student(opts, 10, None)
    for k, v in student.state_dict().items():
        if k.startswith("fc."):
            assert torch.equal(v, fresh.state_dict()[k])
        else:
            assert torch.equal(v, clip_state["visual.trunk." + k]), k
    with pytest.raises(ValueError, match="timm"):
        run_transfer(_opts(out / "bad", distill="clip", clip_model="vfm-tiny-vit"))


@pytest.mark.parametrize("spec", ["timm:resnet10t:random@32", "offline"])
def test_other_teachers_fine_tune_and_store_outputs(spec, tmp_path):
    """A timm tower and the offline CLIP teacher's image side run the same stages as Lite0: their own input
    normalisation, a trainable tower (fine-tuning moves it) and stored outputs of the transfer set."""
    from vfmkit.models.factory import load_state_dict
    from vfmkit.pipelines.transfer import build_teacher, run_transfer

    fresh = build_teacher(spec, 10)
    assert all(p.requires_grad for p in fresh.parameters())
    if spec == "offline":  # the shipped CLIP teacher's image side: Lite0 at its 160 px + the aligned head
        from vfmkit.models.base import LITE_MEAN

        assert fresh.image_size == 160 and fresh.mean == pytest.approx(LITE_MEAN) and fresh.dim == 512
    else:
        assert fresh.image_size == 32 and fresh.mean == pytest.approx((0.485, 0.456, 0.406))
    rep = run_transfer(
        _opts(tmp_path, teacher=spec, teacher_lp_steps=5, teacher_ft_steps=3, pool_limits=[20, 20], k=2),
        stop_after="build-transfer-set",
    )
    t_dir = Path(rep["stages"]["finetune-teacher"]["dir"])
    tuned = load_state_dict(str(t_dir / "model.safetensors"))
    moved = [
        k for k, v in fresh.state_dict().items() if k.startswith("backbone.") and not torch.equal(v, tuned[k])
    ]
    assert moved, "fine-tuning left the tower unchanged"
    s_dir = Path(rep["stages"]["build-transfer-set"]["dir"])
    meta = json.loads((s_dir / "reinforced" / "reinforced.json").read_text())
    assert meta["kind"] == "classification" and spec in json.dumps(meta)


def test_validated_student_finetune(arms):
    """finetune_keep=better: the fine-tuned student is kept only if it beats the distilled one on selection
    images disjoint from the reported ones; the reported top-1 is the kept model's, saved as student.safetensors."""
    from vfmkit.models.factory import load_state_dict
    from vfmkit.pipelines.transfer import TransferOptions, run_transfer

    out, reports = arms
    rep = run_transfer(_opts(out, distill="task", finetune_keep="better", select_offset=1))
    f = rep["stages"]["finetune-student"]
    assert rep["stages"]["distill"]["cached"] and not f["cached"]  # only the student stage is new
    assert f["top1_after_finetune"] == reports["task"]["top1"]  # the same fine-tuning as the "always" run
    want = "distilled" if f["select_before"] > f["select_after"] else "finetuned"
    assert f["kept"] == want
    assert rep["top1"] == (f["top1_before_finetune"] if want == "distilled" else f["top1_after_finetune"])
    kept = load_state_dict(str(Path(f["dir"]) / "student.safetensors"))
    tuned = load_state_dict(str(Path(f["dir"]) / "model.safetensors"))
    same = all(torch.equal(kept[k], tuned[k]) for k in tuned)
    assert same == (want == "finetuned")
    with pytest.raises(ValueError, match="select_offset"):
        TransferOptions(finetune_keep="better", val_every=1)
