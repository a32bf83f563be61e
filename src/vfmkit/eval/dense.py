"""Dense-prediction evaluation of any image tower: spatial features, per-pixel heads, segmentation and depth metrics.

- :func:`load_tower` turns a tower spec into a :class:`SpatialTower` whose ``forward(images) -> {"out": [B,C,h,w],
  "low": [B,C',H/8,W/8] (when the tower has one)}`` reads the feature map BEFORE pooling (for a ViT: the patch
  tokens of the last block, as a map). Images go in as ``uint8`` or float in ``[0, 1]``; the tower applies its own
  normalisation (and, for a fixed-size ViT, its own resize). Specs:

  specs follow the one model-spec grammar (``vfmkit.models.spec``):

  - ``efficientnet-lite0[@SIZE]`` (the real ImageNet weights from the offline registry package);
  - ``openclip:NAME`` (random init) / ``openclip:NAME:TAG_OR_CHECKPOINT_OR_RUN_DIR``: the image tower of a
    vfmkit / open_clip CLIP model (``vfm-tiny-cnn``, ``vfm-tiny-vit``, ``ViT-B-16``, ...);
  - ``timm:NAME[:random]`` (random init), ``timm:NAME:pretrained`` (timm hub, needs network), ``timm:NAME:CKPT``;
    its only map is its last, unless ``timm_low_level=True`` (opt-in, recorded in ``dense.json``): then its
    deepest stride-8 intermediate (timm ``feature_info``, via ``forward_intermediates``) is ``low`` as well;
  - a directory: a segmentation run of the ``seg`` method (e.g. the CamVid teacher): its fine-tuned tower.

  ``reinit=True`` gives any of them with fresh random weights (the random-tower baseline).

- Heads (:class:`DenseHead`): ``linear`` (a 1x1 convolution: the frozen per-pixel linear probe) and ``aspp``
  (a light DeepLabV3-style head: torchvision's ``ASPP`` + a 3x3 conv, fused with the stride-8 features when the
  tower gives them, DeepLabV3+-like). :class:`SegModel` = tower + head, logits upsampled (bilinear) to the input.
- Metrics: :func:`confusion_matrix` / :func:`seg_metrics` (mIoU, pixel accuracy and per-class IoU, void ignored;
  a class absent from both prediction and ground truth is left out of the mean) and :func:`depth_metrics`
  (RMSE, AbsRel, delta<1.25 on valid pixels). No depth benchmark: no real depth ground truth is available offline.

Fitting a head is a training run and goes through the one engine (``vfmkit.methods.seg``); this module only
builds models, reads features and scores predictions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SpatialTower",
    "DenseHead",
    "SegModel",
    "load_tower",
    "build_seg_model",
    "load_dense_model",
    "confusion_matrix",
    "seg_metrics",
    "depth_metrics",
    "mask_iou",
    "depth_loss",
    "seg_loss",
    "evaluate_segmentation",
    "extract_features",
    "calibrate_batchnorm",
]


# ------------------------------------------------------------------------------------------------ towers


class SpatialTower(nn.Module):
    """An image tower that returns feature maps. Subclasses implement ``_features(x_normalised) -> dict``.

    ``channels`` / ``low_channels`` (None when there is no stride-8 map) and ``spec`` describe it; ``input_size``
    ``(H, W)`` (or None: any size) is the size its trunk needs (a ViT's position embeddings).
    """

    def __init__(
        self,
        spec: str,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        low_channels: int | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.spec, self.channels, self.low_channels, self.input_size = (
            spec,
            int(channels),
            low_channels,
            input_size,
        )
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(
                x, size=list(self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self._features(self.prepare(images))

    def _features(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class Lite0Tower(SpatialTower):
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch``): ``out`` = the 1280-ch head conv map (stride 32),
    ``low`` = the 40-ch output of the stride-8 stage."""

    def __init__(self, spec: str, pretrained: bool = True, image_size: int = 240) -> None:
        from vfmkit.models.base import LITE_MEAN, LITE_STD, build_efficientnet_lite0

        super().__init__(spec, 1280, LITE_MEAN, LITE_STD, low_channels=40)
        if pretrained:
            net = build_efficientnet_lite0(image_size)
            for p in net.parameters():
                p.requires_grad_(True)
            net.train()
        else:
            from efficientnet_lite_pytorch import EfficientNet

            net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        del net._fc  # the ImageNet classifier is not part of the dense tower
        self.net = net
        self._low_index = 4  # blocks 3-4 are the 40-channel stride-8 stage

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        n = self.net
        h = n._swish(n._bn0(n._conv_stem(x)))
        low = None
        for i, block in enumerate(n._blocks):
            h = block(h)
            if i == self._low_index:
                low = h
        return {"out": n._swish(n._bn1(n._conv_head(h))), "low": low}


class OpenClipTower(SpatialTower):
    """The image tower of an open_clip model: a ViT's last-block patch tokens, or a timm trunk's feature map."""

    def __init__(self, spec: str, name: str, pretrained: str | None) -> None:
        from vfmkit.models.factory import create_clip

        bundle = create_clip(name, pretrained)
        visual = bundle.model.visual
        self._kind = (
            "vit"
            if hasattr(visual, "forward_intermediates") and hasattr(visual, "patch_size")
            else ("timm" if hasattr(visual, "trunk") else None)
        )
        if self._kind is None:
            raise ValueError(
                f"tower {spec!r}: open_clip image tower {type(visual).__name__} has no spatial "
                "feature path here (supported: VisionTransformer, timm trunks)"
            )
        if self._kind == "vit":
            channels = visual.transformer.width
            size = visual.image_size
            size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        else:
            channels, size = visual.trunk.num_features, None
        super().__init__(spec, channels, bundle.mean, bundle.std, input_size=size)
        self.visual = visual

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        if self._kind == "vit":
            out = self.visual.forward_intermediates(x, indices=1, intermediates_only=True, output_fmt="NCHW")
            return {"out": out["image_intermediates"][-1]}
        f = self.visual.trunk.forward_features(x)
        if f.ndim == 3:  # a timm ViT trunk: tokens -> map
            f = _tokens_to_map(f, getattr(self.visual.trunk, "num_prefix_tokens", 1))
        return {"out": f}


class TimmTower(SpatialTower):
    """A timm backbone: its last intermediate feature map (NCHW for CNNs and ViTs alike) as ``out``.

    ``low_level=True`` also returns, as ``low``, its deepest intermediate of stride 8 (the ``feature_info`` entry
    with ``reduction == 8``: for a ResNet ``layer2``), the stride-8 map a DeepLabV3+-style head fuses, as the Lite0
    tower's; ValueError naming the reductions when the model has none (e.g. a ViT). Off by default: a tower built
    without it is the one saved runs were trained with.
    """

    def __init__(self, spec: str, name: str, weights: str | None, low_level: bool = False) -> None:
        import timm

        model = timm.create_model(name, pretrained=weights == "pretrained", num_classes=0)
        if weights and weights != "pretrained":
            from vfmkit.models.factory import load_state_dict

            sd = {
                k: v
                for k, v in load_state_dict(weights).items()
                if not k.startswith(("fc.", "head.", "classifier."))
            }
            model.load_state_dict(sd, strict=False)
        cfg = model.pretrained_cfg or {}
        size = None
        if hasattr(model, "patch_embed") and not getattr(model.patch_embed, "dynamic_img_size", False):
            s = model.patch_embed.img_size
            size = tuple(s) if isinstance(s, (tuple, list)) else (s, s)
        self._take: list[int] | None = None  # forward_intermediates indices [stride-8, last] when low_level
        low_channels = None
        if low_level:
            info = list(getattr(model, "feature_info", None) or [])
            eights = [i for i, f in enumerate(info) if int(f.get("reduction", 0)) == 8]
            if not eights:
                raise ValueError(
                    f"tower {spec!r}: timm {name} has no stride-8 feature map for low_level (feature_info "
                    f"reductions: {[f.get('reduction') for f in info]})"
                )
            self._take = [eights[-1], len(info) - 1]
            low_channels = int(info[eights[-1]]["num_chs"])
        super().__init__(
            spec,
            model.num_features,
            cfg.get("mean", (0.485, 0.456, 0.406)),
            cfg.get("std", (0.229, 0.224, 0.225)),
            low_channels=low_channels,
            input_size=size,
        )
        self.model = model

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        if self._take is None:
            return {"out": self.model.forward_intermediates(x, indices=1, intermediates_only=True)[-1]}
        low, out = self.model.forward_intermediates(x, indices=self._take, intermediates_only=True)
        return {"out": out, "low": low}


def _tokens_to_map(tokens: Tensor, n_prefix: int) -> Tensor:
    t = tokens[:, n_prefix:]
    side = int(round(t.shape[1] ** 0.5))
    if side * side != t.shape[1]:
        raise ValueError(f"cannot lay {t.shape[1]} patch tokens out as a square map")
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)


