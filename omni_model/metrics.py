"""Scores shared by tokenizer quality reports and evaluation."""

from __future__ import annotations

import re
from typing import Sequence

_WORD = re.compile(r"[a-z0-9']+")
_NUMBERS = dict(enumerate("zero one two three four five six seven eight nine ten eleven twelve".split()))


def normalize_text(text: str) -> list[str]:
    """Lower-case words without punctuation, small numbers spelled out (recognisers
    write "1." for a spoken "one"): the usual normalisation before WER."""
    return [_NUMBERS.get(int(w), w) if w.isdigit() else w for w in _WORD.findall(text.lower())]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: total word edits over total reference words."""
    if len(references) != len(hypotheses):
        raise ValueError("references and hypotheses differ in number")
    edits = words = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = normalize_text(ref), normalize_text(hyp)
        edits += edit_distance(r, h)
        words += len(r)
    return edits / max(1, words)
