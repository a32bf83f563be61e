"""vfmkit: train small, fast vision and vision-language models by transferring knowledge from big ones.

The Python API (each function imports what it needs when called, so ``import vfmkit`` stays cheap)::

    import vfmkit

    res = vfmkit.train("clip_tiny", "train.steps=20", out_dir="runs/api")   # any recipe, the one engine
    bundle = vfmkit.load_model(res.out_dir)              # open_clip model + transforms + tokenizer
    print(vfmkit.evaluate(bundle, tasks=["retrieval"]))  # {"retrieval/i2t_R@1": ..., ...}

``train`` is ``load_config`` + ``vfmkit.methods.registry.run`` (what ``vfmkit train`` calls); ``evaluate`` is
``vfmkit eval``; ``reinforce`` is ``vfmkit reinforce``; ``load_model`` takes every model name ``model.name``
takes (open_clip names, ``local-dir:``/run directories, ``hf-hub:``, config JSON files, ``timm:NAME`` towers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "reinforce", "load_model", "load_config", "derive", "export"]


def load_config(src: Any = None, overrides: Sequence[str] | None = None):
    """A validated ``RunConfig`` from a builtin recipe name, a YAML path or a dict, plus dotted overrides."""
    from vfmkit.config import load_config as _load

    return _load(src, list(overrides or []))


def derive(cfg, updates: dict | None = None, overrides: Sequence[str] | None = None):
    """A new validated ``RunConfig``: ``cfg`` with nested ``updates`` and dotted ``overrides`` (``cfg`` unchanged)."""
    from vfmkit.config import derive as _derive

    return _derive(cfg, updates, list(overrides or []))


def train(recipe: Any, *overrides: str, out_dir: str | Path | None = None, eval_fn=None, **train_kwargs: Any):
    """Train ``recipe`` (a builtin recipe name, a YAML path, a dict or a ``RunConfig``) with dotted ``overrides``
    (``"train.steps=20"``) through the one engine -> ``TrainResult(step, out_dir, history, final_logs, ...)``.

    ``out_dir`` replaces the recipe's; ``eval_fn(model, step) -> dict`` replaces the method's evaluation;
    ``train_kwargs`` go to ``vfmkit.engine.train`` (``stop_after=``, ...). A finished run is not retrained."""
    from vfmkit.config import RunConfig
    from vfmkit.methods.registry import run

    updates = {"out_dir": str(out_dir)} if out_dir is not None else None
    if isinstance(recipe, RunConfig):
        cfg = derive(recipe, updates, overrides)
    else:
        cfg = derive(load_config(recipe, overrides), updates) if updates else load_config(recipe, overrides)
    return run(cfg, eval_fn, **train_kwargs)


def load_model(
    name: str | Path,
    pretrained: str | None = None,
    *,
    image_size: int | None = None,
    device: str = "cpu",
    **kwargs: Any,
):
    """A CLIP model as ``ClipBundle(model, preprocess_train, preprocess_val, tokenizer, image_size, mean, std,
    model_cfg, preprocess_cfg)``. ``name``: a vfmkit run directory (or ``local-dir:DIR``), an open_clip name,
    ``hf-hub:REPO``, a model-config JSON, ``timm:NAME``; ``pretrained``: an open_clip tag or a weights file (for a
    run directory: other weights than its ``model.safetensors``, e.g. a checkpoint or open_clip_train's
    ``epoch_N.pt``)."""
    from vfmkit.models.factory import create_clip

    return create_clip(str(name), pretrained, device=device, image_size=image_size, **kwargs)


def evaluate(
    model: Any,
    pretrained: str | None = None,
    *,
    tasks: Sequence[str] = ("zeroshot", "retrieval", "probe"),
    retrieval_data: str = "builtin:flickr8k/heldout",
    zeroshot_data: str = "builtin:imagenette/val",
    probe_train: str = "builtin:imagenette/train",
    classes: str | None = None,
) -> dict[str, float]:
    """``vfmkit eval`` for a model name / run directory (loaded with :func:`load_model`) or a ``ClipBundle``:
    ``{"zeroshot/top1": ..., "retrieval/i2t_R@1": ..., "probe/top1": ...}`` (percent). Zero-shot class names come
    from the shards' json ``class`` (``classes`` names them when the shards do not; a mismatch is an error)."""
    from vfmkit.eval.clip import evaluate_clip

    bundle = load_model(model, pretrained) if isinstance(model, (str, Path)) else model
    return evaluate_clip(bundle, list(tasks), retrieval_data, zeroshot_data, probe_train, classes)


def reinforce(inputs: Any, out_dir: str | Path, *, progress: bool = False, **args: Any) -> dict:
    """``vfmkit reinforce``: reinforce shards ``inputs`` into ``out_dir`` (resumable per shard); ``args`` are
    ``vfmkit.pipelines.reinforce.ReinforceArgs`` fields (``teachers``, ``n_aug``, ``captions``, ``mode``, ...),
    unknown ones named. Returns ``{"done", "resumed", "samples", "seconds", "samples_per_s", "manifest"}``."""
    from vfmkit.config import parse_section
    from vfmkit.pipelines.reinforce import ReinforceArgs
    from vfmkit.pipelines.reinforce import reinforce as _reinforce

    return _reinforce(inputs, out_dir, parse_section(ReinforceArgs, args, "reinforce"), progress=progress)


def export(model: str | Path, out_dir: str | Path, **kwargs: Any):
    """``vfmkit export``: ONNX (and optional int8 / ExecuTorch) towers of a run or model spec -> (manifest, parity)."""
    from vfmkit.models.export import export_model

    return export_model(str(model), out_dir, **kwargs)
