"""Import image folders / tars into vfmkit shards (img2dataset per-sample layout).

Each sample is ``<key>.jpg`` (JPEG bytes), ``<key>.txt`` (first caption, caption imports only) and ``<key>.json``
with ``uid`` (the source file name), ``sha256`` (of the stored jpg bytes), ``width``/``height`` and either
``captions`` (all captions, CSV order) or ``label``/``class``/``wnid``. Keys are 9-digit indices into the sorted
list of requested names, so the same sources always give the same keys. An image that is missing or does not
decode, or whose captions are all empty, is skipped, named in the manifest (``skipped``: ``[{"uid", "key",
"reason"}]``) and counted (``n_skipped``). The output folder is locked while an import writes (``data/lock.py``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from vfmkit.data.lock import FolderLock
from vfmkit.data.shards import ShardWriter

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
_WNID_RE = re.compile(r"^n\d{8}$")


class ImageSource:
    """Read image files by relative POSIX name from a directory tree or a tar archive."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if self.path.is_dir():
            self._names = sorted(
                p.relative_to(self.path).as_posix()
                for p in self.path.rglob("*")
                if p.is_file() and p.suffix.lower() in _IMAGE_EXTS
            )
        elif self.path.is_file() and tarfile.is_tarfile(self.path):
            self._tar = tarfile.open(self.path, "r:*")
            for m in self._tar.getmembers():
                if m.isreg() and Path(m.name).suffix.lower() in _IMAGE_EXTS:
                    self._members[m.name.removeprefix("./")] = m
            self._names = sorted(self._members)
        else:
            raise FileNotFoundError(f"images {str(self.path)!r}: not a directory or tar file")

    def names(self) -> list[str]:
        """Sorted relative names of the image files."""
        return list(self._names)

    def read(self, name: str) -> bytes | None:
        """Raw bytes of ``name``, or None if it is not there."""
        if self._tar is not None:
            m = self._members.get(name)
            f = self._tar.extractfile(m) if m is not None else None
            return f.read() if f is not None else None
        p = self.path / name
        return p.read_bytes() if p.is_file() else None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def prepare_jpeg(data: bytes, max_size: int | None = None, quality: int = 85) -> tuple[bytes, int, int]:
    """Check that ``data`` decodes; return (jpeg bytes, width, height).

    JPEGs that need no resize are kept byte for byte; others are converted to RGB, the shorter side
    downscaled to ``max_size`` (if larger) and re-encoded at ``quality``. Raises on an undecodable image.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # full decode: a truncated file fails here rather than in training
        fmt = im.format
        w, h = im.size
        if fmt == "JPEG" and im.mode in ("RGB", "L") and (max_size is None or min(w, h) <= max_size):
            return data, w, h
        im = im.convert("RGB")
        if max_size is not None and min(w, h) > max_size:
            s = max_size / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=quality)
        return out.getvalue(), im.size[0], im.size[1]


def read_captions(captions_csv: str | os.PathLike) -> dict[str, list[str]]:
    """``image,caption`` CSV -> image name -> captions in file order (several rows per image allowed)."""
    path = Path(captions_csv)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {str(path)!r} not found")
    caps: dict[str, list[str]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(
                    f"captions file {str(path)!r} needs an 'image,caption' header, got {reader.fieldnames}"
                )
            for row in reader:
                cap = (row["caption"] or "").strip()
                # an image whose captions are all empty stays listed (with none), so the import names it skipped
                caps.setdefault((row["image"] or "").strip(), [])
                if cap:
                    caps[(row["image"] or "").strip()].append(cap)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(
            f"captions file {str(path)!r} is not UTF-8 (byte {e.start}, line {line}): save it as UTF-8"
        ) from e
    caps.pop("", None)
    return caps


def _write_images(
    src: ImageSource,
    names: list[str],
    out_dir: str | os.PathLike,
    shard_size: int,
    meta_fn,
    max_size: int | None,
    quality: int,
    extra: dict,
    compress: bool,
) -> dict:
    """Shared loop: key = index in sorted ``names``; meta_fn(name) -> (json fields, txt or None) or reason str."""
    with FolderLock(out_dir, "vfmkit data import"):  # a second import into the same folder fails at once
        _clear_unfinished(Path(out_dir))
        return _write_images_locked(
            src, names, out_dir, shard_size, meta_fn, max_size, quality, extra, compress
        )


def _clear_unfinished(out: Path) -> None:
    """Before an import writes: drop a killed run's ``*.tmp`` shards and any old manifest, so until this import's
    manifest lands no manifest claims shards that are being rewritten (a rerun of the same command then
    gives the same bytes as an uninterrupted run: keys, shards and order depend only on the sources)."""
    for p in out.glob("*.tmp"):
        p.unlink()
    (out / "manifest.json").unlink(missing_ok=True)


def _write_images_locked(
    src: ImageSource,
    names: list[str],
    out_dir: str | os.PathLike,
    shard_size: int,
    meta_fn,
    max_size: int | None,
    quality: int,
    extra: dict,
    compress: bool,
) -> dict:
    skipped = []
    with ShardWriter(out_dir, max_count=shard_size, extra=extra, compress=compress) as w:
        for i, name in enumerate(names):
            key = f"{i:09d}"
            meta = meta_fn(name)
            if isinstance(meta, str):
                skipped.append({"uid": name, "key": key, "reason": meta})
                continue
            raw = src.read(name)
            if raw is None:
                skipped.append({"uid": name, "key": key, "reason": "missing image"})
                continue
            try:
                jpg, width, height = prepare_jpeg(raw, max_size, quality)
            except Exception as e:  # PIL raises several types for bad files; all mean "corrupt"
                skipped.append({"uid": name, "key": key, "reason": f"corrupt image: {type(e).__name__}: {e}"})
                continue
            fields, txt = meta
            info = {
                "uid": name,
                "sha256": hashlib.sha256(jpg).hexdigest(),
                "width": width,
                "height": height,
                **fields,
            }
            sample = {"__key__": key, "jpg": jpg, "json": info}
            if txt is not None:
                sample["txt"] = txt
            w.write(sample)
        w.extra.update(n_skipped=len(skipped), skipped=skipped)
    return {"format": "vfmkit-shards/1", "shards": w.shards, "count": w.count, **w.extra}


def import_captions(
    images: str | os.PathLike,
    captions_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    names: Iterable[str] | None = None,
    *,
    max_size: int | None = None,
    quality: int = 85,
    compress: bool = False,
) -> dict:
    """Image folder or tar + ``image,caption`` CSV -> shards in ``out_dir``; returns the manifest.

    ``names`` restricts the import to those image names (e.g. a split); default: every image in the CSV.
    ``max_size`` downscales the shorter side (re-encoding at ``quality``); ``compress`` writes ``.tar.gz`` shards.
    """
    caps = read_captions(captions_csv)
    src = ImageSource(images)
    try:
        todo = sorted(set(names)) if names is not None else sorted(caps)

        def meta(name: str):
            c = caps.get(name)
            if c is None:
                return "no caption"
            return "empty caption" if not c else ({"captions": c}, c[0])

        extra = {"kind": "captions", "source_images": str(images), "source_captions": str(captions_csv)}
        return _write_images(src, todo, out_dir, shard_size, meta, max_size, quality, extra, compress)
    finally:
        src.close()


def import_class_folders(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    names: Iterable[str] | None = None,
    *,
    max_size: int | None = None,
    quality: int = 85,
    compress: bool = False,
) -> dict:
    """Class-folder tree (``<class>/<image>``, folder or tar) -> shards; label = index in sorted class names.

    Classes come from the whole tree even when ``names`` selects a subset, so labels never shift.
    """
    src = ImageSource(root)
    try:
        all_names = [n for n in src.names() if n.count("/") == 1]
        classes = sorted({n.split("/")[0] for n in all_names})
        if not classes:
            raise FileNotFoundError(f"no <class>/<image> files in {str(root)!r}")
        index = {c: i for i, c in enumerate(classes)}
        todo = sorted(set(names)) if names is not None else all_names

        def meta(name: str):
            cls = name.split("/")[0] if name.count("/") == 1 else None
            if cls not in index:
                return "not in a class folder"
            fields = {"label": index[cls], "class": cls}
            if _WNID_RE.match(cls):
                fields["wnid"] = cls
            return fields, None

        extra = {
            "kind": "class_folders",
            "source_images": str(root),
            "classes": classes,
            "n_ignored": len(src.names()) - len(all_names),
        }
        return _write_images(src, todo, out_dir, shard_size, meta, max_size, quality, extra, compress)
    finally:
        src.close()
