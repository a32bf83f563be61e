"""Teachers: frozen CLIP-like image-text models and ImageNet classifiers that reinforcement distils from.

Everyone codes against this interface (docs/ARCHITECTURE.md):

- :class:`ImageTextTeacher`: ``encode_image(images [B,3,H,W] in [0,1]) -> [B, D]`` and
  ``encode_text(list[str]) -> [B, D]``, both L2-normalised. The teacher resizes to its own ``image_size`` and
  applies its own normalisation, so callers pass already-augmented images at any resolution.
- :class:`TeacherEnsemble`: K teachers; embeddings are per-teacher normalised then concatenated
  ([B, sum D_k]), the DataCompDR layout.
- :func:`load_teacher` / :func:`load_ensemble` from spec strings:
  ``"openclip:ViT-L-14:datacomp_xl_s13b_b90k"`` (open_clip name + hub tag: needs network),
  ``"openclip:NAME:/path/ckpt.safetensors"`` (local weights), ``"offline"`` (the shipped
  EfficientNet-Lite0 + MiniLM teacher, no network) or a path to a saved offline-teacher directory.
- :class:`ClassifierTeacher` / :func:`load_classifier_ensemble`: image -> logits over the target classes
  (``class_index`` picks e.g. Imagenette's 10 ImageNet-1k indices); the ensemble averages softmax(logits / T).
  Specs: ``"efficientnet-lite0"`` (ImageNet weights from the offline registry package), ``"timm:NAME"``
  (timm hub weights: needs network) or ``"timm:NAME:/path/ckpt"`` (local weights).

Teachers are frozen and in eval mode; every encode runs under ``torch.no_grad`` (not ``inference_mode``: the
outputs are used as targets next to tensors that need gradients).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The teacher interface and the shared EfficientNet-Lite0 tower live in models/base.py (so the offline teacher
# can build on them without importing this module back); re-exported here.
from vfmkit.models.base import (
    LITE_MEAN,
    LITE_STD,
    ImageTextTeacher,
    build_efficientnet_lite0,
    freeze,
    resize_center_crop,
)

__all__ = [
    "ImageTextTeacher",
    "OpenClipTeacher",
    "TeacherEnsemble",
    "ClassifierTeacher",
    "ClassifierEnsemble",
    "load_teacher",
    "load_ensemble",
    "load_classifier",
    "load_classifier_ensemble",
    "resize_center_crop",
    "freeze",
]


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


class OpenClipTeacher(ImageTextTeacher):
    """An open_clip model (CLIP / CustomTextCLIP / CoCa) with its own preprocess config and tokenizer."""

    def __init__(self, name: str, model: nn.Module, tokenizer: Callable, spec: str | None = None) -> None:
        pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = pp.get("size", getattr(model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = pp.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = pp.get("std", (0.26862954, 0.26130258, 0.27577711))
        super().__init__(
            spec or f"openclip:{name}",
            embed_dim=0,
            logit_scale=float(model.logit_scale.detach().exp()),
            image_size=int(size),
            mean=mean,
            std=std,
            interpolation=pp.get("interpolation", "bicubic"),
            resize_mode=pp.get("resize_mode", "shortest"),
        )
        self.model = freeze(model)
        self.tokenizer = tokenizer
        # The projection width is not a uniform attribute across open_clip model classes: measure it once.
        self.embed_dim = int(self.encode_text(["a photo"]).shape[-1])

    def _encode_image_prepared(self, x: Tensor) -> Tensor:
        return self.model.encode_image(x)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(list(texts)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _register_vfmkit_configs() -> None:
    """Best effort: make vfmkit's tiny open_clip configs (models/factory.py) known to open_clip."""
    try:
        from vfmkit.models.factory import register_tiny_configs
    except ImportError:
        return
    register_tiny_configs()


