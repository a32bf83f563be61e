"""Decode functions that replay reinforced samples for training (``ShardLoader`` ``decode_fn``).

At a given (seed, epoch) each sample deterministically picks one stored augmentation (and, multi-modal, one
synthetic caption), re-renders the stored crop at the student's resolution, then normalises for the student.
The choice depends on the epoch, so the decoders keep an ``epoch`` attribute: :class:`ReplayShardLoader` sets it
before every epoch (use it, or call ``decoder.set_epoch(e)`` yourself before iterating a plain ``ShardLoader``).
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .augment import OPENAI_MEAN, OPENAI_STD, ReplayableAugment, to_student
from .loader import ShardLoader
from .reinforced import ImageIndex, ReinforcedMeta, decode_classification, decode_multimodal, densify

Tokenizer = Callable[[list[str]], torch.Tensor]


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 ``[3, H, W]`` (RGB)."""
    with Image.open(io.BytesIO(data)) as im:
        return F.pil_to_tensor(im.convert("RGB"))


def replay_rng(seed: int, epoch: int, uid: str) -> random.Random:
    """The per-(seed, epoch, sample) generator of the training-time choices (process-independent)."""
    digest = hashlib.sha256(f"replay|{int(seed)}|{int(epoch)}|{uid}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class _EpochDecoder:
    """Shared state: seed, epoch, student size and normalisation, optional image join."""

    def __init__(self, meta: ReinforcedMeta, size: int, *, seed: int = 0, mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD, images: ImageIndex | None = None) -> None:
        self.meta, self.size, self.seed, self.epoch = meta, int(size), int(seed), 0
        self.mean, self.std, self.images = tuple(mean), tuple(std), images
        self.aug = ReplayableAugment(meta.recipe)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _with_image(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` with ``jpg``: its own, or joined by uid (sha256-checked: a mismatch raises, naming the uid)."""
        if "jpg" in raw:
            return raw
        if self.images is None:
            raise KeyError("jpg")  # no image stored and no image shards to join with
        return self.images.attach(raw)


class MultimodalReplay(_EpochDecoder):
    """``decode_fn`` for DataCompDR-style samples.

    Returns ``image`` ``[3, S, S]`` (replayed, normalised), ``image_emb`` ``[D]`` (the stored teacher embedding of
    that very augmentation), ``text_emb`` ``[D]`` (real caption, row 0), ``syn_text_emb`` ``[D]`` (the picked
    synthetic caption), ``caption`` / ``syn_caption`` (str, or token ids ``[L]`` when a tokenizer is given),
    ``aug_index`` and ``syn_index``.
    """

    def __init__(self, meta: ReinforcedMeta, size: int, *, tokenizer: Tokenizer | None = None, **kw: Any) -> None:
        super().__init__(meta, size, **kw)
        if "mix" in meta.recipe.stages:
            raise ValueError("multi-modal replay does not support mixing recipes")
        self.tokenizer = tokenizer

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        rec = decode_multimodal(self._with_image(raw), self.meta)
        rng = replay_rng(self.seed, self.epoch, rec.uid)
        a = rng.randrange(self.meta.n_aug)
        s = rng.randrange(self.meta.n_syn) if self.meta.n_syn else -1
        img = self.aug.apply(decode_image(rec.jpg or b""), rec.params[a], self.size)
        caption = rec.caption if rec.caption is not None else ""
        syn = rec.syn_text[s] if s >= 0 else caption
        out: dict[str, Any] = {
            "image": to_student(img, self.size, self.mean, self.std),
            "image_emb": rec.image_emb[a], "text_emb": rec.text_emb[0], "syn_text_emb": rec.text_emb[1 + s],
            "caption": caption, "syn_caption": syn, "aug_index": a, "syn_index": s,
        }
        if self.tokenizer is not None:
            out["caption"], out["syn_caption"] = self.tokenizer([caption, syn])  # [2, L] -> two [L] rows
        return out


def _plain_view(img: torch.Tensor, size: int) -> torch.Tensor:
    """The un-augmented view: resize the short side to ``size`` then centre-crop (the usual eval transform)."""
    img = F.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.center_crop(img, [size, size])


class ClassificationReplay(_EpochDecoder):
    """``decode_fn`` for ImageNet+-style samples: with probability ``p`` a stored augmentation and its densified
    teacher target, else the plain image and the one-hot label.

    Returns ``image`` ``[3, S, S]``, ``target`` ``[num_classes]`` (sums to 1), ``label`` and ``aug_index`` (-1 for
    the plain view). Mixed augmentations need the partner's source image: give ``partners`` (an
    :class:`ImageIndex` over the source shards, partner ids being uids).
    """

    def __init__(self, meta: ReinforcedMeta, size: int, *, p: float = 0.99, densify_mode: str = "smooth",
                 partners: ImageIndex | None = None, **kw: Any) -> None:
        super().__init__(meta, size, **kw)
        if "mix" in meta.recipe.stages and partners is None:
            raise ValueError("a mixing recipe needs `partners` (an ImageIndex giving partner images by uid)")
        self.p, self.densify_mode, self.partners = float(p), densify_mode, partners

    def _partner(self, partner: Any) -> torch.Tensor:
        assert self.partners is not None
        data = self.partners.read(str(partner))
        if data is None:
            raise KeyError(f"no image for mixing partner {partner!r}")
        return decode_image(data)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        rec = decode_classification(self._with_image(raw), self.meta)
        rng = replay_rng(self.seed, self.epoch, rec.uid)
        src = decode_image(rec.jpg or b"")
        C = int(self.meta.num_classes or 0)
        if rng.random() >= self.p:
            img, target, a = _plain_view(src, self.size), torch.nn.functional.one_hot(
                torch.tensor(rec.label), C).float(), -1
        else:
            a = rng.randrange(self.meta.n_aug)
            prm = rec.params[a]
            partner = self._partner(prm.mix.partner) if prm.mix is not None else None
            img = self.aug.replay(src, prm, self.size, partner_img=partner)
            target = densify(rec.values[a], rec.indices[a], C, self.densify_mode)
        return {"image": to_student(img, self.size, self.mean, self.std), "target": target, "label": rec.label,
                "aug_index": a}


class ReplayShardLoader(ShardLoader):
    """A ``ShardLoader`` that keeps its replay decoder's epoch in step with its own (why: the stored augmentation a
    sample replays depends on the epoch, and workers get a copy of the decoder when an epoch starts)."""

    def __iter__(self):  # type: ignore[override]
        if hasattr(self.decode_fn, "set_epoch"):
            self.decode_fn.set_epoch(self.epoch)
        yield from super().__iter__()
