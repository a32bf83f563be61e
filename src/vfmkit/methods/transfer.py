"""Task-oriented knowledge transfer (arXiv:2311.18237): the training pieces, through the one engine.

Method ``transfer`` (``method_args.mode``), each on modules and data a pipeline hands over
(``registry.run_job(cfg, build_kwargs=...)``; ``pipelines/transfer.py`` is the multi-stage job):

- ``finetune``: cross-entropy of a handed model on handed tensors ``{"image", "label"}`` (normalised float
  images), with a seeded random horizontal flip. The teacher's fine-tuning (after its linear probe: LP-FT) and the
  student's final fine-tuning on the few labels.
- ``kd``: distillation of task outputs on handed tensors ``{"image", "target"}``: :func:`task_kl`, the KL per
  image (``target [B, C]``) or per pixel (``target [B, C, H, W]``, segmentation). Task-oriented distillation of a
  classifier from a *stored* reinforced set is method ``dr`` (``mode: reinforced``, ``p: 1``): the teacher's
  outputs are computed once by ``pipelines.reinforce`` and replayed, with the same loss (:func:`task_kl` equals
  ``dr.kl_loss`` per image).
- ``feature``: the task-agnostic baseline: the student's pooled features, through a linear projection, regress
  the frozen foundation model's pooled features (``1 - cosine``), on the very views ``dr`` replays from the same
  reinforced set (``method_args.reinforced``), so the two distillations see identical images. A replayed view
  is a pure function of (uid, stored augmentation index), so the teacher's features of each are computed once
  and memoised (:class:`FeatureMemo`): after the first epoch the arm costs what the task arm costs.
- ``dense_feature``: the dense task-agnostic baseline on handed tensors ``{"image", "target"}``: the handed
  model's feature map ``[B, D, h, w]`` regresses ``target [B, D, h, w]`` (the frozen foundation model's dense
  features), ``1 - cosine`` per location (:func:`feature_loss` over channels), averaged
  (``pipelines.transfer_seg``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job

MODES = ("finetune", "kd", "feature", "dense_feature")


@dataclass
class TransferArgs:
    mode: str = "finetune"
    temperature: float = 1.0  # kd: student temperature T (loss scaled by T^2)
    flip: bool = True  # finetune/kd: seeded random horizontal flips
    reinforced: str | None = None  # feature: the reinforced transfer set whose views are replayed
    label_smoothing: float = 0.0  # finetune
    # feature: the frozen teacher's features of each replayed view, memoised by (uid, stored augmentation): a
    # view is a pure function of the two, so a repeat is read back, not recomputed (0: no memo; entries)
    feature_cache: int = 200_000


# ---------------------------------------------------------------------------------------------- losses
def task_kl(logits: Tensor, target: Tensor, temperature: float = 1.0, ignore: Tensor | None = None) -> Tensor:
    """``KL(target || softmax(logits / T)) * T^2`` averaged per image (``[B, C]``) or per pixel (``[B, C, H, W]``:
    summed over classes at each pixel, averaged over the pixels not masked by ``ignore`` ``[B, H, W]`` (True:
    skip)). ``target`` rows sum to 1 over the class dim."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    logp = F.log_softmax(logits.float() / temperature, dim=1)
    t = target.float()
    kl = (torch.xlogy(t, t) - t * logp).sum(1)  # [B] or [B, H, W]
    if ignore is not None:
        keep = ~ignore
        kl = kl[keep] if keep.any() else kl.new_zeros(1)
    return kl.mean() * (temperature * temperature)


def feature_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """``1 - cos(student, teacher)`` averaged over the batch."""
    return (1.0 - F.cosine_similarity(student_feat.float(), teacher_feat.float(), dim=-1)).mean()


class FeatureMemo:
    """``teacher_features`` of each (uid, augmentation index) computed once: ``__call__(x01, uids, augs)`` runs
    the teacher on the views not seen before only and returns the features of all, in batch order (CPU float32;
    at most ``capacity`` are kept, later ones are computed every time)."""

    def __init__(self, teacher_features: Callable[[Tensor], Tensor], capacity: int) -> None:
        self.fn, self.capacity = teacher_features, int(capacity)
        self.store: dict[tuple[str, int], Tensor] = {}
        self.computed = 0  # views the teacher ran on (a test reads it)

    def __call__(self, x01: Tensor, uids: list[str], augs: list[int]) -> Tensor:
        keys = list(zip((str(u) for u in uids), (int(a) for a in augs), strict=True))
        miss = [i for i, k in enumerate(keys) if k not in self.store]
        fresh: dict[int, Tensor] = {}
        if miss:
            feats = self.fn(x01[miss]).float().cpu()
            self.computed += len(miss)
            for j, i in enumerate(miss):
                fresh[i] = feats[j]
                if len(self.store) < self.capacity:
                    self.store[keys[i]] = feats[j]
        return torch.stack([fresh[i] if i in fresh else self.store[k] for i, k in enumerate(keys)])


