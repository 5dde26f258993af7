"""MassiveText's quality filter and repetition removal (Gopher paper, appendix A, Table A1).

    rule = quality_rule(text)      # None: kept; else the name of the first rule it breaks
    rule = repetition_rule(text)

The rules and their thresholds are datatrove's `GopherQualityFilter` and
`GopherRepetitionFilter` (their defaults equal the paper's numbers: tests/test_filters.py
compares them against a table written from the paper), with two changes:

- Words. datatrove splits English words with spaCy's `blank("en")` tokenizer (other languages:
  nltk's punkt, a download at run time). spaCy is in none of datatrove's extras and nothing may
  download here, so the filters get `WhitespaceWords`: a word is a run of non-whitespace
  characters, as in the paper ("words" separated by whitespace). Nothing downloads.
- Duplicated n-grams (n = 5..10). datatrove counts the characters of an n-gram's *repeats*
  only (not its first occurrence), skipping greedily ahead, against the length of the whole
  text including whitespace. The paper counts "the characters contained within all duplicate
  n-grams, taking care not to count characters that occur in overlapping n-grams more than
  once": `duplicate_ngram_char_fraction` marks every word covered by any occurrence of an
  n-gram that occurs more than once and divides their characters by all words' characters.
  Two copies of a paragraph are then 1.0 (datatrove: about 0.5).

Rules run in the paper's order (quality, then repetition) and a document is reported under
the first rule it breaks, so an audit attributes each removal to one rule.
"""

from __future__ import annotations

import collections
import dataclasses

from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.utils.word_tokenizers import WordTokenizer

__all__ = ["PAPER", "PAPER_DUP_NGRAMS", "QUALITY_RULES", "REPETITION_RULES", "FilterConfig",
           "WhitespaceWords", "duplicate_ngram_char_fraction", "quality_rule",
           "repetition_rule"]


class WhitespaceWords(WordTokenizer):
    """Words as runs of non-whitespace (`str.split`): no model, no download."""

    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:  # the Gopher filters never ask for it
        raise NotImplementedError("WhitespaceWords splits words only")

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        raise NotImplementedError("WhitespaceWords splits words only")


WORDS = WhitespaceWords()  # one instance: datatrove caches split texts per (text, tokenizer)

# datatrove's reason strings, in the order its filters test them.
QUALITY_RULES = ("gopher_short_doc", "gopher_long_doc", "gopher_below_avg_threshold",
                 "gopher_above_avg_threshold", "gopher_too_many_hashes",
                 "gopher_too_many_ellipsis", "gopher_too_many_bullets",
                 "gopher_too_many_end_ellipsis", "gopher_below_alpha_threshold",
                 "gopher_enough_stop_words")
PAPER_DUP_NGRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
REPETITION_RULES = ("empty", "dup_para_frac", "dup_para_char_frac", "dup_line_frac",
                    "dup_line_char_frac", "top_2_gram", "top_3_gram", "top_4_gram",
                    *(f"duplicated_{n}_n_grams" for n, _ in PAPER_DUP_NGRAMS))


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Thresholds that differ from the paper's (for tests and experiments); None: the paper's."""

    quality: tuple[tuple[str, float], ...] = ()  # GopherQualityFilter keyword overrides
    repetition: tuple[tuple[str, object], ...] = ()  # GopherRepetitionFilter overrides
    dup_n_grams: tuple[tuple[int, float], ...] = PAPER_DUP_NGRAMS


PAPER = FilterConfig()

_FILTERS: dict[FilterConfig, tuple[GopherQualityFilter, GopherRepetitionFilter]] = {}


def _filters(cfg: FilterConfig) -> tuple[GopherQualityFilter, GopherRepetitionFilter]:
    if cfg not in _FILTERS:
        quality = GopherQualityFilter(language=WORDS, **dict(cfg.quality))
        # dup_n_grams=(): that rule is ours (see the module docstring).
        repetition = GopherRepetitionFilter(language=WORDS, **{**dict(cfg.repetition),
                                                               "dup_n_grams": ()})
        _FILTERS[cfg] = (quality, repetition)
    return _FILTERS[cfg]


def _reason(result: bool | tuple[bool, str]) -> str | None:
    if result is True:
        return None
    return result[1] if isinstance(result, tuple) else "removed"


def quality_rule(text: str, cfg: FilterConfig = PAPER) -> str | None:
    """The first quality rule `text` breaks, or None when it passes them all."""
    if not text.split():  # datatrove's quality filter divides by the number of lines
        return "gopher_short_doc"
    return _reason(_filters(cfg)[0].filter(Document(text=text, id="")))


def duplicate_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of the words covered by any occurrence of an n-gram that occurs more than
    once, over all words' characters; a word in several such n-grams counts once."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = collections.Counter(grams)
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = b"\1" * n
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / max(total, 1)


def repetition_rule(text: str, cfg: FilterConfig = PAPER) -> str | None:
    """The first repetition rule (Table A1) `text` breaks, or None."""
    rule = _reason(_filters(cfg)[1].filter(Document(text=text, id="")))
    if rule is not None:
        return rule
    words = WORDS.word_tokenize(text)
    for n, limit in cfg.dup_n_grams:
        if duplicate_ngram_char_fraction(words, n) > limit:
            return f"duplicated_{n}_n_grams"
    return None


def first_rule(text: str, cfg: FilterConfig = PAPER) -> tuple[str, str] | None:
    """(stage, rule) of the first rule `text` breaks (stage 'quality' or 'repetition')."""
    rule = quality_rule(text, cfg)
    if rule is not None:
        return "quality", rule
    rule = repetition_rule(text, cfg)
    return None if rule is None else ("repetition", rule)
