"""Task-oriented knowledge transfer for segmentation (arXiv:2311.18237, the dense arm), as cached stages:

    teacher (given) -> transfer-set (teacher outputs stored once) -> distill -> finetune-student

The same stage cache as the classification pipeline (``pipelines.transfer.run_stage``: ``OUT/<stage>-<hash>/``
with ``stage.json`` written atomically last; a finished stage is read back, a killed one resumes from the engine's
checkpoints in its folder).

- teacher: a dense model run folder (``teacher_dir``: a ``seg`` run, by default the CamVid teacher: ImageNet
  Lite0 + ASPP head fine-tuned on CamVid train). It is the task-fine-tuned teacher; nothing is trained here.
- transfer-set: the images of dense shards (``transfer``, default CamVid train; their labels are NOT copied) with
  ``n_aug`` paired views per image drawn by ``DenseAugment.sample_for(seed, uid, a)`` (the CLIPTeX pseudo-label
  layout: ``labels.json`` with ``uid``, ``sha256`` of the jpg and the views' parameters ``paug``). The teacher runs
  ONCE on each view (rendered at ``teacher_view``) and its head's logits (before the bilinear upsampling that ends
  ``SegModel.forward``, so the map is the teacher's full per-pixel output exactly, 64x smaller) are stored as fp16
  ``teacher.<a>.npy``. Written shard by shard atomically by the pseudo-labelling machinery
  (``pipelines.pseudolabel.run_shard``; finished shards are skipped on a rerun).
- distill (through the one engine, method ``transfer``): ``task``: mode ``kd``, the per-pixel KL
  (``methods.transfer.task_kl``) of the student's logits at ``view`` to the stored teacher outputs upsampled to
  the same view; ``feature``: mode ``dense_feature``, the student's dense feature map through a 1x1 projection
  regresses (``1 - cosine`` per location) the frozen, un-tuned ImageNet Lite0 tower's dense features of the
  same views (rendered at ``teacher_view``, average-pooled to the student's map); ``none``: scratch (no stage).
- finetune-student: method ``seg`` (fine-tuning, paired augmentation on the fly) on the labelled dense shards
  (``labelled``, default all CamVid train; ``labelled_limit`` keeps the first N) starting from the distilled
  student (``seg`` ``init``), then val mIoU (``evaluate_segmentation``) at ``eval_size``. Scratch trains for
  distill + finetune steps, so every arm trains the same number of steps. Every arm starts from the same seeded
  student (``timm:<student>`` from scratch + an ASPP head of ``width``), the one ``seg`` builds for ``seed``.
  With ``low_level`` (default) the student's tower also hands its stride-8 map to the head (DeepLabV3+-like,
  ``eval.dense.TimmTower``), so its logits are at stride 8, as the teacher's; off: its stride-32 map only.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.pipelines.transfer import _config, _hash, run_stage

STAGES = ("transfer-set", "distill", "finetune-student")
TEACHER_NAME = "teacher"
STORE_META = "pseudolabels.json"
GENERATOR = "vfmkit.pipelines.transfer_seg/1"


@dataclass
class SegTransferOptions:
    """Options of one segmentation transfer arm (``vfmkit transfer seg`` flags)."""

    out: str = "runs/transfer_seg"
    teacher_dir: str = "runs/camvid_teacher"  # a seg run folder (dense.json + model.safetensors)
    transfer: str = "runs/dense_data/camvid_train"  # dense shards whose images (only) are the transfer set
    labelled: str = "runs/dense_data/camvid_train"  # dense shards with labels for the final fine-tuning
    labelled_limit: int = 0  # first N labelled images (0: all)
    val: str = "runs/dense_data/camvid_val"
    n_aug: int = 4  # stored views per transfer image
    view: list[int] = field(default_factory=lambda: [96, 128])  # student view / training crop (H, W)
    teacher_view: list[int] = field(
        default_factory=lambda: [192, 256]
    )  # the same views at the teacher's size
    scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # crop area range (of the source image)
    eval_size: list[int] = field(default_factory=lambda: [180, 240])  # val images and masks resized to this
    seed: int = 0
    distill: str = "task"  # task | feature | none
    student: str = "resnet10t"  # a timm architecture, from scratch
    width: int = 64  # the student's ASPP head channels
    low_level: bool = True  # the student's head also fuses its tower's stride-8 map (logits at stride 8)
    distill_steps: int = 150
    finetune_steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    finetune_lr: float = 1e-3
    weight_decay: float = 1e-4
    jitter: float = 0.2  # fine-tuning colour jitter
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.distill not in ("task", "feature", "none"):
            raise ValueError(f"distill must be task, feature or none, got {self.distill!r}")
        if self.n_aug < 1:
            raise ValueError(f"n_aug must be >= 1, got {self.n_aug}")
        if min(self.distill_steps, self.finetune_steps, self.labelled_limit) < 0:
            raise ValueError("step counts and labelled_limit must be >= 0")
        for k in ("view", "teacher_view", "eval_size"):
            v = getattr(self, k)
            if len(v) != 2 or min(v) < 8:
                raise ValueError(f"{k} must be [H, W] (>= 8), got {v!r}")


def options_from(
    config: str | None = None, overrides: list[str] | None = None, out: str | None = None
) -> SegTransferOptions:
    """Options from a YAML mapping file and ``KEY=VALUE`` overrides (``pipelines.transfer.options_from``)."""
    from vfmkit.pipelines.transfer import options_from as _options_from

    return _options_from(config, overrides, out, cls=SegTransferOptions, section="transfer seg")


# ---------------------------------------------------------------------------------------------- views
def _augment(o: SegTransferOptions):
    from vfmkit.pipelines.pseudolabel import PseudoLabelArgs

    return PseudoLabelArgs(
        n_aug=o.n_aug, size=tuple(o.view), scale=tuple(o.scale), flip_p=0.5, seed=o.seed
    ).augment()


def render_view(image: Tensor, params, size) -> Tensor:
    """One stored view (``DenseAugParams``: crop box in source pixels + flip) of ``uint8 [3, H, W]`` at ``size``."""
    aug = _VIEW_AUG
    dummy = torch.zeros(image.shape[-2:], dtype=torch.uint8)
    return aug.apply(image, dummy, params, tuple(size))[0]


def _view_aug():
    from vfmkit.data.dense import DenseAugment

    return DenseAugment()  # apply() uses only its interpolation (bilinear, antialiased) and the params


_VIEW_AUG = _view_aug()


def _npy(x: Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.numpy().astype(np.float16), allow_pickle=False)
    return buf.getvalue()


def _from_npy(data: bytes) -> Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


@torch.no_grad()
def teacher_logits(teacher: nn.Module, views: Tensor) -> Tensor:
    """The teacher head's logits ``[B, K, h, w]`` (its map before ``SegModel``'s upsampling) on ``uint8`` views;
    ``F.interpolate(.., view size, bilinear)`` of them IS ``teacher(views)``."""
    return teacher.head(teacher.tower(views)).float()


def _weights_sha(run_dir: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(run_dir) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def store_teacher_outputs(folder: Path, o: SegTransferOptions, teacher: nn.Module, teacher_id: str) -> dict:
    """The teacher's outputs on every stored view, once, into ``folder/store`` (pseudo-label shard layout)."""
    from vfmkit.data.lock import FolderLock, probe_writable
    from vfmkit.data.shards import list_shards
    from vfmkit.pipelines.pseudolabel import LABELS, PseudoLabelArgs, labels_record, open_sample, run_shard
    from vfmkit.pipelines.reinforce import (
        check_or_write_meta,
        out_name,
        shard_done,
        write_manifest_if_complete,
    )

    out = folder / "store"
    aug = _augment(o)
    meta = {
        "generator": GENERATOR,
        "kind": "seg-teacher-logits",
        "teacher": teacher_id,
        "n_aug": o.n_aug,
        "augment": {"size": list(o.view), "scale": list(o.scale), "flip_p": 0.5},
        "teacher_view": list(o.teacher_view),
        "seed": o.seed,
    }

    def label(raw: dict) -> dict:
        jpg, image, uid, params = open_sample(raw, aug, o.seed, o.n_aug)
        views = torch.stack([render_view(image, p, o.teacher_view) for p in params])
        logits = teacher_logits(teacher, views)
        # the images and their metadata only: the transfer set is unlabelled (no seg.png)
        sample = {k: v for k, v in raw.items() if k in ("__key__", "jpg", "jpeg", "png", "json")}
        for a in range(o.n_aug):
            sample[f"{TEACHER_NAME}.{a}.npy"] = _npy(logits[a])
        experts = {TEACHER_NAME: {"kind": "logits", "crop": True, "id": teacher_id}}
        sample[LABELS] = labels_record(uid, jpg, image, experts, params)
        return sample

    urls = list_shards(o.transfer)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out, "vfmkit transfer seg store").acquire()
    try:
        probe_writable(out)
        check_or_write_meta(out, meta, 0, name=STORE_META)
        todo = [u for u in urls if not shard_done(out, out_name(u))]
        skipped: list[str] = []
        for url in todo:
            skipped += run_shard(url, out, [], PseudoLabelArgs(), label_fn=label)["skipped"]
        manifest = write_manifest_if_complete(urls, out, kind="seg-teacher-logits", metadata=STORE_META)
    finally:
        lock.release()
    if manifest is None:
        raise RuntimeError(f"teacher-output store {out}: not every shard finished")
    return {
        "images": int(manifest["count"]),
        "views": int(manifest["count"]) * o.n_aug,
        "shards_resumed": len(urls) - len(todo),
        "skipped": skipped,
    }


