"""Reinforced record schemas and storage (MobileCLIP's DataCompDR and ImageNet+-style classification).

Multi-modal sample (DataCompDR layout, one webdataset key per sample):
- ``paug.json``: ``{"param_aug": [entry per augmentation]}`` (see :mod:`vfmkit.data.augment`);
- ``syn.json``: ``{"syn_text": [n_syn strings]}``;
- ``npz`` (float32) or ``pth.gz`` (gzip of a torch dict, bf16): ``image_emb`` ``[n_aug, sum D_k]`` and ``text_emb``
  ``[1 + n_syn, sum D_k]`` (row 0 the real caption); teacher k's embedding is L2-normalised and occupies its own
  column slice;
- ``json``: ``{"uid", "sha256"}`` of the source image bytes; optionally ``jpg`` / ``txt``.

Classification sample: ``paug.json``, ``topk.npz`` (``values`` float16 ``[n_aug, k]``, ``indices`` ``[n_aug, k]``)
and ``json`` (``uid``, ``sha256``, ``label``); optionally ``jpg``.

Public DataCompDR has no images: :class:`ImageIndex` joins reinforced samples with image shards by uid and checks
the sha256 of the bytes, reporting (not training on) a mismatch.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import struct
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .augment import (
    AugParams,
    AugRecipe,
    ReplayableAugment,
    make_rng,
    params_to_json,
    paug_from_json,
    paug_to_json,
)
from .io import atomic_write_bytes
from .shards import iter_shard, list_shards, split_member_name

log = logging.getLogger(__name__)

FORMAT = "vfmkit-reinforced"
FORMAT_VERSION = 1
_STORAGE_DTYPE = {"npz": "float32", "pth.gz": "bfloat16"}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_CAPTION_BYTES_ESTIMATE = 64  # mean UTF-8 length of a synthetic caption plus JSON quoting (an estimate)


# what a truncated / garbled npz, gzip or torch blob raises
_BLOB_ERRORS = (ValueError, OSError, RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)


class ImageMismatchError(ValueError):
    """The image bytes found for a uid do not match the sha256 stored in the reinforced record."""


# ----------------------------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of the ensemble: ``dim`` columns in the concatenated embedding, its own logit scale."""

    name: str
    dim: int
    logit_scale: float = 100.0
    pretrained: str | None = None


