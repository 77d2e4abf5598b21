"""Evaluation of a trained model on held-out world scenes (never seen in training).

Every task goes through the any-to-any API (`omni_model.pipeline.AnyToAny`), the same
object the server uses:

- t2i and s2i: the world's attribute checker reads the generated image back (colour,
  shape, position, size, count, overall agreement with the scene that was asked for);
- caption and VQA: exact match of the normalised answer (a caption matches if it equals
  any of the world's wordings of its scene: the training captions use three, picked at
  random, so one reference would mark two thirds of the right captions wrong);
- ASR: word error rate;
- TTS: intelligibility, the WER of Whisper's transcript of the generated speech;
- spoken VQA: exact match of the text answer (and, with a recogniser, whether the spoken
  answer says it, beside the same for the reference answer audio passed through the
  speech tokenizer: the ceiling the speech codes allow);
- t2i accuracy against the number of sampler steps, with and without the position penalty.

Scoring is separate from generation (`score_*`), so the scores themselves are tested on
ground truth (perfect) and on random outputs (chance). The report folder gets
`metrics.json`, `report.md` (the table), `t2i_grid.png` (generated images with their
prompts), `loss.png` (training curves from the stages' metrics.jsonl) and a few WAVs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm
from PIL import Image, ImageDraw

from omni_model.metrics import normalize_text, word_error_rate
from omni_model.pipeline import AnyToAny, Audio, LengthPresets, Output
from omni_model.sampler import SamplerConfig
from omni_model.templates import AUDIO_PLACEHOLDER, Text, split_placeholders
from pipelines.manifest import Sample, parse_line, read_lines, resolve_media
from pipelines.media import load_audio, load_image
from pipelines.world import ANSWERS, Agreement, Scene, captions, check_image, render

logger = logging.getLogger(__name__)

TASK_OUTPUTS = {"t2i": ["image"], "s2i": ["image"], "caption": ["text"], "vqa": ["text"],
                "asr": ["text"], "tts": ["speech"], "svqa": ["text", "speech"]}


@dataclass(frozen=True)
class EvalConfig:
    model: str = "runs/stage3/final"  #: a checkpoint folder (final/ of a stage)
    image_tokenizer: str = "runs/tokenizers/image"
    speech_tokenizer: str = "runs/tokenizers/speech"
    data_root: str = "runs/world"
    #: held-out manifests: {task}.jsonl for t2i, caption, vqa, asr, tts, svqa, s2i
    manifests: tuple[str, ...] = ("runs/world/manifests/eval", "runs/world/manifests/sdvi_eval")
    out: str = "runs/report"
    tasks: tuple[str, ...] = ("t2i", "s2i", "caption", "vqa", "asr", "tts", "svqa")
    max_per_task: int = 48
    batch_size: int = 16
    sampler: SamplerConfig = SamplerConfig(steps=16)
    #: the sampler of image outputs (t2i, s2i and the steps curve); None: `sampler`
    image_sampler: SamplerConfig | None = None
    presets: LengthPresets = LengthPresets()
    #: t2i accuracy at these step counts, with and without the position penalty
    step_curve: tuple[int, ...] = (8, 16, 32, 64)
    position_penalty: float = 2.0
    position_penalty_start: int = 0
    s2i_cfg_scale: float = 0.0  #: classifier-free guidance for speech-to-image
    transcribe: bool = True  #: Whisper for TTS intelligibility and spoken answers
    runs: tuple[str, ...] = ("runs/stage1", "runs/stage2", "runs/stage3")  #: loss curves
    #: training shard sets to size the responses from (`calibrate_presets`); empty: `presets`
    calibrate_from: tuple[str, ...] = ("runs/shards/train", "runs/shards/sdvi")
    grid: int = 12  #: generated images in t2i_grid.png
    wavs: int = 3  #: generated WAVs per speech task
    seed: int = 0


@dataclass
class Case:
    """One held-out example: the API inputs and what the answer should be."""

    task: str
    inputs: list[Any]
    reference: str  #: text answer, or the text to be spoken (TTS), or the caption (t2i, s2i)
    scene: Scene | None = None
    prompt: str = ""
    answer_audio: Audio | None = None  #: spoken VQA: the reference spoken answer


# ---------------------------------------------------------------------- scores
def score_images(scenes: Sequence[Scene], images: Sequence[Image.Image]) -> dict[str, float]:
    """Per-attribute agreement of the checker's reading of each image with its scene."""
    agreement = Agreement()
    for scene, image in zip(scenes, images, strict=True):
        agreement.add(scene, check_image(image))
    return agreement.rates()


