"""The evaluation's driver: load the model once, then per task load its cases, generate
their answers in batches (`AnyToAny.generate_many`), score them and the prior guess, and
write the report folder.

A release folder (the authors' checkpoint format) is evaluated through the same API
(`ReleaseAnyToAny`): each task's inputs as the release's fixed prompts take them
(`release_inputs`), the official evaluation scripts' sampler settings
(`release_presets`), no response-length calibration and no steps curve (its sampler is
the official one); its speech answers are spoken by GLM-4-Voice's decoder
(`speech_decoder`, the project's `GLM4VoiceDecoder`) and heard by Whisper, so TTS
reports intelligibility (WER of the transcript) and spoken answers whether they say the
answer; without a decoder, TTS reports only how many codes were said.

One case never stops the evaluation: a row that cannot be loaded (`load_cases`) or
whose inputs the model cannot take (`AnyToAny.prepare`) is quarantined, written to
`quarantine.jsonl` in the report folder with its file, line and reason, and counted in
`metrics.json` (`quarantined`, per task).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from omni_model.any_to_any import OUTPUTS, AnyToAny, LengthPresets, Output, sampler_with
from omni_model.model_folder import write_presets
from omni_model.release.any_to_any import PRESET_KINDS, ReleaseAnyToAny
from omni_model.release.sampler import OfficialSamplerConfig
from omni_model.sampler import SamplerConfig
from pipelines.data.media import MediaLimits
from pipelines.evaluation.calibrate import calibrate_presets
from pipelines.evaluation.cases import load_cases
from pipelines.evaluation.report import write_report
from pipelines.evaluation.scores import chance_levels, score_images
from pipelines.evaluation.tasks import EVAL_TASKS, Case, Prediction, prior_guess, spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    model: str = "runs/stage3/final"  #: a checkpoint folder (final/ of a stage)
    image_tokenizer: str = "runs/tokenizers/image"
    speech_tokenizer: str = "runs/tokenizers/speech"
    #: GLM-4-Voice's decoder folder (config.yaml, flow.pt, hift.pt): speech out for a release
    #: folder (or a bare GLM-4-Voice tokenizer); None: a release's own glm-4-voice-decoder/ if any
    speech_decoder: str | None = None
    data_root: str = "runs/world"
    #: held-out manifests (the published format): folders of {task}.jsonl (t2i, caption,
    #: vqa, asr, tts, svqa, s2i; the first folder holding a task's file), and/or .jsonl
    #: files of any tasks, each row naming its `task` (a user's own sets)
    manifests: tuple[str, ...] = ("runs/world/manifests/eval", "runs/world/manifests/sdvi_eval")
    out: str = "runs/report"
    tasks: tuple[str, ...] = ("t2i", "s2i", "caption", "vqa", "asr", "tts", "svqa")
    max_per_task: int = 48
    batch_size: int = 16
    sampler: SamplerConfig = SamplerConfig(steps=16)
    #: the sampler of image outputs (t2i, s2i and the steps curve); None: `sampler`
    image_sampler: SamplerConfig | None = None
    #: sampler options per task over the above, e.g. {svqa: {cache: prefix, early_stop: true}}
    task_sampler: dict = field(default_factory=dict)
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
    #: also write the measured presets.json into `model`, where `AnyToAny` and serving read it
    presets_into_model: bool = False
    grid: int = 12  #: generated images in t2i_grid.png
    wavs: int = 3  #: generated WAVs per speech task
    seed: int = 0
    #: what a case's media may cost, checked from headers before decoding (a row over
    #: any limit is quarantined): audio up to 60 s (a held-out question or answer is a
    #: sentence), images up to 40 Mpx, the row's media within 256 MiB decoded
    limits: MediaLimits = MediaLimits(max_audio_seconds=60.0)
    max_line_bytes: int = 1_000_000  #: a longer manifest line is quarantined unparsed
    #: where the model runs: auto = cuda when there is a GPU, else cpu
    device: str = "auto"
    #: a release folder's sampler settings per task: "evaluation" (the official evaluation
    #: scripts': LibriSpeech ASR, LibriTTS TTS, MME yes/no) or "inference" (tools/inference.py)
    release_presets: str = "evaluation"
    #: a release folder: official sampler options per task over its presets, e.g.
    #: {vqa: {max_new_tokens: 16, steps: 16}}
    release_sampler: dict = field(default_factory=dict)
    #: a release folder: the side input images are resized and cropped to (512: 1,024 codes)
    release_image_resolution: int = 512

    def __post_init__(self) -> None:
        for task in (*self.tasks, *self.task_sampler, *self.release_sampler):
            spec(task)  # an unknown task fails here, naming the known ones
        for task in self.task_sampler:
            sampler_for(self, task)  # so do unknown or out-of-range options
        if self.release_presets not in PRESET_KINDS:
            raise ValueError(f"release_presets {self.release_presets!r}: one of {', '.join(PRESET_KINDS)}")
        for task, options in self.release_sampler.items():
            try:
                replace(OfficialSamplerConfig(task=task), **(options or {}))
            except TypeError as exc:
                raise ValueError(f"release_sampler.{task}: {exc}") from None


def release_inputs(case: Case) -> list:
    """A case's inputs as the release's fixed task prompts take them: the text to speak
    (TTS) or draw (t2i) alone, the media alone where the prompt's instruction is its own
    (ASR, speech-to-image, spoken VQA); VQA and captions as they are."""
    media = [x for x in case.inputs if not isinstance(x, str)]
    if case.task in ("tts", "t2i"):
        return [case.reference]
    if case.task in ("asr", "s2i", "svqa"):
        return media
    return list(case.inputs)


def prepare_cases(pipe: AnyToAny, cases: Sequence[Case], quarantine: list[dict]) -> tuple[list[Case], list]:
    """The cases the model can take and their prepared inputs; one whose inputs it
    refuses (or fails on) is appended to `quarantine` and left out."""
    kept, prepared = [], []
    release = isinstance(pipe, ReleaseAnyToAny)
    for case in cases:
        try:
            prepared.append(pipe.prepare(release_inputs(case) if release else case.inputs, spec(case.task).outputs))
        except Exception as err:  # noqa: BLE001 - one case never stops the evaluation
            quarantine.append({"task": case.task, "source": None, "line": None, "prompt": case.prompt[:200],
                               "reason": f"could not prepare the inputs: {type(err).__name__}: {err}"[:2000]})
            continue
        kept.append(case)
    return kept, prepared


def run_cases(pipe: AnyToAny, cases: Sequence[Case], sampler: SamplerConfig | dict | None,
              batch_size: int, prepared: list | None = None) -> tuple[list[Output], float]:
    """Every case's answer (case i with seed `sampler.seed + i`; a release: seed 42 and
    `sampler` a dict of official options over each case's own); returns outputs,
    seconds. `prepared`: the cases' inputs already prepared (`prepare_cases`)."""
    start = time.perf_counter()
    if prepared is None:
        prepared = [pipe.prepare(c.inputs, spec(c.task).outputs) for c in cases]
    with tqdm(total=len(cases), desc=cases[0].task if cases else "cases", unit="case", leave=False) as bar:
        outputs = pipe.generate_many(prepared, sampler, batch_size=batch_size, on_batch=bar.update)
    return outputs, time.perf_counter() - start


