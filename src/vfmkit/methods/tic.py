"""TiC-CLIP's per-step training job (arXiv:2310.16226): the CLIP loss, warm start, and LwF distillation.

One time step of a continual run is one ordinary engine run of this method on that step's data mix
(``data.train``, written by ``vfmkit.data.stream.build_mix``):

- warm start: ``model.pretrained`` names the previous step's weights; the engine builds a fresh AdamW and a fresh
  warm-up + cosine schedule for ``train.steps`` (= the step's compute budget C), as TiC-CLIP prescribes;
- LwF: ``method_args.lwf_teacher`` names the previous step's weights; the loss adds
  ``lwf_weight * KL(teacher || student)`` over the in-batch image->text and text->image similarity distributions
  (each model with its own learnt temperature), the teacher frozen. Under DDP the KL is over each rank's local
  batch.

The multi-step job (strategies, patching, evaluation, resume) is ``vfmkit.pipelines.tic``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.data.loader import ShardLoader
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.clip import (
    clamp_logit_scale,
    clip_outputs,
    make_clip_decoder,
    make_contrastive_loss,
)
from vfmkit.methods.registry import Job


@dataclass
class TicArgs:
    loss: str = "clip"  # "clip" or "siglip"
    caption: str = "first"  # the emoji stream has one caption per image
    max_logit_scale: float = 100.0
    lwf_teacher: str | None = None  # previous step's weights (LwF); None: no distillation
    lwf_weight: float = 1.0


def parse_args(cfg: RunConfig) -> TicArgs:
    a = parse_section(TicArgs, cfg.method_args, "method_args")
    if a.lwf_weight < 0:
        raise ConfigError(f"config key 'method_args.lwf_weight': must be >= 0, got {a.lwf_weight}")
    return a


def lwf_kl(student: dict, teacher: dict) -> torch.Tensor:
    """Mean of KL(teacher || student) over the rows (image->text) and columns (text->image) of in-batch logits."""
    s = student["logit_scale"] * student["image_features"] @ student["text_features"].T
    t = teacher["logit_scale"] * teacher["image_features"] @ teacher["text_features"].T
    s, t = s.float(), t.float()
    i2t = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    t2i = F.kl_div(F.log_softmax(s.T, 1), F.log_softmax(t.T, 1), log_target=True, reduction="batchmean")
    return 0.5 * (i2t + t2i)


def make_tic_loss_fn(loss: nn.Module, teacher: nn.Module | None, weight: float):
    def loss_fn(model: nn.Module, batch: dict, step: int):
        o = clip_outputs(model, batch["image"], batch["text"])
        kw = {"logit_bias": o["logit_bias"]} if o.get("logit_bias") is not None else {}
        clip = loss(o["image_features"], o["text_features"], o["logit_scale"], **kw)
        logs = {"clip_loss": clip.detach(), "logit_scale": o["logit_scale"].detach()}
        if teacher is None or weight == 0:
            return clip, logs
        teacher.to(batch["image"].device)
        with torch.no_grad():
            to = clip_outputs(teacher, batch["image"], batch["text"])
        kl = lwf_kl(o, to)
        logs["lwf_kl"] = kl.detach()
        return clip + weight * kl, logs

    return loss_fn


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    """One time step: open_clip model (warm-started from ``model.pretrained`` if set), ClipLoss (+ LwF)."""
    from vfmkit.models.factory import create_clip, write_open_clip_files

    args = parse_args(cfg)
    torch.manual_seed(cfg.seed)
    bundle = create_clip(
        cfg.model.name, cfg.model.pretrained, image_size=cfg.data.image_size, **cfg.model.kwargs
    )
    teacher = None
    if args.lwf_teacher:
        teacher = (
            create_clip(cfg.model.name, args.lwf_teacher, image_size=cfg.data.image_size, **cfg.model.kwargs)
            .model.eval()
            .requires_grad_(False)
        )
    decode = make_clip_decoder(bundle.preprocess_train, bundle.tokenizer, args.caption)
    loader = ShardLoader.from_config(cfg, decode, dist_info)
    loss = make_contrastive_loss(args.loss, cfg, dist_info)
    return Job(
        bundle.model,
        make_tic_loss_fn(loss, teacher, args.lwf_weight),
        loader,
        after_step=lambda m: clamp_logit_scale(m, args.max_logit_scale),
        extra={"bundle": bundle, "teacher": teacher},
        on_final=partial(write_open_clip_files, bundle),  # each step's run folder opens in open_clip
    )


def train_flops_per_sample(job, batch: dict) -> float:
    """FLOPs of one training sample of ``job``: forward + backward of its loss (teacher forward included),
    counted by ``torch.utils.flop_counter.FlopCounterMode`` on ``batch``, divided by the batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    model = job.model
    model.train()
    with FlopCounterMode(display=False) as fc:
        loss, _ = job.loss_fn(model, batch, 0)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / int(batch["image"].shape[0])