@dataclass
class Replayed:
    uids: list[str]
    augs: list[int]
    images: Tensor  # uint8 [N, 3, h, w] the student's views
    logits: Tensor  # float16 [N, K, h', w'] the stored teacher logits (pre-upsampling)
    teacher_images: Tensor | None = None  # uint8 [N, 3, H, W] the same views at teacher_view


def replay_store(store: str | Path, o: SegTransferOptions, teacher_images: bool = False) -> Replayed:
    """Every stored view, re-rendered from its image and stored parameters; the jpg must be the one the outputs
    were made from (its sha256), else ValueError naming the sample."""
    from vfmkit.data.decode import decode_uint8
    from vfmkit.data.dense import DenseAugParams
    from vfmkit.data.shards import iter_shard, list_shards
    from vfmkit.pipelines.pseudolabel import LABELS

    uids, augs, ims, lgs, tims = [], [], [], [], []
    for url in list_shards(str(store)):
        for raw in iter_shard(url):
            meta = json.loads(raw[LABELS])
            jpg = raw.get("jpg") or raw.get("jpeg") or raw.get("png")
            if hashlib.sha256(jpg).hexdigest() != meta["sha256"]:
                raise ValueError(
                    f"uid {meta['uid']!r}: the image is not the one its teacher outputs were made from"
                )
            image = decode_uint8(raw)
            for a, pj in enumerate(meta["paug"]):
                p = DenseAugParams.from_json(pj)
                uids.append(meta["uid"])
                augs.append(a)
                ims.append(render_view(image, p, o.view))
                lgs.append(_from_npy(raw[f"{TEACHER_NAME}.{a}.npy"]).half())
                if teacher_images:
                    tims.append(render_view(image, p, o.teacher_view))
    return Replayed(
        uids, augs, torch.stack(ims), torch.stack(lgs), torch.stack(tims) if teacher_images else None
    )


