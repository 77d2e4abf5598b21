"""`ray job submit` against a `ray start --head` cluster, as a user runs it.

Named to run last: `ray stop` ends every Ray process on the machine, so the session's
in-process Ray is shut down first.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_ray_job_submit_runs_the_world_job(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(bin_dir / "ray"), "start", "--head", "--num-cpus=2", "--port=6390",
                    "--dashboard-host=127.0.0.1", "--dashboard-port=8277", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        out = tmp_path / "world"
        result = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", "http://127.0.0.1:8277",
             "--working-dir", str(ROOT), "--", "python", "jobs/build_world.py",
             f"world.out={out}", "world.train_scenes=4", "world.eval_scenes=2",
             "world.caption_voices=[{engine: espeak, voice: en-us}]", "world.tts_workers=1"],
            env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "succeeded" in result.stdout
        assert len(list((out / "train" / "images").glob("*.png"))) == 4
        assert (out / "manifests" / "train" / "all.jsonl").read_text().count("\n") == 4 * 7
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
