"""Zero-shot semantic segmentation from text: per-location cosine between dense image features and the text
embeddings of the class names (SAM-CLIP's zero-shot segmentation from its CLIP head, arXiv:2310.15308).

- :func:`class_text_embeddings` embeds every class name through prompt templates (``"a photo of a {}."``, ...),
  averages the L2-normalised template embeddings per class and normalises again (CLIP's prompt ensembling).
- :func:`zeroshot_segment` scores a dense feature map ``[B, D, h, w]`` against ``[K, D]`` class embeddings
  (cosine per location), upsamples the scores bilinearly to the wanted size and takes the argmax.
- :func:`evaluate_zeroshot_seg` runs it over ``{"image", "mask"}`` batches and scores with
  :func:`vfmkit.eval.dense.seg_metrics` (void ignored); :func:`majority_baseline` is the mIoU of predicting the
  most frequent class everywhere.
- :func:`teacher_dense_features` is the same read from teacher A itself: its per-location image head on the
  EfficientNet-Lite0 head-conv map (the offline teacher pools then projects linearly, so this is exactly its
  embedding before pooling) - the baseline the merged model is compared with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vfmkit.eval.dense import confusion_matrix, seg_metrics

__all__ = [
    "TEMPLATES",
    "class_text_embeddings",
    "zeroshot_scores",
    "zeroshot_segment",
    "evaluate_zeroshot_seg",
    "majority_baseline",
    "teacher_dense_features",
]

TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a street scene with a {}.",
    "there is a {} in the scene.",
    "a {}.",
)


@torch.no_grad()
def class_text_embeddings(
    encode_text: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = TEMPLATES,
) -> Tensor:
    """``[K, D]`` L2-normalised: per class, the normalised mean of its normalised template embeddings."""
    if not class_names or not templates:
        raise ValueError("zero-shot segmentation needs class names and at least one template")
    texts = [t.format(c) for c in class_names for t in templates]
    emb = F.normalize(encode_text(texts).float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def zeroshot_scores(dense: Tensor, text_emb: Tensor) -> Tensor:
    """Dense features ``[B, D, h, w]``, class embeddings ``[K, D]`` -> cosine ``[B, K, h, w]``."""
    return torch.einsum(
        "bdhw,kd->bkhw", F.normalize(dense.float(), dim=1), F.normalize(text_emb.float(), dim=-1)
    )


def zeroshot_segment(dense: Tensor, text_emb: Tensor, size: Sequence[int] | None = None) -> Tensor:
    """Class ids ``[B, H, W]``: argmax of the per-location cosine, upsampled (bilinear) to ``size`` first."""
    s = zeroshot_scores(dense, text_emb)
    if size is not None and tuple(s.shape[-2:]) != tuple(size):
        s = F.interpolate(s, size=list(size), mode="bilinear", align_corners=False)
    return s.argmax(1)


@torch.no_grad()
def evaluate_zeroshot_seg(
    dense_fn: Callable[[Tensor], Tensor],
    batches: Iterable[dict],
    text_emb: Tensor,
    num_classes: int,
    void: int | None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """mIoU (etc.) of :func:`zeroshot_segment` on ``dense_fn(images)`` against the batches' masks."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    n = 0
    for b in batches:
        pred = zeroshot_segment(dense_fn(b["image"]).cpu(), text_emb.cpu(), b["mask"].shape[-2:])
        cm += confusion_matrix(pred, b["mask"], num_classes, void)
        n += int(b["mask"].shape[0])
    return {**seg_metrics(cm, class_names), "n_images": n}


def majority_baseline(
    train_masks: Iterable[Tensor], val_masks: Iterable[Tensor], num_classes: int, void: int | None
) -> dict:
    """Predict the most frequent (non-void) train class at every val pixel."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for m in train_masks:
        m = m.reshape(-1).long()
        m = m[(m >= 0) & (m < num_classes)]
        counts += torch.bincount(m, minlength=num_classes)
    top = int(counts.argmax())
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for m in val_masks:
        cm += confusion_matrix(torch.full_like(m, top), m, num_classes, void)
    return {**seg_metrics(cm), "class": top}


def teacher_dense_features(teacher_a) -> Callable[[Tensor], Tensor]:
    """``images -> [B, D, h, w]``: the offline teacher A's image head applied at every location of its
    EfficientNet-Lite0 head-conv map (the images are only normalised, not resized, so the map keeps the
    image's aspect). Raises for a teacher without that structure."""
    heads = getattr(teacher_a, "heads", None)
    net = getattr(teacher_a, "image_model", None)
    if heads is None or net is None or not hasattr(net, "extract_features"):
        raise ValueError(
            f"teacher {getattr(teacher_a, 'name', teacher_a)!r} has no dense image features here"
        )

    @torch.no_grad()
    def fn(images: Tensor) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x.to(teacher_a.mean.device) - teacher_a.mean) / teacher_a.std
        f = net.extract_features(x)  # [B, 1280, h, w]
        return heads.image_head(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    return fn
