"""Dataset Reinforcement for classifiers (ImageNet+, arXiv:2303.08983): the training side.

One ``build(cfg, dist_info)`` and three modes (``method_args.mode``) that share the student, the optimiser
recipe, the step budget, the augmentation family and the ``p`` fallback; they differ only in where the
target of each image comes from:

- ``reinforced``: read a reinforced set (``vfmkit reinforce classify``). Each epoch every image replays one
  stored augmentation (probability ``p``; otherwise its plain view and one-hot label) and the target is the
  stored (densified) teacher distribution. Loss ``KL(target || softmax(student / T)) * T^2`` (``batchmean``).
- ``plain``: the same recipe's augmentations, freshly drawn every epoch through
  :class:`~vfmkit.data.augment.ReplayableAugment` (so the family is the reinforced one by construction),
  cross-entropy on the true label (mixed with the partner's label under MixUp/CutMix).
- ``online``: the plain pipeline plus the classifier teacher run every step on the same augmented batch
  (rendered at the recipe's reference size, as generation renders it), with the reinforced mode's KL loss.

``method_args.epochs`` (> 0) sets ``train.steps = epochs x batches per epoch`` (the engine counts steps).
``eval_fn`` reports top-1/top-5, ECE (15 bins) and NLL on ``data.val``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.data.decode import decode_uint8, plain_view
from vfmkit.data.rng import seeded_rng
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job

MODES = ("reinforced", "plain", "online")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class DrArgs:
    """``method_args`` of a DR recipe."""

    mode: str = "reinforced"  # reinforced | plain | online
    reinforced: str | None = None  # folder of `vfmkit reinforce classify --out` (needed by "reinforced")
    p: float = 0.99  # probability of a (stored or fresh) augmentation; else the plain view and one-hot label
    temperature: float = 1.0  # student temperature T of the KL loss (ImageNet+: 1)
    densify: str | None = None  # None: the set's recommended mode; else "smooth" or "zeros"
    label_smoothing: float = 0.0  # plain mode only
    epochs: int = 0  # > 0: train.steps = epochs x batches per epoch
    # Without a reinforced set these define the augmentation family and the online teacher; with one, they
    # come from its metadata (so every mode sees the same recipe and teacher) and must be left unset.
    recipe: dict = field(default_factory=dict)  # AugRecipe fields; default rrc_flip_ra_re at the student size
    teachers: list[str] | None = None  # classifier specs; default ["efficientnet-lite0"]
    class_index: str | list[int] | None = None  # 'imagenette', a classes.json path or indices (label order)
    teacher_temperature: float | None = None  # ensemble softmax temperature; default 1
    num_classes: int | None = None  # default: from the reinforced set or the class index
    eval_batch_size: int = 100


def parse_args(cfg: RunConfig) -> DrArgs:
    a = parse_section(DrArgs, cfg.method_args, "method_args")
    if a.mode not in MODES:
        raise ConfigError(f"config key 'method_args.mode': {a.mode!r} is not one of {', '.join(MODES)}")
    if not 0.0 <= a.p <= 1.0:
        raise ConfigError(f"config key 'method_args.p': {a.p} is not in [0, 1]")
    if a.temperature <= 0:
        raise ConfigError(f"config key 'method_args.temperature': {a.temperature} must be > 0")
    if a.densify not in (None, "smooth", "zeros"):
        raise ConfigError(f"config key 'method_args.densify': {a.densify!r} is not smooth or zeros")
    if a.mode == "reinforced" and not a.reinforced:
        raise ConfigError(
            "config key 'method_args.reinforced': mode 'reinforced' needs the reinforced set's folder"
        )
    if a.reinforced:
        given = [k for k in ("teachers", "class_index", "teacher_temperature") if getattr(a, k) is not None]
        if a.recipe:
            given.insert(0, "recipe")
        if given:
            raise ConfigError(
                f"config key 'method_args.{given[0]}': taken from the reinforced set's "
                "metadata when method_args.reinforced is given (so all modes share it); leave "
                "it unset"
            )
    return a


# ---------------------------------------------------------------------------------------------- losses
def kl_loss(logits: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(target || softmax(logits / T)) * T^2``, ``batchmean``. logits ``[B, C]``, target ``[B, C]`` (rows
    sum to 1). ``T^2`` keeps gradient magnitudes comparable across temperatures (Hinton et al.); 1 at T=1."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return F.kl_div(logp, target.float(), reduction="batchmean") * (temperature * temperature)


def soft_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with a (possibly mixed) label distribution ``target`` ``[B, C]``; equals
    ``F.cross_entropy`` for one-hot targets."""
    t = target.float()
    if label_smoothing:
        t = t * (1.0 - label_smoothing) + label_smoothing / t.shape[-1]
    return -(t * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def _acc(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.detach().argmax(-1) == labels).float().mean()


def make_loss_fn(
    mode: str, temperature: float = 1.0, label_smoothing: float = 0.0, teacher: nn.Module | None = None
) -> Callable:
    """``loss_fn(model, batch, step) -> (loss, logs)`` of a mode.

    batch: ``image`` ``[B, 3, S, S]``, ``target`` ``[B, C]``, ``label`` ``[B]``; online mode also
    ``teacher_image`` ``[B, 3, R, R]`` (uint8 or float in [0, 1]) for ``teacher(images) -> probs [B, C]``.
    """
    if mode == "online" and teacher is None:
        raise ValueError("online distillation needs a teacher")

    def loss_fn(model: nn.Module, batch: dict, step: int):
        logits = model(batch["image"])
        if mode == "plain":
            loss = soft_cross_entropy(logits, batch["target"], label_smoothing)
            return loss, {"acc": _acc(logits, batch["label"])}
        if mode == "online":
            with torch.no_grad():
                target = teacher(batch["teacher_image"]).to(logits.device)  # ensemble returns CPU probs
        else:
            target = batch["target"]
        loss = kl_loss(logits, target, temperature)
        agree = (logits.detach().argmax(-1) == target.argmax(-1)).float().mean()
        return loss, {"acc": _acc(logits, batch["label"]), "teacher_agree": agree}

    return loss_fn


# ---------------------------------------------------------------------------------------------- decoding
def decode_source(raw: dict) -> tuple[Tensor, int, str]:
    """A labelled source sample -> (uint8 image ``[3, H, W]``, label, uid); raises naming what is missing."""
    ext = next((e for e in _IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise KeyError("jpg")
    meta = json.loads(raw["json"]) if "json" in raw else {}
    if "label" not in meta:
        raise KeyError("json label")
    return decode_uint8(raw[ext]), int(meta["label"]), str(meta.get("uid", raw.get("__key__")))


def fresh_rng(seed: int, epoch: int, uid: str) -> random.Random:
    """The per-(seed, epoch, image) generator of plain/online draws: new params every epoch, yet exactly
    reproducible after a resume (process-independent, unlike ``hash``)."""
    return seeded_rng("dr-fresh", int(seed), int(epoch), uid)


class FreshAugment:
    """``decode_fn`` of plain/online modes: one freshly drawn augmentation of the recipe per image and epoch.

    Returns ``image`` ``[3, S, S]`` (normalised), ``target`` one-hot ``[C]``, ``label``, ``mix_kind`` (0 none,
    1 MixUp, 2 CutMix), ``mix_lam``, ``mix_box`` ``[4]`` (reference-size pixels) for :class:`MixCollate`, and
    with ``teacher_size`` also ``teacher_image`` (uint8 ``[3, R, R]``: the same draw rendered at R).
    """

    def __init__(
        self,
        recipe: Any,
        size: int,
        num_classes: int,
        *,
        p: float = 0.99,
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        teacher_size: int | None = None,
    ) -> None:
        from vfmkit.data.augment import ReplayableAugment

        self.aug = ReplayableAugment(recipe)
        self.size, self.num_classes, self.p, self.seed = int(size), int(num_classes), float(p), int(seed)
        self.mean, self.std, self.teacher_size, self.epoch = tuple(mean), tuple(std), teacher_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, raw: dict) -> dict:
        from vfmkit.data.augment import to_student

        src, label, uid = decode_source(raw)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside 0..{self.num_classes - 1}")
        rng = fresh_rng(self.seed, self.epoch, uid)
        kind, lam, box = 0, 1.0, (0, 0, 0, 0)
        if rng.random() >= self.p:
            img, params = plain_view(src, self.size), None
        else:
            params = self.aug.sample_single(rng, (int(src.shape[-2]), int(src.shape[-1])))
            img = self.aug.apply(src, params, self.size)
            draw = self.aug.mix.sample(rng, (self.aug.recipe.size,) * 2) if self.aug.mix is not None else None
            if draw is not None:
                kind, lam, box = (1 if draw[0] == "mixup" else 2), float(draw[1]), tuple(draw[2] or box)
        out = {
            "image": to_student(img, self.size, self.mean, self.std),
            "target": F.one_hot(torch.tensor(label), self.num_classes).float(),
            "label": label,
            "mix_kind": kind,
            "mix_lam": lam,
            "mix_box": torch.tensor(box),
        }
        if self.teacher_size:
            r = self.teacher_size
            out["teacher_image"] = plain_view(src, r) if params is None else self.aug.apply(src, params, r)
        return out


class MixCollate:
    """Collate, then MixUp/CutMix each sample drawn to be mixed with its partner in the batch (timm's
    convention: the reversed batch). Mixes the student image, the teacher image (online) and the target; the
    partner's own (un-mixed) image is used. Normalisation is affine per channel, so mixing normalised images
    equals normalising the mixed one."""

    def __init__(self, recipe: Any) -> None:
        from vfmkit.data.augment import ReplayableAugment

        self.aug = ReplayableAugment(recipe)

    def __call__(self, samples: list[dict]) -> dict:
        from vfmkit.data.augment import MixParams

        batch = default_collate(samples)
        n = len(samples)
        keys = [k for k in ("image", "teacher_image") if k in batch]
        src = {k: batch[k].float() / 255.0 if batch[k].dtype == torch.uint8 else batch[k] for k in keys}
        out = {k: v.clone() for k, v in src.items()}
        target = batch["target"].clone()
        for i in range(n):
            kind = int(batch["mix_kind"][i])
            if kind == 0:
                continue
            j, lam = n - 1 - i, float(batch["mix_lam"][i])
            box = tuple(int(v) for v in batch["mix_box"][i]) if kind == 2 else None
            mix = MixParams("mixup" if kind == 1 else "cutmix", lam, box, j)
            for k in keys:
                out[k][i] = self.aug.apply_mix(src[k][i], src[k][j], mix)
            target[i] = lam * batch["target"][i] + (1.0 - lam) * batch["target"][j]
        batch.update(out)
        batch["target"] = target
        return batch


class EvalDecode:
    """``decode_fn`` of the val set: plain view at the student size, normalised; ``{"image", "label"}``."""

    def __init__(self, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)

    def __call__(self, raw: dict) -> dict:
        from vfmkit.data.augment import to_student

        src, label, _ = decode_source(raw)
        img = to_student(plain_view(src, self.size), self.size, self.mean, self.std)
        return {"image": img, "label": label}


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: nn.Module, loader: Any) -> tuple[Tensor, Tensor]:
    """All logits ``[N, C]`` and labels ``[N]`` of a loader of ``{"image", "label"}`` batches."""
    device = next(model.parameters()).device
    logits, labels = [], []
    for b in loader:
        logits.append(model(b["image"].to(device)).float().cpu())
        labels.append(torch.as_tensor(b["label"]))
    if not logits:
        raise RuntimeError("the validation set yields no batch")
    return torch.cat(logits), torch.cat(labels)


def make_eval_fn(loader: Any) -> Callable[[nn.Module, int], dict]:
    """``eval_fn(model, step) -> {"top1", "top5", "ece", "nll", "n"}`` on the val loader (percent, nats)."""
    from vfmkit.eval.classification import classification_metrics

    def eval_fn(model: nn.Module, step: int) -> dict:
        was = model.training
        model.eval()
        logits, labels = predict(model, loader)
        model.train(was)
        return {**classification_metrics(logits, labels, n_bins=15), "n": int(labels.numel())}

    return eval_fn


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class DrSetup:
    """What the modes share, resolved from the args and (when given) the reinforced set's metadata."""

    recipe: Any  # AugRecipe
    num_classes: int
    teachers: list[str]
    class_index: list[int] | None
    teacher_temperature: float
    meta: Any = None  # ReinforcedMeta or None


def _class_index(spec: str | list[int] | None) -> list[int] | None:
    if spec is None or isinstance(spec, list):
        return spec
    from vfmkit.data.builtin import parse_class_index

    return parse_class_index(spec)


def resolve_setup(args: DrArgs, student_size: int) -> DrSetup:
    """Recipe, classes and teacher: from the reinforced set when given (all modes share them), else args."""
    from vfmkit.data.augment import AugRecipe

    if args.reinforced:
        from vfmkit.data.reinforced import read_metadata

        path = Path(args.reinforced) / "reinforced.json"
        if not path.is_file():
            raise ConfigError(
                f"config key 'method_args.reinforced': no reinforced.json in "
                f"{args.reinforced!r} (write one with `vfmkit reinforce classify --out DIR`)"
            )
        meta = read_metadata(path)
        if meta.kind != "classification":
            raise ConfigError(
                f"config key 'method_args.reinforced': {args.reinforced!r} is a {meta.kind} "
                "set; DR for classifiers needs a classification set"
            )
        cls = meta.extra.get("classifiers") or {}
        setup = DrSetup(
            meta.recipe,
            int(meta.num_classes),
            list(cls.get("names") or ["efficientnet-lite0"]),
            meta.extra.get("class_index"),
            float(cls.get("temperature", 1.0)),
            meta,
        )
    else:
        try:
            recipe = AugRecipe.from_dict({"name": "rrc_flip_ra_re", "size": student_size, **args.recipe})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'method_args.recipe': {e}") from e
        ci = _class_index(args.class_index)
        n = args.num_classes or (len(ci) if ci else None)
        if not n:
            raise ConfigError(
                "config key 'method_args.num_classes': give it (or class_index, or a reinforced set)"
            )
        setup = DrSetup(
            recipe, n, list(args.teachers or ["efficientnet-lite0"]), ci, args.teacher_temperature or 1.0
        )
    if args.num_classes and args.num_classes != setup.num_classes:
        raise ConfigError(
            f"config key 'method_args.num_classes': {args.num_classes} but the data has "
            f"{setup.num_classes} classes"
        )
    return setup


def student_norm(model: nn.Module) -> tuple[tuple, tuple, int]:
    """(mean, std, default input size) of a timm model (ImageNet's when it does not say)."""
    pc = getattr(model, "pretrained_cfg", None) or {}
    size = int((pc.get("input_size") or (3, 224, 224))[-1])
    return tuple(pc.get("mean", IMAGENET_MEAN)), tuple(pc.get("std", IMAGENET_STD)), size


def make_train_loader(cfg: RunConfig, args: DrArgs, setup: DrSetup, size: int, norm: tuple, dist_info: Any):
    """The mode's resumable training loader (``ReplayShardLoader`` keeps the decoder's epoch in step)."""
    from vfmkit.data.replay import ClassificationReplay, ReplayShardLoader

    mean, std = norm
    if args.mode == "reinforced":
        from vfmkit.data.reinforced import ImageIndex

        meta = setup.meta
        # A set written without --images (or a mixing recipe, whose partners are other images) is joined with
        # the source shards by uid; the join checks each image's sha256.
        need_images = not meta.extra.get("images", False) or "mix" in meta.recipe.stages
        index = ImageIndex(cfg.data.train) if need_images else None
        decode = ClassificationReplay(
            meta,
            size,
            p=args.p,
            densify_mode=args.densify or meta.extra.get("densify", "smooth"),
            partners=index if "mix" in meta.recipe.stages else None,
            seed=cfg.seed,
            mean=mean,
            std=std,
            images=index if not meta.extra.get("images", False) else None,
        )
        return ReplayShardLoader.from_config(cfg, decode, dist_info, urls=args.reinforced)
    teacher_size = setup.recipe.size if args.mode == "online" else None
    decode = FreshAugment(
        setup.recipe,
        size,
        setup.num_classes,
        p=args.p,
        seed=cfg.seed,
        mean=mean,
        std=std,
        teacher_size=teacher_size,
    )
    collate = MixCollate(setup.recipe) if "mix" in setup.recipe.stages else default_collate
    return ReplayShardLoader.from_config(cfg, decode, dist_info, collate_fn=collate)


def make_val_loader(cfg: RunConfig, args: DrArgs, size: int, norm: tuple):
    """Val shards in file order, no sample dropped (``drop_last=False``)."""
    from vfmkit.eval.features import ordered_loader

    return ordered_loader(cfg.data.val, EvalDecode(size, *norm), args.eval_batch_size, cfg.data.on_corrupt)


def load_teacher(setup: DrSetup, device: str | torch.device = "cpu") -> nn.Module:
    """The online teacher: the reinforced set's classifier ensemble (or the args'): images -> ``[B, C]``."""
    from vfmkit.models.teachers import load_classifier_ensemble

    return load_classifier_ensemble(
        setup.teachers, setup.class_index, setup.teacher_temperature, device=device
    )


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    """The DR job of ``method_args.mode``: timm student ``cfg.model.name``, from scratch or ``pretrained``."""
    from vfmkit.models.factory import create_classifier

    args = parse_args(cfg)
    # num_classes may come from the data; build the student once it is known, seeded so modes share the init
    probe_size = cfg.data.image_size
    setup = resolve_setup(args, probe_size or 224)
    torch.manual_seed(cfg.seed)
    model = create_classifier(
        cfg.model.name, setup.num_classes, pretrained=cfg.model.pretrained, **cfg.model.kwargs
    )
    mean, std, default_size = student_norm(model)
    size = cfg.data.image_size or default_size
    if probe_size is None and not args.reinforced and "size" not in args.recipe:
        setup = resolve_setup(args, size)  # the recipe's reference size defaults to the student's size
    loader = make_train_loader(cfg, args, setup, size, (mean, std), dist_info)
    job_cfg = None
    if args.epochs > 0:
        try:
            per_epoch = len(loader)
        except TypeError as e:
            raise ConfigError(
                "config key 'method_args.epochs': the training shards have no counts "
                "(manifest.json); set train.steps instead"
            ) from e
        from vfmkit.config import derive

        job_cfg = derive(cfg, {"train": {"steps": args.epochs * per_epoch}})  # the engine counts steps
    teacher = load_teacher(setup, dist_info.device) if args.mode == "online" else None
    eval_fn = make_eval_fn(make_val_loader(cfg, args, size, (mean, std))) if cfg.data.val else None
    loss_fn = make_loss_fn(args.mode, args.temperature, args.label_smoothing, teacher)
    return Job(
        model,
        loss_fn,
        loader,
        eval_fn=eval_fn,
        cfg=job_cfg,
        extra={"setup": setup, "image_size": size, "teacher": teacher, "args": args},
    )