def load_tower(
    spec: str, image_size: int = 240, reinit: bool = False, timm_low_level: bool = False
) -> SpatialTower:
    """A :class:`SpatialTower` from a model spec (``vfmkit.models.spec`` grammar; see the module docstring).

    ``reinit=True`` gives the same architecture with freshly initialised weights (the "random tower" baseline;
    seeded by torch's generator). A spec of a kind no tower loader takes raises ``ModelSpecError`` naming it.
    ``timm_low_level=True`` (``timm:`` specs only, else ValueError) gives a timm tower its stride-8 ``low`` map.
    """
    from vfmkit.models.spec import parse_model_spec

    ms = parse_model_spec(spec).require("efficientnet-lite0", "openclip", "timm", "path", what="tower")
    if timm_low_level and ms.kind != "timm":
        raise ValueError(f"tower {spec!r}: timm_low_level applies to timm: towers only")
    if ms.kind == "efficientnet-lite0":
        tower: SpatialTower = Lite0Tower(spec, pretrained=not reinit, image_size=ms.size or image_size)
        return tower
    if ms.kind == "openclip":
        tower = OpenClipTower(spec, ms.name, ms.source)
    elif ms.kind == "timm":
        tower = TimmTower(spec, ms.name, None if ms.source == "random" else ms.source, timm_low_level)
    elif (Path(ms.name) / "open_clip_config.json").is_file():  # a CLIP run folder: its image tower
        tower = OpenClipTower(spec, f"local-dir:{ms.name}", None)
    else:
        tower = load_dense_model(ms.name).tower
    if reinit:
        reinit_weights(tower)
    return tower


