"""Ray Train stages on a real local Ray: two CPU workers (DDP over gloo), real shards."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from omni_model.sampler import Region, SamplerConfig, generate, make_layout
from omni_model.templates import Message, Text, encode_prompt
from omni_model.tokenizers.text import ByteTokenizer
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab
from pipelines.data.tokenize import TokenizeConfig, tokenize_manifest
from pipelines.world.sdvi import SDVIConfig, build_sdvi
from pipelines.train import (DataConfig, DataSource, FreshModel, ModelConfig, OptimConfig, RunConfig,
                             ScalingConfig, ScheduleConfig, StageConfig, latest_checkpoint, run_stage)
from pipelines.world.build import Voice, WorldConfig, build_world
from tests.conftest import ROOT
from tests.step_clock import step

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def shards(ray_session, fixtures_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    world = root / "world"
    with step("build the world (16 scenes)"):
        build_world(WorldConfig(out=str(world), train_scenes=16, eval_scenes=2, tts_workers=1,
                                caption_voices=(Voice("espeak", "en-us"),)))
    with step("build SDVI (8 rows)"):
        build_sdvi(SDVIConfig(vqa_manifests=(str(world / "manifests/train/vqa.jsonl"),),
                              caption_manifests=(str(world / "manifests/train/caption.jsonl"),),
                              data_root=str(world), out=str(world / "manifests/sdvi"), max_rows=8,
                              question_voices=(Voice("espeak", "en-us+m3"),),
                              answer_voices=(Voice("espeak", "en-us+f3"),), tts_workers=1))
    for name, manifest in (("train", "train/all.jsonl"), ("sdvi", "sdvi/all.jsonl")):
        with step(f"tokenize {name}"):
            tokenize_manifest(TokenizeConfig(
                manifest=str(world / "manifests" / manifest), data_root=str(world),
                out=str(root / "shards" / name), image_tokenizer=str(fixtures_dir / "magvit_tiny_a"),
                speech_tokenizer=str(fixtures_dir / "glm4voice_tiny_a")))
    return root / "shards"


def _stage(shards, run_dir, stage=1, **kw) -> StageConfig:
    mixture = {1: (DataSource("train", 1.0, ("caption", "vqa", "t2i", "text")),),
               2: (DataSource("train", 1.0),),
               3: (DataSource("train", 0.5), DataSource("sdvi", 0.5))}[stage]
    model = (ModelConfig(init="fresh", fresh=FreshModel(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128))
             if stage == 1 else ModelConfig(init="previous", path=kw.pop("previous")))
    cfg = StageConfig(
        stage=stage, run=RunConfig(dir=str(run_dir), max_failures=kw.pop("max_failures", 0)),
        model=model,
        data=DataConfig(shards=str(shards), mixture=mixture, max_seq_len=160, rows_per_step=4, max_pads=4,
                        prefetch=kw.pop("prefetch", None)),
        optim=OptimConfig(lr=kw.pop("lr", 3e-3), warmup_ratio=0.1),
        train=ScheduleConfig(max_steps=kw.pop("max_steps", 30), log_every=5,
                             checkpoint_every=kw.pop("checkpoint_every", 10),
                             max_nonfinite_in_row=kw.pop("max_nonfinite_in_row", 8)),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=1, backend=kw.pop("backend", "auto"),
                              zero_stage=kw.pop("zero_stage", 2)))
    assert not kw
    return cfg


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage1")
    with step("train stage 1, 40 steps on 2 workers"):
        result = run_stage(_stage(shards, run_dir, max_steps=40))
    return run_dir, result


def test_stage1_learns_reports_per_task_and_exports_a_loadable_model(stage1):
    run_dir, result = stage1
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(5, 41, 5))
    assert sum(m["loss"] for m in metrics[-3:]) / 3 < 0.8 * metrics[0]["loss"]
    assert {"loss/t2i", "loss/caption", "loss/vqa", "loss/text"} <= set(metrics[-1])
    assert "loss/asr" not in metrics[-1]  # stage 1 has no speech tasks
    assert all(0 <= m["data_wait_fraction"] <= 1 and m["tokens_per_s"] > 0 for m in metrics)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    model = Transformer.from_pretrained(result["final"])
    vocab = Vocab.load(result["final"])
    prompt = torch.tensor(encode_prompt([Message("user", (Text("Draw a red circle."),))],
                                        ByteTokenizer(), vocab))
    layout = make_layout(vocab, [Region("image", 64)])
    out = generate(model, prompt[None], layout, SamplerConfig(steps=8))
    codes = out[0, layout.region_index == 0]
    assert ((codes >= vocab.image_range.start) & (codes < vocab.image_range.stop)).all()


def test_stage2_starts_from_stage1_weights(stage1, shards, tmp_path):
    run_dir, result = stage1
    # lr 0: steps of stage 2 must leave stage 1's weights exactly as they were
    out = run_stage(_stage(shards, tmp_path / "stage2", stage=2, previous=f"latest:{run_dir}",
                           lr=0.0, max_steps=10))
    a = Transformer.from_pretrained(result["final"]).state_dict()
    b = Transformer.from_pretrained(out["final"]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = set().union(*_metrics(tmp_path / "stage2"))
    assert {"loss/asr", "loss/tts"} & logged  # stage 2 adds speech tasks


def test_stage3_mixes_sdvi_with_replay(stage1, shards, tmp_path):
    run_dir, _ = stage1
    run_stage(_stage(shards, tmp_path / "stage3", stage=3, previous=str(run_dir / "final"), max_steps=10))
    logged = set().union(*_metrics(tmp_path / "stage3"))
    assert {"loss/svqa", "loss/s2i"} & logged
    assert {"loss/caption", "loss/vqa", "loss/asr", "loss/t2i"} & logged  # the replay share


def test_a_killed_worker_is_restarted_and_the_run_finishes(shards, tmp_path):
    """Rank 1 exits after step 15: Ray starts a new worker group, which goes on from the
    step-10 checkpoint (steps 11-15 again, not 1-15) and finishes. Its batches are made
    ahead on a thread (`data.prefetch`, the GPU default) from the worker's Ray Data shard."""
    result = run_stage(_stage(shards, tmp_path / "run", max_steps=20, max_failures=2, prefetch=2),
                       fail_at_step=15)
    assert (tmp_path / "run" / ".failed_once").exists()
    assert json.loads((Path(result["final"]) / "train_state.json").read_text())["step"] == 20
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [5, 10, 15, 15, 20]


