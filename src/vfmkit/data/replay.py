"""Decode functions that replay reinforced samples for training (``ShardLoader`` ``decode_fn``).

At a given (seed, epoch) each sample deterministically picks one stored augmentation (and, multi-modal, one
synthetic caption), re-renders the stored crop at the student's resolution, then normalises for the student.
The choice depends on the epoch, so the decoders keep an ``epoch`` attribute: :class:`ReplayShardLoader` sets it
before every epoch (use it, or call ``decoder.set_epoch(e)`` yourself before iterating a plain ``ShardLoader``).

:func:`~vfmkit.data.reinforced.read_npz` (used here) is the fast reader of the small ``np.savez`` blobs
(top-k targets, teacher embeddings) that replay reads every step.
"""

from __future__ import annotations

import random
import struct
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .augment import OPENAI_MEAN, OPENAI_STD, AugParams, ReplayableAugment, params_from_json, to_student
from .decode import decode_uint8, plain_view
from .loader import ShardLoader
from .reinforced import (
    ImageIndex,
    ReinforcedMeta,
    _json_field,
    check_stored_image,
    decode_multimodal,
    densify,
    read_npz,
)
from .rng import seeded_rng

Tokenizer = Callable[[list[str]], torch.Tensor]


def replay_rng(seed: int, epoch: int, uid: str) -> random.Random:
    """The per-(seed, epoch, sample) generator of the training-time choices (process-independent)."""
    return seeded_rng("replay", int(seed), int(epoch), uid)


