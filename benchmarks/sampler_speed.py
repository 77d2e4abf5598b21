"""Fast sampling, measured side by side on the same held-out cases: for each task, each
sampler variant's forward passes per sample, wall time per sample and accuracy, with
ratios against the 16-step uncached sampler measured in the same run; then batch scaling
(wall per sample at batch 1..32).

    .venv/bin/python benchmarks/sampler_speed.py --runs runs [--cases 32] [--tasks t2i,vqa,asr,tts,svqa]
        [--batch 8] [--no-transcribe] [--variants "16 steps|prefix cache"] [--out FILE.json]
        [--vocoder-iterations N]

`--runs` is a quickstart folder (`runs/` of `bash scripts/quickstart.sh`): its stage-3 model,
tokenizers, held-out world, and the evaluation's calibrated lengths (`report/presets.json`).
Times per sample are split into preparing the inputs (tokenizing images and speech), the
sampler itself and decoding the outputs (images; speech through the codec's decoder and
Griffin-Lim): caches and fewer passes shorten only the sampler's part. Accuracy is the
evaluation's own score of each task (t2i: the checker's overall
agreement; VQA and spoken VQA: exact match; ASR: WER; TTS: Whisper's WER of the speech).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from omni_model.any_to_any import AnyToAny, LengthPresets, batch_key, batches
from omni_model.model_folder import read_presets
from omni_model.sampler import SamplerConfig, sample
from pipelines.evaluation import EVAL_TASKS, EvalConfig, load_cases
from pipelines.evaluation.run import prediction

#: what each variant changes over the task's 16-step sampler
VARIANTS = {
    "one position per pass": {"steps": 1024},
    "16 steps": {},
    "8 steps": {"steps": 8},
    "4 steps": {"steps": 4},
    "threshold 0.9": {"threshold": 0.9},
    "threshold 0.99": {"threshold": 0.99},
    "prefix cache": {"cache": "prefix", "cache_refresh": 4},
    "prefix cache (refresh 8)": {"cache": "prefix", "cache_refresh": 8},
    "dual cache (blocks of 16)": {"cache": "dual", "cache_refresh": 4, "block_length": 16},
    "early stop": {"early_stop": True},
    "factor 1.0": {"factor": 1.0},
    "factor 0.3": {"factor": 0.3},
    "text 0.9 / speech 0.7 thresholds": {"text_threshold": 0.9, "speech_threshold": 0.7},
    "threshold 0.9 + prefix cache + early stop": {"threshold": 0.9, "cache": "prefix", "cache_refresh": 4,
                                                  "early_stop": True},
    "factor 1.0 + prefix cache + early stop": {"factor": 1.0, "cache": "prefix", "cache_refresh": 4,
                                               "early_stop": True},
    "threshold 0.99 + prefix cache (refresh 8)": {"threshold": 0.99, "cache": "prefix", "cache_refresh": 8},
    "text 0.9 / speech 0.7 + prefix cache (refresh 8)": {"text_threshold": 0.9, "speech_threshold": 0.7,
                                                         "cache": "prefix", "cache_refresh": 8},
    "prefix cache (refresh 16)": {"cache": "prefix", "cache_refresh": 16},
    # images: the evaluation fills them in random order; with a threshold, confidence order
    "threshold 0.9 (probability order)": {"threshold": 0.9, "confidence": "probability"},
    "threshold 0.8 (probability order)": {"threshold": 0.8, "confidence": "probability"},
}
#: the figure of merit of each task, and whether higher is better
SCORE = {"t2i": ("overall", True), "s2i": ("overall", True), "caption": ("exact_match", True),
         "vqa": ("exact_match", True), "asr": ("wer", False), "tts": ("intelligibility_wer", False),
         "svqa": ("exact_match", True)}


def generate(pipe: AnyToAny, cases, sampler: SamplerConfig, batch: int) -> tuple[list, dict]:
    """The outputs of `run_cases`, with the time of each part: preparing the inputs
    (tokenizing images and speech), the sampler itself, and decoding the outputs."""
    clock = time.perf_counter
    start = clock()
    prepared = [pipe.prepare(c.inputs, EVAL_TASKS[c.task].outputs) for c in cases]
    prepare_s, sample_s, decode_s = clock() - start, 0.0, 0.0
    outputs = [None] * len(cases)
    for chunk in batches([batch_key(p, sampler) for p in prepared], batch):
        layout = pipe.layout(prepared[chunk[0]])
        start = clock()
        result = sample(pipe.model, [prepared[i].prompt for i in chunk], layout, sampler, pad_id=pipe.vocab.pad_id,
                        uncond_prompt_ids=[prepared[i].uncond for i in chunk] if sampler.cfg_scale > 0 else None,
                        seeds=[sampler.seed + i for i in chunk])
        sample_s += clock() - start
        start = clock()
        for i, ids, steps in zip(chunk, result.ids, result.steps):
            outputs[i] = pipe.decode(prepared[i], layout, ids, steps)
        decode_s += clock() - start
    n = len(cases)
    return outputs, {"prepare_s": prepare_s / n, "sampler_s": sample_s / n, "decode_s": decode_s / n,
                     "seconds_per_sample": (prepare_s + sample_s + decode_s) / n}


def timed(pipe: AnyToAny, cases, task: str, sampler: SamplerConfig, batch: int) -> tuple[list, dict]:
    """A variant's outputs and its passes and times per sample (no scoring: see `scored`)."""
    outputs, seconds = generate(pipe, cases, sampler, batch)
    return outputs, {"passes": float(np.mean([o.steps for o in outputs])), **seconds}


