"""The ``vfmkit`` command: one entry point, one subcommand per module in ``vfmkit.commands``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Each module defines ``register(subparsers)`` and sets ``func`` on its parser via set_defaults.
COMMANDS = [
    "quickstart",
    "data",
    "train",
    "eval",
    "teacher",
    "reinforce",
    "catlip",
    "subclone",
    "backfill",
    "tic",
    "export",
    "transfer",
    "merge",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfmkit", description=__doc__)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also: environment VFMKIT_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"vfmkit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"vfmkit.commands.{name}":
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def error_line(e: BaseException) -> str:
    """One line for a user: the message (which names the file, key or sample), never a traceback.

    OS errors name the path and the system's reason; an error type whose message is not a sentence on its own
    (``KeyError: 'x'``) keeps its type name, and points at ``--debug``.
    """
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        hint = {
            PermissionError: ": choose a folder you can write to, or fix its permissions",
            FileExistsError: ": remove it or choose another --out",
            IsADirectoryError: ": give a file, not a folder",
            NotADirectoryError: ": a file stands where a folder is needed",
        }.get(type(e), "")
        msg = f"{e.strerror}: {where}{hint}"
    else:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if not msg or type(e).__name__ in _TERSE:
            msg = f"{type(e).__name__}: {msg or '(no message)'} (rerun with vfmkit --debug for the traceback)"
    return " ".join(msg.split())


# Error types whose message alone does not say what went wrong.
_TERSE = {
    "KeyError",
    "IndexError",
    "AttributeError",
    "TypeError",
    "ZeroDivisionError",
    "AssertionError",
    "NameError",
    "UnboundLocalError",
    "StopIteration",
    "NotImplementedError",
    "RecursionError",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("VFMKIT_DEBUG", "") not in ("", "0", "false")
    created: list[Path] = []
    try:
        created = probe_out(getattr(args, "out", None))
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"vfmkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        _remove_empty(created)
        if debug:
            raise
        print(f"vfmkit {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    if rc:
        _remove_empty(created)
    return int(rc or 0)


def probe_out(out: str | os.PathLike | None) -> list[Path]:
    """Check before any work that ``--out`` can be written (an output named like a file: its folder). Returns
    the folders this made, deepest first, so a command that then fails leaves none of them behind empty."""
    from vfmkit.data.lock import probe_writable

    if out is None:
        return []
    p = Path(out)
    folder = p.parent if (p.is_file() or (not p.exists() and p.suffix)) else p
    missing, q = [], folder
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    try:
        probe_writable(folder, "output folder")
    except OSError:
        _remove_empty(missing)
        raise
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break


if __name__ == "__main__":
    sys.exit(main())
