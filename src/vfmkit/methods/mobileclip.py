"""MobileCLIP reinforced training: L = (1 - lambda) * L_CLIP + lambda * L_distill (arXiv:2311.17049).

L_distill = 1/2 (L_I2T + L_T2I), L_I2T = (1 / bK) sum_k KL(softmax(Psi_img^k Psi_txt^k^T * s_k) ||
softmax(Phi_img Phi_txt^T * s)) row-wise, with one logit scale s_k per teacher, and L_T2I the same on the
transposed matrices. ``average_after_softmax`` instead averages the K teacher distributions first (Apple's
released code). The loss is computed for the real-caption branch and the synthetic-caption branch and the
two are summed (or mixed with ``syn_ratio``). Under ``local_loss`` + ``gather_with_grad`` every rank scores
its own rows against all gathered columns, so after DDP's gradient averaging the result equals the
single-process loss on the global batch. Offline (stored teacher embeddings) and online (teacher run
every step) distillation share this loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job


@dataclass
class MobileClipArgs:
    lam: float = 1.0  # weight of the distillation loss (1.0: pure distillation, the small-model recipe)
    teacher_scales: list[float] = field(default_factory=list)  # one per teacher; empty: from metadata
    average_after_softmax: bool = False
    caption_mode: str = "sum"  # "sum": real + synthetic branches; "mix": one caption per sample
    syn_ratio: float = 0.5  # with caption_mode "mix": probability of the synthetic caption
    use_syn: bool = True
    n_aug: int = (
        0  # replay only the first n stored augmentations (0: all); the n_aug lever without regenerating
    )
    reinforced: str = ""  # reinforced shards (vfmkit or DataCompDR layout)
    images: str = ""  # image shards joined by uid (public DataCompDR has no jpg)
    online_teachers: list[str] = field(default_factory=list)  # online distillation: teacher specs
    max_logit_scale: float = 100.0
    # Loss settings under DDP: score local rows (True) or every gathered row (False) against the gathered
    # batch; gather the student features with autograd.
    local_loss: bool = True
    gather_with_grad: bool = True


def _gather(x: torch.Tensor, with_grad: bool, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    if with_grad:
        return torch.cat(torch.distributed.nn.all_gather(x), dim=0)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def _split(emb: torch.Tensor, dims: Sequence[int]) -> list[torch.Tensor]:
    if emb.shape[-1] != sum(dims):
        raise ValueError(f"teacher embedding width {emb.shape[-1]} != sum of teacher dims {list(dims)}")
    return list(torch.split(emb, list(dims), dim=-1))


class DistillClipLoss(nn.Module):
    """Multi-teacher similarity distillation + CLIP, exact under local_loss + gather_with_grad (both method args)."""

    def __init__(
        self,
        teacher_dims: Sequence[int],
        teacher_scales: Sequence[float],
        lam: float = 1.0,
        average_after_softmax: bool = False,
        gather_with_grad: bool = True,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = True,
    ):
        super().__init__()
        if len(teacher_dims) != len(teacher_scales):
            raise ConfigError(
                f"config key 'method_args.teacher_scales': {len(teacher_scales)} logit scales for "
                f"{len(teacher_dims)} teachers (one scale per teacher)"
            )
        self.dims, self.scales = list(teacher_dims), [float(s) for s in teacher_scales]
        self.lam, self.avg_after = float(lam), average_after_softmax
        self.gather_with_grad, self.local_loss = gather_with_grad, local_loss
        self.rank, self.world_size = rank, world_size

    def _teacher_log_probs(self, t_a: torch.Tensor, t_b_all: torch.Tensor) -> torch.Tensor:
        """Rows of t_a against all rows of t_b -> log of the teacher target distribution(s).

        Returns [K, b, B] per-teacher log-probs, or [1, b, B] when averaging after the softmax.
        """
        logps = [
            F.log_softmax(s * a.float() @ b.float().T, dim=-1)
            for a, b, s in zip(_split(t_a, self.dims), _split(t_b_all, self.dims), self.scales, strict=True)
        ]
        lp = torch.stack(logps)
        if self.avg_after:
            lp = torch.logsumexp(lp, dim=0, keepdim=True) - torch.log(torch.tensor(float(len(logps))))
        return lp

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        logit_scale: torch.Tensor,
        t_img: torch.Tensor,
        t_txt: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """img, txt: student features [b, D] (normalised); t_img, t_txt: teacher embeddings [b, sum D_k]."""
        rank, ws = self.rank, self.world_size
        img_all, txt_all = _gather(img, self.gather_with_grad, ws), _gather(txt, self.gather_with_grad, ws)
        with torch.no_grad():
            t_img_all, t_txt_all = _gather(t_img, False, ws), _gather(t_txt, False, ws)
        # local_loss: this rank's rows against the gathered batch; else every gathered row (open_clip's option).
        q_img, q_txt, q_t_img, q_t_txt, offset = (
            (img, txt, t_img, t_txt, rank * img.shape[0])
            if self.local_loss or ws == 1
            else (img_all, txt_all, t_img_all, t_txt_all, 0)
        )
        s_i2t = logit_scale * q_img @ txt_all.T  # [b, B]
        s_t2i = logit_scale * q_txt @ img_all.T
        logs: dict[str, torch.Tensor] = {}
        total = img.new_zeros(())
        if self.lam < 1.0:
            labels = torch.arange(q_img.shape[0], device=img.device) + offset
            clip = 0.5 * (F.cross_entropy(s_i2t, labels) + F.cross_entropy(s_t2i, labels))
            total = total + (1 - self.lam) * clip
            logs["clip_loss"] = clip.detach()
        if self.lam > 0.0:
            with torch.no_grad():
                lp_i2t = self._teacher_log_probs(q_t_img, t_txt_all)
                lp_t2i = self._teacher_log_probs(q_t_txt, t_img_all)
            distill = 0.5 * (_kl_rows(lp_i2t, s_i2t) + _kl_rows(lp_t2i, s_t2i))
            total = total + self.lam * distill
            logs["distill_loss"] = distill.detach()
        return total, logs


def _kl_rows(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean over teachers and rows of KL(p_teacher || softmax(student)); teacher_logp [K, b, B]."""
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - s_logp.unsqueeze(0))).sum(-1)  # [K, b]
    return kl.mean()


