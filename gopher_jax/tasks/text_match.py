"""Answer comparison: SQuAD-style normalisation, exact match, token F1, a cloze's first word."""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize(prediction) == normalize(target))


def f1(prediction: str, target: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(target).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def first_word(text: str) -> str:
    """The first whitespace-separated word without the punctuation around it."""
    words = text.split()
    return words[0].strip(string.punctuation) if words else ""


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop sequence."""
    ends = [text.find(s) for s in stop if s in text]
    return text[:min(ends)] if ends else text
