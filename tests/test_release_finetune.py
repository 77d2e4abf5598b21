"""Fine-tuning the released model (omni_model/release/finetune.py, pipelines/data/release_examples.py,
pipelines/train/release_*.py): manifest rows from real WAV and PNG files become the ids
the official training builds, with the release's speech features and quarantine
reasons; a few steps in-process overfit one example with the speech encoder frozen;
and one Ray Train run on tiny_a (2 workers, a worker killed and resumed) saves a release
folder that loads back with the source's encoder."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from PIL import Image

from omni_model.batching import collate
from omni_model.masking import add_tail_pad
from omni_model.objective import Objective
from omni_model.release.finetune import (ReleaseDiffusion, SpeechBatch, freeze_speech_encoder, mask_per_position,
                                         release_loss)
from omni_model.release.images import input_pixels
from omni_model.release.model import ReleaseModel, is_release_folder
from omni_model.release.prompts import task_prompt
from omni_model.tokenizers.image import MagVitTokenizer
from omni_model.tokenizers.sensevoice import context_positions
from omni_model.tokenizers.speech import GLM4VoiceTokenizer
from pipelines.data.release_examples import EXAMPLE_SCHEMA, ReleaseExamples, manifest_batch
from tests.conftest import ROOT

TINY = ROOT / "tests/fixtures/omni_release/tiny_a"
MAGVIT = ROOT / "tests/fixtures/magvit_tiny_a"
GLM = ROOT / "tests/fixtures/glm4voice_tiny_a"


def _speech(path, text: str, rate: int = 16000, channels: int = 1) -> None:
    """Real speech from espeak-ng when it is installed, else a chirp; at `rate`, `channels`."""
    if shutil.which("espeak-ng"):
        raw = path.with_suffix(".espeak.wav")
        subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
        wave, native = sf.read(raw, dtype="float32")
        raw.unlink()
        from omni_model.tokenizers.mel import resample

        wave = resample(torch.from_numpy(wave), native, rate).numpy()
    else:
        t = np.arange(int(0.8 * rate)) / rate
        wave = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)
    sf.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)


def _row(user: str, answer: str, audios=(), images=(), system: str | None = None, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "audios": list(audios), "images": list(images), **extra}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("release_data")
    _speech(root / "hello.wav", "hello there, how are you")
    _speech(root / "stereo.wav", "a red square", rate=44100, channels=2)
    _speech(root / "answer.wav", "a blue circle")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(root / "scene.png")
    (root / "broken.wav").write_bytes(b"RIFF" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
    return root


def _manifest(root, rows, name="m.jsonl"):
    (root / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return manifest_batch(root / name)


def _examples(root, **kw) -> ReleaseExamples:
    kw = {"image_tokenizer": str(MAGVIT), "speech_tokenizer": str(GLM), "image_input_size": 32,
          "image_output_size": 16, "dither": 0.0, **kw}
    return ReleaseExamples(str(TINY), str(root), max_len=kw.pop("max_len", 1024), **kw)


def test_manifest_rows_become_the_official_training_ids(data):
    good = [_row("Convert the speech to text.\n<|audio|>", "hello there, how are you", audios=["hello.wav"]),
            _row("What is in the picture?\n<|image|>", "a box", images=["scene.png"]),
            _row("Generate an image based on the provided text description.\na box", "<|image|>",
                 images=["scene.png"]),
            _row("Convert the text to speech.\na blue circle", "<|audio|>", audios=["answer.wav"]),
            _row("<|audio|>\n<|image|>", "a red square", audios=["stereo.wav"], images=["scene.png"],
                 system="Please response the input audio based on the given image.", task="svqa")]
    stage = _examples(data)
    table = stage(_manifest(data, good))
    assert table.schema == EXAMPLE_SCHEMA and table.num_rows == len(good)
    rows = table.to_pylist()
    assert [r["reason"] for r in rows] == [""] * len(good)
    assert [r["task"] for r in rows] == ["asr", "vqa", "t2i", "tts", "svqa"]
    model = ReleaseModel.from_folder(TINY, dtype=torch.float32, dither=0.0)
    tok, vocab = model.tokenizer, model.vocab
    magvit = MagVitTokenizer.from_pretrained(MAGVIT)
    scene = Image.open(data / "scene.png")

    def split(row):
        first = row["response_mask"].index(1)
        assert all(row["response_mask"][first:]), "the response is one run at the end"
        return row["input_ids"][:first], row["input_ids"][first:]

    def features(row):
        return torch.tensor(row["audio_features"]).view(-1, 560).split(row["audio_frames"])

    # speech in: the features are the release's own front end on the file; the prompt is
    # the official inference's prompt for the task; the response ends <|im_end|> "\n"
    wave, rate = sf.read(data / "hello.wav", dtype="float32")
    (feats,) = features(rows[0])
    assert torch.equal(feats, model.speech_features(wave, rate))
    prompt, response = split(rows[0])
    assert prompt == task_prompt("asr", tok, vocab, audio_frames=context_positions(feats.shape[0])).ids
    assert tok.decode(response) == "hello there, how are you<|im_end|>\n"
    (start,) = rows[0]["audio_starts"]
    context = rows[0]["input_ids"][start - 1:start + context_positions(feats.shape[0]) + 1]
    assert context == [vocab.special("boa"), *[vocab.special("context_of_audio")] * (len(context) - 2),
                       vocab.special("eoa")]
    # an image in a user turn at the input size, in an assistant's at the output size
    codes_in = magvit.encode(input_pixels(scene, 32)[None])[0].tolist()
    codes_out = magvit.encode(input_pixels(scene, 16)[None])[0].tolist()
    prompt, response = split(rows[1])
    assert prompt == task_prompt("vqa", tok, vocab, text="What is in the picture?", image_codes=codes_in).ids
    assert len(codes_in) == 64 and len(codes_out) == 16
    _, response = split(rows[2])
    image = [vocab.special("boi"), *vocab.image_to_ids(codes_out).tolist(), vocab.special("eoi")]
    assert response == image + [vocab.special("im_end"), *tok.encode_text("\n")]
    # speech out: GLM-4-Voice codes between begin and end of audio
    answer, answer_rate = sf.read(data / "answer.wav", dtype="float32")
    codes = GLM4VoiceTokenizer.from_pretrained(GLM).encode([answer], answer_rate)[0]
    _, response = split(rows[3])
    assert response[1:-3] == vocab.speech_to_ids(codes).tolist() and response[0] == vocab.special("boa")
    # spoken VQA: a 44.1 kHz stereo file, resampled and averaged as the release does
    stereo, stereo_rate = sf.read(data / "stereo.wav", dtype="float32")
    (feats,) = features(rows[4])
    assert torch.equal(feats, model.speech_features(stereo, stereo_rate))
    prompt, _ = split(rows[4])
    assert prompt == task_prompt("svqa", tok, vocab, image_codes=codes_in,
                                 audio_frames=context_positions(feats.shape[0])).ids


def test_bad_rows_are_quarantined_with_a_reason(data):
    asr = _row("Convert the speech to text.\n<|audio|>", "hello", audios=["hello.wav"])
    bad = ["not json",
           _row("<|audio|>", "x", audios=["missing.wav"]),
           _row("<|audio|>", "x", audios=["../outside.wav"]),
           _row("<|audio|>", "x", audios=["broken.wav"]),
           _row("Hi", "x", system="<|audio|>", audios=["hello.wav"]),
           _row("What is it?\n<|image|>", "a box", images=["scene.png"]),
           _row("Convert the text to speech.\nhi", "<|audio|>", audios=["answer.wav"]),
           _row("Convert the speech to text.\n<|audio|>", "a long answer " * 40, audios=["hello.wav"]),
           asr]
    stage = _examples(data, image_tokenizer=None, speech_tokenizer=None, max_len=160)
    rows = stage(_manifest(data, bad, "bad.jsonl")).to_pylist()
    reasons = [r["reason"] for r in rows]
    expected = ["not valid JSON", "missing file", "escapes the data root", "unreadable audio",
                "speech in a system message", "no data.image_tokenizer", "no data.speech_tokenizer",
                "exceed max_seq_len=160", ""]
    assert len(rows) == len(bad)
    for reason, want in zip(reasons, expected):
        assert (want in reason) if want else reason == "", (reason, want)
    assert all(r["raw"] for r in rows[:-1]) and rows[-1]["raw"] == "" and rows[-1]["input_ids"]


def test_overfitting_one_example_trains_projector_and_backbone_not_the_encoder(data):
    row = _examples(data)(_manifest(data, [_row("Convert the speech to text.\n<|audio|>", "hello there",
                                                audios=["hello.wav"])])).to_pylist()[0]
    model = freeze_speech_encoder(ReleaseModel.from_folder(TINY, dtype=torch.float32, dither=0.0)).train()
    net = ReleaseDiffusion(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)  # all of them, as ParallelModel passes them
    ids, mask = add_tail_pad(torch.tensor(row["input_ids"]), torch.tensor(row["response_mask"]).bool(),
                             model.vocab.pad_id, 16, num_pads=4)
    batch = collate([(ids, mask)], model.vocab.pad_id)
    feats = torch.tensor(row["audio_features"]).view(-1, 560)
    speech = SpeechBatch.of([feats], [(0, row["audio_starts"][0], context_positions(feats.shape[0]))])
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        out = release_loss(net, batch, speech, model.vocab, Objective(weighting="none"), generator=gen)
        assert not (out.noisy.target_mask & ~batch.response_mask).any()  # the prompt is never masked
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    after = model.state_dict()
    encoder = [k for k in after if k.startswith("speech.encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    for prefix in ("speech.projector.", "transformer.model.layers.0.", "transformer.lm_head."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    frozen = list(model.speech.encoder.parameters())
    assert all(not p.requires_grad and p.grad is None and p not in opt.state for p in frozen)
    assert len(opt.state) == sum(p.requires_grad for p in net.parameters())


def test_the_official_forward_process_masks_each_response_token_on_its_own():
    n, pad, mask = 20000, 5, 9
    ids = torch.full((2, n), 7)
    ids[:, n // 2:] = pad  # the second half: tail pads
    response = torch.ones(2, n, dtype=torch.bool)
    response[:, :100] = False  # a prompt
    noisy = mask_per_position(ids, response, mask, pad, pad_ratio=0.6, generator=torch.Generator().manual_seed(0))
    masked = noisy.target_mask
    assert not masked[:, :100].any() and torch.equal(noisy.noisy_ids[masked], torch.full((int(masked.sum()),), mask))
    # P(u <= t) with t ~ U(eps, 1): 1/2; a pad: P(u <= 0.6 t) = 0.3, per token, not per sample
    assert abs(masked[:, 100:n // 2].float().mean().item() - 0.5) < 0.01
    assert abs(masked[:, n // 2:].float().mean().item() - 0.3) < 0.01
    assert abs(masked[0, 100:n // 2].float().mean() - masked[1, 100:n // 2].float().mean()) < 0.02


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_train_run_saves_a_release_folder_that_loads_back(ray_session, data, tmp_path):
    from omni_model.config import load_config
    from pipelines.train.release_config import ReleaseFinetuneConfig
    from pipelines.train.release_stage import run_release_finetune

    rows = [_row("Convert the speech to text.\n<|audio|>", "hello there", audios=["hello.wav"]),
            _row("What is in the picture?\n<|image|>", "a box", images=["scene.png"]),
            _row("<|audio|>", "x", audios=["missing.wav"])]
    _manifest(data, rows, "train.jsonl")
    cfg = load_config(ReleaseFinetuneConfig, ROOT / "configs/release/stage3_tiny.yaml", [
        f"run.dir={tmp_path / 'run'}", f"data.root={data}", "data.manifests=[train.jsonl]",
        f"data.image_tokenizer={MAGVIT}", "data.speech_tokenizer=null", "data.max_seq_len=256",
        "data.epochs=60", "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1",
        "masking=per_position"])
    result = run_release_finetune(cfg, fail_at_step=3)  # rank 1 dies once at step 3: resumed from step 2
    assert result["examples"] == {**result["examples"], "rows": 3, "examples": 2, "quarantined": 1}
    assert result["metrics"]["step"] == 4 and np.isfinite(result["metrics"]["loss"])
    assert (tmp_path / "run" / ".failed_once").exists()
    final = tmp_path / "run" / "final"
    assert is_release_folder(final) and not (final / "optimizer.pt").exists()
    source = ReleaseModel.from_folder(TINY, dtype=torch.float32)
    tuned = ReleaseModel.from_folder(final, dtype=torch.float32)
    src, new = source.state_dict(), tuned.state_dict()
    assert src.keys() == new.keys()
    assert all(torch.equal(src[k], new[k]) for k in src if k.startswith("speech.encoder."))
    assert any(not torch.equal(src[k], new[k]) for k in src if k.startswith("speech.projector."))
    assert any(not torch.equal(src[k], new[k]) for k in src if k.startswith("transformer."))
    quarantine = pq.read_table(tmp_path / "run/examples/quarantine.parquet")
    assert quarantine.column("reason").to_pylist() == ["missing file 'missing.wav'"]


def test_stage3_hands_a_release_config_to_the_release_job():
    from jobs.finetune_release import is_release_run

    assert is_release_run(["--config", str(ROOT / "configs/release/stage3.yaml")])
    assert is_release_run([f"--config={ROOT / 'configs/release/stage3_tiny.yaml'}", "train.max_steps=2"])
    assert not is_release_run(["--config", str(ROOT / "configs/tiny/stage3.yaml"), "run.dir=x"])
    assert is_release_run(["--config", str(ROOT / "configs/tiny/stage3.yaml"), f"model.path={TINY}"])
