"""``method: seg``: train a dense head (or a whole segmentation model) on dense shards, through the one engine.

One method serves three uses:

- the frozen per-pixel linear probe of any tower (``head: linear``, ``finetune: false``): the tower runs ONCE over
  the un-augmented train set (``cache_features``), and the head trains on the cached maps from a resumable
  ``TensorLoader``. Why not a closed-form/L-BFGS probe: a segmentation probe has ~10^7 pixel samples per pass; a
  minibatch AdamW run of a few hundred steps is what fits, and that is a training run, so it goes through the engine;
- the light DeepLabV3-style head on a frozen tower (``head: aspp``, ``finetune: false``), cached the same way;
- a fine-tuned segmentation model (``finetune: true``, e.g. the CamVid teacher ``recipes/camvid_teacher.yaml``):
  paired image+mask augmentation (``data.dense.DenseAugment``) on the fly from the shards.

``data.train`` / ``data.val`` are dense shards (``vfmkit data import --dense``); the class names, count and void
label come from their manifest. The run directory gets ``dense.json`` (what rebuilds the model:
``eval.dense.load_dense_model``), the engine's ``model.safetensors`` and, from :func:`dense_probe`, ``metrics.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vfmkit.config import ConfigError, RunConfig, load_config, parse_section
from vfmkit.data.dense import DenseAugment, dense_info, make_dense_decoder
from vfmkit.data.io import atomic_write_json
from vfmkit.engine.distributed import DistInfo
from vfmkit.eval.dense import DENSE_META, build_seg_model, evaluate_segmentation, extract_features, seg_loss
from vfmkit.methods.registry import Job

__all__ = ["SegArgs", "build", "dense_probe", "ordered_dense_loader"]


@dataclass
class SegArgs:
    tower: str = "efficientnet-lite0"  # a model spec (vfmkit.models.spec), see eval.dense.load_tower
    random_init: bool = False  # the same architecture with fresh weights (the random-tower baseline; frozen:
    # its BN statistics are set from the train images first, so its features do not degenerate)
    head: str = "linear"  # "linear" (per-pixel linear probe) or "aspp" (light DeepLabV3-style head)
    finetune: bool = False  # train the tower too
    width: int = 128  # aspp head channels
    low_level: bool = True  # aspp: fuse the tower's stride-8 map when it has one
    # a timm: tower also gives its stride-8 map (eval.dense.TimmTower low_level; recorded in dense.json)
    timm_low_level: bool = False
    cache_features: bool = True  # frozen tower: run it once over the un-augmented train set
    crop: list[int] = field(default_factory=lambda: [180, 240])  # augmented training crop (H, W)
    scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # crop area range (of the source)
    jitter: float = 0.2  # colour jitter (image only) when augmenting
    input_size: list[int] | None = None  # resize (H, W) before the tower, for cached features and eval
    image_size: int = 240  # EfficientNet-Lite0's static 'same' padding is computed for this side
    eval_batch_size: int = 16
    tower_lr_mult: float = 1.0  # fine-tuning: the tower's learning rate relative to optim.lr (the head's)
    # a ``.safetensors`` of this very model (tower + head state dict) that starts it, loaded strictly (e.g. a
    # distilled student: pipelines.transfer_seg); None: the seeded fresh init
    init: str | None = None


def parse_args(cfg: RunConfig) -> SegArgs:
    a = parse_section(SegArgs, cfg.method_args, "method_args")
    if a.head not in ("linear", "aspp"):
        raise ConfigError(f"config key 'method_args.head': {a.head!r} is not 'linear' or 'aspp'")
    for key in ("crop", "input_size"):
        v = getattr(a, key)
        if v is not None and (len(v) != 2 or min(v) < 1):
            raise ConfigError(f"config key 'method_args.{key}': expected [H, W], got {v!r}")
    if len(a.scale) != 2 or not 0 < a.scale[0] <= a.scale[1] <= 1:
        raise ConfigError(f"config key 'method_args.scale': expected [lo, hi] in (0, 1], got {a.scale!r}")
    return a


def ordered_dense_loader(
    spec: str,
    batch_size: int,
    size: list[int] | tuple[int, int] | None = None,
    num_classes: int | None = None,
    void: int | None = None,
    on_corrupt: str = "skip",
):
    """Dense shards in shard order, un-augmented (optionally resized to ``size``), no sample dropped."""
    from vfmkit.eval.features import ordered_loader

    decode = make_dense_decoder(None, num_classes=num_classes, void=void, size=tuple(size) if size else None)
    return ordered_loader(spec, decode, batch_size, on_corrupt=on_corrupt)


def _meta(args: SegArgs, info: dict) -> dict:
    return {
        "format": "vfmkit-dense/1",
        "tower": args.tower,
        "random_init": args.random_init,
        "head": args.head,
        "finetune": args.finetune,
        "width": args.width,
        "low_level": args.low_level,
        "timm_low_level": args.timm_low_level,
        "image_size": args.image_size,
        "input_size": args.input_size,
        "num_classes": info["num_classes"],
        "void": info["void"],
        "classes": info["classes"],
    }


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    """The seg job: tower + head (eval.dense), CE with void ignored, val mIoU as the eval hook."""
    from vfmkit.data.loader import ShardLoader, TensorLoader

    args = parse_args(cfg)
    if cfg.data.val is None:
        raise ConfigError("config key 'data.val': the seg method needs dense val shards to report mIoU")
    info = dense_info(cfg.data.train)
    k, void, names = int(info["num_classes"]), info["void"], info["classes"]
    torch.manual_seed(cfg.seed)
    model = build_seg_model(
        args.tower,
        k,
        args.head,
        args.finetune,
        args.width,
        args.low_level,
        args.image_size,
        reinit=args.random_init,
        timm_low_level=args.timm_low_level,
    )
    if args.init:
        from vfmkit.models.factory import load_state_dict

        model.load_state_dict(load_state_dict(args.init), strict=True)
    if getattr(dist_info, "is_main", True):
        atomic_write_json(Path(cfg.out_dir) / DENSE_META, _meta(args, info))

    if args.random_init and not args.finetune:
        # a frozen random tower: give its BN layers the statistics of the (un-augmented) train images first
        from vfmkit.eval.dense import calibrate_batchnorm

        calibrate_batchnorm(
            model.tower,
            (
                b["image"]
                for b in ordered_dense_loader(
                    cfg.data.train, args.eval_batch_size, args.input_size, k, void, cfg.data.on_corrupt
                )
            ),
        )
    cached = args.cache_features and not args.finetune
    if cached:
        feats = extract_features(
            model.tower,
            ordered_dense_loader(
                cfg.data.train, args.eval_batch_size, args.input_size, k, void, cfg.data.on_corrupt
            ),
        )
        n = feats["mask"].shape[0]
        loader = TensorLoader(
            feats,
            batch_size=min(cfg.data.batch_size, n),
            seed=cfg.seed,
            rank=getattr(dist_info, "rank", 0),
            world_size=getattr(dist_info, "world_size", 1),
        )

        def loss_fn(m, batch, step):
            mask = batch.pop("mask").long()
            logits = m(batch, mask.shape[-2:])
            return seg_loss(logits, mask, void), {}
    else:
        aug = DenseAugment(size=tuple(args.crop), scale=tuple(args.scale), jitter=args.jitter)
        decode = make_dense_decoder(aug, seed=cfg.seed, num_classes=k, void=void)
        loader = ShardLoader.from_config(cfg, decode, dist_info)

        def loss_fn(m, batch, step):
            return seg_loss(m(batch["image"]), batch["mask"], void), {}

    def eval_fn(m, step):
        val = ordered_dense_loader(
            cfg.data.val, args.eval_batch_size, args.input_size, k, void, cfg.data.on_corrupt
        )
        dev = next(m.parameters()).device
        res = evaluate_segmentation(m, val, k, void, names, dev)
        res["n_corrupt_val"] = val.n_corrupt
        res["n_corrupt_train"] = getattr(loader, "n_corrupt", 0)
        return res

    groups = None
    if args.finetune and args.tower_lr_mult != 1.0:
        from vfmkit.engine.trainer import param_groups

        groups = []
        for part, mult in ((model.tower, args.tower_lr_mult), (model.head, 1.0)):
            for g in param_groups(part, cfg.optim.weight_decay):
                groups.append({**g, "lr": cfg.optim.lr * mult})
    return Job(
        model,
        loss_fn,
        loader,
        eval_fn=eval_fn,
        groups=groups,
        extra={"meta": _meta(args, info), "cached": cached},
    )


def dense_probe(
    tower: str,
    train: str,
    val: str,
    *,
    out_dir: str | Path,
    head: str = "linear",
    finetune: bool = False,
    random_init: bool = False,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    weight_decay: float = 1e-4,
    warmup_steps: int = 20,
    method_args: dict | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """Fit a dense head on ``tower`` (a model spec) over dense shards ``train``, score it on ``val``.

    Runs the ``seg`` method through ``registry.run`` (the one engine), so a killed probe resumes from its
    checkpoint. Returns the val metrics (``mIoU``, ``pixel_acc``, ``iou/<class>``, ...) and writes them to
    ``out_dir/metrics.json`` (atomically). A finished run with the same settings is not trained again.
    """
    import json

    from vfmkit.methods.registry import run

    margs = {
        "tower": tower,
        "head": head,
        "finetune": finetune,
        "random_init": random_init,
        **(method_args or {}),
    }
    recipe = {
        "method": "seg",
        "seed": seed,
        "out_dir": str(out_dir),
        "data": {"train": train, "val": val, "batch_size": batch_size, "shuffle_buffer": 200},
        "optim": {"lr": lr, "weight_decay": weight_decay, "warmup_steps": min(warmup_steps, steps // 5)},
        "train": {
            "steps": steps,
            "log_every": max(1, steps // 10),
            "progress": False,
            "tensorboard": False,
            "grad_clip": 1.0,
            "ckpt_every": max(50, steps // 2),
        },
        "method_args": margs,
    }
    cfg = load_config(recipe, overrides)
    out = Path(cfg.out_dir)
    done = out / "metrics.json"
    if done.is_file():
        prev = json.loads(done.read_text(encoding="utf-8"))
        if prev.get("config") == asdict(cfg):
            return prev["metrics"]
    prev_cfg = out / "config.json"
    if prev_cfg.is_file() and json.loads(prev_cfg.read_text(encoding="utf-8")) != json.loads(
        json.dumps(asdict(cfg))
    ):
        raise ValueError(
            f"dense probe: {out} holds a run with another config (config.json); use a new out_dir"
        )
    res = run(cfg)
    metrics = {k.removeprefix("eval/"): v for k, v in res.final_logs.items() if k.startswith("eval/")}
    if not metrics or not math.isfinite(metrics.get("mIoU", float("nan"))):
        raise RuntimeError(f"dense probe in {out}: no finite val mIoU (got {metrics})")
    atomic_write_json(done, {"config": asdict(cfg), "metrics": metrics})
    return metrics
