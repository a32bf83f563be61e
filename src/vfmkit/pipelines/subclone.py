"""Weight subcloning jobs: subclone a parent into a child (load the parent by spec, measure importance on
calibration data, cut, check the function on held-out data, save), and train a parent or a child
(method ``subclone`` through ``registry.run_job``). ``vfmkit subclone`` (commands/subclone.py) only parses flags.

A parent is a vfmkit run/subclone directory (``arch.json`` + ``model.safetensors``), a timm ViT name, an open_clip
model name (its ``visual`` or ``text`` tower), or a local transformers GPT-2 directory (``config.json``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vfmkit.config import RunConfig, derive
from vfmkit.data.samples import decode_images, normalize, read_samples
from vfmkit.methods import subclone as sc
from vfmkit.methods.registry import run_job
from vfmkit.methods.subclone import IMAGENET_MEAN, IMAGENET_STD, model_stats
from vfmkit.text.wordvocab import WordVocab


# -------------------------------------------------------------------------------------------- parents
@dataclass
class Parent:
    model: nn.Module
    kind: str  # "image" or "text"
    source: str
    image_size: int = 0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None
    vocab_file: Path | None = None


def _describe(p: Parent) -> Parent:
    m = p.model
    if p.kind == "image":
        size = getattr(getattr(m, "patch_embed", None), "img_size", None) or m.image_size
        p.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        p.mean, p.std = model_stats(m)
    return p


def load_parent(
    spec: str,
    pretrained: str | None = None,
    tower: str = "visual",
    num_classes: int | None = None,
    model_kwargs: dict | None = None,
) -> Parent:
    """Resolve a parent spec (see module docstring) into the library model plus its input pipeline."""
    p = Path(spec)
    if p.is_dir() and (p / "arch.json").is_file():
        model, arch = sc.load_model(p, pretrained)
        kind = "text" if arch["family"] in ("gpt2", "open_clip_text") else "image"
        vocab = p / "vocab.json"
        tok = None
        if vocab.is_file():
            v, ctx = WordVocab.load(vocab), arch.get("task", {}).get("context_length", 32)
            tok = lambda texts: v.encode(texts, ctx)  # noqa: E731
        return _describe(
            Parent(model, kind, str(p), tokenize=tok, vocab_file=vocab if vocab.is_file() else None)
        )
    if p.is_dir() and (p / "config.json").is_file():
        return _hf_parent(p)
    if p.is_file():
        raise sc.SubcloneError(
            f"{p} is a weights file: give the model name as PARENT and the file as --pretrained"
        )
    return _named_parent(spec, pretrained, tower, num_classes, model_kwargs or {})


def _hf_parent(p: Path) -> Parent:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(p), local_files_only=True)
    tok = None
    try:
        t = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        t.pad_token = t.pad_token or t.eos_token

        def tok(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            enc = t(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=32)
            return enc["input_ids"], enc["attention_mask"].bool()
    except (OSError, ValueError):
        pass
    return Parent(model, "text", str(p), tokenize=tok)


def _named_parent(name: str, pretrained: str | None, tower: str, num_classes: int | None, kw: dict) -> Parent:
    import open_clip
    import timm

    from vfmkit.models.factory import create_classifier, create_clip, register_tiny_configs

    register_tiny_configs()
    if name in open_clip.list_models():
        b = create_clip(name, pretrained)
        if tower == "visual":
            return _describe(Parent(b.model.visual, "image", name))
        tok = b.tokenizer
        return Parent(sc.text_tower_of(b.model), "text", name, tokenize=lambda t: (ids := tok(t), ids != 0))
    if name in timm.list_models():
        model = create_classifier(name, num_classes if num_classes is not None else 1000, pretrained, **kw)
        return _describe(Parent(model, "image", name))
    raise sc.SubcloneError(
        f"unknown parent {name!r}: not a directory with arch.json or config.json, not an "
        "open_clip model name and not a timm model name"
    )


def batches_for(parent: Parent, spec: str, n: int, batch_size: int = 32) -> list[dict]:
    """Calibration / held-out batches ``{"x", "mask"?}`` of ``n`` real samples from ``spec``."""
    samples = read_samples(spec, n if parent.kind == "image" else 0)
    if parent.kind == "image":
        x, _ = decode_images(samples, parent.image_size)
        xs = [normalize(x[i : i + batch_size], parent.mean, parent.std) for i in range(0, len(x), batch_size)]
        return [{"x": t} for t in xs]
    texts = [t for s in samples for t in s.texts][:n]
    if not texts:
        raise ValueError(f"no captions in {spec}")
    if parent.tokenize is None:
        raise sc.SubcloneError(f"no tokenizer known for text parent {parent.source}")
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = parent.tokenize(texts[i : i + batch_size])
        out.append({"x": ids, "mask": mask})
    return out


# ------------------------------------------------------------------------------------------- training
def run_training(
    cfg: RunConfig, out_dir: str | Path | None = None, data: dict | None = None, progress: bool | None = None
) -> dict:
    """Train method ``subclone`` of ``cfg`` with ``registry.run_job`` into ``out_dir`` (default ``cfg.out_dir``);
    the run dir becomes a loadable parent (arch.json, vocab.json). ``data`` (``load_task_data``'s output) may
    be given already loaded. Returns {"step", "history", "evals", "final", "model"}."""
    updates: dict[str, Any] = {"out_dir": str(out_dir or cfg.out_dir)}
    if progress is not None:
        updates["train"] = {"progress": progress}
    cfg = derive(cfg, updates)
    job, res = run_job(cfg, build_kwargs={"data": data} if data is not None else None)
    evals = [h for h in res.history if any(k.startswith("eval/") for k in h)]
    return {
        "step": res.step,
        "history": res.history,
        "evals": evals,
        "final": res.final_logs,
        "model": job.model,
    }


# ------------------------------------------------------------------------------------------- subcloning
@dataclass
class SubcloneOptions:
    parent: str
    out: str
    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    mlp_hidden: int | None = None
    scale: str = "paper"
    blocks: str = "middle"
    calib: str | None = None
    heldout: str | None = None
    n_calib: int = 256
    n_heldout: int = 256
    pretrained: str | None = None
    tower: str = "visual"
    num_classes: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    allow_random_parent: bool = False  # a named parent without weights is refused unless this is set


def subclone_parent(o: SubcloneOptions) -> dict:
    """Subclone ``o.parent`` into ``o.out`` (arch.json + model.safetensors [+ vocab.json]) -> the info record
    saved under ``arch.json["subclone"]`` plus ``plan`` (the sc.Plan)."""
    spec, weights, random_parent = sc.parent_source(o.parent, o.pretrained, o.allow_random_parent)
    parent = load_parent(spec, weights, o.tower, o.num_classes, o.model_kwargs)
    img = parent.kind == "image"
    calib = o.calib or ("builtin:imagenette/train" if img else "builtin:flickr8k/train")
    heldout = o.heldout or ("builtin:imagenette/val" if img else "builtin:flickr8k/heldout")
    torch.manual_seed(0)
    res = sc.subclone(
        parent.model,
        batches_for(parent, calib, o.n_calib),
        layers=o.layers,
        width=o.width,
        heads=o.heads,
        mlp_hidden=o.mlp_hidden,
        scale=o.scale,
        block_select=o.blocks,
    )
    check = sc.function_check(parent.model, res.model, batches_for(parent, heldout, o.n_heldout))
    info = {
        "parent": parent.source,
        "parent_weights": "random (--allow-random-parent)"
        if random_parent
        else (weights or "its own (directory)"),
        "parent_dims": vars(res.plan.parent),
        "child_dims": vars(res.plan.child),
        "blocks_kept": res.plan.blocks,
        "scale": o.scale,
        "block_select": o.blocks,
        "calib": calib,
        "n_calib": o.n_calib,
        "heldout": heldout,
        "function_check": check,
        "block_ratio": [round(float(r), 4) for r in res.importance.block_ratio],
    }
    task = sc.read_arch(o.parent).get("task") if (Path(o.parent) / "arch.json").is_file() else None
    sc.save_model(o.out, res.model, res.arch, {"subclone": info, **({"task": task} if task else {})})
    if parent.vocab_file is not None:
        shutil.copyfile(parent.vocab_file, Path(o.out) / "vocab.json")
    return {**info, "plan": res.plan}
