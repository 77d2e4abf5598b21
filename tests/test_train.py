"""Ray Train stages on a real local Ray: two CPU workers (DDP over gloo), real shards."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from omni_model.sampler import Region, SamplerConfig, generate, make_layout
from omni_model.templates import Message, Text, encode_prompt
from omni_model.tokenizers.text import ByteTokenizer
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab
from pipelines.sdvi import SDVIConfig, build_sdvi
from pipelines.tokenize import TokenizeConfig, tokenize_manifest
from pipelines.train import (DataConfig, DataSource, FreshModel, ModelConfig, OptimConfig, RunConfig,
                             ScalingConfig, ScheduleConfig, StageConfig, latest_checkpoint, run_stage)
from pipelines.world_data import Voice, WorldConfig, build_world

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def shards(ray_session, fixtures_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    world = root / "world"
    build_world(WorldConfig(out=str(world), train_scenes=16, eval_scenes=2, tts_workers=1,
                            caption_voices=(Voice("espeak", "en-us"),)))
    build_sdvi(SDVIConfig(vqa_manifests=(str(world / "manifests/train/vqa.jsonl"),),
                          caption_manifests=(str(world / "manifests/train/caption.jsonl"),),
                          data_root=str(world), out=str(world / "manifests/sdvi"), max_rows=8,
                          question_voices=(Voice("espeak", "en-us+m3"),),
                          answer_voices=(Voice("espeak", "en-us+f3"),), tts_workers=1))
    for name, manifest in (("train", "train/all.jsonl"), ("sdvi", "sdvi/all.jsonl")):
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
        stage=stage, run=RunConfig(dir=str(run_dir), max_failures=kw.pop("max_failures", 0),
                                   fail_at_step=kw.pop("fail_at_step", None)),
        model=model,
        data=DataConfig(shards=str(shards), mixture=mixture, max_seq_len=160, rows_per_step=4, max_pads=4),
        optim=OptimConfig(lr=kw.pop("lr", 3e-3), warmup_ratio=0.1),
        train=ScheduleConfig(max_steps=kw.pop("max_steps", 30), log_every=5, checkpoint_every=10),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=1, backend=kw.pop("backend", "auto"),
                              zero_stage=kw.pop("zero_stage", 2)))
    assert not kw
    return cfg


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage1")
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
    result = run_stage(_stage(shards, tmp_path / "run", max_steps=20, fail_at_step=15, max_failures=2))
    assert (tmp_path / "run" / ".failed_once").exists()
    assert json.loads((Path(result["final"]) / "train_state.json").read_text())["step"] == 20


def test_interrupted_deepspeed_run_resumes_from_its_checkpoint(shards, tmp_path):
    """The GPU path's DeepSpeed engine, run on CPU (gloo): ZeRO-2 with its own checkpoint
    format for optimizer shards. A run that died at step 15 (no restarts allowed) and is
    started again resumes at step 10 through `engine.load_checkpoint`, not from zero.
    (The DDP path's resume is exercised by the killed-worker test above.)"""
    cfg = _stage(shards, tmp_path / "ds", max_steps=20, fail_at_step=15, backend="deepspeed")
    with pytest.raises(Exception):
        run_stage(cfg)
    checkpoint = latest_checkpoint(tmp_path / "ds")
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == 10
    assert list((checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))  # ZeRO shards
    result = run_stage(replace(cfg, run=replace(cfg.run, fail_at_step=None)))
    metrics = _metrics(tmp_path / "ds")
    steps = [m["step"] for m in metrics]
    assert steps[:3] == [5, 10, 15] and steps[-2:] == [15, 20] and steps.count(5) == 1
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert 0 < metrics[-1]["lr"] < 3e-3  # DeepSpeed stepped the cosine schedule
    final = Transformer.from_pretrained(result["final"])
    start = Transformer.from_pretrained(checkpoint)
    assert any(not torch.equal(a, b) for a, b in zip(final.state_dict().values(),
                                                     start.state_dict().values()))
