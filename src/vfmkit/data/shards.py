"""Webdataset shards on disk: an atomic writer with a manifest, and one resolver for every way to name shards.

A vfmkit shard directory holds ``<prefix>-000000.tar ...`` plus ``manifest.json``::

    {"format": "vfmkit-shards/1", "shards": [{"name": ..., "count": ..., "sha256": ...}], "count": N, ...extra}

and ``sizes.json`` (``{shard name: count}``, what open_clip_train reads so it needs no ``--train-num-samples``).

Each sample is the img2dataset / webdataset per-sample layout: members ``<key>.<ext>`` that share a key.
Shards written by other tools (img2dataset, plain webdataset: ``*.tar`` with no manifest, perhaps
``*_stats.json`` / ``*.parquet`` beside them) are read as they are.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import braceexpand

from vfmkit.data.io import atomic_write_json

MANIFEST = "manifest.json"
SIZES = "sizes.json"  # open_clip_train's per-directory sample counts
SHARD_EXTS = (".tar", ".tar.gz", ".tgz")
FORMAT = "vfmkit-shards/1"
# webdataset splits a member name at the first dot of its last path component: keys must not hold dots.
_KEY_RE = re.compile(r"^[^.]+$")
_EXT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class ShardError(ValueError):
    """A shard or manifest that cannot be read; the message names the file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encode_value(key: str, ext: str, value: Any) -> bytes:
    """Bytes stored for one member: bytes as is, str as UTF-8, dict/list as JSON, numbers as text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value).encode("utf-8")
    raise TypeError(
        f"sample {key!r}: cannot store {type(value).__name__} as .{ext} (give bytes, str, dict or number)"
    )


class ShardWriter:
    """Write samples into size-capped tar shards, atomically, and a manifest on close.

    ``with ShardWriter(out, max_count=1000) as w: w.write({"__key__": "000000001", "jpg": b"...", "json": {...}})``.
    Each tar is written as ``name.tmp`` and renamed when full, so a crash never leaves a truncated ``.tar``.
    Tar headers carry fixed mtime/owner so that the same samples give byte-identical shards.
    ``extra`` (also settable as ``writer.extra``) is merged into the manifest. ``compress=True`` writes
    ``.tar.gz`` shards (gzip mtime 0, so still reproducible): tar headers and padding are ~3 KiB per 3-member
    sample, which gzip removes; webdataset reads them transparently.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_count: int = 1000,
        extra: dict | None = None,
        compress: bool = False,
    ) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_count = max_count
        self.extra: dict = dict(extra or {})
        self.compress = compress
        self._raw: Any = None
        self._gz: gzip.GzipFile | None = None
        self.shards: list[dict] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._name = ""
        self._n_in_shard = 0
        self._keys: set[str] = set()

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()  # a failed run leaves only complete shards and no manifest claiming them

    def _open_next(self) -> None:
        self._name = f"{self.prefix}-{len(self.shards):06d}.tar" + (".gz" if self.compress else "")
        self._tmp = self.out_dir / (self._name + ".tmp")
        self._raw = open(self._tmp, "wb")
        fileobj = self._raw
        if self.compress:
            # explicit filename/mtime: GzipFile would otherwise embed the tmp name and the clock
            self._gz = fileobj = gzip.GzipFile(
                filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=9
            )
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)
        self._n_in_shard = 0

    def _close_files(self) -> None:
        """Close tar, gzip and file layers in order (tarfile does not close a fileobj it was given)."""
        for f in (self._tar, self._gz):
            if f is not None:
                f.close()
        if self._raw is not None:
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
        self._tar, self._gz, self._raw = None, None, None

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._close_files()
        final = self.out_dir / self._name
        os.replace(self._tmp, final)
        self.shards.append({"name": self._name, "count": self._n_in_shard, "sha256": sha256_file(final)})
        self._tmp = None

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample: ``__key__`` plus one value per extension (bytes, str, dict/list, number)."""
        key = sample.get("__key__")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} must be a non-empty string without dots")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._open_next()
        for ext in sorted(k for k in sample if not k.startswith("__")):
            if not _EXT_RE.match(ext):
                raise ValueError(f"sample {key!r}: bad extension {ext!r}")
            data = encode_value(key, ext, sample[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._n_in_shard += 1
        self.count += 1
        if self._n_in_shard >= self.max_count:
            self._finish_shard()

    def close(self) -> dict:
        """Finish the open shard and write ``manifest.json``; returns the manifest."""
        if self._tar is not None:
            self._finish_shard()
        manifest = {"format": FORMAT, "shards": self.shards, "count": self.count, **self.extra}
        write_sizes(self.out_dir, self.shards)
        atomic_write_json(self.out_dir / MANIFEST, manifest)
        return manifest

    def _abort(self) -> None:
        self._close_files()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tmp = None


def write_sizes(out_dir: str | os.PathLike, shards: list[dict] | None = None) -> Path:
    """``out_dir/sizes.json``: ``{shard file name: sample count}`` (open_clip_train's ``get_dataset_size``), from
    ``shards`` (manifest entries) or the directory's manifest; written atomically."""
    out = Path(out_dir)
    if shards is None:
        shards = read_manifest(out)["shards"]
    atomic_write_json(out / SIZES, {s["name"]: int(s["count"]) for s in shards})
    return out / SIZES


def read_manifest(path: str | os.PathLike) -> dict:
    """Read a vfmkit manifest (a directory or the ``manifest.json`` itself); errors name the file."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"no shard manifest at {str(p)!r}")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"corrupt shard manifest {str(p)!r}: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
        raise ShardError(f"{str(p)!r} is not a {FORMAT} manifest")
    for s in m["shards"]:
        if not isinstance(s, dict) or not {"name", "count", "sha256"} <= s.keys():
            raise ShardError(f"{str(p)!r}: bad shard entry {s!r}")
    return m


def verify_shards(path: str | os.PathLike) -> list[str]:
    """Check every shard of a manifest directory against its sha256; returns the names that do not match."""
    m = read_manifest(path)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    bad = []
    for s in m["shards"]:
        f = root / s["name"]
        if not f.is_file() or sha256_file(f) != s["sha256"]:
            bad.append(s["name"])
    return bad


def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _from_dir(d: Path) -> list[str]:
    if (d / MANIFEST).is_file():
        m = read_manifest(d)
        urls = [str(d / s["name"]) for s in m["shards"]]
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(f"manifest in {str(d)!r} names missing shard {missing[0]!r}")
        return urls
    urls = sorted(u for ext in SHARD_EXTS for u in glob.glob(str(d / f"*{ext}")))
    if not urls:
        raise FileNotFoundError(f"no shards in {str(d)!r}: expected manifest.json or *.tar / *.tar.gz files")
    return urls


def list_shards(spec: str | os.PathLike | Iterable[str]) -> list[str]:
    """Resolve a shard spec to a list of tar paths/URLs.

    ``spec`` is a directory (its manifest, else its sorted ``*.tar``), a brace pattern ``a-{000..009}.tar``,
    a glob, one tar, ``builtin:NAME`` (the embedded default), a remote URL (passed through), or a list of these.
    A spec that names nothing raises ``FileNotFoundError`` naming it.
    """
    if not isinstance(spec, str | os.PathLike):
        return [u for s in spec for u in list_shards(s)]
    spec = os.fspath(spec)
    if spec.startswith("builtin:"):
        from vfmkit.data.builtin import builtin_path

        return _from_dir(builtin_path(spec[len("builtin:") :]))
    if _is_remote(spec):
        return list(braceexpand.braceexpand(spec))
    p = Path(spec).expanduser()
    if p.is_dir():
        return _from_dir(p)
    if p.is_file():
        return [str(p)]
    if "{" in spec:
        urls = [os.path.expanduser(u) for u in braceexpand.braceexpand(spec)]
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"shard pattern {spec!r}: missing {missing[0]!r} ({len(missing)} of {len(urls)})"
            )
        return urls
    if any(c in spec for c in "*?["):
        urls = sorted(glob.glob(os.path.expanduser(spec)))
        if urls:
            return urls
    raise FileNotFoundError(f"no shards at {spec!r}: not a directory, tar file, pattern or builtin:NAME")


def shard_counts(urls: list[str]) -> dict[str, int] | None:
    """Sample count per shard from vfmkit manifests or img2dataset ``*_stats.json``; None if any is unknown."""
    counts: dict[str, int] = {}
    manifests: dict[str, dict[str, int]] = {}
    for u in urls:
        if _is_remote(u):
            return None
        d, name = os.path.split(os.path.abspath(u))
        if d not in manifests:
            try:
                manifests[d] = {s["name"]: int(s["count"]) for s in read_manifest(d)["shards"]}
            except (FileNotFoundError, ShardError):
                manifests[d] = {}
        if name in manifests[d]:
            counts[u] = manifests[d][name]
            continue
        stem = next((name[: -len(e)] for e in SHARD_EXTS if name.endswith(e)), None)
        stats = os.path.join(d, stem + "_stats.json") if stem else ""
        try:
            with open(stats, encoding="utf-8") as f:
                counts[u] = int(json.load(f)["successes"])  # img2dataset's per-shard stats
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return counts


def split_member_name(name: str) -> tuple[str, str]:
    """The one key convention, webdataset's (what the training loader sees): a tar member ``dir/key.ext.more``
    is sample key ``dir/key`` with extension ``ext.more`` (split at the first dot of the basename)."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def iter_shard(url: str) -> Iterator[dict]:
    """Samples of one webdataset tar in file order: ``{"__key__", "__url__", ext: bytes}`` (keys by
    :func:`split_member_name`). The one tar-sample reader: every place that reads a shard by hand uses it.

    Read sequentially (no shuffling) so that a shard always yields the same samples in the same order, which
    the byte-for-byte resume guarantee relies on. A truncated or corrupt tar raises ``ValueError`` naming it.
    """
    fast = _iter_ustar(url)
    if fast is not None:
        yield from fast
        return
    cur: dict | None = None
    try:
        with tarfile.open(url, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not ext:
                    continue
                data = tar.extractfile(member).read()
                if cur is not None and cur["__key__"] != key:
                    yield cur
                    cur = None
                if cur is None:
                    cur = {"__key__": key, "__url__": url}
                cur[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"corrupt input shard {url}: {e}") from e
    if cur is not None:
        yield cur


FAST_TAR_MAX_BYTES = 256 << 20  # larger shards stream through tarfile instead of being read whole


class _NotPlainUstar(Exception):
    """The shard uses a tar feature the fast reader leaves to :mod:`tarfile` (pax/GNU headers, compression)."""


def _iter_ustar(url: str, wds_names: bool = False) -> Iterator[dict] | None:
    """The fast path of :func:`iter_shard` for plain uncompressed ustar/GNU tars (what ShardWriter and
    webdataset write): headers parsed with slicing instead of :mod:`tarfile`'s per-field Python, which cost
    ~30 us per member, a third of a reinforced sample's loading time. Returns None (use :mod:`tarfile`) for a
    bz2/xz file, a remote URL, a shard over 256 MiB, or a tar with pax / long-name headers; the samples are the same either way.
    Checksums are verified, so a corrupt header is still reported."""
    path = Path(url)
    if not path.is_file() or path.stat().st_size > FAST_TAR_MAX_BYTES:
        return None
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise ValueError(f"corrupt input shard {url}: {e}") from e
    if buf[:2] == b"\x1f\x8b":  # .tar.gz (the embedded datasets): zlib in C, then the same parse
        try:
            buf = gzip.decompress(buf)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"corrupt input shard {url}: {e}") from e
    elif buf[:3] == b"BZh" or buf[:6] == b"\xfd7zXZ\x00":
        return None
    try:
        members = _ustar_members(buf, url)
    except _NotPlainUstar:
        return None
    return _group_members(members, url, wds_names)


def _ustar_members(buf: bytes, url: str) -> list[tuple[str, bytes]]:
    out, pos, n = [], 0, len(buf)
    mv = memoryview(buf)
    while True:
        if pos + 512 > n:
            if pos == n and out:
                return out  # no end-of-archive blocks: tarfile accepts this too
            raise ValueError(f"corrupt input shard {url}: truncated tar header at byte {pos}")
        hdr = buf[pos : pos + 512]
        if hdr.count(0) == 512:
            return out
        if hdr[257:262] != b"ustar":
            raise _NotPlainUstar
        try:
            chk = int(hdr[148:156].strip(b"\0 ") or b"0", 8)
            size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError as e:
            raise ValueError(f"corrupt input shard {url}: bad tar header at byte {pos}") from e
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ValueError(f"corrupt input shard {url}: tar header checksum mismatch at byte {pos}")
        kind = hdr[156:157]
        if kind not in (b"0", b"\0", b"5", b"2", b"1", b"3", b"4", b"6"):
            raise _NotPlainUstar  # pax 'x'/'g', GNU 'L'/'K' long names, sparse files: tarfile's job
        name = hdr[0:100].split(b"\0", 1)[0]
        prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:263] == b"ustar\0" else b""
        start = pos + 512
        if start + size > n:
            raise ValueError(f"corrupt input shard {url}: member {name.decode(errors='replace')} truncated")
        if kind in (b"0", b"\0"):
            full = (prefix + b"/" + name) if prefix else name
            out.append((full.decode("utf-8"), bytes(mv[start : start + size])))
        pos = start + (size + 511) // 512 * 512