def load_openclip_teacher(
    name: str, pretrained: str | None, device: str | torch.device = "cpu"
) -> OpenClipTeacher:
    """``pretrained`` is an open_clip tag (downloads: needs network) or a local safetensors / weights-only ckpt."""
    import open_clip

    _register_vfmkit_configs()
    if pretrained and (os.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".pth", ".bin"))):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"open_clip teacher checkpoint not found: {pretrained}")
    model, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=pretrained or None, device=device, weights_only=True
    )
    spec = f"openclip:{name}" + (f":{pretrained}" if pretrained else "")
    return OpenClipTeacher(name, model, open_clip.get_tokenizer(name), spec=spec)


def load_teacher(spec: str, device: str | torch.device = "cpu") -> ImageTextTeacher:
    """Spec string (``models/spec.py`` grammar) -> frozen teacher: ``openclip:NAME[:TAG_OR_PATH]``, ``offline``
    or a saved offline-teacher directory."""
    from vfmkit.models.spec import ModelSpecError, parse_model_spec

    try:
        ms = parse_model_spec(spec)
    except ModelSpecError as e:
        raise ValueError(f"teacher spec '{spec}': expected openclip:NAME[:TAG_OR_PATH] ({e})") from e
    if ms.kind == "openclip" and ms.size is None:
        return load_openclip_teacher(ms.name, ms.source, device)
    from vfmkit.models.offline_teacher import load_offline_teacher

    if ms.kind == "offline":
        return load_offline_teacher(None, device=device)
    if ms.kind == "path":
        return load_offline_teacher(ms.name, device=device)
    raise ValueError(
        f"unknown teacher spec '{spec}': use 'openclip:NAME:TAG_OR_PATH', 'offline' or a saved offline-teacher dir"
    )


class TeacherEnsemble(nn.Module):
    """K frozen teachers; embeddings are normalised per teacher and concatenated along the last dim."""

    def __init__(self, teachers: Sequence[ImageTextTeacher]) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("a teacher ensemble needs at least one teacher")
        self.teachers = nn.ModuleList(teachers)

    @property
    def dims(self) -> list[int]:
        return [t.embed_dim for t in self.teachers]

    @property
    def logit_scales(self) -> list[float]:
        return [t.logit_scale for t in self.teachers]

    @property
    def image_sizes(self) -> list[int]:
        return [t.image_size for t in self.teachers]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def encode_image(self, images: Tensor) -> Tensor:
        """images float [B,3,H,W] in [0,1] -> [B, sum D_k], each D_k block L2-normalised."""
        return torch.cat([t.encode_image(images).cpu() for t in self.teachers], dim=-1)

    def encode_text(self, texts: list[str]) -> Tensor:
        """B strings -> [B, sum D_k], each D_k block L2-normalised."""
        return torch.cat([t.encode_text(texts).cpu() for t in self.teachers], dim=-1)

    def split(self, emb: Tensor) -> list[Tensor]:
        """[..., sum D_k] -> K tensors [..., D_k] (the inverse of the concatenation)."""
        return list(torch.split(emb, self.dims, dim=-1))

    def describe(self) -> dict:
        """Metadata for reinforced data: names, dims, logit scales, image sizes."""
        return {
            "names": self.names,
            "dims": self.dims,
            "logit_scales": self.logit_scales,
            "image_sizes": self.image_sizes,
        }


def load_ensemble(specs: Sequence[str], device: str | torch.device = "cpu") -> TeacherEnsemble:
    return TeacherEnsemble([load_teacher(s, device=device) for s in specs])


# ----------------------------------------------------------------------------------------------- classifiers