def kd_targets(logits: Tensor, size, temperature: float = 1.0, bs: int = 64) -> Tensor:
    """Per-pixel teacher distributions at ``size``: softmax over classes of the stored logits upsampled bilinearly
    (the teacher's own upsampling) and divided by ``temperature``; float16 ``[N, K, H, W]``."""
    out = []
    for i in range(0, logits.shape[0], bs):
        up = F.interpolate(logits[i : i + bs].float(), size=list(size), mode="bilinear", align_corners=False)
        out.append(F.softmax(up / temperature, dim=1).half())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- student
def build_student(o: SegTransferOptions, num_classes: int) -> nn.Module:
    """The seeded student: exactly what method ``seg`` builds for these settings and ``seed``."""
    from vfmkit.eval.dense import build_seg_model

    torch.manual_seed(o.seed)
    return build_seg_model(
        f"timm:{o.student}", num_classes, "aspp", True, o.width, True, timm_low_level=o.low_level
    )


class DenseFeatureStudent(nn.Module):
    """The student's dense feature map (its tower's ``out``) through a 1x1 projection to ``out_dim`` channels."""

    def __init__(self, seg: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.seg = seg
        self.proj = nn.Conv2d(int(seg.tower.channels), int(out_dim), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.seg.tower(x)["out"])


@torch.no_grad()
def frozen_features(views: Tensor, map_size, bs: int = 32) -> Tensor:
    """The frozen, un-tuned ImageNet Lite0 tower's dense features (``out``, 1280 ch) of ``uint8`` views,
    average-pooled to ``map_size``; float32 ``[N, 1280, h, w]``."""
    from vfmkit.eval.dense import load_tower

    tower = load_tower("efficientnet-lite0").eval()
    for p in tower.parameters():
        p.requires_grad_(False)
    out = [
        F.adaptive_avg_pool2d(tower(views[i : i + bs])["out"].float(), tuple(map_size))
        for i in range(0, views.shape[0], bs)
    ]
    return torch.cat(out)


def distill(folder: Path, o: SegTransferOptions, store: Path, num_classes: int) -> dict:
    from vfmkit.data.io import atomic_save_safetensors
    from vfmkit.methods.registry import run_job

    rep = replay_store(store, o, teacher_images=o.distill == "feature")
    student = build_student(o, num_classes)
    common = {
        "steps": o.distill_steps,
        "lr": o.lr,
        "batch": o.batch_size,
        "seed": o.seed,
        "wd": o.weight_decay,
    }
    if o.distill == "task":
        tensors = {"image": rep.images, "target": kd_targets(rep.logits, o.view, o.temperature)}
        model: nn.Module = student
        margs = {"mode": "kd", "flip": False, "temperature": o.temperature}  # the views carry their flips
    else:
        with torch.no_grad():
            student.eval()
            map_size = student.tower(rep.images[:1])["out"].shape[-2:]
        tensors = {"image": rep.images, "target": frozen_features(rep.teacher_images, map_size)}
        model = DenseFeatureStudent(student, tensors["target"].shape[1])
        margs = {"mode": "dense_feature", "flip": False}
    cfg = _config(folder, "transfer", method_args=margs, **common)
    model.train()
    _, res = run_job(cfg, build_kwargs={"model": model, "tensors": tensors})
    _reload(model, folder)
    atomic_save_safetensors(folder / "student.safetensors", student)
    return {"final_loss": res.final_logs.get("loss"), "steps": res.step, "views": len(rep.uids)}


def _reload(model: nn.Module, folder: Path) -> None:
    """The engine's final weights (a resumed run that was already finished returns them too)."""
    from vfmkit.models.factory import load_state_dict

    model.load_state_dict(load_state_dict(str(folder / "model.safetensors")))


def labelled_subset(folder: Path, spec: str, limit: int) -> str:
    """The first ``limit`` samples of dense shards ``spec`` as a dense shard folder (written atomically)."""
    from vfmkit.data.dense import dense_info
    from vfmkit.data.shards import ShardWriter, iter_shard, list_shards

    info = dense_info(spec)
    dst = folder / "labelled"
    if (dst / "manifest.json").is_file():
        return str(dst)
    tmp = folder / ".labelled.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    extra = {
        "kind": "dense",
        "classes": info["classes"],
        "num_classes": info["num_classes"],
        "void": info["void"],
    }
    n = 0
    with ShardWriter(tmp, max_count=1 << 30, extra={**extra, "source": spec}) as w:
        for url in list_shards(spec):
            for raw in iter_shard(url):
                if n >= limit:
                    break
                w.write({k: v for k, v in raw.items() if k != "__url__"})
                n += 1
    tmp.replace(dst)
    return str(dst)