def scored(cases, task: str, outputs: list, recognizer) -> dict:
    """The task's figure of merit of a variant's outputs."""
    speaks = EVAL_TASKS[task].speaks
    score = EVAL_TASKS[task].score(cases, [prediction(o, recognizer if speaks else None) for o in outputs])
    key, _ = SCORE[task]
    if key not in score:  # TTS without a recogniser: no accuracy
        key = next(iter(score))
    return {"metric": key, "score": score[key], **({"says_it": score["spoken_answer_says_it"]}
                                                   if "spoken_answer_says_it" in score else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--tasks", default="t2i,vqa,asr,tts,svqa")
    parser.add_argument("--variants", default="|".join(VARIANTS), help="names separated by |")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scaling", default="1,2,4,8,16,32", help="batch sizes for t2i's batch scaling")
    parser.add_argument("--no-transcribe", action="store_true", help="skip Whisper (no TTS accuracy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocoder-iterations", type=int, default=None,
                        help="Griffin-Lim iterations of speech outputs (default: the codec's own)")
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    measured = read_presets(runs / "report")
    presets = LengthPresets.from_dict(measured) if measured is not None else None
    pipe = AnyToAny.from_pretrained(runs / "stage3" / "final", image_tokenizer=runs / "tokenizers" / "image",
                                    speech_tokenizer=runs / "tokenizers" / "speech", presets=presets)
    if args.vocoder_iterations is not None:
        pipe.speech_codec.griffin_lim_iterations = args.vocoder_iterations
    world = runs / "world"
    cfg = EvalConfig(data_root=str(world), max_per_task=args.cases,
                     manifests=(str(world / "manifests" / "eval"), str(world / "manifests" / "sdvi_eval")))
    base = SamplerConfig(steps=16)
    image_base = SamplerConfig(steps=16, confidence="random")  # the evaluation's image sampler
    recognizer = None
    tasks = [t for t in args.tasks.split(",") if t]
    if not args.no_transcribe and any(EVAL_TASKS[t].speaks for t in tasks):
        from pipelines.evaluation.asr import WhisperRecognizer

        recognizer = WhisperRecognizer()
    names = [v for v in args.variants.split("|") if v]
    results: dict = {"machine": {"threads": args.threads, "torch": torch.__version__},
                     "vocoder_iterations": getattr(pipe.speech_codec, "griffin_lim_iterations", None), "tasks": {}}
    # Every variant of every task is generated and timed before any is transcribed: after
    # Whisper (CTranslate2) has run in this process, torch's inputs and decoding ran 2-3x
    # slower, which would charge later variants for the transcription of earlier ones.
    generated = {}
    for task in tasks:
        cases = load_cases(cfg, task)
        start = image_base if "image" in EVAL_TASKS[task].outputs else base
        generated[task] = (cases, {name: timed(pipe, cases, task, replace(start, **VARIANTS[name]), args.batch)
                                   for name in names})
    if "t2i" in tasks and args.scaling:
        cases = load_cases(replace(cfg, max_per_task=max(int(b) for b in args.scaling.split(","))), "t2i")
        scaling = []
        for b in (int(x) for x in args.scaling.split(",")):
            _, seconds = generate(pipe, cases, image_base, b)
            scaling.append({"batch": b, **seconds})
        print("\nt2i batch scaling (16 steps):")
        for row in scaling:
            row["speed_up"] = scaling[0]["seconds_per_sample"] / row["seconds_per_sample"]
            print(f"  batch {row['batch']:3d}: {row['seconds_per_sample']:.3f} s/sample ({row['speed_up']:.2f}x), "
                  f"sampler {row['sampler_s']:.3f} s/sample")
        results["t2i_batch_scaling"] = scaling
    print(f"{'task':6} {'variant':44} {'passes':>7} {'s/sample':>9} {'vs 16':>7} {'vs 1/pass':>9} "
          f"{'sampler s':>9} {'vs 16':>7} {'score':>7}")
    for task, (cases, variants) in generated.items():
        rows = {name: {**row, **scored(cases, task, outputs, recognizer)}
                for name, (outputs, row) in variants.items()}
        reference = rows.get("16 steps", next(iter(rows.values())))
        slowest = rows.get("one position per pass", reference)
        for name, row in rows.items():
            row["speed_up"] = reference["seconds_per_sample"] / row["seconds_per_sample"]
            row["speed_up_vs_one_per_pass"] = slowest["seconds_per_sample"] / row["seconds_per_sample"]
            row["sampler_speed_up"] = reference["sampler_s"] / row["sampler_s"]
            print(f"{task:6} {name:44} {row['passes']:7.1f} {row['seconds_per_sample']:9.3f} "
                  f"{row['speed_up']:6.2f}x {row['speed_up_vs_one_per_pass']:8.1f}x {row['sampler_s']:9.3f} "
                  f"{row['sampler_speed_up']:6.2f}x {row['score']:7.3f}"
                  + (f" (says it {row['says_it']:.3f})" if "says_it" in row else ""))
        results["tasks"][task] = {"n": len(cases), "variants": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
