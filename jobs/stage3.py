"""Training stage 3 of Omni-Diffusion on Ray Train (the loop is shared: pipelines/train/).
A config whose model.path is a release folder fine-tunes the release instead
(jobs/finetune_release.py).

    python jobs/stage3.py --config configs/tiny/stage3.yaml [train.max_steps=20 run.dir=DIR]
    python jobs/stage3.py --config configs/release/stage3.yaml
"""

from __future__ import annotations

import sys

from jobs.finetune_release import is_release_run, main as finetune_release
from jobs.stage_common import stage_main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(finetune_release(argv, __doc__) if is_release_run(argv) else stage_main(3, __doc__, argv))