def finetune_student(
    folder: Path, o: SegTransferOptions, init: Path | None, steps: int, labelled: str
) -> dict:
    from vfmkit.data.dense import dense_info
    from vfmkit.eval.dense import evaluate_segmentation
    from vfmkit.methods.registry import run_job
    from vfmkit.methods.seg import ordered_dense_loader

    info = dense_info(o.val)
    k, void = int(info["num_classes"]), info["void"]
    margs = {
        "tower": f"timm:{o.student}",
        "head": "aspp",
        "finetune": True,
        "width": o.width,
        "low_level": True,
        "timm_low_level": o.low_level,
        "crop": list(o.view),
        "scale": list(o.scale),
        "jitter": o.jitter,
        "input_size": list(o.eval_size),
        "init": str(init) if init is not None else None,
    }
    before = None
    if init is not None:  # the distilled student's val mIoU before any label is seen
        student = build_student(o, k)
        student.load_state_dict(_load(init))
        val = ordered_dense_loader(o.val, 16, o.eval_size, k, void)
        before = round(evaluate_segmentation(student, val, k, void)["mIoU"], 2)
    cfg = _config(
        folder,
        "seg",
        steps=steps,
        lr=o.finetune_lr,
        batch=o.batch_size,
        seed=o.seed,
        wd=o.weight_decay,
        method_args=margs,
        data={"train": labelled, "val": o.val, "shuffle_buffer": 200},
    )
    _, res = run_job(cfg)
    ev = {kk.removeprefix("eval/"): v for kk, v in res.final_logs.items() if kk.startswith("eval/")}
    if "mIoU" not in ev:
        raise RuntimeError(f"finetune-student in {folder}: no val mIoU in the final logs")
    return {
        "mIoU_before_finetune": before,
        "mIoU": round(float(ev["mIoU"]), 2),
        "pixel_acc": round(float(ev["pixel_acc"]), 2),
        "iou": {kk[4:]: round(float(v), 2) for kk, v in ev.items() if kk.startswith("iou/")},
        "steps": res.step,
    }


