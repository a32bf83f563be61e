"""Build the offline CLIP-like teacher: cache frozen tower features, align the heads (the ``teacher_align``
method through ``registry.run``), round to what ships (fp16), report val retrieval, save.

Every stage resumes: the feature cache is chunked and atomic, the head training resumes from its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from vfmkit.config import load_config
from vfmkit.methods.registry import run_job
from vfmkit.methods.teacher_align import (
    TeacherAlignArgs,
    pair_features,
    retrieval_on_features,
    split_names,
)
from vfmkit.models.offline_teacher import OfflineHeads, save_offline_teacher


def head_config(
    out_dir: str | Path,
    features: str | Path,
    *,
    embed_dim: int = 256,
    hidden: int = 0,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    eval_every: int = 0,
):
    """The validated RunConfig of one head alignment on a cached-features file."""
    return load_config(
        {
            "method": "teacher_align",
            "seed": seed,
            "out_dir": str(out_dir),
            "data": {"batch_size": batch_size},
            "optim": {"lr": lr, "weight_decay": weight_decay, "warmup_steps": min(50, steps // 10)},
            "train": {
                "steps": steps,
                "log_every": max(1, min(50, steps // 4)),
                "progress": False,
                "tensorboard": False,
                "eval_every": eval_every,
                "grad_clip": 1.0,
                "keep_ckpts": 1,
            },
            "method_args": {"features": str(features), "embed_dim": embed_dim, "hidden": hidden},
        }
    )


def train_heads(
    img_feats: Tensor,
    txt_feats: Tensor,
    out_dir: str | Path,
    *,
    embed_dim: int = 256,
    hidden: int = 0,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    val: tuple[Tensor, Tensor] | None = None,
    eval_every: int = 0,
) -> tuple[OfflineHeads, dict]:
    """Align the heads on cached features with ``registry.run`` (method ``teacher_align``).

    img_feats [N,V,1280] (V views), txt_feats [N,C,384] (C captions). ``val`` = (img [M,1280], txt [M,C,384])
    is evaluated (never trained on) every ``eval_every`` steps and at the end. Returns (heads, final logs).
    """
    from vfmkit.data.io import atomic_save_safetensors

    out = Path(out_dir)
    feats = {"img": img_feats, "txt": txt_feats}
    if val is not None:
        feats.update(val_img=val[0], val_txt=val[1])
    atomic_save_safetensors(out / "features.safetensors", feats)
    cfg = head_config(
        out,
        out / "features.safetensors",
        embed_dim=embed_dim,
        hidden=hidden,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        eval_every=eval_every,
    )
    job, res = run_job(cfg)
    return job.model.cpu().eval(), res.final_logs


def build_offline_teacher(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    image_size: int = 160,
    n_views: int = 1,
    embed_dim: int = 256,
    hidden: int = 0,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    exclude: Sequence[str] = ("flickr8k/heldout",),
    eval_val: bool = True,
    max_train_images: int = 0,
    log: Callable = print,
) -> dict:
    """Cache frozen features of Flickr8k TRAIN (minus the embedded held-out images), train the heads, save.

    Val (never trained on) is only encoded to report retrieval. Returns the ``build`` record saved in teacher.json.
    """
    from vfmkit.data.flickr8k import read_tar_images

    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    caps, train, val, held = split_names(data_dir, exclude)
    train = train[: max_train_images or None]  # a prefix of the sorted names: reuses cached chunks
    log(f"flickr8k: {len(train)} train images ({len(held)} embedded held-out excluded), {len(val)} val")
    images = read_tar_images(Path(data_dir) / "images.tar", train + (val if eval_val else []))
    args = TeacherAlignArgs(image_size=image_size)
    img, txt = pair_features(caps, images, train, args, cache, seed=seed, n_views=n_views, log=log)
    val_feats = None
    if eval_val:
        vimg, vtxt = pair_features(caps, images, val, args, cache, seed=seed, n_views=1, log=log)
        val_feats = (vimg[:, 0], vtxt)
    heads, logs = train_heads(
        img,
        txt,
        out / "train",
        embed_dim=embed_dim,
        hidden=hidden,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
    )
    # Report what ships: the fp16-rounded heads.
    heads.load_state_dict({k: v.half().float() for k, v in heads.state_dict().items()})
    record = {
        "data": str(data_dir),
        "split": "train",
        "n_train_images": len(train),
        # The aligned-on images by name: a student's transfer set should exclude them (on images it was
        # aligned on the teacher's targets are nearly one-hot, see ``teacher_train_images``).
        "train_images": list(train),
        "n_views": n_views,
        "excluded_builtin": list(exclude),
        "n_excluded": len(held),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "final_loss": logs.get("loss"),
    }
    if val_feats is not None:
        record["val_retrieval"] = retrieval_on_features(heads, *val_feats)
        log(f"val retrieval (1000 images, 5000 captions): {record['val_retrieval']}")
    save_offline_teacher(out, heads, {"image_size": image_size, "build": record})
    return record


def encode_flickr_split(
    teacher, data_dir: str | Path, split: str = "val", *, limit: int = 0, batch_size: int = 64
) -> dict[str, float]:
    """Any ``ImageTextTeacher`` end to end on a Flickr8k split (5 captions per image) -> R@1/5/10 both ways."""
    from vfmkit.data.decode import decode_float
    from vfmkit.data.flickr8k import read_flickr8k, read_tar_images
    from vfmkit.eval.retrieval import retrieval_metrics

    caps, splits = read_flickr8k(data_dir)
    names = sorted(splits[split])[: limit or None]
    images = read_tar_images(Path(data_dir) / "images.tar", names)
    zi = []
    for s in range(0, len(names), batch_size):
        batch = [decode_float(images[n], name=n) for n in names[s : s + batch_size]]
        zi.append(teacher.encode_image(torch.stack(batch)).cpu())  # Flickr8k images here are all 160x160
    texts = [c for n in names for c in caps[n][:5]]
    zt = torch.cat([teacher.encode_text(texts[s : s + 512]).cpu() for s in range(0, len(texts), 512)])
    return retrieval_metrics(torch.cat(zi), zt, torch.arange(len(names)).repeat_interleave(5))