def evaluate(cfg: EvalConfig, recognizer_factory: Callable[[], Any] | None = None) -> dict:
    """Run the evaluation and write the report folder; returns the metrics."""
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = AnyToAny.from_pretrained(cfg.model, image_tokenizer=cfg.image_tokenizer,
                                    speech_tokenizer=cfg.speech_tokenizer, device=device, presets=cfg.presets,
                                    speech_decoder=cfg.speech_decoder)
    release = isinstance(pipe, ReleaseAnyToAny)
    if release:
        pipe.presets, pipe.image_resolution = cfg.release_presets, cfg.release_image_resolution
    else:
        if cfg.calibrate_from:
            rate = getattr(pipe.speech_codec, "codes_per_second", 12.5)
            pipe.presets = calibrate_presets(cfg.calibrate_from, pipe.text_tokenizer, cfg.presets, rate)
        pipe.presets = replace(pipe.presets, sampler=recorded_sampler(cfg))
        write_presets(out_dir, pipe.presets.to_dict())
    recognizer = None
    speaks = getattr(pipe.speech_codec, "can_decode", False) or getattr(pipe, "speech_decoder", None) is not None
    if cfg.transcribe and speaks and any(EVAL_TASKS[t].speaks for t in cfg.tasks):
        if recognizer_factory is None:
            from pipelines.evaluation.asr import WhisperRecognizer

            recognizer_factory = WhisperRecognizer
        recognizer = recognizer_factory()
    metrics: dict[str, Any] = {"model": cfg.model, "manifests": list(cfg.manifests), "tasks": {}}
    examples: dict[str, list] = {}
    quarantine: list[dict] = []
    for task in tqdm(cfg.tasks, desc="evaluate", unit="task"):
        cases, prepared = prepare_cases(pipe, load_cases(cfg, task, quarantine), quarantine)
        if not cases:
            continue
        task_spec = EVAL_TASKS[task]
        sampler = cfg.release_sampler.get(task) if release else sampler_for(cfg, task)
        outputs, seconds = run_cases(pipe, cases, sampler, cfg.batch_size, prepared)
        answers = [prediction(o, recognizer if task_spec.speaks else None) for o in outputs]
        result = task_spec.score(cases, answers)
        if task_spec.extra is not None:
            result.update(task_spec.extra(pipe, recognizer, cases))
        result.update(n=len(cases), seconds=round(seconds, 1),
                      mean_steps=float(np.mean([o.steps for o in outputs])))
        metrics["tasks"][task] = result
        metrics.setdefault("prior_guess", {})[task] = prior_guess(task, cases, cfg.seed)
        if release:  # the official settings the first case ran with (ASR and TTS scale per case)
            metrics.setdefault("release_settings", {})[task] = asdict(pipe.settings(prepared[0], sampler))
        examples[task] = list(zip(cases, outputs))
        logger.info("%s: %s", task, result)
    if "t2i" in cfg.tasks and cfg.step_curve and not release:
        known, _ = prepare_cases(pipe, [c for c in load_cases(cfg, "t2i", []) if c.scene is not None], [])
        if known:  # (the checker needs the scene; the rows left out are quarantined above)
            metrics["t2i_steps"] = step_curve(pipe, cfg, known)
    if hasattr(recognizer, "close"):
        recognizer.close()  # the isolated Whisper's child process
    metrics["chance"] = chance_levels()
    metrics["quarantined"] = write_quarantine(out_dir, quarantine)
    write_report(out_dir, metrics, examples, cfg.runs, cfg.grid, cfg.wavs)
    if cfg.presets_into_model and not release:  # only once the evaluation has run through
        write_presets(cfg.model, pipe.presets.to_dict())
    return metrics


