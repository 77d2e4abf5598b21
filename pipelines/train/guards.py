"""What keeps a stage from hanging, racing or learning garbage: the resources are
checked before `fit` (the data side fitted to what the workers leave, or a clear
failure), a watchdog fails a stage in which no step completes, a lock keeps a second
run off a run folder in use, weights are checked finite before they are saved, and a
failed stage is summed up in one line."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from pipelines.train.config import StageConfig
from pipelines.train.metrics import PROGRESS_FILE

logger = logging.getLogger(__name__)


class StageStalled(RuntimeError):
    """No training step completed within `run.stall_timeout_s`."""


class RunDirBusy(RuntimeError):
    """Another run holds the run folder's lock."""


class NonFiniteTraining(RuntimeError):
    """Too many non-finite steps in a row, or weights that are not finite."""


LOCK_FILE = ".lock"  #: in the run folder; holds the pid, host and start time of the run in it


#: in the run folder: why the workers stopped the stage. Rank 0 writes it and every rank
#: returns (all reach the stop together: their flags are reduced); the driver raises it.
#: Raising in the workers instead would have Ray retry the worker group into the same steps.
STOPPED_FILE = "stopped.txt"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder for one run: a second run on it (another process, or this one)
    fails at once naming the holder, where two runs used to write the same checkpoints
    and metrics. `flock` is released with its file, so a run that died (even by SIGKILL)
    leaves nothing to clean up; on NFS, Linux maps it to a lock the server keeps."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunDirBusy(f"{run_dir} is in use by another run ({holder}): wait for it to end, "
                             "or give this run another run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, host {socket.gethostname()}, "
                     f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the file stays (removing it would race a waiting run)


def check_finite_weights(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise `NonFiniteTraining` naming the first tensor with a NaN or inf."""
    for name, tensor in named:
        if tensor.numel() and not torch.isfinite(tensor.detach()).all():
            raise NonFiniteTraining(f"non-finite weights ({name}): nothing is saved from them; "
                                    "resume from the last checkpoint with a lower optim.lr")


def failure_reason(err: BaseException) -> str:
    """One line saying why a stage failed: a fit's error names each failing rank's error
    (ranks with the same one together), a controller's error its cause; each error its
    type and the first line of its message."""
    def line(e: BaseException) -> str:
        text = next((part.strip() for part in str(e).splitlines() if part.strip()), "")
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    workers = getattr(err, "worker_failures", None)
    if isinstance(workers, dict) and workers:
        by_reason: dict[str, list[int]] = {}
        for rank in sorted(workers):
            by_reason.setdefault(line(workers[rank]), []).append(rank)
        reason = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {text}"
                           for text, ranks in by_reason.items())
    elif getattr(err, "controller_failure", None) is not None:
        reason = failure_reason(err.controller_failure)
    else:
        reason = line(err)
    return reason if len(reason) <= 500 else reason[:497] + "..."


def fit_to_cluster(cfg: StageConfig) -> StageConfig:
    """Compare what the stage asks for with the cluster's resources.

    The training workers must fit (else fail now, naming the numbers). The data side
    (read tasks and the AssembleSamples actor, `data.task_cpus` each) gets what the
    workers leave: when that is less than it asks, its requests shrink to fit (down to
    0 CPU, sharing the workers' cores; its work is light beside training), where it
    would otherwise wait for CPUs forever.
    """
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    s = cfg.scaling
    need_cpu = s.num_workers * s.cpus_per_worker
    need_gpu = s.num_workers if s.use_gpu else 0
    if need_cpu > cpus or need_gpu > gpus:
        raise ValueError(
            f"the stage asks for {s.num_workers} workers x {s.cpus_per_worker:g} CPU"
            + (" + 1 GPU" if s.use_gpu else "") + f" = {need_cpu:g} CPUs" + (f" and {need_gpu} GPUs" if s.use_gpu else "")
            + f", the cluster has {cpus:g} CPUs and {gpus:g} GPUs: lower scaling.num_workers or "
            "scaling.cpus_per_worker, or add nodes (scaling.check_resources=false on an autoscaling cluster)")
    spare = cpus - need_cpu
    data_tasks = 2  # at least one read task and the AssembleSamples actor run together
    if spare < data_tasks * cfg.data.task_cpus:
        task_cpus = math.floor(100 * spare / data_tasks) / 100
        logger.warning("the workers take %g of %g CPUs: data tasks ask %g CPU each instead of %g, so "
                       "they can run beside them", need_cpu, cpus, task_cpus, cfg.data.task_cpus)
        cfg = replace(cfg, data=replace(cfg.data, task_cpus=task_cpus))
    return cfg


def fit_watched(trainer, cfg: StageConfig, run_dir: Path):
    """`trainer.fit()` under a watchdog: when no step completes for `run.stall_timeout_s`
    the stage fails with what is pending. (The fit runs in a daemon thread: a stalled
    fit cannot be interrupted from outside, and the job's exit ends it and its workers.)"""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = err

    progress = run_dir / PROGRESS_FILE
    started = time.time()
    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=min(5.0, cfg.run.stall_timeout_s))
        if not thread.is_alive():
            break
        last = started
        if progress.exists():
            last = max(last, progress.stat().st_mtime)
        if time.time() - last > cfg.run.stall_timeout_s:
            raise StageStalled(_stall_report(cfg, progress, time.time() - last))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _stall_report(cfg: StageConfig, progress: Path, idle: float) -> str:
    import ray

    done = json.loads(progress.read_text())["step"] if progress.exists() else None
    total, free = ray.cluster_resources(), ray.available_resources()
    pending = []
    try:  # the state API needs the dashboard (a `ray start` cluster has one)
        from ray.util.state import list_actors, list_tasks

        pending += [f"actor {a.class_name}" for a in list_actors(
            filters=[("state", "=", "PENDING_CREATION")], raise_on_missing_output=False)]
        pending += [f"task {t.name}" for t in list_tasks(
            filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], raise_on_missing_output=False)]
    except Exception as err:  # noqa: BLE001 - the report is best effort
        pending.append(f"(no state API: {type(err).__name__})")
    s = cfg.scaling
    return (f"no training step completed in {idle:.0f} s (run.stall_timeout_s="
            f"{cfg.run.stall_timeout_s:g}; last step done: {done if done is not None else 'none'}). "
            f"Pending: {', '.join(sorted(set(pending))) or 'nothing reported'}. The cluster has "
            f"{total.get('CPU', 0):g} CPUs ({free.get('CPU', 0):g} free) and {total.get('GPU', 0):g} GPUs; "
            f"the stage asks {s.num_workers} workers x {s.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if s.use_gpu else ''} and {cfg.data.task_cpus:g} CPU per data task. "
            "If data actors or tasks wait for CPUs, lower scaling.cpus_per_worker or data.task_cpus "
            "(scaling.check_resources=true sizes them), or add nodes")