def _finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in Transformer.from_pretrained(folder).state_dict().values())


def test_non_finite_steps_are_skipped_counted_and_too_many_in_a_row_stop_the_stage(shards, tmp_path):
    """Rank 1's loss is NaN twice at the 4th step, then at every try of the 8th (the
    `nonfinite_at` hook). Both ranks skip the same tries (DDP would otherwise hang or
    drift), the skips are counted, the weights stay finite; the third skip in a row
    (`train.max_nonfinite_in_row=3`) stops the stage with an error, at once (no retry
    of the worker group into the same steps), and no `final/` is exported."""
    from pipelines.train import NonFiniteTraining

    run_dir = tmp_path / "run"
    cfg = _stage(shards, run_dir, max_steps=10, checkpoint_every=5, max_nonfinite_in_row=3, max_failures=2)
    with pytest.raises(NonFiniteTraining, match=r"3 steps in a row had a non-finite loss or gradient norm "
                                                r"\(train.max_nonfinite_in_row=3; 5 skipped in all\): "
                                                r"stopped before step 8"):
        run_stage(cfg, nonfinite_at={3: 2, 7: 100})
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [5]  # one worker group: no retry logged step 5 again
    assert metrics[0]["skipped_nonfinite"] == 2 and torch.isfinite(torch.tensor(metrics[0]["loss"]))
    checkpoint = latest_checkpoint(run_dir)
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 5 and state["nonfinite_skipped"] == 2
    assert _finite(checkpoint)
    assert not (run_dir / "final").exists()