def write_quarantine(out_dir: Path, quarantine: list[dict]) -> dict[str, int]:
    """`quarantine.jsonl` of the report folder; returns the count per task. A row of a
    mixed-task file that does not parse is met once per task read: written once."""
    seen, rows = set(), []
    for q in quarantine:
        key = (q["source"], q["line"]) if q["source"] is not None else id(q)
        if key not in seen:
            seen.add(key)
            rows.append(q)
    (out_dir / "quarantine.jsonl").write_text("".join(json.dumps(q) + "\n" for q in rows))
    if rows:
        logger.warning("%d rows quarantined: see %s", len(rows), out_dir / "quarantine.jsonl")
    counts: dict[str, int] = {}
    for q in rows:
        counts[q["task"]] = counts.get(q["task"], 0) + 1
    return counts


def sampler_for(cfg: EvalConfig, task: str) -> SamplerConfig:
    """Image outputs get `image_sampler`; s2i adds its guidance scale; then the task's
    own options (`task_sampler`)."""
    sampler = cfg.image_sampler or cfg.sampler if "image" in EVAL_TASKS[task].outputs else cfg.sampler
    if task == "s2i" and cfg.s2i_cfg_scale > 0:
        sampler = replace(sampler, cfg_scale=cfg.s2i_cfg_scale)
    return sampler_with(sampler, cfg.task_sampler.get(task) or {}, f"task_sampler.{task}")


def recorded_sampler(cfg: EvalConfig) -> dict:
    """`presets.json`'s sampler options per kind of output: those every evaluated task
    of that kind was measured with (`task_sampler`), so that serving the model uses
    what its report measured; a kind whose tasks differ records what they share."""
    kinds: dict[str, list[dict]] = {}
    for task in cfg.tasks:
        kinds.setdefault(OUTPUTS[EVAL_TASKS[task].outputs], []).append(cfg.task_sampler.get(task) or {})
    shared = {kind: {k: v for k, v in options[0].items() if all(k in o and o[k] == v for o in options)}
              for kind, options in kinds.items()}
    return {kind: options for kind, options in shared.items() if options}


def prediction(output: Output, recognizer=None) -> Prediction:
    """A model output as its scorer reads it; speech heard by `recognizer` when given
    ("" for no speech)."""
    heard = None
    if recognizer is not None:
        speech = output.speech
        heard = recognizer.transcribe(speech, output.sample_rate) if speech is not None and len(speech) else ""
    return Prediction(text=output.text or "", image=output.image, heard=heard,
                      speech_codes=len(output.speech_codes or []))


def step_curve(pipe: AnyToAny, cfg: EvalConfig, cases: list[Case]) -> list[dict]:
    """t2i agreement at each of `cfg.step_curve`, without and with the position penalty."""
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