def exact_match(references: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> float:
    """Share of predictions whose normalised words equal the reference's (or, where a
    reference is a list of acceptable answers, any one of them)."""
    pairs = list(zip(references, predictions, strict=True))
    accepted = [[refs] if isinstance(refs, str) else refs for refs, _ in pairs]
    hits = sum(normalize_text(p) in map(normalize_text, ok) for ok, (_, p) in zip(accepted, pairs))
    return hits / max(1, len(pairs))


def says(references: Sequence[str], transcripts: Sequence[str]) -> float:
    """Share of transcripts that contain every word of their reference."""
    pairs = list(zip(references, transcripts, strict=True))
    return sum(set(normalize_text(r)) <= set(normalize_text(t)) for r, t in pairs) / max(1, len(pairs))


def chance_levels() -> dict[str, float]:
    """What guessing scores: a uniformly random world answer for VQA (the model could
    do better by guessing per question type; this is the floor a report compares to)."""
    return {"vqa": 1 / len(ANSWERS)}


def prior_guess(task: str, cases: Sequence[Case], seed: int = 0) -> dict[str, float]:
    """The scores of a guess that knows the world but not the input: each case answered
    with the right output of another case of the task (a random derangement): the
    render of another scene for t2i/s2i, another scene's caption, another question's
    answer, another utterance's transcript. The chance column of the report."""
    if len(cases) < 2 or task == "tts":
        return {}
    order = np.random.default_rng(seed).permutation(len(cases))
    source = np.empty_like(order)
    source[order] = np.roll(order, 1)  # one cycle through all cases: nobody gets its own
    guesses = [cases[int(j)] for j in source]
    if task in ("t2i", "s2i"):
        if any(c.scene is None for c in cases):
            return {}
        return score_images([c.scene for c in cases], [render(g.scene) for g in guesses])
    if task == "caption":
        return {"exact_match": exact_match(_caption_wordings(cases), [g.reference for g in guesses])}
    refs, answers = [c.reference for c in cases], [g.reference for g in guesses]
    if task == "asr":
        return {"wer": word_error_rate(refs, answers)}
    result = {"exact_match": exact_match(refs, answers)}
    if task == "svqa":
        result["spoken_answer_says_it"] = says(refs, answers)
    return result


def _caption_wordings(cases: Sequence[Case]) -> list[list[str]]:
    """The captions accepted for each case: every world wording of its scene."""
    return [captions(c.scene) if c.scene is not None else [c.reference] for c in cases]


def calibrate_presets(shard_sets: Sequence[str], tokenizer, base: LengthPresets = LengthPresets(),
                      codes_per_second: float = 12.5, quantile: float = 0.9) -> LengthPresets:
    """Response lengths measured on training shards (the answers the model learned).

    TTS: speech codes (+ eoa, im_end) per token of the input text; ASR: answer tokens
    (+ im_end) per second of input speech; text: the longest caption/VQA answer (+ im_end);
    spoken answers: their whole length and where `boa` sits in it. Each at `quantile`,
    so most answers fit and the rest of a region fills with the pads the model learned.
    """
    import pyarrow.parquet as pq

    from pipelines.shards import shard_files

    def n_text(parts) -> int:
        return sum(len(tokenizer.encode(p["text"])) for p in parts if p["type"] == "text")

    def n_codes(parts, kind: str) -> int:
        return sum(len(p["codes"]) for p in parts if p["type"] == kind)

    tts, asr, text, spoken, boa = [], [], [], [], []
    for root in shard_sets:
        for f in shard_files(root) if Path(root).exists() else []:
            for row in pq.read_table(f, columns=["task", "messages"]).to_pylist():
                user, answer = row["messages"][0]["parts"], row["messages"][-1]["parts"]
                if row["task"] == "tts" and n_text(user):
                    tts.append((n_codes(answer, "speech") + 2) / n_text(user))
                elif row["task"] == "asr" and n_codes(user, "speech"):
                    asr.append((n_text(answer) + 1) / (n_codes(user, "speech") / codes_per_second))
                elif row["task"] in ("caption", "vqa"):
                    text.append(n_text(answer) + 1)
                elif row["task"] == "svqa":
                    spoken.append(n_text(answer) + 1 + n_codes(answer, "speech") + 2)
                    boa.append(n_text(answer) / spoken[-1])
    q = lambda xs: float(np.quantile(xs, quantile))
    return replace(
        base,
        tts_codes_per_token=round(q(tts), 3) if tts else base.tts_codes_per_token,
        asr_tokens_per_second=round(q(asr), 3) if asr else base.asr_tokens_per_second,
        text=int(np.ceil(q(text))) + 1 if text else base.text,
        spoken=int(np.ceil(q(spoken))) if spoken else base.spoken,
        boa_fraction=round(float(np.median(boa)), 3) if boa else base.boa_fraction)


# ---------------------------------------------------------------------- cases
def load_cases(cfg: EvalConfig, task: str) -> list[Case]:
    """The first `max_per_task` held-out examples of `task` (media checked and loaded)."""
    root = Path(cfg.data_root)
    path = next((Path(m) / f"{task}.jsonl" for m in cfg.manifests if (Path(m) / f"{task}.jsonl").exists()), None)
    if path is None:
        logger.warning("no held-out manifest for %s in %s", task, cfg.manifests)
        return []
    cases = []
    for _, line in read_lines(path):
        sample = parse_line(line, root)
        cases.append(_case(sample, root))
        if len(cases) >= cfg.max_per_task:
            break
    return cases


def _case(sample: Sample, root: Path) -> Case:
    user, answer = sample.messages[0]["content"], sample.messages[-1]["content"]
    images = (load_image(resolve_media(root, rel)) for rel in sample.images)
    audios = (_audio(resolve_media(root, rel)) for rel in sample.audios)
    inputs = [p.text if isinstance(p, Text) else p for p in split_placeholders(user, images, audios)
              if not (isinstance(p, Text) and not p.text.strip())]
    meta = sample.meta or {}
    scene = Scene.from_dict(meta["scene"]) if "scene" in meta else None
    if sample.task == "tts":
        reference = user.split("\n", 1)[-1]
    elif sample.task in ("t2i", "s2i"):
        reference = meta.get("caption") or user
    else:
        reference = answer.replace(AUDIO_PLACEHOLDER, "").strip()
    outputs = sample.spoken_outputs()
    spoken = _audio(resolve_media(root, outputs[-1])) if outputs else None
    return Case(sample.task, inputs, reference, scene, prompt=user, answer_audio=spoken)


def _audio(path: Path) -> Audio:
    wave, rate = load_audio(path)
    return Audio(wave.T if wave.ndim == 2 else wave, rate)  # [C, N]


# ---------------------------------------------------------------------- generation
def run_cases(pipe: AnyToAny, cases: Sequence[Case], sampler: SamplerConfig,
              batch_size: int) -> tuple[list[Output], float]:
    """Generate every case, batching those with equal layouts; returns outputs, seconds."""
    start = time.perf_counter()
    prepared = [pipe.prepare(c.inputs, TASK_OUTPUTS[c.task]) for c in cases]
    outputs: list[Output | None] = [None] * len(cases)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prepared):
        groups.setdefault(p.regions, []).append(i)
    with tqdm(total=len(cases), desc=cases[0].task if cases else "cases", unit="case", leave=False) as bar:
        for indices in groups.values():
            for k in range(0, len(indices), batch_size):
                chunk = indices[k:k + batch_size]
                results = pipe.generate_batch([prepared[i] for i in chunk], sampler,
                                              seeds=[sampler.seed + i for i in chunk])
                for i, out in zip(chunk, results):
                    outputs[i] = out
                bar.update(len(chunk))
    return outputs, time.perf_counter() - start  # type: ignore[return-value]


