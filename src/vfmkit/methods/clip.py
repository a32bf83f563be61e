"""Plain CLIP / SigLIP training on image-text shards: the baseline every other method builds on.

Losses are open_clip's (``ClipLoss`` is exact under ``local_loss`` + ``gather_with_grad``: each rank
scores its local rows against all gathered columns and DDP averages the gradients, which equals the
single-process loss on the global batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.data.decode import decode_image
from vfmkit.data.loader import ShardLoader
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job


@dataclass
class ClipArgs:
    loss: str = "clip"  # "clip" or "siglip"
    caption: str = "random"  # "random": one of the sample's captions each time; "first": the .txt caption
    max_logit_scale: float = 100.0
    # Loss settings under DDP (open_clip's): score local rows against the gathered batch, gather with autograd.
    local_loss: bool = True
    gather_with_grad: bool = True


def make_contrastive_loss(
    kind: str,
    cfg: RunConfig,
    dist_info: DistInfo,
    local_loss: bool | None = None,
    gather_with_grad: bool | None = None,
) -> nn.Module:
    """open_clip's ClipLoss / SigLipLoss; ``local_loss`` / ``gather_with_grad`` default to ``cfg.method_args``'s
    (True when absent)."""
    from open_clip.loss import ClipLoss, SigLipLoss

    if local_loss is None:
        local_loss = bool(cfg.method_args.get("local_loss", True))
    if gather_with_grad is None:
        gather_with_grad = bool(cfg.method_args.get("gather_with_grad", True))
    if kind == "clip":
        return ClipLoss(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )
    if kind == "siglip":
        return SigLipLoss(rank=dist_info.rank, world_size=dist_info.world_size)
    raise ConfigError(f"config key 'method_args.loss': unknown loss {kind!r} (clip, siglip)")


def clip_outputs(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run an open_clip model and return a dict whatever its output style (tuple or dict)."""
    out = model(images, texts)
    if isinstance(out, dict):
        return out
    keys = ["image_features", "text_features", "logit_scale", "logit_bias"]
    return dict(zip(keys, out, strict=False))


def make_clip_loss_fn(loss: nn.Module) -> Callable:
    def loss_fn(model: nn.Module, batch: dict, step: int):
        o = clip_outputs(model, batch["image"], batch["text"])
        kw = {"logit_bias": o["logit_bias"]} if o.get("logit_bias") is not None else {}
        value = loss(o["image_features"], o["text_features"], o["logit_scale"], **kw)
        return value, {"logit_scale": float(o["logit_scale"].detach())}

    return loss_fn


def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """open_clip clamps the learnt temperature after each step; so do we."""
    m = getattr(model, "module", model)
    if hasattr(m, "logit_scale"):
        with torch.no_grad():
            m.logit_scale.clamp_(0, math.log(max_scale))


def pick_caption(raw: dict, mode: str) -> str:
    import json

    if mode == "random" and "json" in raw:
        caps = json.loads(raw["json"]).get("captions") or []
        if caps:
            return caps[int(torch.randint(len(caps), (1,)))]
    if "txt" not in raw:
        raise KeyError("txt (missing caption)")
    txt = raw["txt"].decode("utf-8") if isinstance(raw["txt"], bytes) else raw["txt"]
    if not txt.strip():
        raise ValueError("empty caption")
    return txt


def make_clip_decoder(transform: Callable, tokenizer: Callable, caption: str = "random") -> Callable:
    """raw webdataset sample -> {"image": [3,H,W], "text": [L]}; raises on a corrupt image or no caption."""

    from vfmkit.text.tokens import TokenCache

    tokenizer = tokenizer if isinstance(tokenizer, TokenCache) else TokenCache(tokenizer)

    def decode(raw: dict) -> dict:
        img = decode_image(raw)
        text = pick_caption(raw, caption)
        return {"image": transform(img), "text": tokenizer([text])[0]}

    return decode


def parse_args(cfg: RunConfig) -> ClipArgs:
    return parse_section(ClipArgs, cfg.method_args, "method_args")


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    """The plain CLIP job: open_clip model + its train transform, captions tokenised, ClipLoss/SigLipLoss."""
    from vfmkit.models.factory import create_clip, write_open_clip_files

    args = parse_args(cfg)
    torch.manual_seed(cfg.seed)
    bundle = create_clip(
        cfg.model.name, cfg.model.pretrained, image_size=cfg.data.image_size, **cfg.model.kwargs
    )
    decode = make_clip_decoder(bundle.preprocess_train, bundle.tokenizer, args.caption)
    loader = ShardLoader.from_config(cfg, decode, dist_info)
    loss = make_contrastive_loss(args.loss, cfg, dist_info, args.local_loss, args.gather_with_grad)
    return Job(
        bundle.model,
        make_clip_loss_fn(loss),
        loader,
        after_step=lambda m: clamp_logit_scale(m, args.max_logit_scale),
        extra={"bundle": bundle},
        on_final=partial(write_open_clip_files, bundle),
    )
