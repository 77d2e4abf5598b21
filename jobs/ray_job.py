"""The body every Ray job shares: parse the config, log, save the resolved config next to
the output, run on a joined or local Ray, and stop the Ray this process started."""

from __future__ import annotations

import logging
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