def fast_tar_samples(url: str) -> Iterator[dict] | None:
    """The training loader's reader: :func:`iter_shard`'s fast path with webdataset's conventions (extensions
    lower-cased, a duplicate member name is an error, ``__*__`` metadata members skipped); None where only
    webdataset/tarfile can read the shard (see :func:`_iter_ustar`)."""
    return _iter_ustar(url, wds_names=True)


def _group_members(members: list[tuple[str, bytes]], url: str, wds_names: bool = False) -> Iterator[dict]:
    cur: dict | None = None
    for mname, data in members:
        if wds_names and "/" not in mname and mname.startswith("__") and mname.endswith("__"):
            continue
        key, ext = split_member_name(mname)
        if not ext:
            continue
        if wds_names:
            ext = ext.lower()
            if cur is not None and cur["__key__"] == key and ext in cur:
                raise ValueError(f"{mname}: duplicate file name in tar file {url}")
        if cur is not None and cur["__key__"] != key:
            yield cur
            cur = None
        if cur is None:
            cur = {"__key__": key, "__url__": url}
        cur[ext] = data
    if cur is not None:
        yield cur


def exclude_uids(
    spec: str | os.PathLike, out_dir: str | os.PathLike, drop: Collection[str], max_count: int = 1000
) -> dict:
    """Copy the samples of ``spec`` whose json ``uid`` is not in ``drop`` into ``out_dir`` (members unchanged).

    Used to keep a teacher's own training images out of a distillation transfer set. Written once: an existing
    manifest for the same source and drop set is returned as is (a rerun resumes). The manifest records
    ``source``, ``kept`` and ``dropped``.
    """
    out = Path(out_dir)
    drop = frozenset(drop)
    tag = {"source": str(spec), "drop_sha256": hashlib.sha256("\n".join(sorted(drop)).encode()).hexdigest()}
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        if all(m.get(k) == v for k, v in tag.items()):
            return m
        (out / MANIFEST).unlink()  # no manifest may claim shards that are about to be rewritten
    kept = dropped = 0
    with ShardWriter(out, max_count=max_count, extra=tag) as w:
        for url in list_shards(spec):
            for s in iter_shard(url):
                if "json" not in s:
                    raise ShardError(f"{url}: sample {s['__key__']!r} has no json (no uid to filter on)")
                if str(json.loads(s["json"]).get("uid", s["__key__"])) in drop:
                    dropped += 1
                    continue
                w.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
                kept += 1
        w.extra.update(kept=kept, dropped=dropped)
    return read_manifest(out)


