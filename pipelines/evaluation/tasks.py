"""The evaluation's tasks as a table: what each asks the model for, what its answer is
scored against, how, and what the prior guess answers. Adding a task is one `TaskSpec`
in `EVAL_TASKS` (and its manifest `{task}.jsonl` among the held-out manifests).

A case's answer reaches its scorer as a `Prediction`, whether the model gave it or the
prior guess did: the guess answers each case with the right output of another case of
the task (the render of another scene, another caption, another answer), which is what
knowing the world but not the input scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from omni_model.any_to_any import Audio
from omni_model.templates import AUDIO_PLACEHOLDER
from pipelines.data.manifest import Sample
from pipelines.evaluation.scores import exact_match, says, score_images
from pipelines.evaluation.standard import asr_scores, caption_scores, vqa_accuracy, vqa_normalise, yes_no_scores
from pipelines.world.scenes import Scene, captions, render


@dataclass
class Case:
    """One held-out example: the API inputs and what the answer should be."""

    task: str
    inputs: list[Any]
    reference: str  #: text answer, or the text to be spoken (TTS), or the caption (t2i, s2i)
    scene: Scene | None = None
    prompt: str = ""
    answer_audio: Audio | None = None  #: spoken VQA: the reference spoken answer
    #: every accepted answer where the manifest gives several (`meta.answers`: VQA's human
    #: answers; `meta.captions`: reference captions); None: `reference` alone
    references: list[str] | None = None
    group: str | None = None  #: the questions' image (`meta.image_id`, else its first image path)


@dataclass(frozen=True)
class Prediction:
    """What a scorer reads of one answer."""

    text: str = ""
    image: Image.Image | None = None
    heard: str | None = None  #: the recogniser's transcript of the spoken answer; None: not heard
    speech_codes: int = 0  #: length of the spoken answer in codes


Scorer = Callable[[Sequence[Case], Sequence[Prediction]], dict[str, float]]


@dataclass(frozen=True)
class TaskSpec:
    outputs: tuple[str, ...]  #: what the model is asked for (`AnyToAny.prepare`)
    reference: Callable[[Sample], str]  #: the answer a manifest row is scored against
    score: Scorer
    #: the prior guess's answer made from another case (None where it cannot be made);
    #: no function: the task has no prior guess
    guess: Callable[[Case], Prediction | None] | None = None
    #: further scores that need the model and the recogniser (pipe, recognizer, cases)
    extra: Callable[[Any, Any, Sequence[Case]], dict[str, float]] | None = None

    @property
    def speaks(self) -> bool:
        return "speech" in self.outputs


# ---------------------------------------------------------------------- references
def _answer(sample: Sample) -> str:
    return sample.messages[-1]["content"].replace(AUDIO_PLACEHOLDER, "").strip()


def _caption(sample: Sample) -> str:
    return (sample.meta or {}).get("caption") or sample.messages[0]["content"]


def _text_to_speak(sample: Sample) -> str:
    return sample.messages[0]["content"].split("\n", 1)[-1]  # after the instruction line


# ---------------------------------------------------------------------- scorers
def _images(cases: Sequence[Case], answers: Sequence[Prediction]) -> dict[str, float]:
    """The world's checker, on the cases whose scene is known (a user's own images have
    none: counted in `unscored`)."""
    known = [(c.scene, a.image) for c, a in zip(cases, answers) if c.scene is not None]
    result = score_images(*map(list, zip(*known))) if known else {}
    return {**result, **({"unscored": float(len(cases) - len(known))} if len(known) < len(cases) else {})}


def caption_wordings(cases: Sequence[Case]) -> list[list[str]]:
    """The captions accepted for each case: the manifest's references, or every world
    wording of its scene (training captions use three, so one reference would mark two
    thirds of the right ones wrong), or the reference alone."""
    return [c.references or (captions(c.scene) if c.scene is not None else [c.reference]) for c in cases]


def _caption_match(cases: Sequence[Case], answers: Sequence[Prediction]) -> dict[str, float]:
    wordings, texts = caption_wordings(cases), [a.text for a in answers]
    return {"exact_match": exact_match(wordings, texts), **caption_scores(wordings, texts)}


def _exact(cases: Sequence[Case], answers: Sequence[Prediction]) -> dict[str, float]:
    return {"exact_match": exact_match([c.reference for c in cases], [a.text for a in answers])}


def _vqa(cases: Sequence[Case], answers: Sequence[Prediction]) -> dict[str, float]:
    """Exact match, and VQA accuracy (VQA v2's answer normalisation; with human answers
    in `meta.answers`, min(1, matches / 3)); on a yes/no set also POPE's and MME's scores."""
    texts = [a.text for a in answers]
    result = {**_exact(cases, answers), "vqa_accuracy": vqa_accuracy([c.references or c.reference for c in cases], texts)}
    if cases and all(vqa_normalise(c.reference) in ("yes", "no") for c in cases):  # POPE, MME
        scores = yes_no_scores([c.reference for c in cases], texts, [c.group for c in cases])
        result.update({f"yes_no_{k}": v for k, v in scores.items()})
    return result


def _wer(cases: Sequence[Case], answers: Sequence[Prediction]) -> dict[str, float]:
    """WER and CER after Whisper's English normaliser."""
    return asr_scores([c.reference for c in cases], [a.text for a in answers])


