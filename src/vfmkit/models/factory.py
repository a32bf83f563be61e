"""One factory for every model vfmkit trains: open_clip CLIP/CoCa by name, timm classifiers by name.

vfmkit's own tiny configs (``models/configs/*.json``) are registered with open_clip, so tests and the
demo go through exactly the same open_clip code path as ``MobileCLIP2-S0`` or ``ViT-B-16``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def register_tiny_configs() -> None:
    """Make ``vfm-tiny-*`` configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _resolve_pretrained(pretrained: str | None) -> tuple[str | None, str | None]:
    """Split ``pretrained`` into (open_clip tag, local file). A vfmkit run dir resolves to its weights."""
    if not pretrained:
        return None, None
    p = Path(pretrained)
    if p.is_dir():
        for cand in ("model.safetensors", "checkpoints/latest/model.safetensors"):
            if (p / cand).is_file():
                return None, str(p / cand)
        raise FileNotFoundError(f"no model.safetensors found in directory {p}")
    if p.suffix in (".safetensors", ".pt", ".pth", ".bin") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"pretrained checkpoint not found: {p}")
        return None, str(p)
    return pretrained, None  # an open_clip tag: may download (the real path for users with network)


def create_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    **kwargs: Any,
) -> ClipBundle:
    """Create an open_clip model (CLIP, CustomTextCLIP or CoCa) with its transforms and tokenizer."""
    import open_clip

    register_tiny_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model name '{name}' (see open_clip.list_models() and vfm-tiny-* configs)")
    tag, path = _resolve_pretrained(pretrained)
    model, pre_train, pre_val = open_clip.create_model_and_transforms(
        name,
        pretrained=tag or path,
        device=device,
        force_image_size=image_size,
        weights_only=True,
        **kwargs,
    )
    tokenizer = open_clip.get_tokenizer(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    return ClipBundle(model, pre_train, pre_val, tokenizer, int(size), mean, std)


def create_classifier(
    name: str, num_classes: int, pretrained: str | bool | None = None, **kwargs: Any
) -> torch.nn.Module:
    """A timm classifier. ``pretrained`` is True (timm hub weights), a local file, or None."""
    import timm

    if isinstance(pretrained, str) and pretrained:
        p = Path(pretrained)
        if not p.is_file():
            raise FileNotFoundError(f"pretrained checkpoint not found: {p}")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        model.load_state_dict(load_state_dict(p))
        return model
    return timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, **kwargs)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights safely: safetensors, or a torch file with ``weights_only=True`` (never unpickles code).

    A torch file's ``state_dict`` / ``model`` / ``model_state_dict`` entry is unwrapped and a DDP ``module.``
    prefix dropped, so training checkpoints of the usual layouts load as plain state dicts."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def create_timm_from_state(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The timm model ``name`` with ``state`` loaded strictly; its classifier width is read from the state
    (the head's ``weight`` rows; no head in the state: a headless model)."""
    import timm

    probe = timm.create_model(name, pretrained=False)
    head = f"{probe.default_cfg.get('classifier', 'fc')}.weight"
    model = timm.create_model(
        name, pretrained=False, num_classes=int(state[head].shape[0]) if head in state else 0
    )
    model.load_state_dict(state, strict=True)
    return model
