"""The tiny offline CoCa captioner as a registered method: ``coca`` (recipe ``coca_tiny``).

open_clip CoCa (2-layer towers, compact vocabulary of the training captions) trained with open_clip's CoCaLoss
on image-caption shards held in memory (images shrunk once to the captioner's size). The pieces (model config,
:class:`~vfmkit.methods.captions.Captioner`, loss) live in ``methods/captions.py``; training then saving the
captioner is ``vfmkit.pipelines.captioner.train_captioner``. ``job.extra["captioner"]`` is the wrapped model.
"""

from __future__ import annotations

import json

import open_clip
import torch

from vfmkit.config import RunConfig, parse_section
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.captions import (
    TINY_COCA_CFG,
    Captioner,
    CocaArgs,
    build_vocab,
    caption_table,
    coca_loss_fn,
    create_tiny_coca,
    read_image_captions,
)
from vfmkit.methods.registry import Job


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    from vfmkit.data.loader import TensorLoader
    from vfmkit.data.shards import list_shards

    args = parse_section(CocaArgs, cfg.method_args, "method_args")
    images, captions = read_image_captions(list_shards(cfg.data.train), args.image_size, args.max_images)
    tok = open_clip.SimpleTokenizer()
    vocab = build_vocab([c for caps in captions for c in caps], tok)
    model_cfg = json.loads(json.dumps(TINY_COCA_CFG))
    model_cfg["vision_cfg"]["image_size"] = args.image_size
    model_cfg["text_cfg"]["vocab_size"] = model_cfg["multimodal_cfg"]["vocab_size"] = len(vocab)
    torch.manual_seed(cfg.seed)
    captioner = Captioner(
        create_tiny_coca(model_cfg),
        args.image_size,
        open_clip.OPENAI_DATASET_MEAN,
        open_clip.OPENAI_DATASET_STD,
        model_cfg=model_cfg,
        name="vfm-tiny-coca",
        vocab=vocab,
    )
    table = caption_table(captioner, images, captions, args.captions_per_image)
    loader = TensorLoader(
        table,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    return Job(
        model=captioner.model,
        loss_fn=coca_loss_fn(args, captioner.mean, captioner.std),
        loader=loader,
        extra={"captioner": captioner},
    )