def test_a_deepspeed_run_skips_non_finite_steps_and_resumes_from_its_checkpoint(shards, tmp_path):
    """The GPU path's DeepSpeed engine, run on CPU (gloo): ZeRO-2 with its own checkpoint
    format for optimizer shards. Rank 1's loss is NaN at the first two tries of the 4th
    step: both ranks skip them through ZeRO's own overflow check, and the skips are
    counted. The run dies at step 15 (no restarts allowed); started again, it resumes at
    step 10 through `engine.load_checkpoint`, not from zero, with its skip count.
    (The DDP path's resume is exercised by the killed-worker test above.)"""
    run_dir = tmp_path / "ds"
    cfg = _stage(shards, run_dir, max_steps=20, backend="deepspeed")
    with pytest.raises(Exception):
        run_stage(cfg, fail_at_step=15, nonfinite_at={3: 2})
    checkpoint = latest_checkpoint(run_dir)
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 10 and state["nonfinite_skipped"] == 2
    assert list((checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))  # ZeRO shards
    assert _finite(checkpoint)
    result = run_stage(cfg)
    metrics = _metrics(run_dir)
    steps = [m["step"] for m in metrics]
    assert steps[:3] == [5, 10, 15] and steps[-2:] == [15, 20] and steps.count(5) == 1
    assert all(m["skipped_nonfinite"] == 2 for m in metrics)  # counted once, carried over the resume
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert 0 < metrics[-1]["lr"] < 3e-3  # DeepSpeed stepped the cosine schedule
    assert _finite(result["final"])
    final = Transformer.from_pretrained(result["final"])
    start = Transformer.from_pretrained(checkpoint)
    assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(),
                                                     start.state_dict().values()))


def test_a_checkpoint_cut_short_is_neither_resumed_nor_the_next_start(stage1, tmp_path):
    """Ray copies a reported checkpoint file by file: a crash mid-copy leaves a folder
    with some of them. Such a folder (a newer step, its model missing or truncated) is
    skipped by the resume and by `latest:` of the next stage; `final/` is whole."""
    from pipelines.train import checkpoint_complete, resolve_previous

    run_dir, _ = stage1
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    good = latest_checkpoint(copy)
    assert checkpoint_complete(good) and json.loads((good / "train_state.json").read_text())["step"] == 40
    for name, damage in (("checkpoint_missing", "unlink"), ("checkpoint_truncated", "truncate")):
        cut = good.parent / name
        shutil.copytree(good, cut)
        state = json.loads((cut / "train_state.json").read_text())
        (cut / "train_state.json").write_text(json.dumps({**state, "step": 50}))
        if damage == "unlink":
            (cut / "model.safetensors").unlink()
        else:
            (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:1000])
        assert not checkpoint_complete(cut)
    assert latest_checkpoint(copy) == good
    # a rank's own file cut short (rank 1's state; each rank lists its files and sizes):
    # the newest checkpoint is skipped, and a worker resuming from it takes the previous one
    from ray.train import Checkpoint

    from pipelines.train.checkpoint import restored_checkpoint

    for name in ("checkpoint_missing", "checkpoint_truncated"):
        shutil.rmtree(good.parent / name)
    previous = max((p for p in good.parent.glob("checkpoint_*") if p.is_dir() and p != good), key=lambda p: p.name)
    assert json.loads((previous / "train_state.json").read_text())["step"] == 30
    rank_1 = good / "rank_1.pt"
    rank_1.write_bytes(rank_1.read_bytes()[:-10])
    assert not checkpoint_complete(good)
    assert latest_checkpoint(copy) == previous
    with restored_checkpoint(Checkpoint.from_directory(str(good)), copy) as (folder, recorded):
        assert folder == previous and recorded["step"] == 30
    shutil.rmtree(copy / "final")
    assert resolve_previous(f"latest:{copy}") == previous
    assert not list(run_dir.glob(".final.*"))  # the export's temporary folder is gone


def test_the_cluster_is_checked_before_training(ray_session, shards, tmp_path):
    """The session's Ray has 8 logical CPUs: 9 one-CPU workers fail at once, naming the
    numbers; 4 two-CPU workers fit, and the data side's requests shrink to what is left."""
    from pipelines.train import fit_to_cluster

    cfg = _stage(shards, tmp_path / "run")
    with pytest.raises(ValueError, match=r"9 workers x 1 CPU = 9 CPUs, the cluster has 8 CPUs"):
        run_stage(replace(cfg, scaling=replace(cfg.scaling, num_workers=9)))
    full = fit_to_cluster(replace(cfg, scaling=replace(cfg.scaling, num_workers=4, cpus_per_worker=2)))
    assert full.data.task_cpus == 0
    assert fit_to_cluster(cfg).data.task_cpus == cfg.data.task_cpus  # 6 CPUs left: unchanged


