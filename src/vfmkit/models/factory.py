"""One factory for every model vfmkit trains: open_clip CLIP/CoCa by name, timm classifiers by name.

vfmkit's own tiny configs (``models/configs/*.json``) are registered with open_clip, so tests and the
demo go through exactly the same open_clip code path as ``MobileCLIP2-S0`` or ``ViT-B-16``.

``create_clip``'s ``name`` (a recipe's ``model.name``) takes what open_clip takes, plus a timm tower:

- an open_clip name (``open_clip.list_models()``, the ``vfm-tiny-*`` configs included);
- ``local-dir:DIR`` (or a bare ``DIR``) holding ``open_clip_config.json``: a vfmkit CLIP run, or any open_clip
  export; its weights load unless ``pretrained`` names others;
- ``hf-hub:ORG/REPO``: open_clip's Hugging Face loader (needs the network or a warm HF cache);
- a model-config JSON file (open_clip's ``{"embed_dim", "vision_cfg", "text_cfg"}``, or an
  ``open_clip_config.json`` with ``model_cfg``);
- ``timm:NAME`` (``timm:NAME:pretrained`` for timm's hub weights): that timm image tower with a text tower from
  ``kwargs["text_cfg"]`` (a dict, or an open_clip model name whose text tower to take; default
  ``vfm-tiny-vit``'s); ``embed_dim`` (default 128), ``timm_pool``, ``timm_proj`` may be given in ``kwargs`` too.

Every CLIP run writes ``open_clip_config.json`` beside its final ``model.safetensors``
(:func:`write_open_clip_files`), so ``open_clip.create_model_and_transforms("local-dir:RUN")`` opens it as it is.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
OPEN_CLIP_CONFIG = "open_clip_config.json"
_registered = False
_dynamic_dir: Path | None = None
# create_model arguments that are not model-config keys (everything else in kwargs overrides the config)
_CREATE_ARGS = {
    "precision",
    "jit",
    "force_quick_gelu",
    "force_custom_text",
    "force_patch_dropout",
    "force_preprocess_cfg",
    "force_context_length",
    "pretrained_image",
    "pretrained_text",
    "cache_dir",
    "output_dict",
    "require_pretrained",
    "load_weights",
}


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
    # what open_clip needs to rebuild this model (``open_clip_config.json``): the full model config and the
    # preprocess config; None when unknown (an hf-hub model whose config could not be read back)
    model_cfg: dict | None = None
    preprocess_cfg: dict = field(default_factory=dict)


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


class ModelNameError(ValueError):
    """A ``model.name`` that names no model; the message lists every reading that was tried."""


def _register_cfg(model_cfg: dict) -> str:
    """Register a model-config dict with open_clip (its public ``add_model_config``) under a content-hash name."""
    import open_clip

    global _dynamic_dir
    key = "vfmkit-cfg-" + hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:16]
    if key not in open_clip.list_models():
        if _dynamic_dir is None:
            _dynamic_dir = Path(tempfile.mkdtemp(prefix="vfmkit-open_clip-configs-"))
        f = _dynamic_dir / f"{key}.json"
        f.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(f)
    return key


def _read_json_cfg(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from an open_clip model-config JSON or an ``open_clip_config.json``."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelNameError(f"model config {str(path)!r} is not readable JSON: {e}") from e
    pp = {}
    if isinstance(d, dict) and isinstance(d.get("model_cfg"), dict):
        d, pp = d["model_cfg"], d.get("preprocess_cfg") or {}
    if not isinstance(d, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= d.keys():
        raise ModelNameError(
            f"model config {str(path)!r} needs embed_dim, vision_cfg and text_cfg (open_clip's model config "
            "layout), or model_cfg holding them (open_clip_config.json)"
        )
    return d, pp


def _timm_tower_cfg(name: str, source: str | None, kwargs: dict) -> dict:
    import open_clip
    import timm

    if not timm.is_model(name.partition(".")[0]):
        raise ModelNameError(f"model name 'timm:{name}': {name!r} is not a timm model (timm.list_models())")
    if source not in (None, "pretrained", "random"):
        raise ModelNameError(
            f"model name 'timm:{name}:{source}': the timm tower source is pretrained or random"
        )
    text = kwargs.pop("text_cfg", "vfm-tiny-vit")
    if isinstance(text, str):
        base = open_clip.get_model_config(text)
        if base is None:
            raise ModelNameError(
                f"model name 'timm:{name}': text_cfg {text!r} is not an open_clip model name"
            )
        text = base["text_cfg"]
    if not isinstance(text, dict):
        raise ModelNameError(f"model name 'timm:{name}': text_cfg must be a dict or an open_clip model name")
    vision = {
        "timm_model_name": name,
        "timm_model_pretrained": source == "pretrained",
        "timm_pool": kwargs.pop("timm_pool", "avg"),
        "timm_proj": kwargs.pop("timm_proj", "linear"),
        "image_size": int(kwargs.pop("image_size", 224)),
    }
    return {"embed_dim": int(kwargs.pop("embed_dim", 128)), "vision_cfg": vision, "text_cfg": dict(text)}


def resolve_clip_name(name: str, kwargs: dict) -> tuple[str, dict | None, dict]:
    """``name`` -> (the name open_clip is called with, the model config or None, a preprocess config).

    Readings, in order: ``local-dir:DIR`` / a directory with ``open_clip_config.json``; ``hf-hub:REPO``; a JSON
    config file; ``timm:NAME[:pretrained]`` (pops its keys from ``kwargs``); an open_clip name. None fits:
    :class:`ModelNameError` listing what was tried."""
    import open_clip

    register_tiny_configs()
    name = str(name)
    tried = []
    if name.startswith("local-dir:") or Path(name).expanduser().is_dir():
        d = Path(name.removeprefix("local-dir:")).expanduser()
        f = d / OPEN_CLIP_CONFIG
        if f.is_file():
            model_cfg, pp = _read_json_cfg(f)
            return f"local-dir:{d}", model_cfg, pp
        raise ModelNameError(
            f"model name {name!r}: {str(d)!r} is "
            + ("a directory without " if d.is_dir() else "not a directory with ")
            + f"{OPEN_CLIP_CONFIG} (a vfmkit CLIP run writes one beside model.safetensors; older runs: "
            "vfmkit.models.factory.write_open_clip_files)"
        )
    tried.append("local-dir:DIR / a directory with open_clip_config.json (no such directory)")
    if name.startswith("hf-hub:"):  # open_clip fetches it (and its config, read back by create_clip)
        return name, None, {}
    tried.append("hf-hub:REPO (no hf-hub: prefix)")
    if name.endswith(".json"):
        p = Path(name).expanduser()
        if not p.is_file():
            raise ModelNameError(f"model name {name!r}: config JSON file not found")
        model_cfg, pp = _read_json_cfg(p)
        return _register_cfg(model_cfg), model_cfg, pp
    tried.append("a model-config .json file (not a .json path)")
    if name.startswith("timm:"):
        from vfmkit.models.spec import parse_model_spec

        ms = parse_model_spec(name)
        model_cfg = _timm_tower_cfg(ms.name, ms.source, kwargs)
        if ms.size:
            model_cfg["vision_cfg"]["image_size"] = ms.size
        return _register_cfg(model_cfg), model_cfg, {}
    tried.append("timm:NAME (no timm: prefix)")
    if name in open_clip.list_models():
        return name, open_clip.get_model_config(name), {}
    tried.append("an open_clip model name (not in open_clip.list_models(), vfm-tiny-* included)")
    raise ModelNameError(f"unknown model name {name!r}; tried: " + "; ".join(tried))


def create_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    **kwargs: Any,
) -> ClipBundle:
    """Create an open_clip model (CLIP, CustomTextCLIP or CoCa) with its transforms and tokenizer.

    ``name`` is read by :func:`resolve_clip_name` (see the module docstring); ``pretrained`` is an open_clip tag,
    a weights file or a vfmkit run dir (for ``local-dir:`` / ``hf-hub:`` names it replaces the folder's weights).
    """
    import open_clip

    kwargs = dict(kwargs)
    oc_name, model_cfg, _ = resolve_clip_name(name, kwargs)
    tag, path = _resolve_pretrained(pretrained)
    schema = oc_name.startswith(("local-dir:", "hf-hub:"))
    if schema and tag:
        raise ValueError(
            f"model name {name!r} carries its own weights: pretrained {tag!r} must be a file or run dir"
        )
    model, pre_train, pre_val = open_clip.create_model_and_transforms(
        oc_name,
        pretrained=None if schema else (tag or path),
        device=device,
        force_image_size=image_size,
        weights_only=True,
        **kwargs,
    )
    if schema and path:
        model.load_state_dict(load_state_dict(path), strict=True)
    if model_cfg is None and oc_name.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download  # open_clip just fetched it: the local cache has it

        f = hf_hub_download(oc_name[len("hf-hub:") :], OPEN_CLIP_CONFIG, local_files_only=True)
        model_cfg = _read_json_cfg(Path(f))[0]
    from vfmkit.models.text_fast import enable_length_bucketing

    enable_length_bucketing(model)  # exact: the same embeddings and gradients, without the padding's compute
    tokenizer = open_clip.get_tokenizer(oc_name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pp = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    if model_cfg is not None:  # the config the model was built from, as open_clip applies the overrides
        model_cfg = copy.deepcopy(model_cfg)
        if image_size is not None:
            model_cfg["vision_cfg"]["image_size"] = image_size
        model_cfg.update({k: v for k, v in kwargs.items() if k not in _CREATE_ARGS})
        if "timm_model_name" in model_cfg.get("vision_cfg", {}):
            model_cfg["vision_cfg"]["timm_model_pretrained"] = False  # the run's weights replace the hub's
    return ClipBundle(model, pre_train, pre_val, tokenizer, int(size), mean, std, model_cfg, pp)


def write_open_clip_files(bundle: ClipBundle, out_dir: str | Path) -> list[Path]:
    """``open_clip_config.json`` (model + preprocess config) in ``out_dir``, plus the tokenizer files of an HF
    tokenizer, so ``open_clip.create_model_and_transforms("local-dir:OUT")`` and ``get_tokenizer`` rebuild the
    model, its transforms and its tokenizer from the folder (weights: ``model.safetensors`` beside it)."""
    from vfmkit.data.io import atomic_write_json

    if bundle.model_cfg is None:
        raise ValueError("this model's open_clip config is unknown (an hf-hub model read offline)")
    out = Path(out_dir)
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in bundle.preprocess_cfg.items()}
    written = [out / OPEN_CLIP_CONFIG]
    atomic_write_json(written[0], {"model_cfg": bundle.model_cfg, "preprocess_cfg": pp})
    hf_tok = getattr(bundle.tokenizer, "tokenizer", None)
    if bundle.model_cfg.get("text_cfg", {}).get("hf_tokenizer_name") and hasattr(hf_tok, "save_pretrained"):
        written += [Path(f) for f in hf_tok.save_pretrained(str(out))]
    return written


def create_classifier(
    name: str, num_classes: int, pretrained: str | bool | None = None, **kwargs: Any
) -> torch.nn.Module:
    """A timm classifier. ``pretrained`` is True or ``"pretrained"`` (timm's default hub weights), a local file,
    a timm pretrained tag (``augreg_in21k``: ``NAME.augreg_in21k`` from the hub or its cache), or None."""
    import timm

    if isinstance(pretrained, str) and pretrained and pretrained != "pretrained":
        p = Path(pretrained)
        if p.is_file():
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
            model.load_state_dict(load_state_dict(p))
            return model
        if p.suffix in (".safetensors", ".pt", ".pth", ".bin") or "/" in pretrained:
            raise FileNotFoundError(f"pretrained checkpoint not found: {p}")
        tagged = f"{name.partition('.')[0]}.{pretrained}"
        try:
            return timm.create_model(tagged, pretrained=True, num_classes=num_classes, **kwargs)
        except Exception as e:  # noqa: BLE001  unknown tag or no network: say both readings that were tried
            raise FileNotFoundError(
                f"pretrained {pretrained!r} for timm model {name!r}: not a file, and timm tag {tagged!r} did not "
                f"load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
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
