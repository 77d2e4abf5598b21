"""Training's guards that need no Ray Train run: the run folder's lock, the resume's
temporary copies, refusing non-finite weights, and the one line a failed stage ends with.
(The guards inside a running stage, non-finite steps and rank files, are in test_train.py.)"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pipelines.train import RunConfig, ScalingConfig, StageConfig, run_stage
from tests.conftest import ROOT

HOLD = """
import sys, time
from pipelines.train.guards import run_dir_lock
with run_dir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def _hold(run_dir) -> subprocess.Popen:
    """Another process holding `run_dir` the way a running stage does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held", "the holder did not take the lock"
    return proc


def _stage(run_dir) -> StageConfig:
    # check_resources off: nothing before the lock may need Ray
    return StageConfig(run=RunConfig(dir=str(run_dir)), scaling=ScalingConfig(check_resources=False))


def test_a_second_run_on_a_held_run_dir_fails_fast_and_a_dead_holder_blocks_nothing(tmp_path):
    from pipelines.train.guards import RunDirBusy, run_dir_lock

    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        started = time.monotonic()
        with pytest.raises(RunDirBusy, match=rf"{run_dir} is in use by another run \(pid {holder.pid},"):
            run_stage(_stage(run_dir))
        assert time.monotonic() - started < 5
    finally:
        holder.kill()  # SIGKILL: the holder cleans nothing up
        holder.wait()
    with run_dir_lock(run_dir):  # the dead holder's lock went with its process
        with pytest.raises(RunDirBusy):  # one process, two runs: refused too
            with run_dir_lock(run_dir):
                pass
    with run_dir_lock(run_dir):  # released on exit
        pass


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_stage_job_ends_with_one_line_saying_why(tmp_path):
    """The job itself (jobs/stage1.py): the last line it writes names the stage and the
    reason, and it exits non-zero."""
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    (run_dir / "config.yaml").write_text("the holder's\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run([sys.executable, "jobs/stage1.py", "--config", "configs/tiny/stage1.yaml",
                                 f"run.dir={run_dir}", "ray.num_cpus=2"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stage 1 failed: RunDirBusy: {run_dir} is in use by another run (pid {holder.pid},"), \
        result.stderr[-3000:]
    assert (run_dir / "config.yaml").read_text() == "the holder's\n"  # the refused run wrote nothing there


def test_the_one_line_reason_of_a_failed_fit():
    """Ray Train wraps a worker's error in a WorkerGroupError whose text is every rank's
    traceback; the line names the first failing rank's error and its first line."""
    from ray.train import ControllerError, WorkerGroupError

    from pipelines.train.guards import NonFiniteTraining, failure_reason

    worker = NonFiniteTraining("3 steps in a row had a non-finite loss or gradient norm\nmore detail")
    err = WorkerGroupError("rank 1 traceback...\n" * 50,
                           {2: worker, 0: RuntimeError("connection reset"), 1: RuntimeError("connection reset")})
    assert failure_reason(err) == ("ranks 0, 1: RuntimeError: connection reset; "
                                   "rank 2: NonFiniteTraining: 3 steps in a row had a non-finite loss or gradient norm")
    assert failure_reason(WorkerGroupError("x", {1: worker})) == \
        "rank 1: NonFiniteTraining: 3 steps in a row had a non-finite loss or gradient norm"
    assert failure_reason(ControllerError(TimeoutError("workers did not start"))) == \
        "TimeoutError: workers did not start"
    assert failure_reason(ValueError("")) == "ValueError"
    assert "\n" not in failure_reason(RuntimeError("a\nb\n" * 100))
    assert len(failure_reason(RuntimeError("x" * 5000))) <= 500


def _checkpoint_folder(folder):
    folder.mkdir()
    (folder / "train_state.json").write_text(json.dumps({"step": 7}))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


@pytest.mark.parametrize("where", ["local", "remote"])
def test_resuming_leaves_no_copy_of_the_checkpoint_behind(tmp_path, monkeypatch, where):
    """Every restart of a worker group resumes; each used to copy the whole checkpoint to
    a temporary folder that nothing deleted (up to a full disk). Resumed twice here, from
    a local checkpoint (read in place) and from one behind a non-local filesystem
    (downloaded, then deleted): no copy is left in the temporary folder."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from pipelines.train.checkpoint import restored_checkpoint

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    source = _checkpoint_folder(tmp_path / "checkpoint_000001")
    filesystem = (pyarrow.fs.LocalFileSystem() if where == "local"
                  else pyarrow.fs.SubTreeFileSystem("/", pyarrow.fs.LocalFileSystem()))
    for _ in range(2):
        checkpoint = Checkpoint(str(source), filesystem=filesystem)
        with restored_checkpoint(checkpoint) as (folder, recorded):
            assert recorded["step"] == 7 and (folder / "model.safetensors").stat().st_size == 4096
    assert not list(scratch.rglob("train_state.json")), sorted(scratch.rglob("*"))
    assert (source / "model.safetensors").exists()  # the checkpoint itself is untouched
    with restored_checkpoint(None) as (folder, recorded):
        assert folder is None and recorded == {"step": 0}


def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    """A checkpoint or `final/` is never written from NaN or inf weights, and the error
    names the tensor."""
    from omni_model.toy import toy_model, toy_vocab
    from omni_model.tokenizers.text import ByteTokenizer
    from pipelines.train.checkpoint import export_final
    from pipelines.train.guards import NonFiniteTraining, check_finite_weights

    vocab = toy_vocab(ByteTokenizer())
    model = toy_model(vocab, hidden=32, layers=1, heads=2, kv_heads=1, seed=1)
    check_finite_weights(model.named_parameters())  # finite: passes
    with torch.no_grad():
        next(iter(model.parameters()))[0, 0] = float("inf")
    name = next(iter(model.state_dict()))
    with pytest.raises(NonFiniteTraining, match=rf"non-finite weights \({name}"):
        check_finite_weights(model.named_parameters())
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    vocab.save(checkpoint)
    for extra in ("tokenizers.json", "train_state.json"):
        (checkpoint / extra).write_text("{}")
    with pytest.raises(NonFiniteTraining, match="non-finite weights"):
        export_final(checkpoint, tmp_path / "final")
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob(".final*"))