class ClassifierTeacher(nn.Module):
    """A frozen image classifier: images float [B,3,H,W] in [0,1] -> logits over the target classes [B, C].

    Preprocessing is the model's own eval protocol: centre crop ``crop_pct`` of the short side, resize to
    ``image_size`` with ``interpolation``, normalise with ``mean``/``std``.

    ``class_index`` (optional) selects columns of the backbone's logits (e.g. Imagenette's 10 ImageNet indices).
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        class_index: Sequence[int] | None = None,
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
    ) -> None:
        super().__init__()
        self.name, self.image_size, self.interpolation = name, int(image_size), interpolation
        self.crop_pct = float(crop_pct)
        self.backbone = freeze(backbone)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        idx = torch.tensor(list(class_index), dtype=torch.long) if class_index is not None else None
        self.register_buffer("class_index", idx, persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.to(self.mean.device)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if (
            self.crop_pct < 1.0
        ):  # the model's eval protocol: centre crop crop_pct of the short side, then resize
            h, w = x.shape[-2:]
            c = round(min(h, w) * self.crop_pct)
            top, left = (h - c) // 2, (w - c) // 2
            x = x[..., top : top + c, left : left + c]
        x = (resize_center_crop(x, self.image_size, self.interpolation) - self.mean) / self.std
        logits = self.backbone(x).float()
        return logits if self.class_index is None else logits.index_select(-1, self.class_index)


def _timm_classifier(name: str, path: str | None) -> tuple[nn.Module, int, tuple, tuple, str, float]:
    import timm

    if path is None:
        model = timm.create_model(name, pretrained=True)  # timm hub weights: needs network
    else:
        from vfmkit.models.factory import create_timm_from_state, load_state_dict

        if not Path(path).is_file():
            raise FileNotFoundError(f"classifier checkpoint not found: {path}")
        model = create_timm_from_state(name, load_state_dict(path))
        if model.num_classes == 0:
            raise ValueError(f"classifier checkpoint {path} has no classifier head for timm:{name}")
    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    interp, crop = cfg.get("interpolation", "bicubic"), float(cfg.get("crop_pct", 1.0))
    return model, int(size), tuple(cfg["mean"]), tuple(cfg["std"]), interp, crop


def load_classifier(
    spec: str, class_index: Sequence[int] | None = None, device: str | torch.device = "cpu"
) -> ClassifierTeacher:
    """``"efficientnet-lite0"`` | ``"efficientnet-lite0@SIZE"`` | ``"timm:NAME"`` | ``"timm:NAME:/path/ckpt"``
    (``models/spec.py`` grammar)."""
    from vfmkit.models.spec import ModelSpecError, parse_model_spec

    try:
        ms = parse_model_spec(spec)
    except ModelSpecError as e:
        raise ValueError(f"unknown classifier spec '{spec}': {e}") from e
    if ms.kind == "efficientnet-lite0":
        size = ms.size or 224
        model = build_efficientnet_lite0(size)
        # TF EfficientNet(-Lite) eval: centre crop size/(size+32) of the image, bicubic resize to size.
        crop = size / (size + 32)
        teacher = ClassifierTeacher(spec, model, size, LITE_MEAN, LITE_STD, class_index, "bicubic", crop)
    elif ms.kind == "timm" and ms.size is None:
        model, size, mean, std, interp, crop = _timm_classifier(ms.name, ms.source)
        teacher = ClassifierTeacher(spec, model, size, mean, std, class_index, interp, crop)
    else:
        raise ValueError(f"unknown classifier spec '{spec}': use 'efficientnet-lite0', 'timm:NAME[:CKPT]'")
    return teacher.to(device)


class ClassifierEnsemble(nn.Module):
    """images [B,3,H,W] in [0,1] -> mean over teachers of softmax(logits_k / T), [B, C] (rows sum to 1)."""

    def __init__(self, teachers: Sequence[ClassifierTeacher], temperature: float = 1.0) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("a classifier ensemble needs at least one teacher")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teachers = nn.ModuleList(teachers)
        self.temperature = float(temperature)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        probs = [torch.softmax(t(images).cpu() / self.temperature, dim=-1) for t in self.teachers]
        return torch.stack(probs, 0).mean(0)

    def describe(self) -> dict:
        return {
            "names": [t.name for t in self.teachers],
            "temperature": self.temperature,
            "image_sizes": [t.image_size for t in self.teachers],
        }


def load_classifier_ensemble(
    specs: Sequence[str],
    class_index: Sequence[int] | None,
    temperature: float = 1.0,
    device: str | torch.device = "cpu",
) -> ClassifierEnsemble:
    """Returns a callable module: images -> averaged probs [B, C]."""
    return ClassifierEnsemble([load_classifier(s, class_index, device) for s in specs], temperature)