def evaluate(cfg: EvalConfig, recognizer_factory: Callable[[], Any] | None = None) -> dict:
    """Run the evaluation and write the report folder; returns the metrics."""
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = AnyToAny.from_pretrained(cfg.model, image_tokenizer=cfg.image_tokenizer,
                                    speech_tokenizer=cfg.speech_tokenizer, presets=cfg.presets)
    if cfg.calibrate_from:
        rate = getattr(pipe.speech_codec, "codes_per_second", 12.5)
        pipe.presets = calibrate_presets(cfg.calibrate_from, pipe.text_tokenizer, cfg.presets, rate)
    (out_dir / "presets.json").write_text(json.dumps(pipe.presets.to_dict(), indent=2) + "\n")
    recognizer = None
    if cfg.transcribe and {"tts", "svqa"} & set(cfg.tasks):
        if recognizer_factory is None:
            from pipelines.asr import WhisperRecognizer

            recognizer_factory = WhisperRecognizer
        recognizer = recognizer_factory()
    metrics: dict[str, Any] = {"model": cfg.model, "tasks": {}}
    examples: dict[str, list] = {}
    for task in tqdm(cfg.tasks, desc="evaluate", unit="task"):
        cases = load_cases(cfg, task)
        if not cases:
            continue
        sampler = cfg.image_sampler or cfg.sampler if task in ("t2i", "s2i") else cfg.sampler
        if task == "s2i" and cfg.s2i_cfg_scale > 0:
            sampler = replace(sampler, cfg_scale=cfg.s2i_cfg_scale)
        outputs, seconds = run_cases(pipe, cases, sampler, cfg.batch_size)
        result = _score(task, cases, outputs, recognizer)
        if task == "svqa" and recognizer is not None and pipe.speech_codec is not None and pipe.speech_codec.can_decode:
            result.update(_spoken_ceilings(pipe, recognizer, cases))
        result.update(n=len(cases), seconds=round(seconds, 1),
                      mean_steps=float(np.mean([o.steps for o in outputs])))
        metrics["tasks"][task] = result
        metrics.setdefault("prior_guess", {})[task] = prior_guess(task, cases, cfg.seed)
        examples[task] = list(zip(cases, outputs))
        logger.info("%s: %s", task, result)
    if "t2i" in cfg.tasks and cfg.step_curve:
        metrics["t2i_steps"] = _step_curve(pipe, cfg, load_cases(cfg, "t2i"))
    metrics["chance"] = chance_levels()
    _write_report(cfg, metrics, examples, out_dir)
    return metrics


