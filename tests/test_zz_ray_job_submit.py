"""`ray job submit` against a `ray start --head --num-cpus=2` cluster with token
authentication, as a user runs it: the world, its tokenization, short stage 1 and stage 2
runs with the tiny configs as shipped (two one-CPU workers take both CPUs: the data side
must be sized to fit, not wait forever), and the Serve deployment of the model, each a
submitted job; the deployed app then answers HTTP after its job has returned.

Named to run last: `ray stop` ends every Ray process on the machine, so the session's
in-process Ray is shut down first.
"""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import FIXTURES, ROOT
from tests.step_clock import step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _submit(env: dict, script: str, *args: str) -> str:
    bin_dir = Path(sys.executable).parent
    with step(f"ray job submit {script}"):
        result = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", "http://127.0.0.1:8277",
             "--working-dir", str(ROOT), "--", "python", script, *args],
            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    return result.stdout


def test_ray_job_submit_runs_world_tokenize_and_stage1(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the session's own Ray's, which is gone
    with step("ray start --head"):
        subprocess.run([str(bin_dir / "ray"), "start", "--head", "--num-cpus=2", "--port=6390",
                        "--dashboard-host=127.0.0.1", "--dashboard-port=8277", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=180)
    try:
        # token authentication is on: the job API refuses a request without the token
        anonymous = requests.get("http://127.0.0.1:8277/api/jobs/", timeout=30)
        assert anonymous.status_code in (401, 403), anonymous.status_code

        out = tmp_path / "world"
        _submit(env, "jobs/build_world.py", f"world.out={out}", "world.train_scenes=4",
                "world.eval_scenes=2", "world.caption_voices=[{engine: espeak, voice: en-us}]",
                "world.tts_workers=1")
        assert len(list((out / "train" / "images").glob("*.png"))) == 4
        assert (out / "manifests" / "train" / "all.jsonl").read_text().count("\n") == 4 * 7

        shards = tmp_path / "shards"
        _submit(env, "jobs/tokenize_manifest.py", "--manifest", str(out / "manifests/train/all.jsonl"),
                "--data-root", str(out), "--out", str(shards / "train"),
                "--image-tokenizer", str(FIXTURES / "magvit_tiny_a"),
                "--speech-tokenizer", str(FIXTURES / "glm4voice_tiny_a"))

        run = tmp_path / "stage1"
        stdout = _submit(env, "jobs/stage1.py", "--config", "configs/tiny/stage1.yaml", f"run.dir={run}",
                         f"data.shards={shards}", "data.text_tokenizer=null", "model.fresh={hidden: 32, "
                         "layers: 1, heads: 2, kv_heads: 1, ffn: 64}", "train.max_steps=4", "train.log_every=2")
        assert "stage 1 done" in stdout
        assert (run / "final" / "model.safetensors").exists()
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]

        # the user story of the hang: stage 2 as shipped, continuing stage 1 for 10 steps
        run2 = tmp_path / "stage2"
        stdout = _submit(env, "jobs/stage2.py", "--config", "configs/tiny/stage2.yaml", f"run.dir={run2}",
                         f"data.shards={shards}", f"model.path=latest:{run}", "data.text_tokenizer=null",
                         "train.max_steps=10", "train.log_every=5")
        assert "stage 2 done" in stdout
        assert [json.loads(x)["step"] for x in (run2 / "metrics.jsonl").read_text().splitlines()] == [5, 10]

        stdout = _submit(env, "jobs/deploy.py", "--config", "configs/tiny/serve.yaml",
                         f"model.model={run / 'final'}", f"model.image_tokenizer={FIXTURES / 'magvit_tiny_a'}",
                         "model.speech_tokenizer=null", "http.port=8391", "deployment.num_replicas=1",
                         "deployment.num_cpus=0.25")
        assert "serving omni-diffusion-tiny at http://127.0.0.1:8391" in stdout
        body = {"inputs": [{"type": "text", "text": "Draw a red circle."}], "outputs": ["image"],
                "sampler": {"steps": 4, "seed": 1}}
        with step("the deployed app answers POST /v1/generate"):
            response = requests.post("http://127.0.0.1:8391/v1/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["output_tokens"] == 64  # magvit_tiny_a: 32 px, an 8x8 grid
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
