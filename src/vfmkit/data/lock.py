"""One writer per output folder: ``OUT/.lock`` held with ``fcntl.flock`` while a job writes there.

``vfmkit train``, ``vfmkit reinforce`` and ``vfmkit data import`` take it before they write anything, so a second
job given the same ``--out`` fails at once, naming the folder and the process that holds it, instead of mixing
its logs, weights and checkpoints with the first one's. The kernel drops the lock when its holder exits (kill -9
included), so a stale ``.lock`` file never blocks a resume. Locks are reentrant within one process (a pipeline
that holds a folder may run a job that takes it again). Taking the lock also proves the folder is writable:
an unwritable ``--out`` is found before the work, not after it.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

__all__ = ["FolderLockedError", "OutputNotWritableError", "FolderLock", "probe_writable"]

LOCK_NAME = ".lock"


class FolderLockedError(RuntimeError):
    """Another process holds the folder's lock; the message names the folder and the holder."""


class OutputNotWritableError(PermissionError):
    """An output folder that cannot be created or written; the message names it."""

    def __str__(self) -> str:  # PermissionError's own str would print "[Errno None] ..."
        return str(self.args[0]) if self.args else ""


_held: dict[str, list] = {}  # resolved folder -> [fd, depth]
_mu = threading.Lock()


def probe_writable(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` (parents too) and write + remove a probe file in it; raise
    :class:`OutputNotWritableError` naming the folder when either fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe.{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OutputNotWritableError(
            f"{what} {str(folder)!r} is not writable ({reason}): choose another folder or fix its permissions"
        ) from e
    return folder


class FolderLock:
    """``with FolderLock(out, "vfmkit train"):`` or ``lock = FolderLock(...).acquire(); ...; lock.release()``."""

    def __init__(self, folder: str | os.PathLike, holder: str = "vfmkit") -> None:
        self.folder, self.holder, self._key, self.created = Path(folder), holder, None, False

    def acquire(self) -> FolderLock:
        self.created = not self.folder.exists()
        probe_writable(self.folder)
        key = str(self.folder.resolve())
        with _mu:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
            path = self.folder / LOCK_NAME
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputNotWritableError(
                    f"cannot create the lock file {str(path)!r}: {e.strerror}"
                ) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    who = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                finally:
                    os.close(fd)
                raise FolderLockedError(
                    f"output folder {str(self.folder)!r} is in use by {who}: wait for it to finish, "
                    "or give this job another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.holder} (pid {os.getpid()})\n".encode(), 0)
            _held[key] = [fd, 1]
            self._key = key
        return self

    def release(self, discard_if_unused: bool = False) -> None:
        """Drop the lock. ``discard_if_unused``: when nothing but ``.lock`` was written (the job failed before
        writing), ``.lock`` goes, and the folder too if this lock created it: a refused job leaves nothing behind."""
        if self._key is None:
            return
        with _mu:
            entry = _held.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[self._key]
                    os.ftruncate(entry[0], 0)  # an idle folder's .lock is empty (same bytes after any run)
                    if discard_if_unused and os.listdir(self.folder) == [LOCK_NAME]:
                        (self.folder / LOCK_NAME).unlink()
                        if self.created:
                            self.folder.rmdir()
                    fcntl.flock(entry[0], fcntl.LOCK_UN)
                    os.close(entry[0])
        self._key = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type, *exc: object) -> None:
        self.release(discard_if_unused=exc_type is not None)
