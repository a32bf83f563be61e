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
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    if ema is not None:
        save_model(ema, str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name)
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for p in old[: max(0, len(old) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    f = ckpt_root / "latest"
    if not f.is_file():
        return None
    p = ckpt_root / f.read_text().strip()
    return p if (p / "state.pt").is_file() else None


def load_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module | None = None) -> dict[str, Any]:
    load_model(model, str(path / "model.safetensors"))
    if ema is not None and (path / "ema.safetensors").is_file():
        load_model(ema, str(path / "ema.safetensors"))
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


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
