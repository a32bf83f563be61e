"""Training runs through ``vfmkit.engine.train`` itself, shared by the engine tests.

Imported by ``tests/test_distributed.py`` / ``tests/test_engine.py`` for the one-process runs, and run under
``torchrun --nproc_per_node 2`` (gloo, CPU) as a script: ``engine_runs.py OUT_DIR`` trains the same tiny CLIP
on the same global batches with DDP (``OUT_DIR/ddp``) and FSDP2 (``OUT_DIR/fsdp2``, given explicit parameter
groups), each rank feeding its own half of every global batch, and then runs the ``clip_tiny`` recipe
uninterrupted under FSDP2
(``OUT_DIR/fsdp2_recipe``, the reference of the kill/resume test) with the overrides in ``RECIPE_ARGS``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

IMAGE_SIZE = 32  # the tiny ViT at 32 px (16 patches): seconds per run on one core
GLOBAL_BATCH = 8
STEPS = 4
# the clip_tiny recipe, small, FSDP2, a checkpoint every 2 steps (the kill test kills after the first one)
RECIPE_ARGS = [
    "train.parallel=fsdp2",
    "train.steps=8",
    "train.ckpt_every=2",
    "train.log_every=2",
    "train.progress=false",
    "train.tensorboard=false",
    "data.batch_size=4",
    "data.shuffle_buffer=16",
    f"data.image_size={IMAGE_SIZE}",
    "optim.warmup_steps=2",
]


def make_model() -> torch.nn.Module:
    from vfmkit.models.factory import create_clip

    torch.manual_seed(0)
    return create_clip("vfm-tiny-vit", image_size=IMAGE_SIZE).model


def global_batches(n: int, batch: int) -> list[dict]:
    """``n`` batches of real embedded Flickr8k images + first captions, in shard order (no augmentation)."""
    from vfmkit.eval.features import ordered_loader
    from vfmkit.methods.clip import make_clip_decoder
    from vfmkit.models.factory import create_clip

    bundle = create_clip("vfm-tiny-vit", image_size=IMAGE_SIZE)
    out = []
    for b in ordered_loader(
        "builtin:flickr8k/train",
        make_clip_decoder(bundle.preprocess_val, bundle.tokenizer, "first"),
        batch_size=batch,
    ):
        out.append(b)
        if len(out) == n:
            return out
    raise RuntimeError("not enough embedded samples")


class ListLoader:
    """The given batches in order, each cut to this rank's rows (``rank`` of ``world`` equal slices)."""

    def __init__(self, batches: list[dict], rank: int = 0, world: int = 1):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for b in self.batches:
            n = len(b["image"]) // self.world
            yield {k: v[self.rank * n : (self.rank + 1) * n] for k, v in b.items()}


def config(**train):
    from vfmkit.config import load_config

    t = {
        "steps": STEPS,
        "progress": False,
        "tensorboard": False,
        "resume": False,
        "log_every": 1,
        "ckpt_every": 0,
        "grad_clip": 1.0,
        **train,
    }
    return load_config(
        {"optim": {"lr": 1e-3, "weight_decay": 0.1, "beta2": 0.98, "warmup_steps": 2}, "train": t}
    )


def clip_run(out: Path, info, explicit_groups: bool = False, **train):
    """The CLIP loss (open_clip ClipLoss, gathered over ranks) on ``global_batches``, with EMA (0.9): the raw
    final weights in ``out/checkpoints/step-{STEPS}/model.safetensors``, the EMA ones in ``out/model.safetensors``.

    ``explicit_groups`` hands the engine the default parameter groups built before wrapping (``groups=``), as
    a method with its own groups does: under FSDP2 the engine must map them onto the sharded parameters.
    """
    from vfmkit.engine import train as engine_train
    from vfmkit.engine.trainer import param_groups
    from vfmkit.methods.clip import clamp_logit_scale, make_clip_loss_fn, make_contrastive_loss

    cfg = config(**{"ema_decay": 0.9, **train})
    loader = ListLoader(global_batches(STEPS, GLOBAL_BATCH), info.rank, info.world_size)
    loss_fn = make_clip_loss_fn(make_contrastive_loss("clip", cfg, info))
    model = make_model()
    groups = param_groups(model, cfg.optim.weight_decay) if explicit_groups else None
    return engine_train(
        cfg, model, loss_fn, loader, out_dir=out, dist_info=info, groups=groups, after_step=clamp_logit_scale
    )


def main(out: str) -> None:
    from vfmkit.config import load_config
    from vfmkit.engine import init_distributed
    from vfmkit.methods.registry import run

    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert info.world_size == 2
    out = Path(out)
    clip_run(out / "ddp", info, parallel="ddp")
    clip_run(out / "fsdp2", info, explicit_groups=True, parallel="fsdp2")
    run(load_config("clip_tiny", [f"out_dir={out / 'fsdp2_recipe'}", *RECIPE_ARGS]))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
