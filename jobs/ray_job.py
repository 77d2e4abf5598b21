"""The body every Ray job shares: parse the config, log, save the resolved config next to
the output, run on a joined or local Ray, and stop the Ray this process started."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, TypeVar

from omni_model.config import parse_job_args, save_config
from pipelines.ray_setup import start_ray, stop_ray

C = TypeVar("C")


def run_ray_job(cls: type[C], doc: str, default_config: str, argv: list[str] | None,
                out_dir: Callable[[C], str | None], run: Callable[[C], Any]) -> tuple[C, Any]:
    """`out_dir` None: `run` saves the config itself (a training stage, under its run
    folder's lock, so that a refused second run does not overwrite the first's)."""
    cfg = parse_job_args(cls, doc.splitlines()[0], default_config, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    folder = out_dir(cfg)
    if folder is not None:
        save_config(cfg, f"{folder}/config.yaml")
    owned = start_ray(cfg.ray)
    try:
        return cfg, run(cfg)
    finally:
        stop_ray(owned)


def run_training_job(what: str, cls: type[C], doc: str, default_config: str, argv: list[str] | None,
                     run: Callable[[C], dict]) -> tuple[C, dict] | None:
    """`run_ray_job` for a training run (which saves its config under its run folder's
    lock): prints the final metrics but the per-task losses; on failure logs the whole
    story, prints `<what> failed: <reason>` as the last line (Ray's own errors are pages
    of worker tracebacks) and returns None."""
    from pipelines.train.guards import failure_reason

    try:
        cfg, result = run_ray_job(cls, doc, default_config, argv, lambda c: None, run)
    except Exception as err:  # noqa: BLE001 - the whole story is logged; the last line says why
        logging.getLogger(__name__).exception("%s failed", what)
        print(f"{what} failed: {failure_reason(err)}", file=sys.stderr, flush=True)
        return None
    metrics = result.get("metrics") or {}
    print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("loss/")}, indent=2))
    return cfg, result
