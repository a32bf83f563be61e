"""CatLIP's synset vocabulary: the most frequent WordNet noun synsets in a caption corpus, with counts.

Saved as JSON (``format: vfmkit-catlip-vocab/1``)::

    {"format": ..., "senses": "first", "min_count": 5, "max_size": 24320, "n_captions": N,
     "n_candidates": distinct synsets seen, "coverage": fraction of captions with >= 1 vocabulary synset,
     "synsets": [{"wnid": "n02084071", "name": "dog.n.01", "count": 1234}, ...]}   # row order = class index

Rows are sorted by count (descending), then offset, so a vocabulary is deterministic.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vfmkit.data.io import atomic_write_json
from vfmkit.text.wordnet import WordNet, WordNetError, offset_to_wnid, wnid_to_offset

FORMAT = "vfmkit-catlip-vocab/1"


@dataclass
class Vocabulary:
    """Row ``i`` of the classifier is synset ``offsets[i]``; ``index`` maps offset -> row (a dict)."""

    offsets: list[int]
    counts: list[int]
    names: list[str]
    meta: dict = field(default_factory=dict)
    index: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {o: i for i, o in enumerate(self.offsets)}
        if len(self.index) != len(self.offsets):
            raise ValueError("vocabulary has duplicate synsets")

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, ref: str | int) -> int | None:
        """Row of a synset given as offset or wnid, or None if it is not in the vocabulary."""
        off = wnid_to_offset(ref) if isinstance(ref, str) else ref
        return self.index.get(off)

    def encode(self, offsets: Iterable[int]) -> list[int]:
        """Synset offsets -> sorted unique vocabulary rows (out-of-vocabulary synsets dropped)."""
        return sorted({self.index[o] for o in offsets if o in self.index})

    def multi_hot(self, rows: Iterable[int]) -> torch.Tensor:
        """Rows -> float32 target of shape [V]."""
        t = torch.zeros(len(self), dtype=torch.float32)
        idx = list(rows)
        if idx:
            t[torch.as_tensor(idx, dtype=torch.long)] = 1.0
        return t

    def prior(self) -> torch.Tensor:
        """Per-row label frequency among the counted captions, shape [V] (for the classifier bias)."""
        n = max(int(self.meta.get("n_captions", 0)), 1)
        return torch.tensor(self.counts, dtype=torch.float64).div(n).clamp(1e-6, 1 - 1e-6).float()

    def to_json(self) -> dict:
        rows = [
            {"wnid": offset_to_wnid(o), "name": n, "count": c}
            for o, n, c in zip(self.offsets, self.names, self.counts, strict=True)
        ]
        return {"format": FORMAT, **self.meta, "synsets": rows}

    def sha256(self) -> str:
        """Identity of the row order (what cached labels depend on)."""
        return hashlib.sha256(",".join(map(str, self.offsets)).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"vocabulary not found: {p}")
        try:
            d = json.loads(p.read_text())
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            rows = d.pop("synsets")
            d.pop("format")
            return cls(
                [wnid_to_offset(r["wnid"]) for r in rows],
                [int(r["count"]) for r in rows],
                [str(r["name"]) for r in rows],
                d,
            )
        except (ValueError, KeyError, TypeError, WordNetError) as e:
            raise ValueError(f"corrupt vocabulary file {p}: {e}") from e


def build_vocab(
    caption_synsets: Iterable[list[int]],
    wordnet: WordNet,
    *,
    min_count: int = 5,
    max_size: int = 24320,
    meta: dict | None = None,
) -> Vocabulary:
    """Count synsets over captions (each synset once per caption); keep those with ``count >= min_count``,
    the ``max_size`` most frequent. ``caption_synsets``: one list of synset offsets per caption."""
    if min_count < 1 or max_size < 1:
        raise ValueError("min_count and max_size must be >= 1")
    counts: Counter[int] = Counter()
    per_caption: list[list[int]] = []
    for offs in caption_synsets:
        uniq = sorted(set(offs))
        counts.update(uniq)
        per_caption.append(uniq)
    kept = sorted((o for o, c in counts.items() if c >= min_count), key=lambda o: (-counts[o], o))[:max_size]
    keep = set(kept)
    covered = sum(1 for offs in per_caption if any(o in keep for o in offs))
    info = {
        "min_count": min_count,
        "max_size": max_size,
        "n_captions": len(per_caption),
        "n_candidates": len(counts),
        "coverage": covered / max(len(per_caption), 1),
        **(meta or {}),
    }
    return Vocabulary(kept, [counts[o] for o in kept], [wordnet.name(o) for o in kept], info)
