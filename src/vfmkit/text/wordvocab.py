"""A word-level vocabulary for tiny language models trained offline (GPT-2's BPE files do not ship offline)."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import torch


class WordVocab:
    """A word-level vocabulary built from training captions (GPT-2's BPE files do not ship offline).

    ids: 0 pad, 1 bos, 2 eos, 3 unk, then words by descending count (ties alphabetical).
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    PAD, BOS, EOS, UNK = 0, 1, 2, 3

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())

    @classmethod
    def build(cls, texts: list[str], size: int) -> WordVocab:
        counts = collections.Counter(w for t in texts for w in cls.words(t))
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - len(cls.SPECIALS)]
        return cls(list(cls.SPECIALS) + [w for w, _ in top])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, texts: list[str], context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids ``[B, context]`` (bos, words, eos, pad) and mask ``[B, context]`` (True on real tokens)."""
        ids = torch.zeros(len(texts), context, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = (
                [self.BOS] + [self.stoi.get(w, self.UNK) for w in self.words(t)][: context - 2] + [self.EOS]
            )
            ids[i, : len(toks)] = torch.tensor(toks)
        mask = ids != self.PAD
        return ids, mask

    def save(self, path: Path) -> None:
        from vfmkit.data.io import atomic_write_bytes

        atomic_write_bytes(Path(path), json.dumps({"itos": self.itos}).encode())

    @classmethod
    def load(cls, path: Path) -> WordVocab:
        try:
            return cls(json.loads(Path(path).read_text())["itos"])
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read vocabulary {path}: {e}") from e
