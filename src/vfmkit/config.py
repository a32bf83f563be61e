"""Typed run configs: YAML recipes + dotted overrides, strict about unknown keys.

Values given with ``--set a.b=value`` are parsed with ``yaml.safe_load`` (never ``eval``), so
``--set optim.lr=1e-3`` gives a float and ``--set train.compile=true`` a bool.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the offending dotted key or file."""


@dataclass
class ModelConfig:
    name: str = "vfm-tiny-vit"
    pretrained: str | None = None
    # Extra keyword arguments forwarded to the model factory (e.g. {"num_classes": 10}).
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    train: str = "builtin:flickr8k/train"
    val: str | None = None
    batch_size: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    on_corrupt: str = "skip"  # "skip" or "raise"
    image_size: int | None = None  # None: the model's own size


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-6
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    schedule: str = "cosine"  # "cosine" or "constant"


@dataclass
class TrainConfig:
    steps: int = 100
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16"
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    channels_last: bool = False
    compile: bool = False
    parallel: str = "ddp"  # "ddp" or "fsdp2"
    ckpt_every: int = 0  # 0: only at the end
    keep_ckpts: int = 2
    log_every: int = 10
    eval_every: int = 0
    progress: bool = True
    tensorboard: bool = True
    resume: bool = True  # resume from out_dir/checkpoints/latest if present
    # Loss settings (local_loss, gather_with_grad) are method args of the methods that use them (clip, mobileclip).


@dataclass
class RunConfig:
    method: str = "clip"
    seed: int = 0
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_args: dict = field(default_factory=dict)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Coerce/validate ``value`` against annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def parse_section(cls: type, d: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from mapping ``d``; unknown keys raise ConfigError with the dotted key."""
    if d is None:
        d = {}
    if dataclasses.is_dataclass(d):
        d = dataclasses.asdict(d)
    if not isinstance(d, dict):
        raise ConfigError(f"config key '{prefix or cls.__name__}': expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = [n for n in names if n.replace("_", "") == str(k).replace("_", "").lower()]
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(names))})"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[k] = _check_type(v, hints[k], key)
    return cls(**kwargs)


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override '{o}' must look like key.sub=value")
        k, v = o.split("=", 1)
        try:
            value = yaml.safe_load(v) if v != "" else None
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"override '{o}': the value of '{k.strip()}' is not valid YAML ({msg})") from e
        out.append((k.strip(), value))
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def load_config(src: str | Path | dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Recipe (a YAML path, a builtin recipe name, or a dict) + dotted overrides -> RunConfig."""
    if src is None:
        data: dict = {}
    elif isinstance(src, dict):
        data = yaml.safe_load(yaml.safe_dump(src))  # deep copy
    else:
        p = Path(src)
        if not p.exists() and not str(src).endswith((".yaml", ".yml")):
            p = Path(__file__).parent / "recipes" / f"{src}.yaml"
            if not p.is_file():
                known = ", ".join(sorted(q.stem for q in p.parent.glob("*.yaml")))
                raise ConfigError(
                    f"recipe {str(src)!r} is neither a YAML file nor a builtin recipe (known: {known})"
                )
        data = load_yaml(p)
    for k, v in parse_overrides(overrides):
        set_dotted(data, k, v)
    return validate(parse_section(RunConfig, data))


# Value rules checked before anything is built: (dotted key, test, what a valid value is).
_CHOICES = {
    "data.on_corrupt": ("skip", "raise"),
    "optim.schedule": ("cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.parallel": ("ddp", "fsdp2"),
}
_RANGES: list[tuple[str, Any, str]] = [
    ("data.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.num_workers", lambda v: v >= 0, "an integer >= 0 (0: load in the training process)"),
    ("data.shuffle_buffer", lambda v: v >= 0, "an integer >= 0"),
    ("data.image_size", lambda v: v is None or v >= 1, "an integer >= 1, or null for the model's own size"),
    ("optim.lr", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("optim.weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("optim.beta1", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optim.beta2", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("optim.eps", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("optim.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("train.steps", lambda v: v >= 1, "an integer >= 1 (the number of optimizer steps)"),
    ("train.grad_accum", lambda v: v >= 1, "an integer >= 1 (micro-batches per optimizer step)"),
    ("train.grad_clip", lambda v: v is None or (math.isfinite(v) and v >= 0), "a number >= 0, or null (off)"),
    ("train.ema_decay", lambda v: v is None or 0 <= v < 1, "a number in [0, 1), or null (off)"),
    ("train.ckpt_every", lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
    ("train.keep_ckpts", lambda v: v >= 1, "an integer >= 1"),
    ("train.log_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.eval_every", lambda v: v >= 0, "an integer >= 0 (0: only at the end)"),
]
_HINTS = {"train.precision": {"fp16": " (fp16 needs a loss scaler vfmkit does not have: use bf16)"}}


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value's range or choice (names the dotted key); returns ``cfg``. Runs inside ``load_config``,
    so a value that cannot work is refused before any model, loader or output folder is made."""

    def get(key: str) -> Any:
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, choices in _CHOICES.items():
        v = get(key)
        if v not in choices:
            hint = _HINTS.get(key, {}).get(v, "")
            raise ConfigError(f"config key '{key}': {v!r} is not one of {', '.join(choices)}{hint}")
    for key, ok, what in _RANGES:
        v = get(key)
        if not ok(v):
            raise ConfigError(f"config key '{key}': {v!r} is out of range; it must be {what}")
    if not cfg.model.name:
        raise ConfigError("config key 'model.name': empty; name a model (e.g. vfm-tiny-vit)")
    if not cfg.method:
        raise ConfigError("config key 'method': empty; name a registered method (e.g. clip)")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def derive(cfg: RunConfig, updates: dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A new validated RunConfig: ``cfg`` with ``updates`` (a nested dict, merged section by section) and dotted
    ``overrides`` applied. ``cfg`` itself is never changed (a validated config is not edited in place)."""
    return load_config(_merge(to_dict(cfg), updates or {}), overrides)
