"""Training stage 2 of Omni-Diffusion on Ray Train (the loop is shared: pipelines/train/).

    python jobs/stage2.py --config configs/tiny/stage2.yaml [train.max_steps=20 run.dir=DIR]
"""

from __future__ import annotations

import sys

from jobs.stage_common import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(2, __doc__, sys.argv[1:]))
