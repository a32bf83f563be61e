"""Offline teacher head alignment: the ``teacher_align`` method.

Trains the two projection heads (and the log logit scale) of the offline CLIP-like teacher
(``vfmkit.models.offline_teacher``: frozen EfficientNet-Lite0 image tower + frozen all-MiniLM-L6-v2 text tower)
contrastively on CACHED frozen features, through the one engine. ``build`` caches the towers' pooled features of
the training pairs (resumable chunk files, so a rerun reuses them) and hands the engine a ``TensorLoader`` over
them. The full teacher build (cache, train, fp16 rounding, val report, save) is
``vfmkit.pipelines.teacher.build_offline_teacher``.

``method_args`` (:class:`TeacherAlignArgs`):
- ``data``: a Flickr8k folder (``captions.csv``, ``splits.json``, ``images.tar``: its ``train`` split is used,
  minus the images of the embedded sets in ``exclude``) or a shard spec whose json holds ``uid`` + ``captions``
  (e.g. ``builtin:flickr8k/train``); or ``features``: a safetensors file holding ``img`` [N,V,1280] and ``txt``
  [N,C,384] (and optionally ``val_img`` [M,1280], ``val_txt`` [M,C,384]) already cached.
- ``val``: optional shard spec of held-out pairs evaluated every ``train.eval_every`` steps and at the end.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.config import ConfigError, RunConfig, parse_section
from vfmkit.data.decode import decode_float
from vfmkit.engine.distributed import DistInfo
from vfmkit.methods.registry import Job
from vfmkit.models.base import LITE_MEAN, LITE_STD, build_efficientnet_lite0, resize_center_crop
from vfmkit.models.offline_teacher import (
    MAX_LOGIT_SCALE,
    OfflineHeads,
    clip_loss,
    lite0_features,
    load_minilm,
    minilm_features,
)


@dataclass
class TeacherAlignArgs:
    data: str = ""
    features: str = ""
    val: str = ""
    image_size: int = 160
    n_views: int = 1
    captions_per_image: int = 5
    embed_dim: int = 256
    hidden: int = 0
    cache_dir: str = ""  # default: <out_dir>/cache
    exclude: list[str] = field(default_factory=lambda: ["flickr8k/heldout"])
    max_train_images: int = 0  # a prefix of the sorted train names (0: all)


# ------------------------------------------------------------------------------------------------ feature cache


def augment_view(
    img: Tensor, size: int, gen: torch.Generator, scale: tuple[float, float] = (0.5, 1.0)
) -> Tensor:
    """A random square-ish crop (area fraction in ``scale``) + horizontal flip of [3,H,W] -> [3,size,size]."""
    h, w = img.shape[-2:]
    frac = scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item()
    ch, cw = max(8, round(h * math.sqrt(frac))), max(8, round(w * math.sqrt(frac)))
    i = int(torch.randint(0, h - ch + 1, (), generator=gen))
    j = int(torch.randint(0, w - cw + 1, (), generator=gen))
    crop = img[:, i : i + ch, j : j + cw]
    if torch.rand((), generator=gen).item() < 0.5:
        crop = crop.flip(-1)
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[
        0
    ]


def _names_hash(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _chunked_cache(
    cache_dir: Path,
    tag: str,
    items: Sequence[str],
    compute: Callable[[int, int], Tensor],
    chunk: int,
    log: Callable,
) -> Tensor:
    """Resumable cache: rows [s, e) computed by ``compute(s, e)`` into atomic chunk files, then concatenated.

    A chunk file is named by the hash of ``tag`` (everything the rows depend on besides the items: model,
    size, view, seed) and of its own items, so a killed run resumes at the first missing chunk and a list
    with the same leading items (e.g. a prefix of the train split) reuses the chunks already computed.
    Returns float32 [len(items), ...].
    """
    from safetensors.torch import load_file

    from vfmkit.data.io import atomic_save_safetensors

    d = cache_dir / tag
    d.mkdir(parents=True, exist_ok=True)
    parts, n = [], len(items)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        f = d / f"rows_{_names_hash(items[s:e])}_{e - s}.safetensors"
        if f.is_file():
            try:
                parts.append(load_file(str(f))["x"])
                continue
            except Exception:  # a torn file from a killed run: recompute it
                log(f"cache chunk {f} unreadable, recomputing")
        x = compute(s, e).float().contiguous()
        atomic_save_safetensors(f, {"x": x})
        parts.append(x)
        log(f"cached {tag} rows {e}/{n}")
    return torch.cat(parts)


def cache_image_features(
    images: dict[str, bytes],
    names: Sequence[str],
    image_size: int,
    view: int,
    cache_dir: Path,
    *,
    seed: int = 0,
    chunk: int = 256,
    device: str = "cpu",
    log: Callable = print,
) -> Tensor:
    """Pooled Lite0 features of ``names`` at ``image_size``: view 0 = whole image, view v>0 = seeded random crop.

    Returns float32 [N, 1280].
    """
    model = build_efficientnet_lite0(image_size).to(device).to(memory_format=torch.channels_last)
    mean = torch.tensor(LITE_MEAN).view(1, 3, 1, 1).to(device)
    std = torch.tensor(LITE_STD).view(1, 3, 1, 1).to(device)

    def compute(s: int, e: int) -> Tensor:
        xs = []
        for i in range(s, e):
            img = decode_float(images[names[i]], name=names[i])
            if view == 0:
                xs.append(resize_center_crop(img[None], image_size)[0])
            else:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + i * 101 + view)
                xs.append(augment_view(img, image_size, gen))
        x = ((torch.stack(xs).to(device) - mean) / std).contiguous(memory_format=torch.channels_last)
        return lite0_features(model, x).cpu()

    tag = f"img_lite0_s{image_size}_v{view}" + (f"_seed{seed}" if view else "")
    return _chunked_cache(cache_dir, tag, list(names), compute, chunk, log)


def cache_text_features(
    captions: Sequence[str], cache_dir: Path, *, chunk: int = 1024, device: str = "cpu", log: Callable = print
) -> Tensor:
    """MiniLM features of every caption, float32 [M, 384] (cached, resumable)."""
    st = load_minilm(device)
    captions = list(captions)
    return _chunked_cache(
        cache_dir, "txt_minilm", captions, lambda s, e: minilm_features(st, captions[s:e]), chunk, log
    )


# ------------------------------------------------------------------------------------------------ data


def split_names(data_dir: str | Path, exclude: Sequence[str]) -> tuple[dict, list[str], list[str], list[str]]:
    """Flickr8k folder -> (captions, sorted train names minus the embedded ``exclude`` sets, sorted val, held)."""
    from vfmkit.data.flickr8k import builtin_uids, read_flickr8k

    caps, splits = read_flickr8k(data_dir)
    held = {u for name in exclude for u in builtin_uids(name)}
    train = sorted(n for n in splits["train"] if n not in held)
    val = sorted(splits["val"])
    short = [n for n in train + val if len(caps.get(n, [])) < 5]
    if short:
        raise ValueError(f"{len(short)} Flickr8k images have fewer than 5 captions, e.g. {short[:3]}")
    return caps, train, val, sorted(held)


def pair_features(
    caps: dict[str, list[str]],
    images: dict[str, bytes],
    names: Sequence[str],
    args: TeacherAlignArgs,
    cache: Path,
    *,
    seed: int,
    n_views: int,
    log: Callable = print,
) -> tuple[Tensor, Tensor]:
    """-> (img [N,V,1280], txt [N,C,384]) for ``names`` (C = ``captions_per_image``), cached."""
    c = args.captions_per_image
    short = [n for n in names if len(caps.get(n, [])) < c]
    if short:
        raise ValueError(f"{len(short)} images have fewer than {c} captions, e.g. {short[:3]}")
    txt = cache_text_features([t for n in names for t in caps[n][:c]], cache, log=log).view(len(names), c, -1)
    views = [
        cache_image_features(images, names, args.image_size, v, cache, seed=seed, log=log)
        for v in range(n_views)
    ]
    return torch.stack(views, 1), txt


def load_features(cfg: RunConfig, args: TeacherAlignArgs, log: Callable = print) -> dict[str, Tensor]:
    """The training (and optional val) features named by the method args: ``img``, ``txt`` [, ``val_img``, ``val_txt``]."""
    if args.features:
        from safetensors.torch import load_file

        p = Path(args.features)
        if not p.is_file():
            raise FileNotFoundError(f"config key 'method_args.features': no file {p}")
        return load_file(str(p))
    if not args.data:
        raise ConfigError("config key 'method_args.data': teacher_align needs data (or features)")
    cache = Path(args.cache_dir) if args.cache_dir else Path(cfg.out_dir) / "cache"
    from vfmkit.data.flickr8k import is_flickr8k_dir, read_shard_pairs, read_tar_images

    if is_flickr8k_dir(args.data):
        caps, train, _, _ = split_names(args.data, args.exclude)
        train = train[: args.max_train_images or None]
        images = read_tar_images(Path(args.data) / "images.tar", train)
    else:
        caps, images = read_shard_pairs(args.data)
        train = sorted(caps)[: args.max_train_images or None]
    img, txt = pair_features(caps, images, train, args, cache, seed=cfg.seed, n_views=args.n_views, log=log)
    out = {"img": img, "txt": txt}
    if args.val:
        vcaps, vimages = read_shard_pairs(args.val)
        vnames = sorted(vcaps)
        vimg, vtxt = pair_features(vcaps, vimages, vnames, args, cache, seed=cfg.seed, n_views=1, log=log)
        out.update(val_img=vimg[:, 0], val_txt=vtxt)
    return out


# ------------------------------------------------------------------------------------------------ loss / eval


def head_loss(model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
    """One random cached view [B,V,1280] and one random caption [B,C,384] per image -> CLIP loss."""
    img, txt = batch["img"], batch["txt"]
    b = img.shape[0]
    rows = torch.arange(b, device=img.device)
    # torch's global RNG is part of the engine's checkpoint, so a resumed run draws the same views/captions.
    v = torch.randint(0, img.shape[1], (b,)).to(img.device)
    c = torch.randint(0, txt.shape[1], (b,)).to(img.device)
    zi, zt = model(img[rows, v], txt[rows, c])
    heads = model.module if hasattr(model, "module") else model
    loss = clip_loss(zi, zt, heads.logit_scale)
    return loss, {"logit_scale": heads.logit_scale.detach().exp()}


def clamp_scale(model: nn.Module) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


def retrieval_on_features(heads: OfflineHeads, img_feats: Tensor, txt_feats: Tensor) -> dict[str, float]:
    """R@1/5/10 both ways. img_feats [N,1280] (one view), txt_feats [N,C,384] (C captions per image)."""
    from vfmkit.eval.retrieval import retrieval_metrics

    n, c = txt_feats.shape[:2]
    with torch.no_grad():
        zi, zt = heads(img_feats.float(), txt_feats.reshape(n * c, -1).float())
    return retrieval_metrics(zi.cpu(), zt.cpu(), torch.arange(n).repeat_interleave(c))


def build(cfg: RunConfig, dist_info: DistInfo) -> Job:
    from vfmkit.data.loader import TensorLoader

    args = parse_section(TeacherAlignArgs, cfg.method_args, "method_args")
    feats = load_features(cfg, args)
    torch.manual_seed(cfg.seed)
    heads = OfflineHeads(args.embed_dim, args.hidden)
    loader = TensorLoader(
        {"img": feats["img"], "txt": feats["txt"]},
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    eval_fn = None
    if "val_img" in feats:
        val = (feats["val_img"], feats["val_txt"])
        eval_fn = lambda m, step: retrieval_on_features(m, *val)  # noqa: E731
    return Job(model=heads, loss_fn=head_loss, loader=loader, after_step=clamp_scale, eval_fn=eval_fn)
