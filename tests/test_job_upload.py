"""What `ray job submit --working-dir .` uploads from a checkout: the code and configs,
not the test fixtures, run folders or caches (`.rayignore` beside `.gitignore`). Ray
refuses a working directory over 100 MiB; a checkout with its fixtures and a run folder
or two went over. Checked with Ray's own reading of the ignore files."""

from __future__ import annotations

import subprocess

from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

from tests.conftest import ROOT


def test_a_job_upload_holds_code_and_configs_not_data():
    rules = get_excludes_from_ignore_files(ROOT, include_gitignore=True)

    def left_out(relative: str) -> bool:
        return any(rule(ROOT / relative) for rule in rules)

    for data in ("tests/fixtures/omni_release/tiny_a/config.json", "tests/assets/world_magvit32/config.json",
                 "runs/stage1/final/model.safetensors", ".cache/tests/any2any-x/model/config.json",
                 "benchmarks/results/glm4voice_decoder_cpu.json"):
        assert left_out(data), data
    for code in ("jobs/stage1.py", "configs/tiny/stage1.yaml", "omni_model/any_to_any.py", "scripts/env.sh",
                 "pretrained/tokenizers/speech/decoder/config.json", "tests/any2any.py"):
        assert not left_out(code), code
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split("\0")
    uploaded = sum((ROOT / f).stat().st_size for f in tracked if f and (ROOT / f).is_file() and not left_out(f))
    assert uploaded < 40 * 2**20, f"{uploaded / 2**20:.0f} MiB of tracked files would be uploaded"