def make_loss_fn(loss: DistillClipLoss, args: MobileClipArgs, teacher: Callable | None = None) -> Callable:
    """Batch keys: image, text, [syn_text], t_img, t_txt, [t_syn]. With ``teacher`` (online
    distillation) the teacher embeddings are computed from ``teacher_image``/``captions`` every step."""
    from vfmkit.methods.clip import clip_outputs

    def loss_fn(model: nn.Module, batch: dict, step: int):
        if teacher is not None:
            with torch.no_grad():
                batch = {**batch, **teacher(batch)}
        use_syn = args.use_syn and "syn_text" in batch
        # One forward for both caption branches (DDP sees a single forward per step).
        texts = torch.cat([batch["text"], batch["syn_text"]]) if use_syn else batch["text"]
        o = clip_outputs(model, batch["image"], texts)
        scale, b = o["logit_scale"], batch["image"].shape[0]
        txt = o["text_features"][:b]
        total, logs = loss(o["image_features"], txt, scale, batch["t_img"], batch["t_txt"])
        if use_syn:
            syn = o["text_features"][b:]
            syn_total, syn_logs = loss(o["image_features"], syn, scale, batch["t_img"], batch["t_syn"])
            if args.caption_mode == "sum":
                total = total + syn_total
            else:
                total = (1 - args.syn_ratio) * total + args.syn_ratio * syn_total
            logs.update({f"syn_{k}": v for k, v in syn_logs.items()})
        logs["logit_scale"] = scale.detach()
        return total, logs

    return loss_fn


def parse_args(cfg: RunConfig) -> MobileClipArgs:
    args = parse_section(MobileClipArgs, cfg.method_args, "method_args")
    if args.caption_mode not in ("sum", "mix"):
        raise ConfigError(
            f"config key 'method_args.caption_mode': {args.caption_mode!r} is not 'sum' or 'mix'"
        )
    if not 0.0 <= args.lam <= 1.0:
        raise ConfigError(f"config key 'method_args.lam': {args.lam} is outside [0, 1]")
    return args


