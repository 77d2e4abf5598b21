"""The field's metrics, computed the way published numbers are, from maintained packages:

- ASR and TTS intelligibility: WER and CER (`jiwer`) after Whisper's English text
  normaliser (`whisper-normalizer`, the normaliser of OpenAI's Whisper evaluation:
  lower case, punctuation out, spellings and numbers standardised: "Three." -> "3");
- VQA: the VQA v2 answer normalisation (punctuation, number words to digits, articles
  and contractions, as the official evaluation script does), then exact match, or with
  ten human answers per question VQA accuracy (an answer counts fully when at least
  three humans gave it: min(1, matches / 3), averaged over the ten leave-one-out subsets);
- yes/no sets (POPE, MME): accuracy, precision/recall/F1 of "yes" and the share of
  "yes" answers (POPE's table), and accuracy+ (MME: every question of an image right);
- captions: corpus BLEU-4 (`sacrebleu`, every reference of a case) and CIDEr-D
  (`pycocoevalcap`, the COCO caption evaluation's own code) over lower-cased words
  without punctuation (COCO's Java PTB tokenizer is replaced by that).

Each function takes references and predictions in order and returns plain floats.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Sequence

__all__ = ["asr_scores", "caption_scores", "normalise", "vqa_accuracy", "vqa_normalise", "yes_no_scores"]


@lru_cache(maxsize=1)
def _whisper_normaliser():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalise(text: str) -> str:
    """Whisper's English normaliser."""
    return _whisper_normaliser()(text)


def asr_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus WER and CER after Whisper's normaliser. References that normalise to nothing
    (a silent clip's empty transcript) cannot be scored by a rate and are counted apart,
    where there are any: `empty_references`, with the words their hypotheses inserted in
    `inserted_words`."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(normalise(r), normalise(h)) for r, h in zip(references, hypotheses)]
    scored = [(r, h) for r, h in pairs if r.strip()]
    empty = [h for r, h in pairs if not r.strip()]
    result = {"empty_references": float(len(empty)),
              "inserted_words": float(sum(len(h.split()) for h in empty))} if empty else {}
    if not scored:
        return {"wer": float("nan"), "cer": float("nan"), **result}
    refs, hyps = zip(*scored)
    hyps = [h if h.strip() else "" for h in hyps]
    words = jiwer.process_words(list(refs), list(hyps))
    chars = jiwer.process_characters(list(refs), list(hyps))
    return {"wer": float(words.wer), "cer": float(chars.cer), **result}


# ---------------------------------------------------------------------- VQA
# The official VQA evaluation's answer processing (Antol et al. 2015; VQA v2 vqaEval.py):
# the same rules, written anew.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]


def vqa_normalise(answer: str) -> str:
    """An answer as the VQA evaluation compares it: "Two dogs." -> "2 dogs"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    for p in _PUNCTUATION:  # kept apart from words: removed; inside a word: a space
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(answers: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> float:
    """Mean VQA accuracy. A case's `answers` is one answer (exact match after
    normalisation) or the human answers: with 3 or more, VQA v2's min(1, matches / 3)
    averaged over leaving each human out; with 2, a match with either."""
    if len(answers) != len(predictions):
        raise ValueError(f"{len(answers)} answer sets but {len(predictions)} predictions")
    total = 0.0
    for refs, prediction in zip(answers, predictions):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("a question without an answer")
        guess = vqa_normalise(prediction)
        normalised = [vqa_normalise(r) for r in refs]
        if len(normalised) < 3:
            total += float(guess in normalised)
            continue
        matches = [sum(other == guess for j, other in enumerate(normalised) if j != i) for i in range(len(normalised))]
        total += sum(min(1.0, m / 3) for m in matches) / len(matches)
    return total / max(1, len(predictions))


# ---------------------------------------------------------------------- captions
_WORDS = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _caption_words(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def caption_scores(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (0-1) and CIDEr-D of `predictions` against each case's references."""
    import sacrebleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference sets but {len(predictions)} predictions")
    if not predictions:
        return {}
    refs = [[_caption_words(r) for r in ([rs] if isinstance(rs, str) else rs)] for rs in references]
    if any(not r for r in refs):
        raise ValueError("a caption case without a reference")
    hyps = [_caption_words(p) for p in predictions]
    most = max(map(len, refs))
    # sacrebleu reads reference streams; a case with fewer references repeats its first
    # (a repeated reference changes neither clipped counts nor the closest length)
    streams = [[r[k] if k < len(r) else r[0] for r in refs] for k in range(most)]
    bleu = sacrebleu.corpus_bleu(hyps, streams, tokenize="none").score / 100
    cider, _ = Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)})
    return {"bleu4": float(bleu), "cider": float(cider)}


# ---------------------------------------------------------------------- yes/no sets
def yes_no_scores(answers: Sequence[str], predictions: Sequence[str],
                  groups: Sequence[str | None] | None = None) -> dict[str, float]:
    """The scores of yes/no question sets: POPE's (accuracy, and precision, recall and F1
    of "yes", with the share of "yes" answers given) and MME's accuracy+ (the share of
    images, `groups`, whose every question is answered right; MME asks two per image)."""
    if len(answers) != len(predictions):
        raise ValueError(f"{len(answers)} answers but {len(predictions)} predictions")
    truth = [vqa_normalise(a) for a in answers]
    if any(t not in ("yes", "no") for t in truth):
        raise ValueError("yes/no scores need every answer to be yes or no")
    said = [vqa_normalise(p).split()[:1] == ["yes"] for p in predictions]
    right = [s == (t == "yes") for s, t in zip(said, truth)]
    tp = sum(s and t == "yes" for s, t in zip(said, truth))
    precision = tp / max(1, sum(said))
    recall = tp / max(1, truth.count("yes"))
    result = {"accuracy": sum(right) / max(1, len(right)), "precision": precision, "recall": recall,
              "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
              "yes_ratio": sum(said) / max(1, len(said))}
    if groups is not None and any(g is not None for g in groups):
        by: dict[str, list[bool]] = {}
        for g, r in zip(groups, right):
            if g is not None:
                by.setdefault(g, []).append(r)
        result["accuracy_plus"] = sum(all(v) for v in by.values()) / len(by)
    return result