def _intelligibility(cases: Sequence[Case], answers: Sequence[Prediction]) -> dict[str, float]:
    if any(a.heard is None for a in answers):  # no recogniser: only how much was said
        return {"mean_speech_codes": float(np.mean([a.speech_codes for a in answers]))}
    scores = asr_scores([c.reference for c in cases], [a.heard for a in answers])
    return {"intelligibility_wer": scores["wer"], "intelligibility_cer": scores["cer"]}


def _spoken_answer(cases: Sequence[Case], answers: Sequence[Prediction]) -> dict[str, float]:
    result = _exact(cases, answers)
    if all(a.heard is not None for a in answers):
        result["spoken_answer_says_it"] = says([c.reference for c in cases], [a.heard for a in answers])
    return result


# ---------------------------------------------------------------------- guesses and extras
def _render_of(case: Case) -> Prediction | None:
    return Prediction(image=render(case.scene)) if case.scene is not None else None


def _text_of(case: Case) -> Prediction:
    return Prediction(text=case.reference)


def _spoken_text_of(case: Case) -> Prediction:
    return Prediction(text=case.reference, heard=case.reference)


def spoken_ceilings(pipe, recognizer, cases: Sequence[Case]) -> dict[str, float]:
    """`spoken_answer_says_it` of the reference answer audio itself (what the recogniser
    can hear) and of the same audio encoded and decoded by the speech tokenizer (the most
    the model's spoken answers can score)."""
    codec = pipe.speech_codec
    if recognizer is None or codec is None or not codec.can_decode:
        return {}
    spoken = [c for c in cases if c.answer_audio is not None]
    heard, through_codec = [], []
    for case in spoken:
        wave = torch.as_tensor(np.asarray(case.answer_audio.waveform, dtype=np.float32))
        heard.append(recognizer.transcribe(wave.numpy(), case.answer_audio.sample_rate))
        with torch.no_grad():
            codes = codec.encode([wave], case.answer_audio.sample_rate)[0]
            decoded = codec.decode([codes])[0].numpy()
        through_codec.append(recognizer.transcribe(decoded, codec.sample_rate))
    refs = [c.reference for c in spoken]
    return {"reference_says_it": says(refs, heard),
            "reference_through_codec_says_it": says(refs, through_codec)}


EVAL_TASKS: dict[str, TaskSpec] = {
    "t2i": TaskSpec(("image",), _caption, _images, _render_of),
    "s2i": TaskSpec(("image",), _caption, _images, _render_of),
    "caption": TaskSpec(("text",), _answer, _caption_match, _text_of),
    "vqa": TaskSpec(("text",), _answer, _vqa, _text_of),
    "asr": TaskSpec(("text",), _answer, _wer, _text_of),
    "tts": TaskSpec(("speech",), _text_to_speak, _intelligibility),  # a guess needs a recogniser
    "svqa": TaskSpec(("text", "speech"), _answer, _spoken_answer, _spoken_text_of, spoken_ceilings),
}


def spec(task: str) -> TaskSpec:
    if task not in EVAL_TASKS:
        raise ValueError(f"no evaluation task {task!r}; known: {sorted(EVAL_TASKS)}")
    return EVAL_TASKS[task]


def prior_guess(task: str, cases: Sequence[Case], seed: int = 0) -> dict[str, float]:
    """The scores of the prior guess: each case answered with the guess made from
    another case of the task, picked by a random derangement (one cycle through all
    cases: nobody gets its own). The report's chance column."""
    task_spec = spec(task)
    if len(cases) < 2 or task_spec.guess is None:
        return {}
    order = np.random.default_rng(seed).permutation(len(cases))
    source = np.empty_like(order)
    source[order] = np.roll(order, 1)
    guesses = [task_spec.guess(cases[int(j)]) for j in source]
    if any(g is None for g in guesses):
        return {}
    return task_spec.score(cases, guesses)