def _reinforced_decoder(cfg: RunConfig, args: MobileClipArgs, bundle, meta):
    """Replay decoder -> batch keys the loss wants (image, text, syn_text, t_img, t_txt, t_syn)."""
    from vfmkit.data.reinforced import ImageIndex
    from vfmkit.data.replay import MultimodalReplay
    from vfmkit.data.shards import list_shards

    images = ImageIndex(list_shards(args.images)) if args.images else None
    if not 0 <= args.n_aug <= meta.n_aug:
        raise ConfigError(
            f"config key 'method_args.n_aug': {args.n_aug}, but the reinforced shards store {meta.n_aug} "
            "augmentations per sample (0: all)"
        )
    use_syn = bool(args.use_syn and meta.n_syn)
    replay = MultimodalReplay(
        meta,
        bundle.image_size,
        tokenizer=bundle.tokenizer,
        tokenize_syn=use_syn,
        n_aug=args.n_aug,
        seed=cfg.seed,
        mean=bundle.mean,
        std=bundle.std,
        images=images,
    )

    class Decode:
        def set_epoch(self, epoch: int) -> None:
            replay.set_epoch(epoch)

        def __call__(self, raw: dict) -> dict:
            r = replay(raw)
            out = {
                "image": r["image"],
                "text": r["caption"],
                "t_img": r["image_emb"].float(),
                "t_txt": r["text_emb"].float(),
            }
            if use_syn:  # without the synthetic branch its caption is neither tokenised nor batched
                out.update(syn_text=r["syn_caption"], t_syn=r["syn_text_emb"].float())
            return out

    return Decode()


class OnlineTeacher:
    """Online distillation: the same loss, the teacher ensemble run on every batch (for comparison)."""

    def __init__(self, ensemble, mean, std):
        self.ens = ensemble
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, batch: dict) -> dict:
        dev = batch["image"].device
        pixels = (batch["image"] * self.std.to(dev) + self.mean.to(dev)).clamp(
            0, 1
        )  # undo the student's norm
        out = {"t_img": self.ens.encode_image(pixels), "t_txt": self.ens.encode_text(batch["captions"])}
        if "syn_captions" in batch:
            out["t_syn"] = self.ens.encode_text(batch["syn_captions"])
        return out


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    """Reinforced (offline) MobileCLIP training, or online distillation with ``online_teachers``."""
    from vfmkit.data.decode import decode_image
    from vfmkit.data.loader import ShardLoader
    from vfmkit.data.reinforced import read_metadata
    from vfmkit.data.replay import ReplayShardLoader
    from vfmkit.data.shards import list_shards
    from vfmkit.methods.clip import clamp_logit_scale, pick_caption
    from vfmkit.models.factory import create_clip, write_open_clip_files

    args = parse_args(cfg)
    torch.manual_seed(cfg.seed)
    bundle = create_clip(
        cfg.model.name, cfg.model.pretrained, image_size=cfg.data.image_size, **cfg.model.kwargs
    )
    if args.online_teachers:
        from vfmkit.models.teachers import load_ensemble

        ens = load_ensemble(args.online_teachers, device=dist_info.device)
        dims, scales = ens.dims, args.teacher_scales or ens.logit_scales

        def decode(raw):  # the teacher embeds the very caption the student sees
            text = pick_caption(raw, "random")
            return {
                "image": bundle.preprocess_train(decode_image(raw)),
                "text": bundle.tokenizer([text])[0],
                "captions": text,
            }

        loader = ShardLoader.from_config(cfg, decode, dist_info)
        teacher = OnlineTeacher(ens, bundle.mean, bundle.std)
    else:
        if not args.reinforced:
            raise ConfigError(
                "config key 'method_args.reinforced': give reinforced shards (or online_teachers)"
            )
        from pathlib import Path

        urls = list_shards(args.reinforced)
        meta_path = Path(urls[0]).parent / "reinforced.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"reinforced metadata not found: {meta_path}")
        meta = read_metadata(meta_path)
        dims = [t.dim for t in meta.teachers]
        scales = args.teacher_scales or [t.logit_scale for t in meta.teachers]
        loader = ReplayShardLoader.from_config(
            cfg, _reinforced_decoder(cfg, args, bundle, meta), dist_info, urls=urls
        )
        teacher = None
    loss = DistillClipLoss(
        dims,
        scales,
        args.lam,
        args.average_after_softmax,
        args.gather_with_grad,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        local_loss=args.local_loss,
    )
    return Job(
        bundle.model,
        make_loss_fn(loss, args, teacher),
        loader,
        after_step=lambda m: clamp_logit_scale(m, args.max_logit_scale),
        extra={"bundle": bundle},
        on_final=partial(write_open_clip_files, bundle),
    )
