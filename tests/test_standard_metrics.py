"""The field's metrics (pipelines/evaluation/standard.py) on cases whose right values are
known by hand: Whisper-normalised WER and CER, VQA v2's answer normalisation and
accuracy, corpus BLEU-4 and CIDEr-D."""

import math
import random

import pytest

from pipelines.evaluation.standard import (asr_scores, caption_scores, normalise, vqa_accuracy, vqa_normalise,
                                          yes_no_scores)
from pipelines.world.scenes import captions, make_scene


def test_wer_and_cer_are_taken_after_whispers_normaliser():
    assert normalise("Three blue squares.") == "3 blue squares"
    assert normalise("The colour, Mr. Smith!") == "the color mister smith"
    perfect = asr_scores(["Three blue squares.", "The colour is grey"], ["3 blue squares", "the color is gray"])
    assert perfect["wer"] == 0 and perfect["cer"] == 0
    # one inserted word in 3 + one substituted word in 2: 2 edits over 5 words
    assert asr_scores(["the cat sat", "big dog"], ["the cat sat down", "big cat"])["wer"] == pytest.approx(2 / 5)
    # characters: "abcd" -> "abxd" is 1 edit in 4
    assert asr_scores(["abcd"], ["abxd"])["cer"] == pytest.approx(1 / 4)
    # an empty reference cannot be a rate: counted apart with what was inserted
    apart = asr_scores(["", "hello there"], ["go away", "hello there"])
    assert apart["wer"] == 0 and apart["empty_references"] == 1 and apart["inserted_words"] == 2
    assert math.isnan(asr_scores([""], ["x"])["wer"])
    with pytest.raises(ValueError, match="1 references but 2"):
        asr_scores(["a"], ["a", "b"])


@pytest.mark.parametrize("answer, expected", [
    ("Two dogs.", "2 dogs"), ("the RED one", "red 1"), ("yes!", "yes"), ("dont know", "don't know"),
    ("3,000", "3000"), ("a/b", "b"), ("  on the left\n", "on left"), ("none", "0"), ("3.5", "3.5"),
])
def test_vqa_answers_are_normalised_as_the_official_evaluation_does(answer, expected):
    assert vqa_normalise(answer) == expected


def test_vqa_accuracy_counts_an_answer_fully_when_three_humans_gave_it():
    assert vqa_accuracy(["two"], ["2"]) == 1.0  # one reference: exact match after normalisation
    assert vqa_accuracy([["cat", "kitten"]], ["kitten"]) == 1.0
    humans = ["cat"] * 2 + ["dog"] * 8
    # leave-one-out over ten humans: the 2 "cat" subsets hold 1 match, the 8 others 2: (2/3 + 8*2/3)/10
    assert vqa_accuracy([humans], ["cat"]) == pytest.approx(0.6)
    assert vqa_accuracy([humans], ["dog"]) == 1.0
    assert vqa_accuracy([humans], ["bird"]) == 0.0
    with pytest.raises(ValueError, match="without an answer"):
        vqa_accuracy([[]], ["x"])


def test_bleu_and_cider_rank_right_captions_over_wrong_ones():
    scenes = [make_scene(5, i) for i in range(40)]
    refs = [captions(s) for s in scenes]
    right = caption_scores(refs, [r[0] for r in refs])
    assert right["bleu4"] == pytest.approx(1.0)
    rng = random.Random(0)
    shuffled = caption_scores(refs, [refs[(i + 7) % len(refs)][0] for i in range(len(refs))])
    noise = caption_scores(refs, [" ".join(rng.choice(["a", "zebra", "runs", "blue", "quickly"]) for _ in range(6))
                                  for _ in refs])
    assert right["cider"] > shuffled["cider"] > noise["cider"] >= 0
    assert right["bleu4"] > shuffled["bleu4"] > noise["bleu4"]
    # case and punctuation do not count; a case with fewer references is scored as if its
    # first were repeated (which changes neither clipped counts nor the closest length)
    assert caption_scores(refs, [r[0].upper() + "." for r in refs]) == right
    uneven = [["a red circle on the left"], ["two blue squares", "there are two blue squares"]]
    padded = [["a red circle on the left"] * 2, uneven[1]]
    hyps = ["a red circle at the left", "two blue squares"]
    assert caption_scores(uneven, hyps)["bleu4"] == pytest.approx(caption_scores(padded, hyps)["bleu4"])
    with pytest.raises(ValueError, match="without a reference"):
        caption_scores([[]], ["x"])


def test_yes_no_sets_get_popes_and_mmes_scores():
    truth = ["yes", "no", "Yes", "no", "yes"]
    said = ["Yes.", "yes, there is", "no", "No", "yes"]
    scores = yes_no_scores(truth, said, ["a", "a", "b", "b", "c"])
    # "yes" said 3 times, 2 of them right; 3 true "yes": precision = recall = F1 = 2/3
    assert scores == pytest.approx({"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3,
                                    "yes_ratio": 3 / 5, "accuracy_plus": 1 / 3})  # only image c all right
    assert "accuracy_plus" not in yes_no_scores(["yes"], ["yes"])
    with pytest.raises(ValueError, match="yes or no"):
        yes_no_scores(["two"], ["2"])
