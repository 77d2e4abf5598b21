"""Training metrics: the window of steps between two reports (loss overall and per task,
masked-token accuracy, tokens/s, time waiting for data), reduced over the workers, and
rank 0's writer (`metrics.jsonl`, TensorBoard, `progress.json` for the watchdog)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from pipelines.data.manifest import TASKS

logger = logging.getLogger(__name__)


PROGRESS_FILE = "progress.json"  #: rank 0's last step and its time (the watchdog reads it)


class MetricsWindow:
    """Accumulates the metrics of the steps between two reports."""

    def __init__(self, n_tasks: int, device: torch.device) -> None:
        self.loss = torch.zeros(n_tasks, device=device)  # summed weighted loss per task
        self.count = torch.zeros(n_tasks, device=device)  # masked tokens per task
        self.correct = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device)  # real (non-padding) tokens processed
        self.steps = 0
        self.wait = 0.0
        self.time = 0.0

    def add(self, per_pos, logits, targets, masked, tags, attention) -> None:
        tags = tags.clamp(min=0)
        self.loss.index_add_(0, tags[masked], per_pos[masked].float())
        self.count.index_add_(0, tags[masked], torch.ones_like(per_pos[masked], dtype=torch.float))
        self.correct += (logits.argmax(-1) == targets[masked]).sum()  # logits: the masked positions
        self.tokens += attention.sum()
        self.steps += 1

    def merge(self, other: "MetricsWindow") -> None:
        """Add a step's window (kept apart until the step is known to be applied)."""
        self.loss += other.loss
        self.count += other.count
        self.correct += other.correct
        self.tokens += other.tokens
        self.steps += other.steps
        self.wait += other.wait
        self.time += other.time

    def reduce(self, world: int) -> dict[str, float]:
        packed = torch.cat([self.loss, self.count, self.correct[None], self.tokens[None],
                            torch.tensor([self.time, self.wait], device=self.loss.device)])
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed)
        n = len(self.loss)
        loss, count = packed[:n], packed[n:2 * n]
        correct, tokens, seconds, wait = packed[2 * n:].tolist()
        seconds, wait = seconds / world, wait / world
        out = {"loss": (loss.sum() / count.sum().clamp(min=1)).item(),
               "masked_accuracy": correct / max(1.0, count.sum().item()),
               "tokens_per_s": tokens / max(seconds, 1e-9),
               "data_wait_fraction": wait / max(seconds, 1e-9)}
        for i, task in enumerate(TASKS):
            if count[i] > 0:
                out[f"loss/{task}"] = (loss[i] / count[i]).item()
        return out


class MetricsWriter:
    """Rank 0 appends metrics to `metrics.jsonl` and TensorBoard event files, and keeps
    `progress.json` (the last step and when) for the driver's watchdog."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.progress_file = run_dir / PROGRESS_FILE
        self.progress_written = 0.0
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def progress(self, step: int) -> None:
        """Record a finished step (at most every 5 s: a small file, rewritten)."""
        now = time.time()
        if now - self.progress_written >= 5.0:
            tmp = self.progress_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step, "time": now}))
            tmp.replace(self.progress_file)
            self.progress_written = now

    def write(self, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key != "step":
                self.tb.add_scalar(key, value, metrics["step"])
        self.tb.flush()
        logger.info("step %d loss %.4f acc %.3f %.0f tok/s", metrics["step"], metrics["loss"],
                    metrics["masked_accuracy"], metrics["tokens_per_s"])

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()
