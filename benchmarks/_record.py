"""How every benchmark script records a run: results/<name>.json (latest figures) + a block in RESULTS.<name>.md.

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/
    from _record import machine, now, record

    res = {"headline": "...", "floor": 1.1, "floor_met": bool(ratio >= 1.1), ..., "date": now(), "machine": machine()}
    print(text)
    record("catlip", res, text)

``results/<name>.json`` is replaced atomically (``vfmkit.data.io.atomic_write_json``); ``RESULTS.<name>.md``
gets one appended block with the command line and the printed text. ``collect_results.py`` assembles both.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

from vfmkit.data.io import atomic_write_json

ROOT = Path(__file__).resolve().parent  # the benchmarks folder: results/ and RESULTS.<name>.md live here
REQUIRED = ("headline", "floor", "floor_met", "date", "machine")
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


def now() -> str:
    """UTC ISO 8601 timestamp to the second, e.g. ``2026-11-29T01:16:48+00:00``."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine() -> str:
    """Host, CPU architecture and count, torch threads and version; the CUDA device when CUDA is available.

    Call it after ``torch.set_num_threads``: the thread count is read at call time.
    """
    import torch

    s = (
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        s += f", {torch.cuda.get_device_name()}"
    return s


def record(
    name: str, result: dict, text: str, argv: list[str] | None = None, *, script: str | None = None
) -> Path:
    """Write ``results/<name>.json`` and append the run to ``RESULTS.<name>.md``; returns the JSON path.

    ``result`` must hold ``headline`` (one line: what was compared and the ratio), ``floor`` and ``floor_met``
    (a computed bool); ``date`` and ``machine`` are filled in (in ``result`` itself) when absent. ``text`` is the
    run's printed output; ``argv`` its arguments (default ``sys.argv[1:]``); ``script`` the script's name in the
    command line when it differs from ``name`` (default ``name``). Raises ``ValueError`` (nothing written) when a
    key is missing or malformed.
    """
    if not _NAME_RE.match(name) or (script is not None and not _NAME_RE.match(script)):
        raise ValueError(f"benchmark name {name!r} / script {script!r}: letters, digits and _ only")
    for key in REQUIRED[:3]:  # date and machine are filled in below when absent
        if key not in result:
            raise ValueError(f"{name}: result has no {key!r} (required: {', '.join(REQUIRED)})")
    headline = result["headline"]
    if not isinstance(headline, str) or not headline.strip() or "\n" in headline:
        raise ValueError(f"{name}: 'headline' must be one non-empty line, got {headline!r}")
    if not isinstance(result["floor_met"], bool):
        raise ValueError(
            f"{name}: 'floor_met' must be a computed bool, got {type(result['floor_met']).__name__} "
            f"{result['floor_met']!r}"
        )
    for key in ("date", "machine"):
        if key in result and not isinstance(result[key], str):
            raise ValueError(f"{name}: {key!r} must be a str, got {result[key]!r}")
    if not isinstance(text, str):
        raise ValueError(f"{name}: text must be a str, got {type(text).__name__}")
    result.setdefault("date", now())
    result.setdefault("machine", machine())
    out = ROOT / "results" / f"{name}.json"
    atomic_write_json(out, result)
    cmd = shlex.join(["python", f"benchmarks/{script or name}.py", *(sys.argv[1:] if argv is None else argv)])
    body = text.rstrip("\n")
    with open(ROOT / f"RESULTS.{name}.md", "a", encoding="utf-8") as f:
        f.write(f"\n## {name} ({result['date']})\n\n```\n$ {cmd}\n{body}\n```\n")
    return out
