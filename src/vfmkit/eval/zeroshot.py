"""Zero-shot classification with prompt templates (open_clip's builder and template lists)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vfmkit.eval.classification import classification_metrics
from vfmkit.eval.features import encode_images_labels


def class_names_from_json(path: str | Path) -> list[str]:
    """classes.json (wnid -> {imagenet_index, name}) -> names in sorted-wnid order (the label order)."""
    d = json.loads(Path(path).read_text())
    return [d[k]["name"] for k in sorted(d)]


@torch.no_grad()
def zeroshot_eval(
    model,
    tokenizer: Callable,
    preprocess: Callable,
    spec: str,
    classnames: Sequence[str],
    templates: Sequence[Callable[[str], str]] | None = None,
    device: str = "cpu",
    batch_size: int = 128,
) -> dict[str, float]:
    """Top-1/top-5 (percent), ECE and NLL of the zero-shot classifier on class-labelled shards."""
    from open_clip import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    model.eval().to(device)
    templates = templates or OPENAI_IMAGENET_TEMPLATES
    clf = build_zero_shot_classifier(
        model, tokenizer, classnames, templates, num_classes_per_batch=10, device=device, use_tqdm=False
    )  # [D, C]
    feats, labels = encode_images_labels(model.encode_image, preprocess, spec, batch_size, device)
    scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
    return classification_metrics(scale * feats @ clf.cpu(), labels)
