"""Build the synthetic world: render scenes, speak their captions, write manifests.

    python jobs/build_world.py --config configs/tiny/world.yaml [world.train_scenes=500]
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts jobs/ first on sys.path, where jobs/tokenize.py would shadow
# the standard library's tokenize: put the project root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import json
import logging
from dataclasses import dataclass, field

from pipelines.config import parse_job_args, save_config
from pipelines.ray_setup import RayConfig, start_ray, stop_ray
from pipelines.world_data import WorldConfig, build_world


@dataclass(frozen=True)
class BuildWorldJob:
    world: WorldConfig = field(default_factory=WorldConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(BuildWorldJob, __doc__.splitlines()[0], "configs/tiny/world.yaml", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    save_config(cfg, f"{cfg.world.out}/config.yaml")
    owned = start_ray(cfg.ray)
    try:
        counts = build_world(cfg.world)
    finally:
        stop_ray(owned)
    print(json.dumps(counts, indent=2))
    print(f"world written to {cfg.world.out}/ (train/, eval/, manifests/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
