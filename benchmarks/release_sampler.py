"""The project's sampler techniques on the official sampler, measured on the fixture
releases: for each task's official preset (shortened), each technique's forward passes,
time against the official sampler measured in the same run, and how many response
ids and whether the parsed answer equal the official sampler's.

    .venv/bin/python benchmarks/release_sampler.py [--releases tiny_a,tiny_b] [--tasks asr,tts,vqa,t2i,s2i,svqa]
        [--new-tokens 16] [--big] [--big-new-tokens 16] [--only-big] [--repeats 2] [--clock cpu|wall]
        [--threads 1] [--out FILE.json]

The fixtures are tiny (hidden size 16) with random weights: their answers are noise and
their confidences flat, so the ids tell whether a technique is exact, not whether it
keeps good answers. `--big` adds tiny_a's config grown to 8 layers of hidden size 256
(random weights too) with the release's real prompt lengths (an image is 1,024 codes, the
fixture's 16), where a forward pass costs enough for the times to mean something; its
prompt vectors are the embeddings of the prompt ids (speech positions included).

Techniques (`omni_model.release.speed`, `OfficialSamplerConfig.threshold/early_stop`):
step-level batching (the six tasks' requests in one batch, different prompt lengths and
settings, with one pass a step or `max_padding=0.5`; and four copies of one request, one
length, so no padding), the prompt cache (refresh every 4 and every 16 steps),
confidence thresholds, and early stop on a scripted end (`ending`: the fixtures' random
weights never commit an end, so early stop alone never fires). Then, for each fixture
release, how many ids of each of the six batched requests equal its batch-1 run, in
float32 and bfloat16, padded and not. Times are the best of `--repeats` runs taken in
turn; CPU time by default, steadier than wall time on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_model.release.model import ReleaseModel  # noqa: E402
from omni_model.release.prompts import task_prompt  # noqa: E402
from omni_model.release.response import parse_response  # noqa: E402
from omni_model.release.sampler import OfficialSamplerConfig, generate, preset, unconditional_prompt  # noqa: E402
from omni_model.release.speed import PromptCache, generate_batch, masked_forward  # noqa: E402
from omni_model.transformer import Transformer  # noqa: E402

RELEASES = ROOT / "tests/fixtures/omni_release"
TASKS = ("asr", "tts", "vqa", "t2i", "s2i", "svqa")
FIXTURE_TASK = {t: t.upper() for t in TASKS}
INSTRUCTIONS = {"t2i": "Generate an image based on the provided text description.\n",
                "tts": "Convert the text to speech.\n"}
SEED = 42
CLOCK = [time.process_time]


@dataclass
class Request:
    task: str
    vectors: torch.Tensor  # [1, P, H]
    config: OfficialSamplerConfig
    unconditional: list[int] | None


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}; torch {torch.__version__}, {torch.get_num_threads()} threads"


def fixture_requests(model: ReleaseModel, folder: Path, tasks, new_tokens: int, real_lengths: bool,
                     embed_only: ReleaseModel | None = None) -> list[Request]:
    """Each task's fixture prompt (text, image codes, speech features of the fixture's
    reference) with its preset shortened to `new_tokens` (same ratio of steps)."""
    meta = json.loads((folder / "reference.json").read_text())
    ref = load_file(str(folder / "reference.safetensors"))
    out = []
    for task in tasks:
        spec = meta["prompts"][FIXTURE_TASK[task]]
        content = spec["messages"][-1]["content"]
        text = None
        if task in INSTRUCTIONS:
            text = content.removeprefix(INSTRUCTIONS[task])
        elif task == "vqa":
            text = content.split("\n<|begin_of_image|>")[0]
        codes = spec["image_codes"]
        if codes is not None and real_lengths:
            codes = (codes * (1024 // len(codes) + 1))[:1024]
        frames = meta["speech"][spec["audio"]]["feature_frames"] + 4 if spec["audio"] else None
        prompt = task_prompt(task, model.tokenizer, model.vocab, text=text, image_codes=codes, audio_frames=frames)
        if embed_only is None:
            features = [ref[f"speech.{spec['audio']}.features"]] if spec["audio"] else []
            vectors = model.prompt_embeds(prompt, features)
        else:  # a backbone without the release's speech input: the ids' embeddings
            vectors = embed_only.transformer.model.embed_tokens(torch.tensor([prompt.ids]))
        official = preset(task)
        config = preset(task, max_new_tokens=new_tokens,
                        steps=max(1, round(new_tokens * official.steps / official.max_new_tokens)))
        unconditional = None
        if config.cfg > 0:
            unconditional = unconditional_prompt(task, model.tokenizer.encode, model.vocab, len(prompt.ids),
                                                 random.Random(SEED))
        out.append(Request(task, vectors, config, unconditional))
    return out


def single(model: ReleaseModel, request: Request, forward=None, end_at: int | None = None, **changes):
    """A closure running one request through `generate` -> (ids, passes). `forward`
    makes a fresh forward per run (a cache is per request); `end_at`: the scripted end
    (`ending`)."""
    config = replace(request.config, **changes)

    def run():
        f = forward() if forward is not None else model.logits
        if end_at is not None:
            f = ending(f, end_at, model.vocab.pad_id)
        passes = [0]

        def counted(vectors, start):
            passes[0] += 1
            return f(vectors, start)
        ids = generate(counted, model.transformer.model.embed_tokens, request.vectors, model.vocab, config,
                       request.unconditional, torch.Generator().manual_seed(SEED))
        label = f"{f.full}+{f.spans}" if isinstance(f, PromptCache) else passes[0]
        return ids.tolist(), label
    return run


def ending(forward, at: int, pad_id: int, margin: float = 3.0):
    """A scripted end: at response positions `at:` the model's `<|endoftext|>` logit is
    set `margin` above its largest, as a model that answers in `at` ids and pads the rest
    (the fixtures' random weights never end an answer, so early stop has nothing to stop)."""
    def forward_ending(vectors, start):
        logits = forward(vectors, start).clone()
        logits[:, at:, pad_id] = logits[:, at:].max(-1).values + margin
        return logits
    return forward_ending


def batched(model: ReleaseModel, requests: list[Request], max_padding: float | None = None):
    """A closure running `requests` through `generate_batch` -> (ids of each, passes)."""
    def run():
        passes = []
        out = generate_batch(masked_forward(model.transformer), model.transformer.model.embed_tokens,
                             [r.vectors for r in requests], model.vocab, [r.config for r in requests],
                             [r.unconditional for r in requests],
                             [torch.Generator().manual_seed(SEED) for _ in requests], max_padding,
                             on_pass=passes.append)
        return [o.tolist() for o in out], len(passes)
    return run


def in_sequence(runs):
    def run():
        outs = [r() for r in runs]
        return [o[0] for o in outs], sum(o[1] for o in outs)
    return run


def timed(variants: dict, repeats: int) -> dict:
    """name -> (result, best seconds): the variants run in turn, `repeats` rounds, so a
    change of the machine's load falls on all of them alike. Seconds are the process's
    CPU time (`--clock cpu`, steadier on a shared machine) or wall time."""
    best = {name: float("inf") for name in variants}
    results = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = CLOCK[0]()
            results[name] = fn()
            best[name] = min(best[name], CLOCK[0]() - start)
    return {name: (results[name], best[name]) for name in variants}


def agreement(model: ReleaseModel, ids: list[int], base: list[int]) -> tuple[int, bool]:
    same = sum(a == b for a, b in zip(ids, base))
    parsed = parse_response(ids, model.tokenizer, model.vocab) == parse_response(base, model.tokenizer, model.vocab)
    return same, parsed


def measure(name: str, model: ReleaseModel, requests: list[Request], repeats: int, full: bool = True) -> list[dict]:
    """Each technique against the official sampler on each request; `full`: every
    technique (else the ones whose time matters: caches, one threshold, batching)."""
    rows = []

    def row(task, technique, ids, passes, base, base_seconds, seconds, scale=1):
        same, parsed = agreement(model, ids, base[0][0])
        rows.append(dict(release=name, task=task, technique=technique, passes=str(passes),
                         base_passes=base[0][1], time_ratio=seconds / (scale * base_seconds),
                         seconds=seconds, ids_equal=same, ids=len(base[0][0]), parsed_equal=parsed))

    thresholds = (0.9, 0.5, 0.3) if full else (0.5,)
    for r in requests:
        end_at = r.config.max_new_tokens // 4
        variants = {"official": single(model, r)}
        for refresh in (4, 16):
            variants[f"prompt cache, refresh {refresh}"] = single(
                model, r, forward=lambda refresh=refresh: PromptCache(model.transformer, refresh))
        for t in thresholds:
            variants[f"threshold {t}"] = single(model, r, threshold=t)
        if full:  # early stop on the random weights alone never fires (no end is ever committed)
            variants["official, scripted end"] = single(model, r, end_at=end_at)
            variants["early stop, scripted end"] = single(model, r, end_at=end_at, early_stop=True)
        variants["batch of 4 copies (one length)"] = batched(model, [r] * 4)
        measured = timed(variants, repeats)
        base = measured["official"]
        (ids, passes), seconds = base
        rows.append(dict(release=name, task=r.task, technique="official", passes=str(passes), base_passes=passes,
                         time_ratio=1.0, seconds=seconds, ids_equal=len(ids), ids=len(ids), parsed_equal=True))
        for technique, ((ids, passes), seconds) in measured.items():
            if technique == "official":
                continue
            if technique == "early stop, scripted end":
                row(r.task, technique, ids, passes, measured["official, scripted end"],
                    measured["official, scripted end"][1], seconds)
            elif technique.startswith("batch"):
                row(r.task, technique, ids[0], passes, base, base[1], seconds, scale=4)
                rows[-1]["ids_equal_rows"] = [agreement(model, i, base[0][0])[0] for i in ids]
            else:
                row(r.task, technique, ids, passes, base, base[1], seconds)
    mixed = {"batch of every task (mixed lengths)": None,
             "batch of every task, max_padding 0.5": 0.5}
    measured = timed({"in sequence": in_sequence([single(model, r) for r in requests]),
                      **{k: batched(model, requests, v) for k, v in mixed.items()}}, repeats)
    (alone, alone_passes), alone_seconds = measured["in sequence"]
    for technique in mixed:
        (together, passes), seconds = measured[technique]
        for r, ids, base in zip(requests, together, alone):
            same, parsed = agreement(model, ids, base)
            rows.append(dict(release=name, task=r.task, technique=technique,
                             passes=f"{passes} for all", base_passes=f"{alone_passes} for all",
                             time_ratio=seconds / alone_seconds, seconds=seconds, ids_equal=same, ids=len(base),
                             parsed_equal=parsed))
    return rows


def batch_exactness(name: str, requests: list[Request], model: ReleaseModel) -> list[str]:
    """The six tasks batched, with and without padding, in float32 and in the release's
    bfloat16: how many ids of each request equal its batch-1 run."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        m = ReleaseModel.from_folder(model.source, dtype=dtype, dither=0.0)
        cast = [replace(r, vectors=r.vectors.to(dtype)) for r in requests]
        alone = [single(m, r)()[0] for r in cast]
        for max_padding in (None, 0):
            together, passes = batched(m, cast, max_padding)()
            same = [f"{r.task} {sum(a == b for a, b in zip(t, a_))}/{len(a_)}"
                    for r, t, a_ in zip(cast, together, alone)]
            out.append(f"{name} {str(dtype).removeprefix('torch.')} max_padding={max_padding} "
                       f"({passes} passes): "
                       + ", ".join(same))
    return out


def big_model(tiny: ReleaseModel) -> ReleaseModel:
    """tiny_a's release with its backbone grown to 8 layers of hidden size 256 (random)."""
    config = tiny.transformer.config.replace(hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                             num_attention_heads=8, num_key_value_heads=4)
    transformer = Transformer.from_config(config, seed=0).eval()
    return ReleaseModel(transformer, tiny.speech, tiny.tokenizer, tiny.vocab, tiny.source, {}).eval()


def print_table(rows: list[dict]) -> None:
    print("| release | task | technique | passes (official) | time / official | ids equal | parsed equal |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        extra = f" (rows: {', '.join(map(str, r['ids_equal_rows']))})" if "ids_equal_rows" in r else ""
        time_cell = f"{r['seconds'] * 1000:.0f} ms" if r["technique"] == "official" else f"{r['time_ratio']:.2f}"
        print(f"| {r['release']} | {r['task']} | {r['technique']} | {r['passes']} ({r['base_passes']}) | "
              f"{time_cell} | {r['ids_equal']}/{r['ids']}{extra} | {'yes' if r['parsed_equal'] else 'no'} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", default="tiny_a,tiny_b")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--big", action="store_true", help="also tiny_a grown to 8 x 256, real prompt lengths")
    parser.add_argument("--big-new-tokens", type=int, default=16)
    parser.add_argument("--only-big", action="store_true", help="skip the fixture releases")
    parser.add_argument("--repeats", type=int, default=2, help="timings: the best of this many runs")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier CPU times)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    tasks = args.tasks.split(",")
    print(f"CPU: {cpu_model()}; {args.clock} time, best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    rows, exactness = [], []
    with torch.no_grad():
        for name in [] if args.only_big else args.releases.split(","):
            model = ReleaseModel.from_folder(RELEASES / name, dtype=torch.float32, dither=0.0)
            requests = fixture_requests(model, RELEASES / name, tasks, args.new_tokens, False)
            rows += measure(name, model, requests, args.repeats)
            exactness += batch_exactness(name, requests, model)
        if args.big:
            tiny = ReleaseModel.from_folder(RELEASES / "tiny_a", dtype=torch.float32, dither=0.0)
            big = big_model(tiny)
            requests = fixture_requests(tiny, RELEASES / "tiny_a", tasks, args.big_new_tokens, True, embed_only=big)
            rows += measure("tiny_a 8x256", big, requests, args.repeats, full=False)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print_table(rows)
    if exactness:
        print("\nstep-level batching of every task, ids equal to batch 1 (of each request's):")
        for line in exactness:
            print(line)
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_model(), "rows": rows, "exactness": exactness}, indent=1) + "\n")


if __name__ == "__main__":
    main()