def _load(path: Path) -> dict:
    from vfmkit.models.factory import load_state_dict

    return load_state_dict(str(path))


# ---------------------------------------------------------------------------------------------- driver
def run_seg_transfer(o: SegTransferOptions, stop_after: str | None = None) -> dict:
    """Run one arm's stages (each cached); ``stop_after`` a stage name ends there. Returns every stage's result
    (with its folder and ``seconds``) and ``mIoU``."""
    from vfmkit.data.dense import dense_info
    from vfmkit.eval.dense import load_dense_model

    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    out = Path(o.out)
    info = dense_info(o.val)
    k = int(info["num_classes"])
    report: dict[str, Any] = {"options": asdict(o), "stages": {}}
    student_cfg = {
        "student": o.student,
        "width": o.width,
        "view": o.view,
        "scale": o.scale,
        "batch": o.batch_size,
        "seed": o.seed,
        "wd": o.weight_decay,
        # only when on, so the stride-32 student's cached stages keep their hashes
        **({"low_level": True} if o.low_level else {}),
    }
    d_dir, d_hash = None, None
    if o.distill != "none":
        teacher_id = f"seg:{_weights_sha(o.teacher_dir)}"
        s_cfg = {
            "teacher": teacher_id,
            "transfer": o.transfer,
            "n_aug": o.n_aug,
            "view": o.view,
            "teacher_view": o.teacher_view,
            "scale": o.scale,
            "seed": o.seed,
        }

        def _set(f: Path) -> dict:
            teacher = load_dense_model(o.teacher_dir)
            if int(teacher.meta["num_classes"]) != k:
                raise ValueError(
                    f"teacher {o.teacher_dir!r} has {teacher.meta['num_classes']} classes, val {k}"
                )
            return store_teacher_outputs(f, o, teacher, teacher_id)

        s_dir, s_res = run_stage(out, "seg-transfer-set", s_cfg, _set)
        report["stages"]["transfer-set"] = {**s_res, "dir": str(s_dir)}
        if stop_after == "transfer-set":
            return report
        d_cfg = {
            **student_cfg,
            "set": _hash(s_cfg),
            "distill": o.distill,
            "steps": o.distill_steps,
            "lr": o.lr,
            "temperature": o.temperature if o.distill == "task" else None,
        }
        d_dir, d_res = run_stage(
            out, f"seg-distill-{o.distill}", d_cfg, lambda f: distill(f, o, s_dir / "store", k)
        )
        d_hash = _hash(d_cfg)
        report["stages"]["distill"] = {**d_res, "dir": str(d_dir)}
    if stop_after == "distill":
        return report
    # scratch trains for distill + finetune steps, so every arm trains the same number of steps
    steps = o.finetune_steps if d_dir is not None else o.distill_steps + o.finetune_steps
    f_cfg = {
        **student_cfg,
        "distilled": d_hash,
        "steps": steps,
        "finetune_lr": o.finetune_lr,
        "jitter": o.jitter,
        "labelled": o.labelled,
        "labelled_limit": o.labelled_limit,
        "val": o.val,
        "eval_size": o.eval_size,
    }

    def _ft(f: Path) -> dict:
        lab = labelled_subset(f, o.labelled, o.labelled_limit) if o.labelled_limit else o.labelled
        init = d_dir / "student.safetensors" if d_dir is not None else None
        return finetune_student(f, o, init, steps, lab)

    f_dir, f_res = run_stage(out, "seg-student", f_cfg, _ft)
    report["stages"]["finetune-student"] = {**f_res, "dir": str(f_dir)}
    report["mIoU"] = f_res["mIoU"]
    return report
