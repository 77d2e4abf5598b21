"""Fast sampling, measured side by side on the same held-out cases: for each task, each
sampler variant's forward passes per sample, wall time per sample and accuracy, with
ratios against the 16-step uncached sampler measured in the same run; then batch scaling
(wall per sample at batch 1..32).

    .venv/bin/python benchmarks/sampler_speed.py --runs runs [--cases 32] [--tasks t2i,vqa,asr,tts,svqa]
        [--batch 8] [--no-transcribe] [--out FILE.json]

`--runs` is a quickstart folder (`bash scripts/pipeline.sh full DIR`): its stage-3 model,
tokenizers, held-out world, and the evaluation's calibrated lengths (`report/presets.json`).
Accuracy is the evaluation's own score of each task (t2i: the checker's overall
agreement; VQA and spoken VQA: exact match; ASR: WER; TTS: Whisper's WER of the speech).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from omni_model.pipeline import AnyToAny, LengthPresets
from omni_model.sampler import SamplerConfig
from pipelines.evaluation import TASKS, EvalConfig, load_cases
from pipelines.evaluation.run import prediction, run_cases

#: what each variant changes over the task's 16-step sampler
VARIANTS = {
    "one position per pass": {"steps": 1024},
    "16 steps": {},
    "8 steps": {"steps": 8},
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
}
#: the figure of merit of each task, and whether higher is better
SCORE = {"t2i": ("overall", True), "s2i": ("overall", True), "caption": ("exact_match", True),
         "vqa": ("exact_match", True), "asr": ("wer", False), "tts": ("intelligibility_wer", False),
         "svqa": ("exact_match", True)}


def measure(pipe: AnyToAny, cases, task: str, sampler: SamplerConfig, batch: int, recognizer) -> dict:
    outputs, seconds = run_cases(pipe, cases, sampler, batch)
    speaks = TASKS[task].speaks
    score = TASKS[task].score(cases, [prediction(o, recognizer if speaks else None) for o in outputs])
    key, _ = SCORE[task]
    if key not in score:  # TTS without a recogniser: no accuracy
        key = next(iter(score))
    return {"passes": float(np.mean([o.steps for o in outputs])), "seconds_per_sample": seconds / len(cases),
            "metric": key, "score": score[key], **({"says_it": score["spoken_answer_says_it"]}
                                                    if "spoken_answer_says_it" in score else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument("--tasks", default="t2i,vqa,asr,tts,svqa")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scaling", default="1,2,4,8,16,32", help="batch sizes for t2i's batch scaling")
    parser.add_argument("--no-transcribe", action="store_true", help="skip Whisper (no TTS accuracy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    presets_file = runs / "report" / "presets.json"
    presets = LengthPresets.from_dict(json.loads(presets_file.read_text())) if presets_file.exists() else None
    pipe = AnyToAny.from_pretrained(runs / "stage3" / "final", image_tokenizer=runs / "tokenizers" / "image",
                                    speech_tokenizer=runs / "tokenizers" / "speech", presets=presets)
    world = runs / "world"
    cfg = EvalConfig(data_root=str(world), max_per_task=args.cases,
                     manifests=(str(world / "manifests" / "eval"), str(world / "manifests" / "sdvi_eval")))
    base = SamplerConfig(steps=16)
    image_base = SamplerConfig(steps=16, confidence="random")  # the evaluation's image sampler
    recognizer = None
    tasks = [t for t in args.tasks.split(",") if t]
    if not args.no_transcribe and any(TASKS[t].speaks for t in tasks):
        from pipelines.asr import WhisperRecognizer

        recognizer = WhisperRecognizer()
    names = [v for v in args.variants.split(",") if v]
    results: dict = {"machine": {"threads": args.threads, "torch": torch.__version__}, "tasks": {}}
    print(f"{'task':6} {'variant':44} {'passes':>7} {'s/sample':>9} {'vs 16':>7} {'vs 1/pass':>9} {'score':>7}")
    for task in tasks:
        cases = load_cases(cfg, task)
        start = image_base if "image" in TASKS[task].outputs else base
        rows = {}
        for name in names:
            rows[name] = measure(pipe, cases, task, replace(start, **VARIANTS[name]), args.batch, recognizer)
        reference = rows.get("16 steps", next(iter(rows.values())))
        slowest = rows.get("one position per pass", reference)
        for name, row in rows.items():
            row["speed_up"] = reference["seconds_per_sample"] / row["seconds_per_sample"]
            row["speed_up_vs_one_per_pass"] = slowest["seconds_per_sample"] / row["seconds_per_sample"]
            print(f"{task:6} {name:44} {row['passes']:7.1f} {row['seconds_per_sample']:9.3f} "
                  f"{row['speed_up']:6.2f}x {row['speed_up_vs_one_per_pass']:8.1f}x {row['score']:7.3f}"
                  + (f" (says it {row['says_it']:.3f})" if "says_it" in row else ""))
        results["tasks"][task] = {"n": len(cases), "variants": rows}
    if "t2i" in tasks and args.scaling:
        cases = load_cases(replace(cfg, max_per_task=max(int(b) for b in args.scaling.split(","))), "t2i")
        scaling = []
        for b in (int(x) for x in args.scaling.split(",")):
            _, seconds = run_cases(pipe, cases, image_base, b)
            scaling.append({"batch": b, "seconds_per_sample": seconds / len(cases)})
        print("\nt2i batch scaling (16 steps):")
        for row in scaling:
            row["speed_up"] = scaling[0]["seconds_per_sample"] / row["seconds_per_sample"]
            print(f"  batch {row['batch']:3d}: {row['seconds_per_sample']:.3f} s/sample ({row['speed_up']:.2f}x)")
        results["t2i_batch_scaling"] = scaling
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
