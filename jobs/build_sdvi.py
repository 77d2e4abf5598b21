"""Build the SDVI data (spoken VQA and speech-to-image) by speaking VQA and caption manifests.

    python jobs/build_sdvi.py --config configs/tiny/sdvi.yaml [sdvi.max_rows=500]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from jobs.ray_job import run_ray_job
from pipelines.ray_setup import RayConfig
from pipelines.world.sdvi import SDVIConfig, build_sdvi


@dataclass(frozen=True)
class BuildSDVIJob:
    sdvi: SDVIConfig = field(default_factory=SDVIConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def main(argv: list[str] | None = None) -> int:
    cfg, counts = run_ray_job(BuildSDVIJob, __doc__, "configs/tiny/sdvi.yaml",
                              argv, lambda c: c.sdvi.out, lambda c: build_sdvi(c.sdvi))
    print(json.dumps(counts))
    print(f"SDVI manifests in {cfg.sdvi.out}/ (svqa.jsonl, s2i.jsonl, all.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
