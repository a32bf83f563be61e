"""Task-oriented knowledge transfer for segmentation (issue 14 item 5): the staged dense pipeline on the embedded
CamVid subset (48 train, 24 val images) with the real CamVid teacher run when it is there.

A module fixture runs the three arms (task-oriented per-pixel KL, task-agnostic dense features, scratch) with
tiny views and a few steps: mechanics, not accuracy. The teacher is the trained CamVid teacher
(``runs/camvid_teacher``) when present, else a real Lite0 + ASPP seg run trained here for a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
CAMVID_TEACHER = REPO / "runs" / "camvid_teacher"
TRAIN, VAL = "builtin:camvid/train", "builtin:camvid/val"


def _teacher(tmp: Path) -> str:
    if (CAMVID_TEACHER / "model.safetensors").is_file() and (CAMVID_TEACHER / "dense.json").is_file():
        return str(CAMVID_TEACHER)
    from vfmkit.methods.seg import dense_probe

    out = tmp / "teacher"
    dense_probe(
        "efficientnet-lite0",
        TRAIN,
        VAL,
        out_dir=out,
        head="aspp",
        finetune=True,
        steps=4,
        batch_size=4,
        method_args={"width": 32, "crop": [64, 96]},
    )
    return str(out)


def _opts(out: Path, teacher: str, **kw):
    from vfmkit.pipelines.transfer_seg import SegTransferOptions

    base = dict(
        out=str(out),
        teacher_dir=teacher,
        transfer=TRAIN,
        labelled=TRAIN,
        labelled_limit=24,
        val=VAL,
        n_aug=2,
        view=[48, 64],
        teacher_view=[96, 128],
        eval_size=[72, 96],
        width=16,
        distill_steps=6,
        finetune_steps=4,
        batch_size=8,
    )
    return SegTransferOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    from vfmkit.pipelines.transfer_seg import run_seg_transfer

    tmp = tmp_path_factory.mktemp("transfer_seg")
    teacher = _teacher(tmp)
    out = tmp / "arms"
    reports = {d: run_seg_transfer(_opts(out, teacher, distill=d)) for d in ("task", "feature", "none")}
    return out, teacher, reports


def test_three_arms_end_to_end(arms):
    out, teacher, r = arms
    assert r["task"]["stages"]["transfer-set"]["views"] == 48 * 2
    assert not r["task"]["stages"]["transfer-set"]["cached"]
    assert r["feature"]["stages"]["transfer-set"]["cached"]  # the arms share the one store
    assert r["task"]["stages"]["transfer-set"]["dir"] == r["feature"]["stages"]["transfer-set"]["dir"]
    assert "transfer-set" not in r["none"]["stages"] and "distill" not in r["none"]["stages"]
    for d in ("task", "feature"):
        assert r[d]["stages"]["distill"]["steps"] == 6
        assert r[d]["stages"]["finetune-student"]["steps"] == 4
        assert r[d]["stages"]["finetune-student"]["mIoU_before_finetune"] is not None
    assert r["none"]["stages"]["finetune-student"]["steps"] == 6 + 4  # scratch: the same number of steps
    for d in r.values():
        assert 0.0 <= d["mIoU"] <= 100.0
        assert set(d["stages"]["finetune-student"]["iou"]) >= {"road", "sky"}
    # the finetune-student folder is a seg run the dense harness loads back
    from vfmkit.eval.dense import load_dense_model

    m = load_dense_model(r["task"]["stages"]["finetune-student"]["dir"])
    assert m(torch.zeros(1, 3, 48, 64, dtype=torch.uint8)).shape == (1, 11, 48, 64)
    # the default student fuses its stride-8 map: recorded, rebuilt, and its head predicts at stride 8
    assert m.meta["timm_low_level"] is True and m.head.low is not None
    with torch.no_grad():
        assert m.head(m.tower(torch.zeros(1, 3, 48, 64, dtype=torch.uint8))).shape == (1, 11, 6, 8)


def test_every_arm_starts_from_the_same_seeded_student(arms):
    from vfmkit.engine.distributed import DistInfo
    from vfmkit.methods.registry import build_job
    from vfmkit.pipelines.transfer import _config
    from vfmkit.pipelines.transfer_seg import build_student

    out, teacher, _ = arms
    o = _opts(out, teacher)
    cfg = _config(
        out / "probe-init",
        "seg",
        steps=1,
        lr=1e-3,
        batch=4,
        seed=o.seed,
        method_args={
            "tower": f"timm:{o.student}",
            "head": "aspp",
            "finetune": True,
            "width": o.width,
            "timm_low_level": o.low_level,
        },
        data={"train": TRAIN, "val": VAL},
    )
    seg_init = build_job(cfg, DistInfo()).model.state_dict()
    student = build_student(o, 11)
    mine = student.state_dict()
    assert o.low_level and student.head.low is not None  # the default student has the stride-8 fusion
    assert set(seg_init) == set(mine)
    assert all(torch.equal(seg_init[k], mine[k]) for k in mine)
    # off: the stride-32-only student (the head has no low-level branch)
    assert build_student(_opts(out, teacher, low_level=False), 11).head.low is None


def test_rerun_reads_every_stage_from_cache(arms):
    from vfmkit.pipelines.transfer_seg import run_seg_transfer

    out, teacher, r = arms
    for d in ("task", "feature", "none"):
        again = run_seg_transfer(_opts(out, teacher, distill=d))
        assert all(s["cached"] for s in again["stages"].values()), d
        assert again["mIoU"] == r[d]["mIoU"]


def test_killed_student_stage_resumes_to_the_same_result(arms):
    from vfmkit.pipelines.transfer_seg import run_seg_transfer

    out, teacher, r = arms
    f_dir = Path(r["task"]["stages"]["finetune-student"]["dir"])
    (f_dir / "stage.json").unlink()  # killed after training, before its stage record
    redo = run_seg_transfer(_opts(out, teacher, distill="task"))
    assert not redo["stages"]["finetune-student"]["cached"]
    assert redo["stages"]["distill"]["cached"] and redo["stages"]["transfer-set"]["cached"]
    assert redo["mIoU"] == r["task"]["mIoU"]


def test_exception_mid_distill_resumes_to_the_same_result(arms, tmp_path, monkeypatch):
    import vfmkit.methods.transfer as mt
    from vfmkit.models.factory import load_state_dict
    from vfmkit.pipelines.transfer_seg import run_seg_transfer

    out, teacher, r = arms
    real, calls = mt.task_kl, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # after the step-3 checkpoint (ckpt_every = steps // 2)
            raise RuntimeError("injected failure mid-distill")
        return real(*a, **k)

    monkeypatch.setattr(mt, "task_kl", dying)
    o = _opts(tmp_path, teacher, distill="task")
    with pytest.raises(RuntimeError, match="injected"):
        run_seg_transfer(o)
    d_dir = next(tmp_path.glob("seg-distill-task-*"))
    assert not (d_dir / "stage.json").exists() and any((d_dir / "checkpoints").iterdir())
    monkeypatch.setattr(mt, "task_kl", real)
    redo = run_seg_transfer(o)
    assert redo["stages"]["transfer-set"]["cached"]  # the store finished before the failure
    assert not redo["stages"]["distill"]["cached"]
    ref = load_state_dict(str(Path(r["task"]["stages"]["distill"]["dir"]) / "student.safetensors"))
    got = load_state_dict(str(d_dir / "student.safetensors"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert redo["mIoU"] == r["task"]["mIoU"]


def test_stored_targets_equal_the_teacher_on_the_replayed_view(arms):
    from vfmkit.data.shards import iter_shard, list_shards
    from vfmkit.eval.dense import load_dense_model
    from vfmkit.pipelines.transfer_seg import replay_store

    out, teacher, r = arms
    o = _opts(out, teacher)
    store = Path(r["task"]["stages"]["transfer-set"]["dir"]) / "store"
    rep = replay_store(store, o, teacher_images=True)
    assert len(rep.uids) == 96 and rep.images.shape == (96, 3, 48, 64)
    model = load_dense_model(teacher)
    idx = [0, 1, 37, 95]
    with torch.no_grad():
        want = model(rep.teacher_images[idx]).float()  # the teacher's output, recomputed now
    got = F.interpolate(rep.logits[idx].float(), size=o.teacher_view, mode="bilinear", align_corners=False)
    assert got.shape == want.shape == (4, 11, 96, 128)
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-2), float((got - want).abs().max())
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.99
    # the two stored views of one image differ (distinct stored augmentations)
    assert rep.uids[0] == rep.uids[1] and rep.augs[:2] == [0, 1]
    assert not torch.equal(rep.logits[0], rep.logits[1])
    # the store holds the images and the teacher outputs, not the labels (the transfer set is unlabelled)
    src = {json.loads(s["json"])["uid"]: s["jpg"] for u in list_shards(TRAIN) for s in iter_shard(u)}
    for u in list_shards(str(store)):
        for s in iter_shard(u):
            assert "seg.png" not in s and s["jpg"] == src[json.loads(s["labels.json"])["uid"]]


def test_kl_target_matches_the_student_logits(arms):
    from vfmkit.methods.transfer import task_kl
    from vfmkit.pipelines.transfer_seg import build_student, kd_targets, replay_store

    out, teacher, r = arms
    o = _opts(out, teacher)
    rep = replay_store(Path(r["task"]["stages"]["transfer-set"]["dir"]) / "store", o)
    target = kd_targets(rep.logits[:3], o.view)
    student = build_student(o, 11).eval()
    with torch.no_grad():
        logits = student(rep.images[:3])
    assert target.shape == logits.shape == (3, 11, 48, 64)
    assert torch.allclose(target.float().sum(1), torch.ones(3, 48, 64), atol=1e-2)
    loss = task_kl(logits, target.float())
    assert torch.isfinite(loss) and loss > 0
    # the per-pixel KL is zero when the student outputs the teacher's (upsampled) logits
    up = F.interpolate(rep.logits[:3].float(), size=o.view, mode="bilinear", align_corners=False)
    assert float(task_kl(up, target.float())) < 1e-3


def test_cli_seg_subcommand(arms, capsys):
    from vfmkit.cli import main

    out, teacher, r = arms
    o = _opts(out, teacher, distill="task")
    sets = []
    for k in (
        "teacher_dir",
        "transfer",
        "labelled",
        "labelled_limit",
        "val",
        "n_aug",
        "view",
        "teacher_view",
    ):
        sets += ["--set", f"{k}={json.dumps(getattr(o, k))}"]
    for k in ("eval_size", "width", "distill_steps", "finetune_steps", "batch_size"):
        sets += ["--set", f"{k}={json.dumps(getattr(o, k))}"]
    assert main(["transfer", "seg", *sets, "--out", str(out)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["mIoU"] == r["task"]["mIoU"]
    assert all(s["cached"] for s in rec.values() if isinstance(s, dict))