def _score(task: str, cases: Sequence[Case], outputs: Sequence[Output], recognizer) -> dict:
    refs = [c.reference for c in cases]
    if task in ("t2i", "s2i"):
        return score_images([c.scene for c in cases], [o.image for o in outputs])
    if task == "tts" and recognizer is None:
        return {"mean_speech_codes": float(np.mean([len(o.speech_codes or []) for o in outputs]))}
    if task == "caption":
        return {"exact_match": exact_match(_caption_wordings(cases), [o.text or "" for o in outputs])}
    if task == "vqa":
        return {"exact_match": exact_match(refs, [o.text or "" for o in outputs])}
    if task == "asr":
        return {"wer": word_error_rate(refs, [o.text or "" for o in outputs])}
    if task == "tts":
        return {"intelligibility_wer": word_error_rate(refs, _hear(recognizer, outputs))}
    result = {"exact_match": exact_match(refs, [o.text or "" for o in outputs])}  # svqa
    if recognizer is not None:
        result["spoken_answer_says_it"] = says(refs, _hear(recognizer, outputs))
    return result


def _hear(recognizer, outputs: Sequence[Output]) -> list[str]:
    """What the recogniser hears in each generated waveform ("" for none)."""
    return [recognizer.transcribe(o.speech, o.sample_rate) if o.speech is not None and len(o.speech) else ""
            for o in outputs]


def _spoken_ceilings(pipe: AnyToAny, recognizer, cases: Sequence[Case]) -> dict[str, float]:
    """`spoken_answer_says_it` of the reference answer audio itself (what the recogniser
    can hear) and of the same audio encoded and decoded by the speech tokenizer (the most
    the model's spoken answers can score)."""
    spoken = [c for c in cases if c.answer_audio is not None]
    heard, through_codec = [], []
    for case in spoken:
        wave = torch.as_tensor(np.asarray(case.answer_audio.waveform, dtype=np.float32))
        heard.append(recognizer.transcribe(wave.numpy(), case.answer_audio.sample_rate))
        with torch.no_grad():
            codes = pipe.speech_codec.encode([wave], case.answer_audio.sample_rate)[0]
            decoded = pipe.speech_codec.decode([codes])[0].numpy()
        through_codec.append(recognizer.transcribe(decoded, pipe.speech_codec.sample_rate))
    refs = [c.reference for c in spoken]
    return {"reference_says_it": says(refs, heard),
            "reference_through_codec_says_it": says(refs, through_codec)}


def _step_curve(pipe: AnyToAny, cfg: EvalConfig, cases: list[Case]) -> list[dict]:
    curve = []
    scenes = [c.scene for c in cases]
    for steps in cfg.step_curve:
        for penalty in (1.0, cfg.position_penalty):
            sampler = replace(cfg.image_sampler or cfg.sampler, steps=steps, position_penalty=penalty,
                              position_penalty_start=cfg.position_penalty_start)
            outputs, seconds = run_cases(pipe, cases, sampler, cfg.batch_size)
            rates = score_images(scenes, [o.image for o in outputs])
            curve.append({"steps": steps, "position_penalty": penalty, "overall": rates["overall"],
                          "colour": rates["colour"], "shape": rates["shape"], "seconds": round(seconds, 1)})
    return curve


