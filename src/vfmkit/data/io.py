"""The one atomic writer: readers see either the old file or the whole new one, never half of it.

Every write goes to a tmp name in the same folder (so ``os.replace`` is a rename on one file system), is
flushed and fsynced, then replaces ``path``. On any error the tmp file is removed and ``path`` is untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors"]


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, **json_kw: Any) -> None:
    """Serialise ``obj`` as UTF-8 JSON (``ensure_ascii=False`` unless given) plus a newline, written atomically."""
    json_kw.setdefault("ensure_ascii", False)
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, **json_kw) + "\n").encode("utf-8"))


def atomic_save_safetensors(
    path: str | os.PathLike, tensors_or_module: Any, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a ``{name: tensor}`` dict, or a module's ``state_dict()``, as safetensors, atomically.

    Tensors are made contiguous and moved to the CPU; ``metadata`` values must be strings (safetensors' rule).
    """
    from safetensors.torch import save

    state = tensors_or_module.state_dict() if hasattr(tensors_or_module, "state_dict") else tensors_or_module
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(path, save(state, metadata=dict(metadata) if metadata is not None else None))