def _flip(x: Tensor, step: int, seed: int, dims: tuple[int, ...] = (-1,)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    m = torch.rand(x.shape[0], generator=g) < 0.5
    return m, torch.where(m.view(-1, *([1] * (x.dim() - 1))).to(x.device), x.flip(dims), x)


# ---------------------------------------------------------------------------------------------- modules
class PooledFeatures(nn.Module):
    """A timm student's pooled features (``forward_head(pre_logits=True)``) through a linear projection."""

    def __init__(self, student: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.student = student
        self.proj = nn.Linear(int(student.num_features), int(out_dim))

    def forward(self, x: Tensor) -> Tensor:
        s = self.student
        return self.proj(s.forward_head(s.forward_features(x), pre_logits=True))


def build(
    cfg: RunConfig,
    dist_info: DistInfo,
    model: nn.Module | None = None,
    tensors: dict[str, Tensor] | None = None,
    teacher_features: Callable[[Tensor], Tensor] | None = None,
) -> Job:
    from vfmkit.data.loader import TensorLoader

    args = parse_section(TransferArgs, cfg.method_args, "method_args")
    if args.mode not in MODES:
        raise ConfigError(f"config key 'method_args.mode': {args.mode!r} is not one of {', '.join(MODES)}")
    if args.temperature <= 0:
        raise ConfigError(f"config key 'method_args.temperature': {args.temperature} must be > 0")
    if args.feature_cache < 0:
        raise ConfigError(f"config key 'method_args.feature_cache': {args.feature_cache} must be >= 0")
    if model is None:
        raise ConfigError(
            "config key 'method': 'transfer' trains a module handed to it (vfmkit transfer run, or "
            "registry.run_job(cfg, build_kwargs={'model': ..., ...}))"
        )
    seed = cfg.seed
    if args.mode == "feature":
        if teacher_features is None or not args.reinforced:
            raise ConfigError(
                "config key 'method_args.reinforced': mode 'feature' needs the reinforced transfer set and "
                "build_kwargs teacher_features"
            )
        from vfmkit.methods import dr

        dargs = dr.DrArgs(mode="reinforced", reinforced=args.reinforced, p=1.0)
        setup = dr.resolve_setup(dargs, cfg.data.image_size or 224)
        student = model.student if isinstance(model, PooledFeatures) else model
        mean, std, default = dr.student_norm(student)
        size = cfg.data.image_size or default
        loader = dr.make_train_loader(cfg, dargs, setup, size, (mean, std), dist_info)
        m_t = torch.tensor(mean).view(1, 3, 1, 1)
        s_t = torch.tensor(std).view(1, 3, 1, 1)
        memo = FeatureMemo(teacher_features, args.feature_cache) if args.feature_cache > 0 else None

        def loss_fn(m: nn.Module, batch: dict, step: int):
            x = batch["image"]
            with torch.no_grad():
                x01 = (x * s_t.to(x.device) + m_t.to(x.device)).clamp(0, 1)
                if memo is None:
                    target = teacher_features(x01)
                else:
                    target = memo(x01, batch["uid"], batch["aug_index"].tolist())
            loss = feature_loss(m(x), target.to(x.device))
            return loss, {}

        return Job(model, loss_fn, loader)

    if tensors is None or "image" not in tensors:
        raise ConfigError("config key 'method_args.mode': needs build_kwargs tensors with 'image'")
    need = "label" if args.mode == "finetune" else "target"
    if need not in tensors:
        raise ConfigError(f"config key 'method_args.mode': mode {args.mode!r} needs a tensor {need!r}")
    n = int(tensors["image"].shape[0])
    loader = TensorLoader(
        tensors, min(cfg.data.batch_size, n), seed=seed, rank=dist_info.rank, world_size=dist_info.world_size
    )

    def loss_fn(m: nn.Module, batch: dict, step: int):
        x = batch["image"]
        if args.flip:
            flipped, x = _flip(x, step, seed)
        logits = m(x)
        if args.mode == "finetune":
            y = batch["label"].long()
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            return loss, {"acc": float((logits.argmax(1) == y).float().mean())}
        t = batch["target"]
        if args.flip and t.dim() == 4:  # per-pixel targets flip with their image
            t = torch.where(flipped.view(-1, 1, 1, 1).to(t.device), t.flip(-1), t)
        if args.mode == "dense_feature":  # 1 - cosine over channels at each location
            return feature_loss(logits.movedim(1, -1), t.to(logits.device).movedim(1, -1)), {}
        return task_kl(logits, t, args.temperature), {}

    return Job(model, loss_fn, loader)