# ---------------------------------------------------------------------- report
def _write_report(cfg: EvalConfig, metrics: dict, examples: dict, out: Path) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(format_report(metrics))
    if "t2i" in examples:
        pairs = examples["t2i"][:cfg.grid]
        image_grid([o.image for _, o in pairs], [c.reference for c, _ in pairs]).save(out / "t2i_grid.png")
    curves = {}
    for run in cfg.runs:
        path = Path(run) / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            curves[Path(run).name] = [(r["step"], r["loss"]) for r in rows]
    if curves:
        line_chart(curves, "training loss").save(out / "loss.png")
    for task in ("tts", "svqa"):
        for i, (case, output) in enumerate(examples.get(task, [])[:cfg.wavs]):
            if output.speech is not None and len(output.speech):
                sf.write(out / f"{task}_{i}.wav", output.speech, output.sample_rate)
                (out / f"{task}_{i}.txt").write_text(f"{case.prompt}\n-> {output.text or ''}\n")


def format_report(metrics: dict) -> str:
    """The Markdown table of a metrics dict."""
    rows = ["| task | n | metric | value | prior guess | mean steps |", "|---|---|---|---|---|---|"]
    for task, result in metrics["tasks"].items():
        prior = metrics.get("prior_guess", {}).get(task, {})
        for key, value in result.items():
            if key in ("n", "seconds", "mean_steps"):
                continue
            guess = f"{prior[key]:.3f}" if key in prior else ""
            rows.append(f"| {task} | {result['n']} | {key} | {value:.3f} | {guess} | {result['mean_steps']:.1f} |")
    text = "# Evaluation on held-out world scenes\n\n" + "\n".join(rows) + "\n"
    if metrics.get("t2i_steps"):
        text += "\n## Text-to-image accuracy against sampler steps\n\n"
        text += "| steps | position penalty | overall | colour | shape | seconds |\n|---|---|---|---|---|---|\n"
        for r in metrics["t2i_steps"]:
            text += (f"| {r['steps']} | {r['position_penalty']:g} | {r['overall']:.3f} | {r['colour']:.3f} "
                     f"| {r['shape']:.3f} | {r['seconds']} |\n")
    text += ("\nPrior guess: each case answered with another held-out case's right output (the "
             "render of another scene, another caption, another answer): what knowing the world "
             f"but not the input scores. Uniform chance for VQA: {metrics['chance']['vqa']:.3f}.\n")
    return text


def image_grid(images: Sequence[Image.Image], captions: Sequence[str], cell: int = 128,
               columns: int = 4) -> Image.Image:
    """Images (scaled to `cell`) with their prompts underneath."""
    rows = max(1, -(-len(images) // columns))
    grid = Image.new("RGB", (columns * cell, rows * (cell + 40)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + 40)
        grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        words, line, lines = caption.split(), "", []
        for w in words:
            if len(line) + len(w) + 1 > cell // 6:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, text in enumerate(lines[:3]):
            draw.text((x + 2, y + cell + 2 + 12 * k), text, fill="black")
    return grid


def line_chart(series: dict[str, list[tuple[float, float]]], title: str,
               size: tuple[int, int] = (640, 360)) -> Image.Image:
    """A plain line chart (one line per series, consecutive on the x axis)."""
    width, height = size
    left, right, top, bottom = 50, 10, 24, 30
    chart = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(chart)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    points, offset = {}, 0.0
    for name, values in series.items():
        points[name] = [(offset + x, y) for x, y in values]
        offset += max((x for x, _ in values), default=0)
    xs = [x for pts in points.values() for x, _ in pts] or [0, 1]
    ys = [y for pts in points.values() for _, y in pts] or [0, 1]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    y1 = y1 if y1 > y0 else y0 + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / max(1e-9, x1 - x0) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 4), title, fill="black")
    draw.text((4, top), f"{y1:.2f}", fill="black")
    draw.text((4, height - bottom - 10), f"{y0:.2f}", fill="black")
    draw.text((left, height - bottom + 6), "cumulative step", fill="black")
    for k, (name, pts) in enumerate(points.items()):
        colour = colours[k % len(colours)]
        if len(pts) > 1:
            draw.line([at(x, y) for x, y in pts], fill=colour, width=2)
        for x, y in pts:
            cx, cy = at(x, y)
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        draw.text((width - right - 120, top + 4 + 12 * k), name, fill=colour)
    return chart