def describe_shards(spec: str | os.PathLike, verify: bool = False) -> dict:
    """What ``vfmkit data info`` shows, for every spec ``train`` reads (a directory with or without a manifest,
    an img2dataset folder, one tar, a brace pattern or glob, ``builtin:NAME``)::

        {"spec", "shards": [{"name", "url", "count"}], "count", "counts_from", "manifest": dict | None,
         "stats": {"successes", "failed_to_download", "failed_to_resize"} | None, "verify": {...} | None}

    Counts come from a vfmkit manifest, else img2dataset's ``*_stats.json`` (``successes``), else a count pass
    over the tars. ``verify``: a manifest's sha256 per shard; every shard read to the end (a corrupt tar is
    named) and its sample count checked against the manifest or stats; problems listed in ``verify["problems"]``.
    """
    urls = list_shards(spec)
    text = os.fspath(spec)
    manifest = None
    p = Path(text).expanduser()
    if text.startswith("builtin:"):
        from vfmkit.data.builtin import builtin_path

        p = builtin_path(text[len("builtin:") :])
    mdir = p if p.is_dir() else Path(urls[0]).parent
    if (mdir / MANIFEST).is_file():
        manifest = read_manifest(mdir)
    listed = {s["name"]: s for s in manifest["shards"]} if manifest else {}
    counts = shard_counts(urls)
    source = None
    if counts is not None:
        source = "manifest" if all(os.path.basename(u) in listed for u in urls) else "img2dataset stats"
    stats = None
    stat_files = sorted(glob.glob(str(mdir / "*_stats.json")))
    if stat_files:
        stats = {"successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
        for f in stat_files:
            try:
                d = json.loads(Path(f).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ShardError(f"corrupt img2dataset stats {f!r}: {e}") from e
            for k in stats:
                stats[k] += int(d.get(k, 0) or 0)
    read_counts: dict[str, int] = {}
    problems: list[str] = []
    if counts is None or verify:
        for u in urls:
            try:
                read_counts[u] = sum(1 for _ in iter_shard(u))
            except ValueError as e:
                problems.append(str(e))
        if counts is None:
            counts, source = read_counts, "counted"
    out_shards = [{"name": os.path.basename(u), "url": u, "count": counts.get(u)} for u in urls]
    res = {
        "spec": text,
        "shards": out_shards,
        "count": sum(c for c in counts.values() if c is not None),
        "counts_from": source,
        "manifest": manifest,
        "stats": stats,
        "verify": None,
    }
    if verify:
        checked_sha = 0
        for u in urls:
            name = os.path.basename(u)
            if name in listed:
                checked_sha += 1
                if sha256_file(u) != listed[name]["sha256"]:
                    problems.append(f"{u}: sha256 does not match the manifest")
            if u in read_counts and counts.get(u) is not None and read_counts[u] != counts[u]:
                problems.append(f"{u}: {read_counts[u]} samples read, {source} says {counts[u]}")
        res["verify"] = {"sha256_checked": checked_sha, "read": len(read_counts), "problems": problems}
    return res
