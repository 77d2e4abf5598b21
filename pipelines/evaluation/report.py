"""The report folder: `metrics.json`, `report.md` (the table), `t2i_grid.png` (generated
images under their prompts), `loss.png` (training curves from the stages'
`metrics.jsonl`), `t2i_steps.png` (t2i accuracy against sampler steps) and a few WAVs.

Charts are drawn with matplotlib's object API (no pyplot, no display needed).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
from matplotlib.figure import Figure
from PIL import Image


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
    sources = ", ".join(f"`{m}`" for m in metrics.get("manifests", [])) or "held-out world scenes"
    text = f"# Evaluation\n\nModel `{metrics.get('model', '?')}` on {sources}.\n\n" + "\n".join(rows) + "\n"
    quarantined = metrics.get("quarantined") or {}
    if quarantined:
        counts = ", ".join(f"{task} {n}" for task, n in sorted(quarantined.items(), key=lambda kv: str(kv[0])))
        text += f"\nQuarantined (not evaluated; `quarantine.jsonl` says why): {counts}.\n"
    if metrics.get("t2i_steps"):
        text += "\n## Text-to-image accuracy against sampler steps\n\n"
        text += "| steps | position penalty | overall | colour | shape | seconds |\n|---|---|---|---|---|---|\n"
        for r in metrics["t2i_steps"]:
            text += (f"| {r['steps']} | {r['position_penalty']:g} | {r['overall']:.3f} | {r['colour']:.3f} "
                     f"| {r['shape']:.3f} | {r['seconds']} |\n")
    text += ("\nPrior guess: each case answered with another held-out case's right output (the "
             "render of another scene, another caption, another answer): what knowing the world "
             f"but not the input scores. Uniform chance for the world's VQA: {metrics['chance']['vqa']:.3f}.\n"
             "Metrics: WER/CER after Whisper's English normaliser (jiwer); VQA exact match and VQA "
             "accuracy (VQA v2's answer normalisation); captions exact match (any reference), corpus "
             "BLEU-4 (sacrebleu) and CIDEr-D (pycocoevalcap); images by the world's checker where the "
             "scene is known (`unscored`: cases without one).\n")
    return text


def write_report(out: Path, metrics: dict, examples: dict[str, list], runs: Sequence[str] = (),
                 grid: int = 12, wavs: int = 3) -> None:
    """Everything of the report folder; `examples[task]` holds (case, output) pairs."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(format_report(metrics))
    if examples.get("t2i"):
        pairs = examples["t2i"][:grid]
        image_grid([o.image for _, o in pairs], [c.reference for c, _ in pairs], out / "t2i_grid.png")
    curves = training_curves(runs)
    if curves:
        loss_chart(curves, out / "loss.png")
    if metrics.get("t2i_steps"):
        steps_chart(metrics["t2i_steps"], out / "t2i_steps.png")
    for task in ("tts", "svqa"):
        for i, (case, output) in enumerate(examples.get(task, [])[:wavs]):
            if output.speech is not None and len(output.speech):
                sf.write(out / f"{task}_{i}.wav", output.speech, output.sample_rate)
                (out / f"{task}_{i}.txt").write_text(f"{case.prompt}\n-> {output.text or ''}\n")


def training_curves(runs: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """(step, loss) of each run folder's `metrics.jsonl`, by the folder's name."""
    curves = {}
    for run in runs:
        path = Path(run) / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            curves[Path(run).name] = [(r["step"], r["loss"]) for r in rows]
    return curves


def image_grid(images: Sequence[Image.Image], captions: Sequence[str], path: Path, columns: int = 4) -> None:
    """Images with their prompts above them."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(2.2 * columns, 2.6 * rows), dpi=100)
    for i, (image, caption) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(caption, 26)[:3]), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)


def loss_chart(curves: dict[str, list[tuple[float, float]]], path: Path, title: str = "training loss") -> None:
    """One line per run, the runs one after the other on the step axis (640x360)."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    offset = 0.0
    for name, points in curves.items():
        if points:
            steps, losses = zip(*points)
            ax.plot([offset + s for s in steps], losses, marker=".", markersize=3, label=name)
            offset += max(steps)
    ax.set(title=title, xlabel="cumulative step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def steps_chart(curve: Sequence[dict], path: Path) -> None:
    """t2i overall accuracy against sampler steps, one line per position penalty."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot()
    for penalty in sorted({r["position_penalty"] for r in curve}):
        rows = [r for r in curve if r["position_penalty"] == penalty]
        ax.plot([r["steps"] for r in rows], [r["overall"] for r in rows], marker="o",
                label=f"position penalty {penalty:g}")
    ax.set_xscale("log", base=2)
    ax.set(title="text-to-image accuracy against sampler steps", xlabel="steps", ylabel="overall agreement",
           ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