def test_a_stalled_stage_fails_and_says_what_is_pending(shards, tmp_path):
    """Its own 2-CPU Ray, two one-CPU workers, data tasks asking one CPU each and the
    cluster check off: the data can never be scheduled. The job fails within the stall
    timeout instead of waiting forever, naming the resources."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "jobs/stage1.py", "--config", "configs/tiny/stage1.yaml", f"run.dir={tmp_path / 'run'}",
         f"data.shards={shards}", "data.text_tokenizer=null", "data.max_seq_len=160",
         "model.fresh={hidden: 32, layers: 1, heads: 2, kv_heads: 1, ffn: 64}", "train.max_steps=4",
         "ray.num_cpus=2", "scaling.check_resources=false", "data.task_cpus=1", "run.stall_timeout_s=10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "StageStalled: no training step completed in" in result.stderr, result.stderr[-3000:]
    assert "the stage asks 2 workers x 1 CPU and 1 CPU per data task" in result.stderr


def test_the_text_tokenizer_travels_with_the_checkpoint(shards, tmp_path):
    """Trained with a BPE text tokenizer, `final/` holds its copy and fingerprint: it
    loads with the original gone, and a next stage with another tokenizer is refused."""
    from omni_model.any_to_any import AnyToAny
    from omni_model.tokenizers.text import BPETokenizer

    corpus = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square")
              for p in ("left", "right")] * 20
    BPETokenizer.train(corpus, vocab_size=300, min_frequency=1).save_pretrained(tmp_path / "bpe")
    cfg = _stage(shards, tmp_path / "run", max_steps=4)
    cfg = replace(cfg, data=replace(cfg.data, text_tokenizer=str(tmp_path / "bpe")),
                  train=replace(cfg.train, log_every=2, checkpoint_every=4))
    final = Path(run_stage(cfg)["final"])
    recorded = json.loads((final / "tokenizers.json").read_text())["text"]
    assert recorded["path"] == "text_tokenizer" and recorded["fingerprint"].startswith("bpe-")
    shutil.rmtree(tmp_path / "bpe")
    pipe = AnyToAny.from_pretrained(final)
    assert pipe.text_tokenizer.fingerprint == recorded["fingerprint"]
    BPETokenizer.train(corpus[:40], vocab_size=280, min_frequency=1).save_pretrained(tmp_path / "other")
    stage2 = _stage(shards, tmp_path / "stage2", stage=2, previous=str(final))
    with pytest.raises(ValueError, match="text ids would change meaning"):
        run_stage(replace(stage2, data=replace(stage2.data, text_tokenizer=str(tmp_path / "other"))))


def test_workers_killed_during_a_save_resume_from_a_complete_checkpoint(shards, tmp_path):
    """SIGKILL every training worker the moment a checkpoint folder appears (Ray is
    copying the checkpoint into it, or has just finished): Ray restarts the workers,
    they resume from a complete checkpoint (or from the start), the run finishes, and
    the newest checkpoint the run folder offers is a complete one."""
    import psutil

    from pipelines.train import checkpoint_complete

    cfg = _stage(shards, tmp_path / "run", max_steps=30, max_failures=1)
    outcome = {}

    def run() -> None:
        try:
            outcome["result"] = run_stage(cfg)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed = []
    deadline = time.time() + 300
    while not killed and thread.is_alive() and time.time() < deadline:
        if any(p.is_dir() for p in (tmp_path / "run").glob("train/checkpoint_*")):
            # only this session's workers: the Ray this process started is its descendant
            # (other Ray instances on a shared machine have their own RayTrainWorkers)
            for proc in psutil.Process().children(recursive=True):
                try:
                    if any("RayTrainWorker" in part for part in proc.cmdline()):
                        proc.kill()
                        killed.append(proc.pid)
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.001)
    thread.join(600)
    assert len(killed) == 2, killed
    assert "error" not in outcome, outcome.get("error")
    final = Path(outcome["result"]["final"])
    assert json.loads((final / "train_state.json").read_text())["step"] == 30
    latest = latest_checkpoint(tmp_path / "run")
    assert checkpoint_complete(latest) and json.loads((latest / "train_state.json").read_text())["step"] == 30
