"""The parts of the staged GPU check (benchmarks/gpu_check.py) that need no GPU: the
FLOP count and peaks behind MFU, per-stage time caps, and a JSON report written after
every stage so that a run cut short still says how far it got."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

#: Dense bf16 peak FLOP/s by device name, first match wins (NVIDIA's data sheets, no
#: sparsity; SXM parts unless named). H200 has H100's compute (more and faster memory).
PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
)


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named `device_name` (None: not in `PEAKS`)."""
    return next((peak for key, peak in PEAKS if key in device_name), None)


@dataclass(frozen=True)
class Shape:
    """The numbers of a transformer that its FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def matmul_params(self) -> int:
        """Weights that multiply every token: q/k/v/o, the SwiGLU MLP and the output
        layer. Embedding look-ups, norms and biases do no matrix products."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.ffn
        return self.layers * (attn + mlp) + self.hidden * self.vocab


def train_flops_per_token(shape: Shape, context: float) -> float:
    """Training FLOPs per token: 6 x the matmul weights (forward 2, backward 4) plus the
    attention products QK^T and AV, 2 x 2 x context x heads x head_dim per layer in the
    forward pass, 3x that with the backward (PaLM's appendix B count, no causal halving:
    the model is bidirectional). `context` is the number of keys a query attends to."""
    return 6 * shape.matmul_params + 12 * shape.layers * shape.heads * shape.head_dim * context


def mean_context(doc_lengths: Sequence[int]) -> float:
    """The keys a token attends to, averaged over tokens, when each attends within its
    own document of a packed row: sum(len^2) / sum(len)."""
    total = sum(doc_lengths)
    return sum(n * n for n in doc_lengths) / total if total else 0.0


def mfu(shape: Shape, context: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: `train_flops_per_token` x tokens/s over the peak."""
    return None if not peak else train_flops_per_token(shape, context) * tokens_per_s / peak


# ---------------------------------------------------------------------------- time caps
class CapExceeded(Exception):
    """A stage (or a part of one) ran past its time cap."""

    def __init__(self, label: str, seconds: float) -> None:
        super().__init__(f"{label}: past its time cap of {seconds:.0f} s")
        self.label = label


@contextlib.contextmanager
def time_cap(seconds: float, label: str) -> Iterator[None]:
    """Raise `CapExceeded` in the main thread once `seconds` have passed (SIGALRM: a
    long C call is interrupted when it returns). Nests: an inner cap never outlives
    the outer one, and the outer one's remaining time is restored after it."""
    if seconds <= 0:
        raise CapExceeded(label, seconds)
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= seconds:  # the outer cap comes first: let it fire
        yield
        return
    outer_handler = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()

    def fire(signum: int, frame: Any) -> None:
        raise CapExceeded(label, seconds)

    signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_left - (time.monotonic() - start)))


# ---------------------------------------------------------------------------- report
_T0 = time.monotonic()


def log(message: str) -> None:
    """A progress line with the wall time and the seconds since start (flushed, so a
    cut-off run's output tail shows where it was)."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def describe_error(error: BaseException) -> dict[str, str]:
    """The type, message and last lines of the traceback of `error`, for the JSON."""
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return {"type": type(error).__name__, "message": str(error)[:2000],
            "traceback": "".join(lines)[-3000:]}


class Report:
    """The check's results, written whole (atomically) to `path` on every `save`."""

    def __init__(self, path: str | Path | None, meta: dict[str, Any]) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"meta": meta, "stages": {}, "summary": {}}
        self.summarise: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {})

    def save(self) -> None:
        if self.summarise is not None:
            try:
                self.data["summary"] = self.summarise(self.data["stages"])
            except Exception as e:  # a summary must never lose the stages themselves
                self.data["summary"] = {"error": describe_error(e)}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Stage:
    """One step of the check: `run(record)` fills `record["result"]` as it goes."""

    key: str  #: what `--stages` names it by
    name: str  #: its entry in the report
    cap_s: float  #: its default time cap
    run: Callable[[dict[str, Any]], None]


def run_stages(stages: Sequence[Stage], selected: Sequence[str], report: Report, budget_s: float,
               caps: dict[str, float] | None = None,
               cleanup: Callable[[Stage, BaseException | None], None] | None = None) -> bool:
    """Run the `selected` stages in order, each under its cap (and what is left of
    `budget_s`), recording ok / error / timeout and the seconds taken; the report is
    saved before and after each. An error ends its stage only. Returns True when all
    selected stages ended ok."""
    start = time.monotonic()
    all_ok = True
    for stage in stages:
        if stage.key not in selected:
            continue
        left = budget_s - (time.monotonic() - start)
        cap = min((caps or {}).get(stage.key, stage.cap_s), left)
        record = report.stage(stage.name)
        record.clear()
        record.update(status="running", cap_s=round(cap, 1), result={})
        report.save()
        log(f"stage {stage.key} ({stage.name}): start, cap {cap:.0f} s")
        t0 = time.monotonic()
        failure: BaseException | None = None
        try:
            with time_cap(cap, f"stage {stage.key}"):
                stage.run(record)
            record["status"] = "ok"
        except KeyboardInterrupt:
            raise
        except CapExceeded as e:
            failure = e
            record.update(status="timeout", error=describe_error(e))
        except BaseException as e:  # noqa: BLE001 - one stage's failure must not end the check
            failure = e
            record.update(status="error", error=describe_error(e))
        finally:
            record["seconds"] = round(time.monotonic() - t0, 1)
            if cleanup is not None:
                try:
                    cleanup(stage, failure)
                except Exception as e:  # noqa: BLE001
                    record["cleanup_error"] = describe_error(e)
            report.save()
        all_ok &= record["status"] == "ok"
        log(f"stage {stage.key}: {record['status']} after {record['seconds']} s"
            + (f" ({record['error']['type']}: {record['error']['message'][:300]})" if failure else ""))
        sys.stdout.flush()
    return all_ok
