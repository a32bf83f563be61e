"""``method: merge``: SAM-CLIP-style merging (arXiv:2310.15308) of a language-aligned teacher A and a dense
teacher B into one backbone (``vfmkit.models.merge``), through the one engine.

Losses (per-task weights ``w_a``, ``w_b``):

- ``L_A = 1 - cos(pool(Head_A(backbone(x))), A.encode_image(x))`` on image-text shards (``data.train``, e.g.
  Flickr8k train; only the images are used: A's embedding is the target);
- ``L_B``: dense distillation to teacher B on dense shards (``method_args.dense_train``, e.g. CamVid train; the
  labels are unused, B's logits are the target): per-pixel KL at temperature ``temperature`` (``kl``) or focal +
  dice against B's argmax / probabilities (``focal_dice``).

Two data streams per optimiser step: the loader (:class:`TwoStreamLoader`) yields ``{"a": batch_a, "b": batch_b}``
and the loss is ``w_a * L_A + w_b * L_B``, so one engine step accumulates the gradients of both streams into one
optimiser update (the engine's ``grad_accum`` still works on top: each micro-batch then holds both streams). Each
stream keeps its own resumable position, saved with the engine's checkpoint.

Stages (``method_args.stage``):

- ``probe`` (Stage I): Head_A only, backbone and Head_B frozen; stream A only;
- ``multitask`` (Stage II): both losses, both streams; per-parameter-group learning-rate multipliers via
  ``Job.groups`` (``lr_mult_backbone``, ``lr_mult_head_b``, ``lr_mult_head_a``; the paper: 0.1x on the encoder
  and Head_SAM);
- ``a_only``: everything trains on ``L_A`` only (the fine-tuned end of the weight-interpolation baseline).

``init_from`` (a previous merge run folder) loads its ``model.safetensors`` into the model first (Stage II from
Stage I). ``teacher_b`` is a ``seg`` run folder (the CamVid teacher); a tower spec instead (e.g.
``efficientnet-lite0``) builds an UNTRAINED dense model with a fresh ``head_b`` head, seeded by ``seed``: only for
mechanics checks (the recipe smoke test), never for a result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job

__all__ = [
    "MergeArgs",
    "TwoStreamLoader",
    "build",
    "dense_kd_loss",
    "load_teacher_b",
    "evaluate_merged",
    "MERGE_META",
]

STAGES = ("probe", "multitask", "a_only")
MERGE_META = "merge.json"


@dataclass
class MergeArgs:
    teacher_a: str = "offline"  # a teacher spec (models.teachers.load_teacher)
    teacher_b: str = "runs/camvid_teacher"  # a seg run folder (or a tower spec: untrained, mechanics only)
    head_b: str = "aspp"  # the fresh head when teacher_b is a tower spec
    stage: str = "multitask"
    init_from: str = ""  # a merge run folder whose model.safetensors initialises the model
    dense_train: str = "builtin:camvid/train"  # stream B: dense shards (labels unused)
    dense_val: str = ""  # dense val shards for the eval hook (B's mIoU); empty: none
    batch_b: int = 4
    w_a: float = 1.0
    w_b: float = 10.0
    dense_loss: str = "kl"  # "kl" or "focal_dice"
    temperature: float = 1.0
    focal_gamma: float = 2.0
    lr_mult_backbone: float = 0.1
    lr_mult_head_b: float = 0.1
    lr_mult_head_a: float = 1.0
    image_size_a: int = 160  # stream A images: centre view at this side (teacher A's input size)
    crop_b: list[int] = field(default_factory=lambda: [144, 192])  # stream B augmented crop (H, W)
    scale_b: list[float] = field(default_factory=lambda: [0.3, 1.0])
    jitter_b: float = 0.0
    pool: str = "mean"  # Head_A pooling: "mean" or "max"
    hidden: int = 0  # Head_A projection's residual MLP width (0: linear, as teacher A's head)
    head_blocks: int = 1  # backbone blocks Head_A copies (Lite0's last stage is one block)
    proj_from_teacher: bool = True  # initialise Head_A's projection from teacher A's image head when it fits
    eval_batch_size: int = 16


def parse_args(cfg: RunConfig) -> MergeArgs:
    a = parse_section(MergeArgs, cfg.method_args, "method_args")
    if a.stage not in STAGES:
        raise ConfigError(f"config key 'method_args.stage': {a.stage!r} is not one of {', '.join(STAGES)}")
    if a.dense_loss not in ("kl", "focal_dice"):
        raise ConfigError(
            f"config key 'method_args.dense_loss': {a.dense_loss!r} is not 'kl' or 'focal_dice'"
        )
    if a.pool not in ("mean", "max"):
        raise ConfigError(f"config key 'method_args.pool': {a.pool!r} is not 'mean' or 'max'")
    if a.batch_b < 1:
        raise ConfigError(f"config key 'method_args.batch_b': must be >= 1, got {a.batch_b}")
    if a.temperature <= 0:
        raise ConfigError(f"config key 'method_args.temperature': must be > 0, got {a.temperature}")
    for key in ("w_a", "w_b", "lr_mult_backbone", "lr_mult_head_b", "lr_mult_head_a"):
        if getattr(a, key) < 0:
            raise ConfigError(f"config key 'method_args.{key}': must be >= 0, got {getattr(a, key)}")
    if len(a.crop_b) != 2 or min(a.crop_b) < 1:
        raise ConfigError(f"config key 'method_args.crop_b': expected [H, W], got {a.crop_b!r}")
    if len(a.scale_b) != 2 or not 0 < a.scale_b[0] <= a.scale_b[1] <= 1:
        raise ConfigError(f"config key 'method_args.scale_b': expected [lo, hi] in (0, 1], got {a.scale_b!r}")
    return a


# ------------------------------------------------------------------------------------------------ two streams


class TwoStreamLoader:
    """Several resumable loaders read in lockstep: each iteration yields ``{name: next batch of that stream}``.

    A stream that runs out starts its next epoch by itself (the streams have different lengths), so iteration
    never ends; ``state_dict`` / ``load_state_dict`` hold every stream's position (the engine saves it with each
    checkpoint), so a resumed run reads exactly the batches an uninterrupted one would.
    """

    def __init__(self, streams: dict[str, Any]) -> None:
        if not streams:
            raise ValueError("TwoStreamLoader needs at least one stream")
        self.streams = dict(streams)
        self._its: dict[str, Any] = {}

    def __iter__(self):
        self._its = {k: iter(s) for k, s in self.streams.items()}
        while True:
            yield {k: self._next(k) for k in self.streams}

    def _next(self, k: str) -> Any:
        for _ in range(2):
            try:
                return next(self._its[k])
            except StopIteration:
                self._its[k] = iter(self.streams[k])  # the stream's next epoch
        raise RuntimeError(f"data stream {k!r} yields no batch: is it smaller than one batch?")

    def set_epoch(self, epoch: int) -> None:  # each stream keeps its own epoch (saved in its state)
        pass

    @property
    def n_corrupt(self) -> int:
        return sum(int(getattr(s, "n_corrupt", 0)) for s in self.streams.values())

    def state_dict(self) -> dict:
        return {k: s.state_dict() for k, s in self.streams.items() if hasattr(s, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.streams) - set(state)
        if missing:
            raise ValueError(f"loader state has no position for stream(s) {', '.join(sorted(missing))}")
        for k, s in self.streams.items():
            s.load_state_dict(state[k])


# ------------------------------------------------------------------------------------------------ losses


def dense_kd_loss(
    student: Tensor, teacher: Tensor, kind: str = "kl", temperature: float = 1.0, gamma: float = 2.0
) -> Tensor:
    """Dense distillation between logits ``[B, K, H, W]``.

    ``kl``: per-pixel KL(p_teacher || p_student) at ``temperature`` (times T^2, Hinton's scaling), mean over
    pixels. ``focal_dice``: focal loss against the teacher's argmax + soft dice against its probabilities.
    """
    s, t = student.float(), teacher.float()
    if kind == "kl":
        ls = F.log_softmax(s / temperature, dim=1)
        lt = F.log_softmax(t / temperature, dim=1)
        return (lt.exp() * (lt - ls)).sum(1).mean() * temperature**2
    if kind == "focal_dice":
        target = t.argmax(1)
        logp = F.log_softmax(s, dim=1).gather(1, target[:, None])[:, 0]
        focal = (-((1 - logp.exp()) ** gamma) * logp).mean()
        ps, pt = s.softmax(1), t.softmax(1)
        inter = (ps * pt).sum((0, 2, 3))
        dice = 1 - ((2 * inter + 1) / (ps.sum((0, 2, 3)) + pt.sum((0, 2, 3)) + 1)).mean()
        return focal + dice
    raise ValueError(f"dense_kd_loss: kind must be 'kl' or 'focal_dice', got {kind!r}")


# ------------------------------------------------------------------------------------------------ teachers


def load_teacher_b(spec: str, head: str = "aspp", num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """Teacher B, frozen: a ``seg`` run folder (``eval.dense.load_dense_model``); a tower spec builds an untrained
    dense model (mechanics only) with ``num_classes`` outputs."""
    from vfmkit.eval.dense import build_seg_model, load_dense_model
    from vfmkit.models.base import freeze

    if Path(spec).is_dir():
        model = load_dense_model(spec)
    else:
        if num_classes is None:
            raise ValueError(f"teacher B {spec!r} is not a seg run folder and no class count is known")
        torch.manual_seed(seed)
        model = build_seg_model(spec, num_classes, head, finetune=True)
        model.meta = {"tower": spec, "head": head, "num_classes": num_classes, "untrained": True}
    model.finetune = True  # its tower is read through the merged model; the teacher itself is frozen below
    return freeze(model)


def _a_decoder(size: int):
    from vfmkit.data.decode import decode_uint8, plain_view

    def decode(raw: dict) -> dict:
        return {"image": plain_view(decode_uint8(raw, backend="torchvision"), size)}

    return decode


# ------------------------------------------------------------------------------------------------ build


def build(
    cfg: RunConfig,
    dist_info: DistInfo,
    teacher_a: nn.Module | None = None,
    teacher_b: nn.Module | None = None,
) -> Job:
    """The merge job. ``teacher_a`` / ``teacher_b`` may be handed in already loaded (a pipeline running several
    stages loads them once); otherwise they are loaded from ``method_args.teacher_a`` / ``teacher_b``."""
    from safetensors.torch import load_file

    from vfmkit.data.dense import DenseAugment, dense_info, make_dense_decoder
    from vfmkit.data.io import atomic_write_json
    from vfmkit.data.loader import ShardLoader
    from vfmkit.models.merge import build_merged_model, teacher_a_proj_init
    from vfmkit.models.teachers import load_teacher

    args = parse_args(cfg)
    device = getattr(dist_info, "device", "cpu")
    info = dense_info(args.dense_train)
    k, void = int(info["num_classes"]), info["void"]
    if teacher_a is None:
        teacher_a = load_teacher(args.teacher_a)
    if teacher_b is None:
        teacher_b = load_teacher_b(args.teacher_b, args.head_b, k, cfg.seed)
    teacher_a, teacher_b = teacher_a.to(device), teacher_b.to(device)
    kb = int(getattr(teacher_b, "meta", {}).get("num_classes", k))
    if kb != k:
        raise ConfigError(
            f"config key 'method_args.dense_train': {k} classes, but teacher B ({args.teacher_b}) has {kb}"
        )

    torch.manual_seed(cfg.seed)
    init = teacher_a_proj_init(teacher_a) if args.proj_from_teacher else None
    model = build_merged_model(
        teacher_b,
        teacher_a.embed_dim,
        hidden=args.hidden,
        pool=args.pool,
        head_blocks=args.head_blocks,
        proj_init=init,
    )
    if args.init_from:
        w = Path(args.init_from) / "model.safetensors"
        if not w.is_file():
            raise ConfigError(f"config key 'method_args.init_from': no model.safetensors in {args.init_from}")
        model.load_state_dict(load_file(str(w)), strict=True)
    model.attach_text(teacher_a)

    rank, world = getattr(dist_info, "rank", 0), getattr(dist_info, "world_size", 1)
    streams: dict[str, Any] = {}
    if args.w_a > 0 or args.stage == "probe":
        streams["a"] = ShardLoader.from_config(cfg, _a_decoder(args.image_size_a), dist_info)
    if args.stage == "multitask" and args.w_b > 0:
        aug = DenseAugment(size=tuple(args.crop_b), scale=tuple(args.scale_b), jitter=args.jitter_b)
        streams["b"] = ShardLoader(
            args.dense_train,
            make_dense_decoder(aug, seed=cfg.seed, num_classes=k, void=void),
            args.batch_b,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.seed + 1,
            num_workers=cfg.data.num_workers,
            rank=rank,
            world_size=world,
            resampled=cfg.data.resampled,
            on_corrupt=cfg.data.on_corrupt,
            drop_last=True,
        )
    if not streams:
        raise ConfigError("config key 'method_args.w_a': stage a_only needs w_a > 0")
    loader = TwoStreamLoader(streams)

    groups = None
    if args.stage == "probe":
        for p in [*model.backbone_parameters(), *model.head_b_parameters()]:
            p.requires_grad_(False)
    elif args.stage == "multitask":
        from vfmkit.engine.trainer import param_groups

        groups = []
        for part, mult in (
            (model.tower, args.lr_mult_backbone),
            (model.head_b, args.lr_mult_head_b),
            (model.head_a, args.lr_mult_head_a),
        ):
            for g in param_groups(part, cfg.optim.weight_decay):
                if g["params"]:
                    groups.append({**g, "lr": cfg.optim.lr * mult, "lr_mult": mult})

    def loss_fn(m, batch, step):
        total: Tensor | float = 0.0
        logs: dict[str, Any] = {}
        if "a" in batch:
            x = batch["a"]["image"]
            with torch.no_grad():
                target = teacher_a.encode_image(x)
            la = (1 - (m(x, "a") * target).sum(-1)).mean()
            total = total + args.w_a * la
            logs["loss_a"] = la.detach()
        if "b" in batch:
            x = batch["b"]["image"]
            with torch.no_grad():
                target = teacher_b(x)
            lb = dense_kd_loss(m(x, "b"), target, args.dense_loss, args.temperature, args.focal_gamma)
            total = total + args.w_b * lb
            logs["loss_b"] = lb.detach()
        return total, logs

    meta = {
        "format": "vfmkit-merge/1",
        "teacher_a": args.teacher_a,
        "teacher_b": args.teacher_b,
        "stage": args.stage,
        "pool": args.pool,
        "hidden": args.hidden,
        "head_blocks": args.head_blocks,
        "embed_dim": teacher_a.embed_dim,
        "num_classes": k,
        "void": void,
        "classes": info["classes"],
    }
    if getattr(dist_info, "is_main", True):
        atomic_write_json(Path(cfg.out_dir) / MERGE_META, meta)

    eval_fn = None
    if args.dense_val or cfg.data.val:

        def eval_fn(m, step):
            return evaluate_merged(
                m,
                teacher_a,
                retrieval_val=cfg.data.val,
                dense_val=args.dense_val or None,
                image_size_a=args.image_size_a,
                batch_size=args.eval_batch_size,
                zeroshot=bool(args.dense_val),
            )

    return Job(
        model,
        loss_fn,
        loader,
        eval_fn=eval_fn,
        groups=groups,
        extra={"meta": meta, "teacher_a": teacher_a, "teacher_b": teacher_b},
    )


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def retrieval_r1(encode_image, encode_text, spec: str, size: int, batch_size: int = 64) -> dict[str, float]:
    """Image-text retrieval on shards with json ``captions``: R@1/5/10 both ways and their mean R@1."""
    from vfmkit.data.decode import decode_float, resize_center_crop
    from vfmkit.eval.features import ordered_loader
    from vfmkit.eval.retrieval import retrieval_metrics

    def decode(raw):
        return {
            "image": resize_center_crop(decode_float(raw), size),
            "captions": json.dumps(json.loads(raw["json"])["captions"]),
        }

    imgs, caps = [], []
    for batch in ordered_loader(spec, decode, batch_size=batch_size):
        imgs.append(F.normalize(encode_image(batch["image"]).float(), dim=-1).cpu())
        caps += [json.loads(c) for c in batch["captions"]]
    flat = [c for cs in caps for c in cs]
    owner = torch.tensor([i for i, cs in enumerate(caps) for _ in cs])
    txt = torch.cat(
        [F.normalize(encode_text(flat[s : s + 256]).float(), dim=-1).cpu() for s in range(0, len(flat), 256)]
    )
    m = retrieval_metrics(torch.cat(imgs), txt, owner)
    return {**m, "R@1": 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])}


@torch.no_grad()
def evaluate_merged(
    model: nn.Module,
    teacher_a: nn.Module,
    *,
    retrieval_val: str | None = None,
    dense_val: str | None = None,
    image_size_a: int = 160,
    batch_size: int = 16,
    zeroshot: bool = True,
) -> dict[str, float]:
    """A's metric (retrieval mean R@1 with A's text tower), B's (dense val mIoU of Head_B) and zero-shot
    segmentation mIoU from Head_A's dense features and the class names' text embeddings."""
    from vfmkit.data.dense import dense_info
    from vfmkit.eval.dense import evaluate_segmentation
    from vfmkit.eval.zeroshot_seg import class_text_embeddings, evaluate_zeroshot_seg
    from vfmkit.methods.seg import ordered_dense_loader
    from vfmkit.models.merge import HeadBView

    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out: dict[str, float] = {}
    if retrieval_val:
        r = retrieval_r1(lambda x: model(x.to(dev), "a"), teacher_a.encode_text, retrieval_val, image_size_a)
        out.update({f"a/{k}": v for k, v in r.items()})
    if dense_val:
        info = dense_info(dense_val)
        k, void, names = int(info["num_classes"]), info["void"], info["classes"]
        seg = evaluate_segmentation(
            HeadBView(model), ordered_dense_loader(dense_val, batch_size, None, k, void), k, void, names, dev
        )
        out["b/mIoU"], out["b/pixel_acc"] = seg["mIoU"], seg["pixel_acc"]
        if zeroshot:
            text = class_text_embeddings(teacher_a.encode_text, names)
            zs = evaluate_zeroshot_seg(
                lambda x: model(x.to(dev), "dense_a"),
                ordered_dense_loader(dense_val, batch_size, None, k, void),
                text,
                k,
                void,
                names,
            )
            out["zs/mIoU"], out["zs/pixel_acc"] = zs["mIoU"], zs["pixel_acc"]
    model.train(was)
    return out
