"""Atomic checkpoints that load without unpickling code.

Layout: ``out_dir/checkpoints/step-000123/{model.safetensors, ema.safetensors, state.pt}`` and a
``latest`` text file naming the newest complete one. A checkpoint directory is written under a
temporary name and renamed into place, so a kill at any moment leaves either the old or the new one.
``state.pt`` (optimizer, scheduler, RNG, data position, step) is read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from vfmkit.data.io import atomic_write_text


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    ema: torch.nn.Module | None = None,
    keep: int = 2,
) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:09d}"
    tmp = ckpt_root / f".tmp-step-{step:09d}-{os.getpid()}"
    for stale in ckpt_root.glob(".tmp-step-*"):  # a killed run's partial folders (the run holds OUT/.lock)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        if ema is not None:
            save_model(ema, str(tmp / "ema.safetensors"))
        torch.save(state, tmp / "state.pt")
    except BaseException:  # e.g. a full disk: the previous checkpoint and `latest` stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name)
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name <= final.name)
    for p in old[: max(0, len(old) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def trim_log(path: Path, step: int) -> None:
    """Keep the records of ``log.jsonl`` up to ``step`` (the step a run starts or resumes from), atomically: a run
    killed after its last checkpoint logged steps the resumed run does again, and without this they would appear
    twice; a run that starts over keeps none of the old run's lines. A line cut short by a kill is dropped."""
    import json

    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            keep.append(line)
    if keep != lines:
        atomic_write_text(path, "".join(x + "\n" for x in keep))


def discard_checkpoints(ckpt_root: Path) -> None:
    """Remove every checkpoint under ``ckpt_root`` (a run told not to resume starts over in its folder)."""
    if (ckpt_root / "latest").is_file():
        (ckpt_root / "latest").unlink()
    for p in ckpt_root.glob("step-*"):
        shutil.rmtree(p, ignore_errors=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


class NotACheckpointError(CheckpointError):
    """A ``state.pt`` holding pickled objects (code), which vfmkit never writes and never unpickles."""


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    f = ckpt_root / "latest"
    if not f.is_file():
        return None
    p = ckpt_root / f.read_text().strip()
    return p if (p / "state.pt").is_file() else None


def checkpoint_candidates(ckpt_root: Path) -> list[Path]:
    """The checkpoints a resume may use, best first: the one ``latest`` names, then the others newest first."""
    named = latest_checkpoint(ckpt_root)
    others = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir() and p != named), reverse=True)
    return ([named] if named is not None else []) + others


def _read_state(path: Path) -> dict[str, Any]:
    import pickle

    f = path / "state.pt"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise NotACheckpointError(
            f"{f} is not a vfmkit checkpoint: it holds pickled objects beyond tensors and plain data, which vfmkit "
            "never loads; delete that checkpoint folder (or set train.resume=false to start over)"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{f} is truncated or unreadable ({' '.join(str(e).split())[:120]})") from e


def _check_safetensors(f: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), "pt") as h:
            h.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f} is truncated or unreadable ({' '.join(str(e).split())[:120]})") from e


def load_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load weights into ``model`` (and ``ema``) and return the training state. Every file is checked before any
    weight is touched: a truncated or missing file raises :class:`CheckpointError` naming it, a pickle-bearing
    ``state.pt`` :class:`NotACheckpointError`."""
    state = _read_state(path)
    files = [path / "model.safetensors"] + ([path / "ema.safetensors"] if ema is not None else [])
    for f in files:
        if f.name == "ema.safetensors" and not f.is_file():
            continue
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        _check_safetensors(f)
    load_model(model, str(path / "model.safetensors"))
    if ema is not None and (path / "ema.safetensors").is_file():
        load_model(ema, str(path / "ema.safetensors"))
    return state


def resume_checkpoint(
    ckpt_root: Path, model: torch.nn.Module, ema: torch.nn.Module | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest complete checkpoint under ``ckpt_root``; None when there is none to resume from.

    A truncated or unreadable one is named in a warning and the previous one is used; a pickle-bearing
    ``state.pt`` is refused outright (tampering is not a reason to quietly rewind). If checkpoints exist but none
    is complete, :class:`CheckpointError` names them."""
    import logging

    tried = []
    for cand in checkpoint_candidates(ckpt_root):
        try:
            return cand, load_checkpoint(cand, model, ema)
        except NotACheckpointError:
            raise
        except CheckpointError as e:
            logging.getLogger("vfmkit").warning(
                "not resuming from %s: %s; trying the previous checkpoint", cand, e
            )
            tried.append(str(e))
    if tried:
        raise CheckpointError(
            f"no complete checkpoint under {ckpt_root} ({'; '.join(tried)}): "
            "set train.resume=false (or give another --out) to start over"
        )
    return None


# Keys a resume may change: how the run is watched and how often it saves, not what it trains.
RESUME_MAY_CHANGE = (
    "out_dir",
    "train.steps",
    "train.progress",
    "train.tensorboard",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.resume",
    "train.compile",
    "data.num_workers",
    "data.val",
)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def resume_config_differences(saved: dict, now: dict) -> list[str]:
    """Dotted keys whose values differ between a run folder's ``config.json`` and the config resuming it (the keys
    of :data:`RESUME_MAY_CHANGE` aside), each as ``key: saved -> now``."""
    a, b = _flat(saved), _flat(now)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if any(k == m or k.startswith(m + ".") for m in RESUME_MAY_CHANGE):
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
    return diffs


def check_resume_config(out_dir: Path, cfg_dict: dict) -> None:
    """Refuse to resume ``out_dir`` with a config that trains something else than its ``config.json`` says."""
    import json

    from vfmkit.config import ConfigError

    f = out_dir / "config.json"
    if not f.is_file():
        return
    try:
        saved = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{f} is not readable JSON ({e}): cannot check what this run was started with"
        ) from e
    diffs = resume_config_differences(saved, json.loads(json.dumps(cfg_dict)))  # as config.json holds it
    if diffs:
        raise ConfigError(
            f"{out_dir} holds a run started with another config; resuming it would mix two runs. Differing keys: "
            + "; ".join(diffs)
            + ". Give another --out, or set train.resume=false to start over in this folder"
        )


def module_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """A module's state dict as safetensors' ``save_model`` writes it: tensors sharing storage kept once
    (the dropped names recorded in the metadata, which ``load_model`` reads), all contiguous."""
    from safetensors.torch import _remove_duplicate_names

    state = dict(model.state_dict())
    metadata: dict[str, str] | None = None
    for kept, dropped in _remove_duplicate_names(state).items():
        for name in dropped:
            metadata = metadata or {}
            metadata.setdefault(name, kept)
            del state[name]
    return {k: v.contiguous() for k, v in state.items()}, metadata