@dataclass(frozen=True)
class ReinforcedMeta:
    """What a reinforced set holds; written next to the shards as ``reinforced.json``.

    ``kind`` is ``"multimodal"`` (embeddings) or ``"classification"`` (top-k probabilities over ``num_classes``).
    """

    kind: str
    recipe: AugRecipe
    n_aug: int
    teachers: tuple[TeacherSpec, ...] = ()
    n_syn: int = 0
    storage: str = "npz"
    num_classes: int | None = None
    topk: int | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("multimodal", "classification"):
            raise ValueError(f"kind must be 'multimodal' or 'classification', got {self.kind!r}")
        if self.storage not in _STORAGE_DTYPE:
            raise ValueError(f"storage must be one of {sorted(_STORAGE_DTYPE)}, got {self.storage!r}")
        if self.n_aug < 1:
            raise ValueError(f"n_aug must be >= 1, got {self.n_aug}")
        if self.kind == "multimodal" and not self.teachers:
            raise ValueError("a multimodal reinforced set needs at least one teacher")
        if self.kind == "classification" and (not self.num_classes or not self.topk):
            raise ValueError("a classification reinforced set needs num_classes and topk")

    @property
    def dtype(self) -> str:
        """Storage dtype of the embeddings: float32 for npz, bfloat16 for pth.gz."""
        return _STORAGE_DTYPE[self.storage]

    @property
    def emb_dim(self) -> int:
        """sum_k D_k: width of the concatenated teacher embeddings."""
        return sum(t.dim for t in self.teachers)

    def teacher_slices(self) -> list[slice]:
        """Column slice of each teacher inside the concatenated embedding."""
        out, start = [], 0
        for t in self.teachers:
            out.append(slice(start, start + t.dim))
            start += t.dim
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        d["teachers"] = [dataclasses.asdict(t) for t in self.teachers]
        return {"format": f"{FORMAT}/{self.format_version}", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReinforcedMeta:
        d = dict(d)
        fmt = d.pop("format", None)
        if fmt != f"{FORMAT}/{FORMAT_VERSION}":
            raise ValueError(
                f"unsupported reinforced metadata format {fmt!r} (expected {FORMAT}/{FORMAT_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown reinforced metadata keys: {unknown}")
        d["recipe"] = AugRecipe.from_dict(d["recipe"])
        d["teachers"] = tuple(TeacherSpec(**t) for t in d.get("teachers", ()))
        return cls(**d)


def write_metadata(path: str | os.PathLike, meta: ReinforcedMeta) -> None:
    """Write ``meta`` as JSON atomically."""
    atomic_write_bytes(path, json.dumps(meta.to_dict(), indent=1, sort_keys=True).encode())


def read_metadata(path: str | os.PathLike) -> ReinforcedMeta:
    """Read and validate metadata written by :func:`write_metadata`; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return ReinforcedMeta.from_dict(json.load(f))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)}: bad reinforced metadata: {e}") from e


def _mean_param_json_bytes(recipe: AugRecipe, n: int = 32) -> float:
    """Mean compact-JSON size of one augmentation entry, measured on ``n`` real draws for a 256 px source."""
    aug = ReplayableAugment(recipe)
    sizes = [
        len(
            json.dumps(
                params_to_json(
                    aug.sample_for(0, "estimate", k, (256, 256), partner=1, partner_size=(256, 256)), recipe
                ),
                separators=(",", ":"),
            )
        )
        + 1
        for k in range(n)
    ]
    return sum(sizes) / n


def storage_breakdown(meta: ReinforcedMeta) -> dict[str, int]:
    """Bytes per sample by part (``embeddings``/``topk``, ``params``, ``captions``) and ``total``.

    Embeddings are exact (raw array bytes, before the container's small header); params and captions are
    estimates (measured mean JSON size; ~64 B per caption).
    """
    params = int(round(meta.n_aug * _mean_param_json_bytes(meta.recipe)))
    if meta.kind == "multimodal":
        parts = {
            "embeddings": (meta.n_aug + 1 + meta.n_syn) * meta.emb_dim * _BYTES[meta.dtype],
            "params": params,
            "captions": meta.n_syn * _CAPTION_BYTES_ESTIMATE,
        }
    else:
        idx_bytes = 2 if (meta.num_classes or 0) <= np.iinfo(np.int16).max else 4
        parts = {"topk": meta.n_aug * int(meta.topk or 0) * (2 + idx_bytes), "params": params}
    parts["total"] = sum(parts.values())
    return parts


def storage_bytes_per_sample(meta: ReinforcedMeta) -> int:
    """Total estimated bytes per sample (what a generator prints up front)."""
    return storage_breakdown(meta)["total"]


# ------------------------------------------------------------------------------------------ embeddings blob
def encode_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, storage: str = "npz") -> bytes:
    """``npz`` (float32) or ``pth.gz`` (bf16 torch dict, gzip) bytes for ``[n_aug, D]`` and ``[1 + n_syn, D]``."""
    if storage == "npz":
        buf = io.BytesIO()
        np.savez(
            buf,
            image_emb=image_emb.detach().float().cpu().numpy(),
            text_emb=text_emb.detach().float().cpu().numpy(),
        )
        return buf.getvalue()
    if storage == "pth.gz":
        buf = io.BytesIO()
        torch.save(
            {
                "image_emb": image_emb.detach().cpu().to(torch.bfloat16).contiguous(),
                "text_emb": text_emb.detach().cpu().to(torch.bfloat16).contiguous(),
            },
            buf,
        )
        return gzip.compress(buf.getvalue(), compresslevel=6)
    raise ValueError(f"unknown embedding storage {storage!r}")


# Why a fast path: ``np.load`` of a 0.7 KB top-k npz costs ~0.8 ms and of a 20 KB embedding npz ~2.5 ms (zipfile +
# ``ast.literal_eval`` of the npy header), several % of a small student's CPU step per image; the reinforced
# modes must cost what plain costs.
_NPY_HEADER = re.compile(
    r"'descr':\s*'([<>|=]?[a-zA-Z]\d*)',\s*'fortran_order':\s*False,\s*"
    r"'shape':\s*\(([\d,\s]*)\)"
)


def _fast_npy(buf: memoryview) -> np.ndarray | None:
    """A plain (non-object, C-order) ``.npy`` payload -> array view; None when it is anything else."""
    if len(buf) < 12 or bytes(buf[:6]) != b"\x93NUMPY" or buf[6] not in (1, 2, 3):
        return None
    off = 10 if buf[6] == 1 else 12
    hlen = struct.unpack_from("<H" if buf[6] == 1 else "<I", buf, 8)[0]
    m = _NPY_HEADER.search(bytes(buf[off : off + hlen]).decode("latin1"))
    if m is None:
        return None
    dtype = np.dtype(m.group(1))
    if dtype.hasobject:
        return None
    shape = tuple(int(x) for x in m.group(2).replace(" ", "").split(",") if x)
    return np.frombuffer(buf, dtype, math.prod(shape), offset=off + hlen).reshape(shape)


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """``np.savez`` bytes -> ``{name: array}``, equal to ``np.load``'s arrays (dtype, shape, values).

    Walks the stored (uncompressed) zip entries directly, returning read-only views of ``data``; anything else
    (compression, data descriptors, Fortran order, object or structured arrays) goes through ``np.load`` with
    ``allow_pickle=False`` (writable copies), so it never unpickles."""
    out: dict[str, np.ndarray] = {}
    view, pos = memoryview(data), 0
    while bytes(view[pos : pos + 4]) == b"PK\x03\x04":
        _, _, flags, comp, _, _, _, csize, _, nlen, xlen = struct.unpack_from("<4sHHHHHIIIHH", view, pos)
        name = bytes(view[pos + 30 : pos + 30 + nlen]).decode()
        extra, start = view[pos + 30 + nlen : pos + 30 + nlen + xlen], pos + 30 + nlen + xlen
        if csize == 0xFFFFFFFF:  # zip64: sizes are in extra field 0x0001 (uncompressed, then compressed)
            xp = 0
            while xp + 4 <= len(extra) and struct.unpack_from("<H", extra, xp)[0] != 1:
                xp += 4 + struct.unpack_from("<H", extra, xp + 2)[0]
            csize = struct.unpack_from("<Q", extra, xp + 12)[0] if xp + 20 <= len(extra) else -1
        arr = (
            _fast_npy(view[start : start + csize]) if comp == 0 and not flags & 0x08 and csize >= 0 else None
        )
        if arr is None:
            break
        out[name.removesuffix(".npy")] = arr
        pos = start + csize
    if not out or bytes(view[pos : pos + 4]) not in (b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06"):
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return out


def decode_embeddings(data: bytes, storage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_embeddings`; returns float32 tensors. Never unpickles (weights_only / no pickle)."""
    if storage == "npz":
        z = read_npz(data)  # astype copies: the tensors own writable memory
        return torch.from_numpy(z["image_emb"].astype(np.float32)), torch.from_numpy(
            z["text_emb"].astype(np.float32)
        )
    if storage == "pth.gz":
        d = torch.load(io.BytesIO(gzip.decompress(data)), map_location="cpu", weights_only=True)
        return d["image_emb"].float(), d["text_emb"].float()
    raise ValueError(f"unknown embedding storage {storage!r}")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _json_field(raw: dict[str, Any], ext: str) -> Any:
    """Parsed JSON of ``raw[ext]`` (bytes, str or already a dict); ``KeyError(ext)`` when absent."""
    v = raw[ext]
    if isinstance(v, (bytes, bytearray)):
        return json.loads(v.decode("utf-8"))
    return json.loads(v) if isinstance(v, str) else v


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data`` (what ``json.sha256`` stores)."""
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------- multi-modal record
@dataclass
class MultimodalRecord:
    """One decoded DataCompDR-style sample. ``image_emb`` ``[n_aug, D]``, ``text_emb`` ``[1 + n_syn, D]`` float32."""

    key: str
    uid: str
    sha256: str | None
    params: list[AugParams]
    syn_text: list[str]
    image_emb: torch.Tensor
    text_emb: torch.Tensor
    jpg: bytes | None = None
    caption: str | None = None


def _check_mm_shapes(
    meta: ReinforcedMeta,
    n_params: int,
    n_syn: int,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    where: str,
) -> None:
    want_i, want_t = (meta.n_aug, meta.emb_dim), (1 + meta.n_syn, meta.emb_dim)
    if tuple(image_emb.shape) != want_i or tuple(text_emb.shape) != want_t:
        raise ValueError(
            f"{where}: embeddings {tuple(image_emb.shape)}/{tuple(text_emb.shape)}, "
            f"metadata says image {want_i} and text {want_t}"
        )
    if n_params != meta.n_aug or n_syn != meta.n_syn:
        raise ValueError(
            f"{where}: {n_params} augmentations / {n_syn} captions, metadata says {meta.n_aug} / {meta.n_syn}"
        )


def encode_multimodal(
    key: str,
    uid: str,
    params: Sequence[AugParams],
    syn_text: Sequence[str],
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    meta: ReinforcedMeta,
    *,
    sha256: str | None = None,
    jpg: bytes | None = None,
    caption: str | None = None,
) -> dict[str, Any]:
    """A webdataset sample dict (all values bytes, plus ``__key__``) in DataCompDR's layout.

    ``jpg`` is stored only when given; its sha256 is computed when ``sha256`` is not given.
    """
    _check_mm_shapes(meta, len(params), len(syn_text), image_emb, text_emb, f"sample {key!r}")
    if jpg is not None and sha256 is None:
        sha256 = sha256_hex(jpg)
    sample: dict[str, Any] = {
        "__key__": key,
        "paug.json": _json_bytes(paug_to_json(params, meta.recipe)),
        "syn.json": _json_bytes({"syn_text": list(syn_text)}),
        meta.storage: encode_embeddings(image_emb, text_emb, meta.storage),
        "json": _json_bytes({"uid": uid, "sha256": sha256}),
    }
    if jpg is not None:
        sample["jpg"] = jpg
    if caption is not None:
        sample["txt"] = caption.encode("utf-8")
    return sample


def decode_multimodal(raw: dict[str, Any], meta: ReinforcedMeta) -> MultimodalRecord:
    """Decode one raw webdataset sample. A missing part raises ``KeyError(ext)``, a malformed one ``ValueError``
    naming the sample, so the loader can report it and skip."""
    key = str(raw.get("__key__", "?"))
    info = _json_field(raw, "json")
    storage = "npz" if "npz" in raw else "pth.gz" if "pth.gz" in raw else None
    if storage is None:
        raise KeyError(meta.storage)
    try:
        params = paug_from_json(_json_field(raw, "paug.json"), meta.recipe)
        syn = list(_json_field(raw, "syn.json")["syn_text"])
        image_emb, text_emb = decode_embeddings(raw[storage], storage)
    except _BLOB_ERRORS as e:
        raise ValueError(f"sample {key!r} (uid {info.get('uid')!r}): {type(e).__name__}: {e}") from e
    _check_mm_shapes(meta, len(params), len(syn), image_emb, text_emb, f"sample {key!r}")
    txt = raw.get("txt")
    return MultimodalRecord(
        key,
        str(info["uid"]),
        info.get("sha256"),
        params,
        syn,
        image_emb,
        text_emb,
        raw.get("jpg"),
        txt.decode("utf-8") if isinstance(txt, bytes) else txt,
    )


# ----------------------------------------------------------------------------------- classification record
def topk_encode(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of teacher probabilities ``[..., C]`` -> (values ``[..., k]`` float32, indices ``[..., k]`` int64),
    sorted by decreasing value."""
    values, indices = torch.topk(probs.float(), k, dim=-1)
    return values, indices


def densify(
    values: torch.Tensor, indices: torch.Tensor, num_classes: int, mode: str = "smooth"
) -> torch.Tensor:
    """Top-k ``[..., k]`` -> a dense distribution ``[..., num_classes]`` that sums to 1.

    ``smooth``: the mass the top-k miss (1 - sum) is spread evenly over the other ``C - k`` classes (ImageNet+).
    ``zeros``: the other classes get 0 and the top-k values are renormalised to sum to 1.
    """
    v = values.float().clamp_min(0.0)
    k = v.shape[-1]
    if mode == "smooth":
        if k >= num_classes:
            return torch.zeros(*v.shape[:-1], num_classes).scatter(
                -1, indices.long(), v / v.sum(-1, keepdim=True)
            )
        rest = (1.0 - v.sum(-1, keepdim=True)).clamp_min(0.0) / (num_classes - k)
        dense = rest.expand(*v.shape[:-1], num_classes).clone()
        dense = dense.scatter(-1, indices.long(), v)
        return dense / dense.sum(-1, keepdim=True)  # guards float16 rounding of stored values
    if mode == "zeros":
        dense = torch.zeros(*v.shape[:-1], num_classes).scatter(-1, indices.long(), v)
        return dense / dense.sum(-1, keepdim=True).clamp_min(1e-12)
    raise ValueError(f"densify mode must be 'smooth' or 'zeros', got {mode!r}")


@dataclass
class ClassificationRecord:
    """One ImageNet+-style sample: ``values``/``indices`` ``[n_aug, k]`` (float32 / int64)."""

    key: str
    uid: str
    sha256: str | None
    label: int
    params: list[AugParams]
    values: torch.Tensor
    indices: torch.Tensor
    jpg: bytes | None = None


def encode_classification(
    key: str,
    uid: str,
    label: int,
    params: Sequence[AugParams],
    values: torch.Tensor,
    indices: torch.Tensor,
    meta: ReinforcedMeta,
    *,
    sha256: str | None = None,
    jpg: bytes | None = None,
) -> dict[str, Any]:
    """A webdataset sample dict: ``paug.json``, ``topk.npz`` (float16 values, int16/int32 indices), ``json``."""
    want = (meta.n_aug, meta.topk)
    if tuple(values.shape) != want or tuple(indices.shape) != want or len(params) != meta.n_aug:
        raise ValueError(
            f"sample {key!r}: top-k {tuple(values.shape)}, {len(params)} params; metadata says {want}"
        )
    if jpg is not None and sha256 is None:
        sha256 = sha256_hex(jpg)
    idx_dtype = np.int16 if (meta.num_classes or 0) <= np.iinfo(np.int16).max else np.int32
    buf = io.BytesIO()
    np.savez(buf, values=values.float().numpy().astype(np.float16), indices=indices.numpy().astype(idx_dtype))
    sample: dict[str, Any] = {
        "__key__": key,
        "paug.json": _json_bytes(paug_to_json(params, meta.recipe)),
        "topk.npz": buf.getvalue(),
        "json": _json_bytes({"uid": uid, "sha256": sha256, "label": int(label)}),
    }
    if jpg is not None:
        sample["jpg"] = jpg
    return sample


def decode_classification(raw: dict[str, Any], meta: ReinforcedMeta) -> ClassificationRecord:
    """Inverse of :func:`encode_classification` (errors name the sample)."""
    key = str(raw.get("__key__", "?"))
    info = _json_field(raw, "json")
    try:
        params = paug_from_json(_json_field(raw, "paug.json"), meta.recipe)
        with np.load(io.BytesIO(raw["topk.npz"]), allow_pickle=False) as z:
            values = torch.from_numpy(z["values"].astype(np.float32))
            indices = torch.from_numpy(z["indices"].astype(np.int64))
    except _BLOB_ERRORS as e:
        raise ValueError(f"sample {key!r} (uid {info.get('uid')!r}): {type(e).__name__}: {e}") from e
    if tuple(values.shape) != (meta.n_aug, meta.topk) or len(params) != meta.n_aug:
        raise ValueError(
            f"sample {key!r}: top-k {tuple(values.shape)}, metadata says ({meta.n_aug}, {meta.topk})"
        )
    return ClassificationRecord(
        key, str(info["uid"]), info.get("sha256"), int(info["label"]), params, values, indices, raw.get("jpg")
    )


def sample_params(meta: ReinforcedMeta, seed: int, uid: str, image_size: tuple[int, int]) -> list[AugParams]:
    """The ``n_aug`` deterministic augmentation draws of one sample (no mixing partner)."""
    aug = ReplayableAugment(meta.recipe)
    return [aug.sample(make_rng(seed, uid, a), image_size) for a in range(meta.n_aug)]


# ------------------------------------------------------------------------------------------- join by uid
@dataclass
class JoinReport:
    """Outcome of a join: counts plus the uids that were left out and why."""

    joined: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def n_mismatch(self) -> int:
        return len(self.mismatched)

    @property
    def n_missing(self) -> int:
        return len(self.missing)


class ImageIndex:
    """uid -> image bytes of image shards (img2dataset / vfmkit layout, whose ``json`` carries ``uid``).

    For plain ``.tar`` shards only (tar, offset, size) is kept and bytes are read on demand; compressed shards
    (``.tar.gz``, e.g. the embedded subsets) cannot be seeked, so their image bytes are held in memory.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        image_ext: str = "jpg",
        uid_field: str = "uid",
    ) -> None:
        self.image_ext, self.uid_field = image_ext, uid_field
        self._loc: dict[str, tuple[str, int, int] | bytes] = {}
        for url in list_shards(urls):
            self._scan(url)

    def _scan(self, url: str) -> None:
        seekable = url.endswith(".tar")
        pending: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(url, "r") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = split_member_name(m.name)
                    entry = pending.setdefault(key, {})
                    if ext == self.image_ext:
                        f = None if seekable else tf.extractfile(m)
                        entry["loc"] = (url, m.offset_data, m.size) if f is None else f.read()
                    elif ext == "json":
                        f = tf.extractfile(m)
                        entry["uid"] = json.loads(f.read() if f is not None else b"{}").get(self.uid_field)
                    if "loc" in entry and "uid" in entry:
                        if entry["uid"] is not None:
                            self._loc[str(entry["uid"])] = entry["loc"]
                        del pending[key]
        except (tarfile.TarError, OSError, ValueError) as e:
            raise ValueError(f"{url}: cannot index image shard: {e}") from e

    def __len__(self) -> int:
        return len(self._loc)

    def __contains__(self, uid: object) -> bool:
        return str(uid) in self._loc

    def read(self, uid: str) -> bytes | None:
        """The image bytes stored for ``uid``, or None."""
        loc = self._loc.get(str(uid))
        if loc is None or isinstance(loc, bytes):
            return loc
        url, off, size = loc
        with open(url, "rb") as f:
            f.seek(off)
            return f.read(size)

    def attach(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` with ``jpg`` filled from the index. Raises ``KeyError`` (no image for the uid) or
        :class:`ImageMismatchError` (sha256 differs), both naming the uid: a loader skips and counts them."""
        info = _json_field(raw, "json")
        uid = str(info["uid"])
        data = self.read(uid)
        if data is None:
            raise KeyError(f"no image for uid {uid!r}")
        check_image_sha256(info, data, f"uid {uid!r}")
        return {**raw, self.image_ext: data}


def check_image_sha256(info: dict[str, Any], data: bytes, where: str) -> None:
    """Raise :class:`ImageMismatchError` naming ``where`` (the uid or sample) when ``data`` is not the image whose
    sha256 the record stores (a tampered record, or another sample's image). A record without sha256 passes."""
    want = info.get("sha256")
    if want and sha256_hex(data) != want:
        raise ImageMismatchError(
            f"{where}: image sha256 {sha256_hex(data)[:12]}... != stored {str(want)[:12]}...; "
            "the sample is not trained on"
        )


def check_stored_image(raw: dict[str, Any], image_ext: str = "jpg") -> dict[str, Any]:
    """``raw`` (a reinforced sample that carries its own image, ``vfmkit reinforce ... --images``) after checking
    the image against the sha256 in its json: the same check the join by uid makes."""
    info = _json_field(raw, "json")
    check_image_sha256(info, raw[image_ext], f"uid {info.get('uid')!r} (key {raw.get('__key__')!r})")
    return raw


def _uid_of(raw: dict[str, Any]) -> str:
    """The uid of a raw sample, or its key when its json is absent or unreadable."""
    try:
        return str(_json_field(raw, "json")["uid"])
    except (KeyError, ValueError, TypeError):
        return f"<key {raw.get('__key__')}>"


def join_by_uid(
    reinforced: str | os.PathLike | Sequence[str | os.PathLike],
    index: ImageIndex,
    report: JoinReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield reinforced raw samples with their image bytes attached; samples whose image is missing or whose
    sha256 does not match are left out, counted in ``report`` and logged by uid."""
    report = report if report is not None else JoinReport()
    for url in list_shards(reinforced):
        for raw in iter_shard(url):
            try:
                out = index.attach(raw)
            except ImageMismatchError as e:
                report.mismatched.append(_uid_of(raw))
                log.warning("skipping %s/%s: %s", url, raw["__key__"], e)
                continue
            except KeyError as e:
                report.missing.append(_uid_of(raw))
                log.warning("skipping %s/%s: %s", url, raw["__key__"], e)
                continue
            report.joined += 1
            yield out
