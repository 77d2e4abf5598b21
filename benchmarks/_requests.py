"""Helpers the Serve benchmarks share: HTTP request bodies built from a held-out world
(the user turn's text and media, as a client would send them) and a free port."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

from omni_model.templates import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, PLACEHOLDERS
from pipelines.data.manifest import parse_line, read_lines
from pipelines.evaluation import EVAL_TASKS

#: the outputs each task asks for (the evaluation's table)
OUTPUTS = {task: list(spec.outputs) for task, spec in EVAL_TASKS.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_requests(world: Path, per_task: int = 4, tasks: tuple[str, ...] = tuple(OUTPUTS),
                   steps: int = 16) -> list[tuple[str, dict]]:
    """(task, body) of the first `per_task` held-out examples of each task."""
    bodies = []
    for manifest in sorted((Path(world) / "manifests").glob("*eval*/*.jsonl")):
        taken: dict[str, int] = {}
        for _, line in read_lines(manifest):
            sample = parse_line(line, world)
            if sample.task not in tasks or taken.get(sample.task, 0) >= per_task:
                continue
            taken[sample.task] = taken.get(sample.task, 0) + 1
            images, audios = iter(sample.images), iter(sample.audios)
            inputs = []
            for piece in PLACEHOLDERS.split(sample.messages[0]["content"]):
                if piece == IMAGE_PLACEHOLDER:
                    inputs.append({"type": "image", "data": _b64(Path(world) / next(images))})
                elif piece == AUDIO_PLACEHOLDER:
                    inputs.append({"type": "audio", "data": _b64(Path(world) / next(audios))})
                elif piece.strip():
                    inputs.append({"type": "text", "text": piece})
            bodies.append((sample.task, {"inputs": inputs, "outputs": OUTPUTS[sample.task],
                                         "sampler": {"steps": steps, "seed": len(bodies)}}))
    return bodies


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