class _EpochDecoder:
    """Shared state: seed, epoch, student size and normalisation, optional image join."""

    def __init__(
        self,
        meta: ReinforcedMeta,
        size: int,
        *,
        seed: int = 0,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        images: ImageIndex | None = None,
    ) -> None:
        self.meta, self.size, self.seed, self.epoch = meta, int(size), int(seed), 0
        self.mean, self.std, self.images = tuple(mean), tuple(std), images
        self.aug = ReplayableAugment(meta.recipe)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _with_image(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` with ``jpg``: its own or joined by uid, sha256-checked either way (a mismatch raises, naming it)."""
        if "jpg" in raw:
            return check_stored_image(raw)  # the images-in-shards path is sha256-checked as the join is
        if self.images is None:
            raise KeyError("jpg")  # no image stored and no image shards to join with
        return self.images.attach(raw)


class MultimodalReplay(_EpochDecoder):
    """``decode_fn`` for DataCompDR-style samples.

    Returns ``image`` ``[3, S, S]`` (replayed, normalised), ``image_emb`` ``[D]`` (the stored teacher embedding of
    that very augmentation), ``text_emb`` ``[D]`` (real caption, row 0), ``syn_text_emb`` ``[D]`` (the picked
    synthetic caption), ``caption`` / ``syn_caption`` (str, or token ids ``[L]`` when a tokenizer is given),
    ``aug_index`` and ``syn_index``. ``tokenize_syn=False`` leaves ``syn_caption`` a string (a training run
    without the synthetic-caption branch does not pay for tokenising it).
    """

    def __init__(
        self,
        meta: ReinforcedMeta,
        size: int,
        *,
        tokenizer: Tokenizer | None = None,
        tokenize_syn: bool = True,
        n_aug: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(meta, size, **kw)
        if n_aug < 0 or n_aug > meta.n_aug:
            raise ValueError(f"n_aug {n_aug}: the shards store {meta.n_aug} augmentations per sample")
        self.n_aug = n_aug or meta.n_aug  # replay only the first n_aug stored augmentations (0: all)
        if "mix" in meta.recipe.stages:
            raise ValueError("multi-modal replay does not support mixing recipes")
        from vfmkit.text.tokens import TokenCache

        if tokenizer is not None and not isinstance(tokenizer, TokenCache):
            tokenizer = TokenCache(tokenizer)  # the same rows; a caption is tokenised once per run
        self.tokenizer, self.tokenize_syn = tokenizer, tokenize_syn

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        rec = decode_multimodal(self._with_image(raw), self.meta)
        rng = replay_rng(self.seed, self.epoch, rec.uid)
        a = rng.randrange(self.n_aug)
        s = rng.randrange(self.meta.n_syn) if self.meta.n_syn else -1
        img = self.aug.apply(decode_uint8(rec.jpg or b""), rec.params[a], self.size)
        caption = rec.caption if rec.caption is not None else ""
        syn = rec.syn_text[s] if s >= 0 else caption
        out: dict[str, Any] = {
            "image": to_student(img, self.size, self.mean, self.std),
            "image_emb": rec.image_emb[a],
            "text_emb": rec.text_emb[0],
            "syn_text_emb": rec.text_emb[1 + s],
            "caption": caption,
            "syn_caption": syn,
            "aug_index": a,
            "syn_index": s,
        }
        if self.tokenizer is not None and self.tokenize_syn:
            out["caption"], out["syn_caption"] = self.tokenizer([caption, syn])  # [2, L] -> two [L] rows
        elif self.tokenizer is not None:
            out["caption"] = self.tokenizer([caption])[0]
        return out


class ClassificationReplay(_EpochDecoder):
    """``decode_fn`` for ImageNet+-style samples: with probability ``p`` a stored augmentation and its densified
    teacher target, else the plain image and the one-hot label.

    Returns ``image`` ``[3, S, S]``, ``target`` ``[num_classes]`` (sums to 1), ``label`` and ``aug_index`` (-1 for
    the plain view). Mixed augmentations need the partner's source image: give ``partners`` (an
    :class:`ImageIndex` over the source shards, partner ids being uids).

    Per sample it reads only what the draw needs (it runs once per image per step, so it must cost what a plain
    pipeline costs): the plain view reads ``json`` and the image; a stored augmentation also reads ``topk.npz``
    (with :func:`read_npz`) and parses just the chosen entry of ``paug.json``. So a malformed ``paug.json`` or
    ``topk.npz`` is reported (``ValueError`` naming the sample) only when a stored augmentation is drawn, and a
    malformed ``paug.json`` entry only when it is the one drawn.
    For a well-formed sample the output is exactly what replaying the whole record decoded by
    :func:`~vfmkit.data.reinforced.decode_classification` (``np.load``, every param) gives.
    """

    def __init__(
        self,
        meta: ReinforcedMeta,
        size: int,
        *,
        p: float = 0.99,
        densify_mode: str = "smooth",
        partners: ImageIndex | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(meta, size, **kw)
        if "mix" in meta.recipe.stages and partners is None:
            raise ValueError("a mixing recipe needs `partners` (an ImageIndex giving partner images by uid)")
        self.p, self.densify_mode, self.partners = float(p), densify_mode, partners

    def _partner(self, partner: Any) -> torch.Tensor:
        assert self.partners is not None
        data = self.partners.read(str(partner))
        if data is None:
            raise KeyError(f"no image for mixing partner {partner!r}")
        return decode_uint8(data)

    def _stored(self, raw: dict[str, Any], a: int, where: str) -> tuple[AugParams, torch.Tensor]:
        """Stored augmentation ``a`` of ``raw``: its params and densified target ``[num_classes]``."""
        meta = self.meta
        try:
            entries = _json_field(raw, "paug.json")["param_aug"]
            z = read_npz(raw["topk.npz"])
            values, indices = z["values"], z["indices"]
            want = (meta.n_aug, meta.topk)
            if len(entries) != meta.n_aug or values.shape != want or indices.shape != want:
                raise ValueError(
                    f"{len(entries)} params, top-k {values.shape}/{indices.shape}; metadata says "
                    f"({meta.n_aug}, {meta.topk})"
                )
            prm = params_from_json(entries[a], meta.recipe)
        except (
            ValueError,
            KeyError,
            TypeError,
            IndexError,
            OSError,
            EOFError,
            struct.error,
            zipfile.BadZipFile,
        ) as e:
            raise ValueError(f"sample {where}: {type(e).__name__}: {e}") from e
        v = torch.from_numpy(values[a].astype(np.float32))
        i = torch.from_numpy(indices[a].astype(np.int64))
        return prm, densify(v, i, int(meta.num_classes or 0), self.densify_mode)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        raw = self._with_image(raw)
        info = _json_field(raw, "json")
        label, uid = int(info["label"]), str(info["uid"])
        rng = replay_rng(self.seed, self.epoch, uid)
        src = decode_uint8(raw["jpg"])
        if rng.random() >= self.p:
            img, a = plain_view(src, self.size), -1
            target = torch.nn.functional.one_hot(torch.tensor(label), int(self.meta.num_classes or 0)).float()
        else:
            a = rng.randrange(self.meta.n_aug)
            prm, target = self._stored(raw, a, f"{raw.get('__key__', '?')!r} (uid {uid!r})")
            partner = self._partner(prm.mix.partner) if prm.mix is not None else None
            img = self.aug.replay(src, prm, self.size, partner_img=partner)
        return {
            "image": to_student(img, self.size, self.mean, self.std),
            "target": target,
            "label": label,
            "aug_index": a,
            "uid": uid,
        }


class ReplayShardLoader(ShardLoader):
    """A ``ShardLoader`` that keeps its replay decoder's epoch in step with its own (why: the stored augmentation a
    sample replays depends on the epoch, and workers get a copy of the decoder when an epoch starts)."""

    def __iter__(self):  # type: ignore[override]
        if hasattr(self.decode_fn, "set_epoch"):
            self.decode_fn.set_epoch(self.epoch)
        yield from super().__iter__()
