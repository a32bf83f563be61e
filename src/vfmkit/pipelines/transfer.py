"""Task-oriented knowledge transfer (arXiv:2311.18237) as a multi-stage job:

    finetune-teacher -> build-transfer-set -> distill -> finetune-student

Every stage writes its outputs into ``OUT/<stage>-<hash>/``, where the hash is of the stage's config (its
options plus the hashes of the stages it reads), and finishes with ``stage.json`` (``{"config", "result"}``,
written atomically last). A stage whose ``stage.json`` exists is read back, not rerun, so arms that share a stage
(the teacher, a transfer set) compute it once, and a killed run resumes: training stages resume from the engine's
checkpoints in their folder, the teacher-output store (``pipelines.reinforce``) from its finished shards.
Swappable: ``teacher_weights`` brings an already fine-tuned teacher (a ``model.safetensors`` of this stage),
``transfer_set`` a ready shard folder (images, unlabelled).

- finetune-teacher: any image tower the project can name (:func:`build_teacher`: ``efficientnet-lite0@SIZE``, the
  real ImageNet Lite0, by default; ``timm:NAME[:SOURCE]``, ``openclip:NAME[:TAG_OR_PATH]``, ``offline`` or an
  offline-teacher directory) with a new task head: linear probe on frozen features, then full fine-tuning (LP-FT),
  both through the engine; val top-1 of both recorded.
- build-transfer-set: ``retrieval`` (each labelled image queries its ``k`` nearest pool images in the fine-tuned
  teacher's pooled-feature space: :func:`vfmkit.data.curate.curate`, balanced, deduplicated), ``random`` (a
  seeded random subset of the pool of ``transfer_size``) or ``all``; the set is written as shards, its
  composition in ``composition.json``. The teacher's outputs on it are stored once with the classification
  reinforcement machinery (``vfmkit reinforce classify``: ``n_aug`` stored augmentations per image).
- distill: ``task`` (method ``dr``, reinforced mode, p=1: KL to the stored teacher outputs), ``feature`` (method
  ``transfer`` mode ``feature``: the frozen, un-tuned foundation model's pooled features, same replayed views),
  ``clip`` (method ``clip`` on caption shards with an open_clip model whose image trunk is the student's timm
  architecture: the CLIP-pretraining baseline; no teacher, no transfer set) or ``none`` (scratch).
- finetune-student: method ``transfer`` mode ``finetune`` on the labels (scratch: for distill + finetune steps,
  so every arm trains the same number of steps); val top-1 before and after.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

STAGES = ("finetune-teacher", "build-transfer-set", "distill", "finetune-student")
LITE_DIM = 1280


@dataclass
class TransferOptions:
    """Options of one transfer arm (``vfmkit transfer run`` flags)."""

    out: str = "runs/transfer"
    labelled: str = "builtin:imagenette/train"  # labelled images (json label or <wnid>/ class tree)
    val: str = "builtin:imagenette/val"
    val_every: int = 1  # evaluate on every n-th val image (stored order), 1: all
    pool: list[str] = field(default_factory=lambda: ["builtin:flickr8k/train"])  # unlabelled pool specs
    pool_limits: list[int] = field(default_factory=list)  # per pool spec: first N images (0: all)
    pool_skip_labelled: bool = True  # a pool spec equal to `labelled` leaves out the labelled subset
    per_class: int = 10  # labels per class, drawn by label_seed
    label_seed: int = 0
    seed: int = 0
    # teacher
    teacher: str = "efficientnet-lite0@128"
    teacher_weights: str | None = (
        None  # a fine-tuned teacher (this stage's model.safetensors): skip the stage
    )
    teacher_lp_steps: int = 100
    teacher_ft_steps: int = 100
    teacher_lp_lr: float = 1e-2
    teacher_ft_lr: float = 3e-4
    # transfer set
    transfer_set: str | None = None  # a ready shard folder of unlabelled images: skip curation
    curation: str = "retrieval"  # retrieval | random | all
    k: int = 20  # retrieval: neighbours per labelled image
    balance: bool = True
    dedup_threshold: float | None = 0.98
    transfer_size: int = 0  # random: subset size (0: the size of the retrieval set with the same options)
    knn_backend: str = "auto"  # auto | exact | faiss
    n_aug: int = 4  # stored teacher outputs per image
    # student
    distill: str = "task"  # task | feature | clip | none
    # distill=clip (the "web-scale CLIP pretraining" stand-in): CLIP-pretrain an open_clip model whose image
    # tower is the student's timm architecture on caption shards, for distill_steps; its trunk starts the
    # student's fine-tuning
    clip_model: str = "vfm-tiny-cnn"
    clip_data: str = "builtin:flickr8k/train"
    clip_lr: float = 1e-3
    student: str = "resnet10t"
    image_size: int = 64
    distill_steps: int = 200
    finetune_steps: int = 100
    batch_size: int = 64
    lr: float = 2e-3
    finetune_lr: float = 1e-3
    # The paper: the student's final fine-tuning on the few labels is optional, it can hurt: validate it.
    # "better" keeps the fine-tuned student only if it beats the distilled one on the selection images
    # val[select_offset::val_every], disjoint from the reported val[::val_every]; "always" keeps it.
    finetune_keep: str = "always"
    select_offset: int = 1
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        if self.curation not in ("retrieval", "random", "all"):
            raise ValueError(f"curation must be retrieval, random or all, got {self.curation!r}")
        if self.distill not in ("task", "feature", "clip", "none"):
            raise ValueError(f"distill must be task, feature, clip or none, got {self.distill!r}")
        if self.finetune_keep not in ("always", "better"):
            raise ValueError(f"finetune_keep must be always or better, got {self.finetune_keep!r}")
        if self.finetune_keep == "better" and not 1 <= self.select_offset < self.val_every:
            raise ValueError(
                f"finetune_keep=better selects on val[select_offset::val_every], disjoint from the reported "
                f"val[::val_every]: needs 1 <= select_offset < val_every (got {self.select_offset}, {self.val_every})"
            )
        if self.per_class < 1 or self.k < 1 or self.n_aug < 1:
            raise ValueError("per_class, k and n_aug must be >= 1")
        if min(self.distill_steps, self.finetune_steps, self.teacher_lp_steps, self.teacher_ft_steps) < 0:
            raise ValueError("step counts must be >= 0")
        if self.pool_limits and len(self.pool_limits) != len(self.pool):
            raise ValueError(
                f"pool_limits has {len(self.pool_limits)} entries for {len(self.pool)} pool specs"
            )


def options_from(
    config: str | None = None,
    overrides: list[str] | None = None,
    out: str | None = None,
    cls: type | None = None,
    section: str = "transfer",
) -> Any:
    """Options (``cls``, default :class:`TransferOptions`) from a YAML mapping file and ``KEY=VALUE`` overrides
    (values read with ``yaml.safe_load``: ``config.load_yaml`` / ``config.parse_overrides``); an unknown key or
    a bad value is a ConfigError naming it."""
    from vfmkit.config import ConfigError, load_yaml, parse_overrides, parse_section

    d: dict = load_yaml(config) if config else {}
    d.update(parse_overrides(overrides))
    if out:
        d["out"] = out
    try:
        return parse_section(cls or TransferOptions, d, section)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{section} options: {e}") from e


# ---------------------------------------------------------------------------------------------- stage cache
def _hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_stage(out: Path, name: str, cfg: dict, fn) -> tuple[Path, dict]:
    """``fn(folder) -> result`` once per config: ``OUT/<name>-<hash>/stage.json`` caches it."""
    from vfmkit.data.io import atomic_write_json

    folder = out / f"{name}-{_hash(cfg)}"
    done = folder / "stage.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        return folder, {**rec["result"], "cached": True}
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = fn(folder)
    result = {**result, "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(done, {"stage": name, "config": cfg, "result": result})
    return folder, {**result, "cached": False}


def _config(
    out_dir: Path,
    method: str,
    *,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    wd: float = 0.0,
    method_args: dict | None = None,
    model: dict | None = None,
    data: dict | None = None,
):
    from vfmkit.config import load_config

    return load_config(
        {
            "method": method,
            "seed": seed,
            "out_dir": str(out_dir),
            "model": model or {"name": "none"},
            "data": {"batch_size": batch, **(data or {})},
            "optim": {"lr": lr, "weight_decay": wd, "warmup_steps": max(1, min(20, steps // 10))},
            "train": {
                "steps": max(1, steps),
                "log_every": max(1, steps // 4),
                "eval_every": 0,
                "ckpt_every": max(1, steps // 2),
                "keep_ckpts": 1,
                "progress": False,
                "tensorboard": False,
            },
            "method_args": method_args or {},
        }
    )


# ---------------------------------------------------------------------------------------------- data
@dataclass
class LabelledData:
    keys: list[str]
    images: Tensor  # uint8 [N, 3, S, S] at the source's stored size (square crop)
    labels: Tensor


def _samples(spec: str):
    from vfmkit.data.samples import read_samples

    return [s for s in read_samples(spec) if s.image is not None]


def select_labelled(samples, per_class: int, seed: int):
    """``per_class`` samples of each class, drawn by ``seed`` from the keys in sorted order (deterministic)."""
    from vfmkit.data.rng import seeded_rng

    by: dict[int, list] = {}
    for s in samples:
        if s.label is None:
            raise ValueError(f"labelled sample {s.key!r} has no label")
        by.setdefault(int(s.label), []).append(s)
    out = []
    for c in sorted(by):
        group = sorted(by[c], key=lambda s: s.key)
        if len(group) < per_class:
            raise ValueError(f"class {c} has {len(group)} labelled images, fewer than per_class={per_class}")
        out += seeded_rng("transfer-labels", seed, c).sample(group, per_class)
    return out


def _decode(samples, size: int) -> tuple[Tensor, Tensor]:
    from vfmkit.data.samples import decode_images

    return decode_images(samples, size)


def _norm(x: Tensor, mean, std) -> Tensor:
    from vfmkit.data.samples import normalize

    return normalize(x, tuple(mean), tuple(std))


# ---------------------------------------------------------------------------------------------- teacher
class TaskTeacher(nn.Module):
    """A foundation model's image tower with a task head: normalised images -> logits; :meth:`features` ->
    pooled ``[B, dim]``. Built from a spec by :func:`build_teacher` (Lite0, timm, open_clip or offline CLIP
    teacher); ``mean``/``std``/``image_size`` are the tower's input normalisation and side."""

    def __init__(
        self,
        backbone: nn.Module,
        features_fn: Callable[[nn.Module, Tensor], Tensor],
        dim: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.backbone, self._features_fn = backbone, features_fn
        self.dim, self.image_size = int(dim), int(image_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        self.head = nn.Linear(self.dim, int(num_classes))

    def train(self, mode: bool = True) -> TaskTeacher:
        """Batch-norm statistics stay the pretrained ones while fine-tuning (a few labels make tiny batches)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        return self._features_fn(self.backbone, x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        drop = getattr(self.backbone, "_dropout", None)  # Lite0's own pre-classifier dropout
        f = self.features(x)
        return self.head(drop(f) if drop is not None else f)


class _ClipImage(nn.Module):
    """The image side of an image-text teacher (open_clip ``visual`` or the offline teacher's Lite0 + image
    head): normalised images -> embedding; the text tower is left out (not fine-tuned, not saved)."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        if hasattr(teacher, "image_model"):  # the offline teacher
            self.image_model, self.image_head = teacher.image_model, teacher.heads.image_head
        else:
            self.visual = teacher.model.visual

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "visual"):
            return self.visual(x)
        from vfmkit.models.offline_teacher import lite0_features

        return self.image_head(lite0_features(self.image_model, x))


def _lite0_pooled(b: nn.Module, x: Tensor) -> Tensor:
    return b._avg_pooling(b.extract_features(x))


def _call(b: nn.Module, x: Tensor) -> Tensor:
    return b(x)


def teacher_size(spec: str) -> int:
    """The input side a teacher spec is run at: its ``@SIZE``, else the model's own (224 for Lite0 / timm)."""
    from vfmkit.models.spec import parse_model_spec

    ms = parse_model_spec(spec)
    if ms.size:
        return int(ms.size)
    if ms.kind in ("offline", "path"):
        from vfmkit.models.offline_teacher import load_offline_heads, shipped_teacher_dir

        return int(
            load_offline_heads(shipped_teacher_dir() if ms.kind == "offline" else ms.name)[1]["image_size"]
        )
    if ms.kind == "openclip":
        import open_clip

        vision = (open_clip.get_model_config(ms.name) or {}).get("vision_cfg", {})
        if "image_size" in vision:  # the model's config: no weights loaded just to read its size
            side = vision["image_size"]
            return int(side[0] if isinstance(side, (list, tuple)) else side)
        from vfmkit.models.teachers import load_openclip_teacher

        return int(load_openclip_teacher(ms.name, ms.source).image_size)
    return 224


def build_teacher(spec: str, num_classes: int) -> TaskTeacher:
    """A fresh task teacher from a model spec (``vfmkit.models.spec``): ``efficientnet-lite0[@S]`` (ImageNet
    weights, offline), ``timm:NAME[:SOURCE][@S]`` (timm hub tag, local file, ``pretrained`` or ``random``),
    ``openclip:NAME[:TAG_OR_PATH][@S]`` or ``offline[@S]`` / an offline-teacher directory (the image side of the
    CLIP teacher). Every parameter of the tower is trainable (LP-FT fine-tunes it)."""
    from vfmkit.models.spec import parse_model_spec

    ms = parse_model_spec(spec).require(
        "efficientnet-lite0", "timm", "openclip", "offline", "path", what="transfer teacher"
    )
    size = int(ms.size or 224)  # Lite0 / timm; the CLIP teachers' own size is read below
    if ms.kind == "efficientnet-lite0":
        from vfmkit.models.base import LITE_MEAN, LITE_STD, build_efficientnet_lite0

        b = build_efficientnet_lite0(size)
        b._fc = nn.Identity()
        return TaskTeacher(b, _lite0_pooled, LITE_DIM, num_classes, size, LITE_MEAN, LITE_STD)
    if ms.kind == "timm":
        from vfmkit.models.factory import create_classifier

        src = ms.source
        pre = None if src in (None, "random") else (True if src == "pretrained" else src)
        if src == "random":
            torch.manual_seed(0)  # a seeded init: the same "random" teacher in every arm and rerun
        b = create_classifier(ms.name, 0, pretrained=pre)
        cfg = getattr(b, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        return TaskTeacher(b, _call, int(b.num_features), num_classes, size, mean, std)
    if ms.kind == "openclip":
        from vfmkit.models.teachers import load_openclip_teacher

        t = load_openclip_teacher(ms.name, ms.source)
    else:
        from vfmkit.models.offline_teacher import OfflineTeacher, load_offline_heads, shipped_teacher_dir

        heads, cfg = load_offline_heads(shipped_teacher_dir() if ms.kind == "offline" else ms.name)
        t = OfflineTeacher(heads, int(ms.size or cfg["image_size"]), float(cfg["logit_scale"]))
    enc = _ClipImage(t)
    size = int(ms.size or t.image_size)
    with torch.no_grad():
        dim = int(enc.eval()(torch.zeros(1, 3, size, size)).shape[-1])
    mean = t.mean.flatten().tolist()
    std = t.std.flatten().tolist()
    return TaskTeacher(enc, _call, dim, num_classes, size, mean, std)


@torch.no_grad()
def _batched(fn, x: Tensor, bs: int = 64) -> Tensor:
    return torch.cat([fn(x[i : i + bs]).float() for i in range(0, x.shape[0], bs)]) if len(x) else x


def _top1(logits: Tensor, labels: Tensor) -> float:
    return round(100.0 * float((logits.argmax(1) == labels).float().mean()), 2)


def _tnorm(teacher: TaskTeacher, x: Tensor) -> Tensor:
    """uint8 images -> the teacher's normalised input."""
    return _norm(x, teacher.mean, teacher.std)


def load_teacher_weights(path: str | Path, spec: str, num_classes: int) -> TaskTeacher:
    from vfmkit.models.factory import load_state_dict

    t = build_teacher(spec, num_classes)
    t.load_state_dict(load_state_dict(str(path)))
    return t.eval()


def finetune_teacher(
    folder: Path, o: TransferOptions, lab: LabelledData, val: LabelledData, size: int
) -> dict:
    """LP then FT of the teacher on the labelled images; writes ``model.safetensors``."""
    from vfmkit.data.io import atomic_save_safetensors
    from vfmkit.eval.probe import fit_linear_head
    from vfmkit.methods.registry import run_job

    n_cls = int(lab.labels.max()) + 1
    torch.manual_seed(o.seed)
    teacher = build_teacher(o.teacher, n_cls)
    x, vx = _tnorm(teacher, lab.images), _tnorm(teacher, val.images)
    teacher.eval()
    feats, vfeats = _batched(teacher.features, x), _batched(teacher.features, vx)
    lp_cfg = _config(
        folder / "lp",
        "transfer",
        steps=o.teacher_lp_steps,
        lr=o.teacher_lp_lr,
        batch=o.batch_size,
        seed=o.seed,
    )
    fit_linear_head(teacher.head, feats, lab.labels, lp_cfg, folder / "lp")
    _reload(teacher.head, folder / "lp")
    lp_top1 = _top1(teacher.head(vfeats), val.labels)
    ft_cfg = _config(
        folder / "ft",
        "transfer",
        steps=o.teacher_ft_steps,
        lr=o.teacher_ft_lr,
        batch=min(o.batch_size, 32),
        seed=o.seed,
        wd=1e-4,
        method_args={"mode": "finetune"},
    )
    teacher.train()
    run_job(ft_cfg, build_kwargs={"model": teacher, "tensors": {"image": x, "label": lab.labels}})
    _reload(teacher, folder / "ft")
    teacher.eval()
    ft_top1 = _top1(_batched(teacher, vx), val.labels)
    atomic_save_safetensors(folder / "model.safetensors", teacher)
    return {"lp_top1": lp_top1, "ft_top1": ft_top1, "num_classes": n_cls, "n_labelled": len(lab.keys)}


# ---------------------------------------------------------------------------------------------- transfer set
def _pool(o: TransferOptions, labelled_keys: set[str]):
    """(samples, source name per sample) of the pool specs (labelled images left out where the spec is the
    labelled spec), each spec capped at its limit in stored order."""
    out, src = [], []
    for i, spec in enumerate(o.pool):
        limit = o.pool_limits[i] if o.pool_limits else 0
        items = _samples(spec)
        if o.pool_skip_labelled and spec == o.labelled:
            items = [s for s in items if s.key not in labelled_keys]
        items = items[:limit] if limit else items
        out += items
        src += [_source_name(spec)] * len(items)
    return out, src


def _source_name(spec: str) -> str:
    """``builtin:flickr8k/train`` -> ``flickr8k/train``; ``/data/imagenette/train.tar`` -> ``imagenette/train``."""
    p = Path(spec.split(":", 1)[-1].rstrip("/"))
    return f"{p.parent.name}/{p.name.split('.')[0]}" if p.parent.name else p.name.split(".")[0]


def _reload(model: nn.Module, run_dir: Path) -> None:
    """The engine's final weights of ``run_dir`` into ``model`` (so a rerun of a run the engine reports as
    complete gives the trained model, not the fresh one)."""
    from vfmkit.models.factory import load_state_dict

    model.load_state_dict(load_state_dict(str(run_dir / "model.safetensors")))


def write_transfer_shards(folder: Path, samples, sources: list[str]) -> int:
    """The transfer set as shards: original image bytes + json (uid, source key, ``label`` -1: unlabelled)."""
    from vfmkit.data.shards import ShardWriter

    tmp = folder / "shards.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    with ShardWriter(tmp, prefix="transfer", max_count=1000) as w:
        for i, (s, src) in enumerate(zip(samples, sources, strict=True)):
            w.write(
                {
                    "__key__": f"t{i:07d}",
                    "jpg": s.image,
                    "json": {"uid": f"t{i:07d}", "label": -1, "source": src, "source_key": s.key},
                }
            )
    tmp.replace(folder / "shards")
    return len(samples)


def build_transfer_set(
    folder: Path, o: TransferOptions, teacher: TaskTeacher, lab: LabelledData, size: int
) -> dict:
    from vfmkit.data.curate import curate
    from vfmkit.data.io import atomic_write_json
    from vfmkit.data.rng import seeded_rng

    pool, sources = _pool(o, set(lab.keys))
    if not pool:
        raise ValueError("the transfer pool is empty")
    comp: dict[str, Any] = {"pool": len(pool), "pool_per_source": {}}
    for s in sources:
        comp["pool_per_source"][s] = comp["pool_per_source"].get(s, 0) + 1
    if o.curation == "all":
        chosen = list(range(len(pool)))
    else:
        px, _ = _decode(pool, size)
        emb = _batched(teacher.features, _tnorm(teacher, px))
        qemb = _batched(teacher.features, _tnorm(teacher, lab.images))
        cur = curate(
            qemb,
            lab.labels,
            emb,
            o.k,
            balance=o.balance,
            dedup_threshold=o.dedup_threshold,
            backend=o.knn_backend,
            pool_sources=sources,
        )
        if o.curation == "retrieval":
            chosen = cur.indices
            comp["retrieval"] = cur.composition
        else:
            n = o.transfer_size or len(cur.indices)
            chosen = sorted(
                seeded_rng("transfer-random", o.seed, n).sample(range(len(pool)), min(n, len(pool)))
            )
    samples = [pool[i] for i in chosen]
    srcs = [sources[i] for i in chosen]
    comp["n"] = len(samples)
    comp["per_source"] = {s: srcs.count(s) for s in sorted(set(srcs))}
    write_transfer_shards(folder, samples, srcs)
    atomic_write_json(folder / "composition.json", comp)
    return comp


def reinforce_transfer_set(
    folder: Path, o: TransferOptions, teacher: TaskTeacher, shards: str, size: int
) -> dict:
    """The teacher's outputs on the transfer set, stored once (``vfmkit reinforce classify`` layout)."""
    from vfmkit.models.teachers import ClassifierEnsemble, ClassifierTeacher
    from vfmkit.pipelines.reinforce import ReinforceArgs, Reinforcer, reinforce

    args = ReinforceArgs(
        mode="classify",
        teachers=["transfer-teacher"],
        n_aug=o.n_aug,
        recipe={"size": size},
        seed=o.seed,
        images=True,
        device="cpu",
        prefetch=False,
        batch_size=64,
        chunk=64,
        topk=10,
    )
    ct = ClassifierTeacher(
        f"finetuned:{o.teacher}@{size}", teacher, size, teacher.mean, teacher.std, None, "bicubic", 1.0
    )
    ens = ClassifierEnsemble([ct])
    res = reinforce(
        shards,
        folder / "reinforced",
        args,
        rank=0,
        world_size=1,
        progress=False,
        reinforcer=Reinforcer(args, teachers=ens),
    )
    return {"samples": int(res.get("samples", 0)), "resumed": res.get("resumed")}


# ---------------------------------------------------------------------------------------------- student
def _student(o: TransferOptions, n_cls: int) -> nn.Module:
    from vfmkit.models.factory import create_classifier

    torch.manual_seed(o.seed)  # as dr.build seeds its student: every arm starts from the same init
    return create_classifier(o.student, n_cls)


def _student_norm(model: nn.Module):
    from vfmkit.methods.dr import student_norm

    mean, std, _ = student_norm(model)
    return mean, std


def distill(folder: Path, o: TransferOptions, reinforced: str, n_cls: int) -> dict:
    from vfmkit.data.shards import read_manifest
    from vfmkit.methods.registry import run_job

    # a transfer set smaller than one batch (a small pool, a teacher whose neighbours collide so the balanced
    # set is small) still trains: the engine's loader drops the last partial batch
    n_set = int(read_manifest(reinforced)["count"])
    common = {
        "steps": o.distill_steps,
        "lr": o.lr,
        "batch": max(1, min(o.batch_size, n_set)),
        "seed": o.seed,
        "wd": o.weight_decay,
    }
    data = {"train": reinforced, "image_size": o.image_size, "shuffle_buffer": 500}
    if o.distill == "task":
        cfg = _config(
            folder,
            "dr",
            model={"name": o.student},
            data=data,
            method_args={"mode": "reinforced", "reinforced": reinforced, "p": 1.0, "num_classes": n_cls},
            **common,
        )
        job, res = run_job(cfg)
        return {"final_loss": res.final_logs.get("loss"), "steps": res.step}
    from vfmkit.methods.transfer import PooledFeatures

    frozen = build_teacher(o.teacher, n_cls).eval()  # the un-tuned foundation model (its head is unused)
    tsize = frozen.image_size
    for p in frozen.parameters():
        p.requires_grad_(False)

    def teacher_features(x01: Tensor) -> Tensor:
        x = torch.nn.functional.interpolate(
            x01, size=(tsize, tsize), mode="bilinear", antialias=True, align_corners=False
        )
        m = torch.tensor(frozen.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(frozen.std, device=x.device).view(1, 3, 1, 1)
        return frozen.features((x - m) / s)

    model = PooledFeatures(_student(o, n_cls), frozen.dim)
    cfg = _config(
        folder,
        "transfer",
        model={"name": o.student},
        data=data,
        method_args={"mode": "feature", "reinforced": reinforced},
        **common,
    )
    job, res = run_job(cfg, build_kwargs={"model": model, "teacher_features": teacher_features})
    return {"final_loss": res.final_logs.get("loss"), "steps": res.step}


def clip_pretrain(folder: Path, o: TransferOptions) -> dict:
    """CLIP pretraining (method ``clip``, open_clip loss) of ``clip_model`` on ``clip_data`` for
    ``distill_steps``; its image trunk must be the student's timm architecture (checked before training)."""
    from vfmkit.methods.registry import run_job
    from vfmkit.models.factory import create_clip

    trunk = getattr(create_clip(o.clip_model, image_size=o.image_size).model.visual, "trunk", None)
    student = _student(o, 1)
    want = set(student.state_dict()) - _head_keys(student)
    if trunk is None or set(trunk.state_dict()) != want:
        raise ValueError(
            f"clip_model {o.clip_model!r}: its image tower is not a timm {o.student!r} trunk (distill=clip "
            "needs an open_clip config with vision_cfg.timm_model_name equal to the student)"
        )
    cfg = _config(
        folder,
        "clip",
        model={"name": o.clip_model},
        data={"train": o.clip_data, "image_size": o.image_size, "shuffle_buffer": 500},
        method_args={"loss": "clip", "caption": "random"},
        steps=o.distill_steps,
        lr=o.clip_lr,
        batch=o.batch_size,
        seed=o.seed,
        wd=0.1,
    )
    job, res = run_job(cfg)
    return {"final_loss": res.final_logs.get("loss"), "steps": res.step}


def _head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of a timm classifier's head (what a pretrained trunk does not have)."""
    head = model.get_classifier()
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in head.parameters()}


def load_student(o: TransferOptions, n_cls: int, distill_dir: Path | None) -> nn.Module:
    from vfmkit.models.factory import load_state_dict

    model = _student(o, n_cls)
    if distill_dir is not None:
        state = load_state_dict(str(distill_dir / "model.safetensors"))
        if o.distill == "feature":
            state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
        if o.distill == "clip":  # the CLIP image trunk; the task head stays the seeded fresh one
            pre = "visual.trunk."
            state = {k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)}
            head = _head_keys(model)
            state = {**{k: v for k, v in model.state_dict().items() if k in head}, **state}
        model.load_state_dict(state)
    return model


def finetune_student(
    folder: Path,
    o: TransferOptions,
    model: nn.Module,
    lab: LabelledData,
    val: LabelledData,
    steps: int,
    select: LabelledData | None = None,
) -> dict:
    """Fine-tune on the labels; with ``select`` (finetune_keep=better) keep whichever of the distilled and the
    fine-tuned student scores higher on it. The kept weights go to ``student.safetensors``."""
    from vfmkit.data.io import atomic_save_safetensors
    from vfmkit.methods.registry import run_job

    mean, std = _student_norm(model)
    x, vx = _norm(lab.images, mean, std), _norm(val.images, mean, std)
    sx = _norm(select.images, mean, std) if select is not None else None
    model.eval()
    before = _top1(_batched(model, vx), val.labels)
    before_state = {k: v.clone() for k, v in model.state_dict().items()} if select is not None else None
    sel_before = _top1(_batched(model, sx), select.labels) if select is not None else None
    cfg = _config(
        folder,
        "transfer",
        steps=steps,
        lr=o.finetune_lr,
        batch=o.batch_size,
        seed=o.seed,
        wd=o.weight_decay,
        method_args={"mode": "finetune"},
    )
    model.train()
    if steps > 0:
        run_job(cfg, build_kwargs={"model": model, "tensors": {"image": x, "label": lab.labels}})
        _reload(model, folder)
    model.eval()
    res: dict[str, Any] = {
        "top1_before_finetune": before,
        "top1_after_finetune": _top1(_batched(model, vx), val.labels),
    }
    res["kept"] = "finetuned"
    if select is not None:
        sel_after = _top1(_batched(model, sx), select.labels)
        res.update(select_before=sel_before, select_after=sel_after, n_select=len(select.keys))
        if steps > 0 and sel_before > sel_after:
            model.load_state_dict(before_state)
            res["kept"] = "distilled"
    res["top1"] = res["top1_before_finetune"] if res["kept"] == "distilled" else res["top1_after_finetune"]
    atomic_save_safetensors(folder / "student.safetensors", model)
    return res


# ---------------------------------------------------------------------------------------------- driver
def run_transfer(o: TransferOptions, stop_after: str | None = None) -> dict:
    """Run one arm's stages (each cached); ``stop_after`` a stage name ends there. Returns every stage's result
    and the folders."""
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    torch.manual_seed(o.seed)
    out = Path(o.out)
    tsize = teacher_size(o.teacher)
    lab_samples = select_labelled(_samples(o.labelled), o.per_class, o.label_seed)
    val_samples = _samples(o.val)[:: max(1, o.val_every)]
    lab_t = LabelledData([s.key for s in lab_samples], *_decode(lab_samples, tsize))
    val_t = LabelledData([s.key for s in val_samples], *_decode(val_samples, tsize))
    n_cls = int(lab_t.labels.max()) + 1
    report: dict[str, Any] = {"options": asdict(o), "stages": {}}
    if o.distill == "none":  # scratch: no teacher, no transfer set
        return _student_stage(o, out, report, lab_samples, val_samples, n_cls, None, None)
    if o.distill == "clip":  # CLIP pretraining on captions: no teacher, no transfer set
        c_cfg = {
            **_student_cfg(o),
            "clip_model": o.clip_model,
            "clip_data": o.clip_data,
            "clip_lr": o.clip_lr,
            "steps": o.distill_steps,
        }
        d_dir, d_res = run_stage(out, "distill-clip", c_cfg, lambda f: clip_pretrain(f, o))
        report["stages"]["distill"] = {**d_res, "dir": str(d_dir)}
        if stop_after in ("finetune-teacher", "build-transfer-set", "distill"):
            return report
        return _student_stage(o, out, report, lab_samples, val_samples, n_cls, d_dir, _hash(c_cfg))

    data_cfg = {
        "labelled": o.labelled,
        "val": o.val,
        "val_every": o.val_every,
        "per_class": o.per_class,
        "label_seed": o.label_seed,
    }
    t_cfg = {
        **data_cfg,
        "teacher": o.teacher,
        "lp_steps": o.teacher_lp_steps,
        "ft_steps": o.teacher_ft_steps,
        "lp_lr": o.teacher_lp_lr,
        "ft_lr": o.teacher_ft_lr,
        "seed": o.seed,
        "batch": o.batch_size,
    }
    if o.teacher_weights:
        t_dir, t_res = Path(o.teacher_weights).parent, {"given": str(o.teacher_weights), "cached": True}
        t_path, t_hash = Path(o.teacher_weights), _hash({"weights": str(o.teacher_weights)})
    else:
        t_dir, t_res = run_stage(out, "teacher", t_cfg, lambda f: finetune_teacher(f, o, lab_t, val_t, tsize))
        t_path, t_hash = t_dir / "model.safetensors", _hash(t_cfg)
    report["stages"]["finetune-teacher"] = {**t_res, "dir": str(t_dir)}
    if stop_after == "finetune-teacher":
        return report
    teacher = load_teacher_weights(t_path, o.teacher, n_cls)

    s_cfg = {
        "teacher": t_hash,
        "curation": o.curation,
        "pool": o.pool,
        "pool_limits": o.pool_limits,
        "k": o.k,
        "balance": o.balance,
        "dedup": o.dedup_threshold,
        "size": o.transfer_size,
        "transfer_set": o.transfer_set,
        "n_aug": o.n_aug,
        "seed": o.seed,
        "labels": data_cfg,
    }

    def _set(f: Path) -> dict:
        comp = (
            {"given": o.transfer_set} if o.transfer_set else build_transfer_set(f, o, teacher, lab_t, tsize)
        )
        shards = o.transfer_set or str(f / "shards")
        return {"composition": comp, **reinforce_transfer_set(f, o, teacher, shards, tsize)}

    s_dir, s_res = run_stage(out, "transfer-set", s_cfg, _set)
    report["stages"]["build-transfer-set"] = {**s_res, "dir": str(s_dir)}
    if stop_after == "build-transfer-set":
        return report

    d_dir, d_res = _distill_stage(o, out, s_cfg, s_dir, n_cls)
    report["stages"]["distill"] = {**d_res, "dir": str(d_dir)}
    if stop_after == "distill":
        return report
    return _student_stage(o, out, report, lab_samples, val_samples, n_cls, d_dir, _hash(s_cfg))


def _student_cfg(o: TransferOptions) -> dict:
    return {
        "student": o.student,
        "image_size": o.image_size,
        "batch": o.batch_size,
        "seed": o.seed,
        "lr": o.lr,
        "wd": o.weight_decay,
    }


def _distill_stage(o: TransferOptions, out: Path, s_cfg: dict, s_dir: Path, n_cls: int):
    d_cfg = {**_student_cfg(o), "set": _hash(s_cfg), "distill": o.distill, "steps": o.distill_steps}
    return run_stage(
        out, f"distill-{o.distill}", d_cfg, lambda f: distill(f, o, str(s_dir / "reinforced"), n_cls)
    )


def _student_stage(o, out, report, lab_samples, val_samples, n_cls, d_dir, set_hash) -> dict:
    data_cfg = {
        "labelled": o.labelled,
        "val": o.val,
        "val_every": o.val_every,
        "per_class": o.per_class,
        "label_seed": o.label_seed,
    }
    f_cfg = {
        **_student_cfg(o),
        "distill": o.distill,
        "set": set_hash,
        "distill_steps": o.distill_steps,
        "finetune_steps": o.finetune_steps,
        "finetune_lr": o.finetune_lr,
        "labels": data_cfg,
    }
    if o.finetune_keep != "always":  # (so the "always" stages keep the hashes they had)
        f_cfg.update(keep=o.finetune_keep, select_offset=o.select_offset)
    # scratch trains for distill + finetune steps, so every arm trains the same number of steps
    steps = o.finetune_steps if d_dir is not None else o.distill_steps + o.finetune_steps
    lab = LabelledData([s.key for s in lab_samples], *_decode(lab_samples, o.image_size))
    val = LabelledData([s.key for s in val_samples], *_decode(val_samples, o.image_size))
    select = None
    if o.finetune_keep == "better":
        sel = _samples(o.val)[o.select_offset :: o.val_every]
        select = LabelledData([s.key for s in sel], *_decode(sel, o.image_size))
    f_dir, f_res = run_stage(
        out,
        "student",
        f_cfg,
        lambda f: finetune_student(f, o, load_student(o, n_cls, d_dir), lab, val, steps, select),
    )
    report["stages"]["finetune-student"] = {**f_res, "dir": str(f_dir)}
    report["top1"] = f_res["top1"]
    return report
