"""Training stage 2 of Omni-Diffusion on Ray Train (the loop is shared: pipelines/train.py).

    python jobs/stage2.py --config configs/tiny/stage2.yaml [train.max_steps=20 run.dir=DIR]
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts jobs/ first on sys.path, where jobs/tokenize.py would shadow
# the standard library's tokenize: put the project root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from jobs.stage_common import stage_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(stage_main(2, __doc__, sys.argv[1:]))
