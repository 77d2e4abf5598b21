"""Build the synthetic world: render scenes, speak their captions, write manifests.

    python jobs/build_world.py --config configs/tiny/world.yaml [world.train_scenes=500]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from jobs.ray_job import run_ray_job
from pipelines.ray_setup import RayConfig
from pipelines.world.build import WorldConfig, build_world


@dataclass(frozen=True)
class BuildWorldJob:
    world: WorldConfig = field(default_factory=WorldConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def main(argv: list[str] | None = None) -> int:
    cfg, counts = run_ray_job(BuildWorldJob, __doc__, "configs/tiny/world.yaml",
                              argv, lambda c: c.world.out, lambda c: build_world(c.world))
    print(json.dumps(counts, indent=2))
    print(f"world written to {cfg.world.out}/ (train/, eval/, manifests/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