def seg_tower_spec(model: str, pretrained: str | None = None) -> str:
    """The tower spec of a CLIP model as ``vfmkit eval`` names it: a run folder (or ``local-dir:DIR``) as itself,
    an open_clip name (+ weights) as ``openclip:NAME[:WEIGHTS]``."""
    folder = model.removeprefix("local-dir:")
    if pretrained is None and (Path(folder) / "open_clip_config.json").is_file():
        return folder
    return f"openclip:{model}" + (f":{pretrained}" if pretrained else "")


@torch.no_grad()
def calibrate_batchnorm(module: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to their average over ``batches`` (then eval mode).

    A freshly initialised tower's BN layers hold mean 0 / var 1, which is not what its activations have, so in
    eval mode its features degenerate; with the statistics of real images it is a fair random-feature baseline.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    module.train()
    for x in batches:
        module(x)
    module.eval()
    for m in bns:
        m.momentum = 0.1
    return module


def reinit_weights(module: nn.Module) -> nn.Module:
    """Re-initialise every submodule that has ``reset_parameters`` (convs, linears, norms): a random tower."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


# ------------------------------------------------------------------------------------------------ heads


class DenseHead(nn.Module):
    """Per-pixel head on a tower's maps. ``kind="linear"``: one 1x1 conv on ``out`` (a linear probe per pixel).
    ``kind="aspp"``: torchvision's DeepLabV3 ``ASPP`` (rates ``rates``, ``width`` channels) + 3x3 conv + BN + ReLU,
    upsampled to the stride-8 map and fused with a 48-ch projection of ``low`` when ``low_channels`` is given."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kind: str = "linear",
        width: int = 128,
        low_channels: int | None = None,
        rates: Sequence[int] = (2, 4, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if kind not in ("linear", "aspp"):
            raise ValueError(f"head kind must be 'linear' or 'aspp', got {kind!r}")
        self.kind = kind
        if kind == "linear":
            # Standardise each channel (BN without affine, as DINOv2's linear probes do), then one 1x1 conv:
            # still a linear map per pixel, but well conditioned whatever the tower's feature scale.
            self.classifier = nn.Sequential(
                nn.BatchNorm2d(in_channels, affine=False), nn.Conv2d(in_channels, out_channels, 1)
            )
            return
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.aspp = ASPP(in_channels, list(rates), width)
        self.low = None
        fuse_in = width
        if low_channels:
            self.low = nn.Sequential(
                nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU()
            )
            fuse_in += 48
        self.fuse = nn.Sequential(
            nn.Conv2d(fuse_in, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        x = feats["out"]
        if self.kind == "linear":
            return self.classifier(x)
        x = self.aspp(x)
        low = feats.get("low")
        if self.low is not None and low is not None:
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, self.low(low)], dim=1)
        return self.classifier(self.fuse(x))


class SegModel(nn.Module):
    """Tower + head. ``finetune=False`` freezes the tower (eval mode, no gradients: a probe).

    ``forward(images) -> logits [B, K, H, W]`` at the input size (bilinear upsampling of the head's output);
    ``forward(feats_dict, size)`` runs only the head on precomputed tower maps (cached-feature probes).
    """

    def __init__(self, tower: SpatialTower, head: DenseHead, finetune: bool = False) -> None:
        super().__init__()
        self.tower, self.head, self.finetune = tower, head, bool(finetune)
        if not self.finetune:
            for p in self.tower.parameters():
                p.requires_grad_(False)
            self.tower.eval()

    def train(self, mode: bool = True) -> SegModel:
        super().train(mode)
        if not self.finetune:
            self.tower.eval()  # frozen BN statistics stay frozen
        return self

    def forward_features(self, feats: dict[str, Tensor], size: Sequence[int]) -> Tensor:
        return F.interpolate(self.head(feats), size=list(size), mode="bilinear", align_corners=False)

    def forward(self, images: Tensor | dict[str, Tensor], size: Sequence[int] | None = None) -> Tensor:
        if isinstance(images, dict):  # precomputed tower maps (a cached-feature probe), output at ``size``
            return self.forward_features({k: v.float() for k, v in images.items()}, size)
        if self.finetune:
            feats = self.tower(images)
        else:
            with torch.no_grad():
                feats = self.tower(images)
        return self.forward_features(feats, images.shape[-2:])


def build_seg_model(
    tower: str | SpatialTower,
    num_classes: int,
    head: str = "linear",
    finetune: bool = False,
    width: int = 128,
    low_level: bool = True,
    image_size: int = 240,
    reinit: bool = False,
    timm_low_level: bool = False,
) -> SegModel:
    """Tower (a spec or a built :class:`SpatialTower`) + head; ``low_level`` fuses the tower's stride-8 map into
    an ``aspp`` head when the tower has one; ``timm_low_level`` gives a ``timm:`` spec's tower that map."""
    t = load_tower(tower, image_size, reinit, timm_low_level) if isinstance(tower, str) else tower
    low = t.low_channels if (low_level and head == "aspp") else None
    return SegModel(t, DenseHead(t.channels, num_classes, head, width, low), finetune)


DENSE_META = "dense.json"


def load_dense_model(run_dir: str | Path) -> SegModel:
    """A trained segmentation model from a ``seg`` run directory (``dense.json`` + ``model.safetensors``).

    ``dense.json`` holds what rebuilds the model (``tower``, ``head``, ``num_classes``, ``width``, ``low_level``,
    ``image_size``, ``timm_low_level``: absent in runs saved before it existed, i.e. off) and the data's
    ``classes``/``void``; the weights are loaded strictly, weights only.
    """
    from safetensors.torch import load_file

    d = Path(run_dir)
    meta_path, weights = d / DENSE_META, d / "model.safetensors"
    for p in (meta_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"dense run {str(d)!r}: no {p.name}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    # reinit: the weights all come from the checkpoint (no need to load ImageNet's or a CLIP run's first)
    tower = load_tower(
        meta["tower"],
        int(meta.get("image_size", 240)),
        reinit=True,
        timm_low_level=bool(meta.get("timm_low_level", False)),
    )
    model = build_seg_model(
        tower,
        int(meta["num_classes"]),
        meta["head"],
        bool(meta.get("finetune", False)),
        int(meta.get("width", 128)),
        bool(meta.get("low_level", True)),
    )
    sd = load_file(str(weights))
    model.load_state_dict(sd, strict=True)
    model.tower.spec = str(d)
    model.meta = meta
    return model.eval()


# ------------------------------------------------------------------------------------------------ losses, metrics


def seg_loss(logits: Tensor, mask: Tensor, void: int | None) -> Tensor:
    """Per-pixel cross-entropy with the void label ignored."""
    return F.cross_entropy(logits.float(), mask.long(), ignore_index=-100 if void is None else int(void))


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, void: int | None = None) -> Tensor:
    """``[K, K]`` int64 counts, rows = ground truth, columns = prediction; pixels labelled ``void`` (or any id
    outside ``0..K-1``) are ignored."""
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = (t >= 0) & (t < num_classes)
    if void is not None:
        keep &= t != void
    t, p = t[keep], p[keep].clamp(0, num_classes - 1)
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(
        num_classes, num_classes
    )


def seg_metrics(cm: Tensor, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """``mIoU``, ``pixel_acc``, ``mean_acc`` (percent) and ``iou/<class>`` from a confusion matrix.

    IoU_k = TP / (TP + FP + FN); a class with no ground-truth and no predicted pixel has no IoU (NaN, reported as
    such) and is left out of the mean.
    """
    cm = cm.double()
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc_k = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    valid = ~torch.isnan(iou)
    total = cm.sum()
    out = {
        "mIoU": float(iou[valid].mean() * 100) if valid.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total * 100) if total > 0 else float("nan"),
        "mean_acc": float(acc_k[~torch.isnan(acc_k)].mean() * 100)
        if (~torch.isnan(acc_k)).any()
        else float("nan"),
    }
    names = list(class_names) if class_names is not None else [str(i) for i in range(cm.shape[0])]
    for k, name in enumerate(names):
        out[f"iou/{name}"] = float(iou[k] * 100)
    return out


def mask_iou(pred: Tensor, target: Tensor) -> dict[str, Any]:
    """IoU (percent) of binary masks ``pred`` / ``target`` ``[N, H, W]`` (or ``[H, W]``; nonzero = foreground).

    ``per_image``: IoU_i = |p_i & t_i| / |p_i | t_i| (NaN where both are empty); ``mean``: over the images with a
    non-empty union (``n_images`` of them, ``n_empty`` left out, as :func:`seg_metrics` leaves out absent
    classes); ``pooled``: all pixels of all images as one mask (sum of intersections / sum of unions).
    """
    if pred.shape != target.shape:
        raise ValueError(f"mask_iou: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = pred.bool().reshape(-1, *pred.shape[-2:]) if pred.ndim >= 2 else pred.bool()
    t = target.bool().reshape(p.shape)
    inter = (p & t).flatten(1).sum(1).double()
    union = (p | t).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    valid = union > 0
    return {
        "mean": float(iou[valid].mean() * 100) if valid.any() else float("nan"),
        "pooled": float(inter.sum() / union.sum() * 100) if union.sum() > 0 else float("nan"),
        "n_images": int(valid.sum()),
        "n_empty": int((~valid).sum()),
        "per_image": [float(v * 100) for v in iou],
    }


def depth_metrics(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> dict[str, float]:
    """RMSE, AbsRel = mean(|p - t| / t) and delta1 = % of pixels with max(p/t, t/p) < 1.25, over pixels where
    ``valid`` (default: ``target > 0``)."""
    p, t = pred.reshape(-1).double(), target.reshape(-1).double()
    m = (t > 0) if valid is None else valid.reshape(-1).bool() & (t > 0)
    p, t = p[m], t[m]
    if t.numel() == 0:
        raise ValueError("depth_metrics: no valid pixel")
    ratio = torch.maximum(p / t, t / p.clamp(min=1e-12))
    return {
        "rmse": float(((p - t) ** 2).mean().sqrt()),
        "absrel": float(((p - t).abs() / t).mean()),
        "delta1": float((ratio < 1.25).double().mean() * 100),
    }


def depth_loss(log_depth: Tensor, target: Tensor, lam: float = 0.5) -> Tensor:
    """Scale-invariant log loss (Eigen et al.) between a head's log-depth ``[B, 1, H, W]`` and depth ``> 0``."""
    lt = target.float().clamp(min=1e-6).log()
    m = target > 0
    d = (log_depth.squeeze(1).float() - lt)[m.squeeze(1) if m.ndim == 4 else m]
    return (d**2).mean() - lam * d.mean() ** 2


# ------------------------------------------------------------------------------------------------ running


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    batches: Iterable[dict],
    num_classes: int,
    void: int | None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Score ``model(images) -> logits`` on ``{"image", "mask"}`` batches; logits are resized to the mask size."""
    was = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    n = 0
    for b in batches:
        logits = model(b["image"].to(device))
        mask = b["mask"]
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
        cm += confusion_matrix(logits.argmax(1).cpu(), mask, num_classes, void)
        n += int(mask.shape[0])
    model.train(was)
    return {**seg_metrics(cm, class_names), "n_images": n}


@torch.no_grad()
def extract_features(
    tower: SpatialTower,
    batches: Iterable[dict],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
) -> dict[str, Tensor]:
    """Run a frozen tower once over ``{"image", "mask"}`` batches: ``{"out", ["low"], "mask" (uint8)}``.

    Maps are stored as ``dtype`` (half by default: they are inputs to a probe, and halve the memory).
    """
    tower.eval().to(device)
    outs: dict[str, list[Tensor]] = {}
    for b in batches:
        f = tower(b["image"].to(device))
        for k, v in f.items():
            if v is not None:
                outs.setdefault(k, []).append(v.to(dtype).cpu())
        outs.setdefault("mask", []).append(b["mask"].to(torch.uint8))
    return {k: torch.cat(v) for k, v in outs.items()}


def meta_of(model: Any) -> dict:
    return dict(getattr(model, "meta", {}) or {})
