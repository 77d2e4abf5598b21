"""The Ray Data pipelines end to end on a real local Ray: build a small world (rendering
and real TTS), then tokenize a manifest mixing good, awkward and broken rows into real
Parquet shards with the reference tokenizers from tests/fixtures."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from pipelines.data.manifest import read_lines
from pipelines.data.shards import read_quarantine, read_shards, shard_files, to_messages
from pipelines.data.tokenize import TokenizeConfig, tokenize_manifest
from pipelines.world.build import Voice, WorldConfig, build_world
from pipelines.world.sdvi import SDVIConfig, build_sdvi
from tests.hostile import hostile_manifest_rows
from tests.step_clock import step

LINE_LIMIT = 100_000

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    cfg = WorldConfig(out=str(out), train_scenes=12, eval_scenes=4,
                      caption_voices=(Voice("espeak", "en-us", 1.0), Voice("hibari", "heart", 1.0)),
                      tts_workers=1)
    with step("build the world (12 + 4 scenes, two voices)"):
        counts = build_world(cfg)
    return out, counts


def test_world_build_writes_media_and_manifests(world):
    out, counts = world
    assert counts["train"]["t2i"] == 12 and counts["eval"]["caption"] == 4
    assert counts["train"]["vqa"] == 24
    assert len(list((out / "train" / "images").glob("*.png"))) == 12
    assert len(list((out / "eval" / "images").glob("*.png"))) == 4
    clips = sorted((out / "train" / "audio").glob("*.wav"))
    assert len(clips) == 12
    for clip in clips[:3]:
        info = sf.info(clip)
        words = len(clip.with_suffix(".txt").read_text().split())
        assert info.samplerate == 16000 and 0.15 * words < info.duration < 1.2 * words
    lines = list(read_lines(out / "manifests" / "train" / "all.jsonl"))
    assert len(lines) == sum(counts["train"].values())
    assert (out / "train" / "text.txt").read_text().count("\n") > 50


def _broken_manifest(out):
    """Good world rows, awkward-but-valid media, and one row per failure kind."""
    root = out
    good = [line for _, line in read_lines(out / "manifests" / "train" / "all.jsonl")][:20]
    img = "train/images/scene_000000.png"
    chat = lambda u, a, **kw: json.dumps({"messages": [{"role": "user", "content": u},  # noqa: E731
                                                       {"role": "assistant", "content": a}], **kw})
    (root / "odd").mkdir(exist_ok=True)
    base = Image.open(root / img)
    base.convert("L").save(root / "odd" / "grey.png")
    base.convert("RGBA").save(root / "odd" / "rgba.png")
    base.convert("CMYK").save(root / "odd" / "cmyk.jpg")
    base.resize((96, 32)).save(root / "odd" / "wide.png")
    base.save(root / "odd" / "bild_ä ü.png")
    speech, rate = sf.read(root / "train" / "audio" / "caption_000000.wav", dtype="float32")
    up = np.interp(np.arange(0, len(speech), 1 / 3), np.arange(len(speech)), speech).astype(np.float32)
    sf.write(root / "odd" / "stereo48k.wav", np.stack([up, up], 1), 48000)
    sf.write(root / "odd" / "narrow8k.wav", speech[::2], 8000)
    sf.write(root / "odd" / "clip.flac", speech, rate)
    raw = (root / img).read_bytes()
    (root / "odd" / "truncated.png").write_bytes(raw[: len(raw) // 2])
    sf.write(root / "odd" / "empty.wav", np.zeros(0, np.float32), 16000)
    (root / "odd" / "noise.wav").write_bytes(b"RIFF0000WAVEjunk" * 8)
    (root.parent / "outside.png").write_bytes(raw)
    sf.write(root / "odd" / "long.wav", np.full(16000 * 61, 0.01, np.float32), 16000)
    base.resize((200, 200)).save(root / "odd" / "huge.png")
    awkward = [chat("<|image|>Describe.", "a scene", images=[f"odd/{n}"])
               for n in ("grey.png", "rgba.png", "cmyk.jpg", "wide.png", "bild_ä ü.png")]
    awkward += [chat("Transcribe.<|audio|>", "words", audios=[f"odd/{n}"])
                for n in ("stereo48k.wav", "narrow8k.wav", "clip.flac")]
    broken = {
        "not valid JSON": "{oops",
        "missing file": chat("<|image|>Describe.", "x", images=["odd/nothing.png"]),
        "image: unreadable image": chat("<|image|>Describe.", "x", images=["odd/truncated.png"]),
        "audio: empty audio": chat("Transcribe.<|audio|>", "x", audios=["odd/empty.wav"]),
        "audio: unreadable audio": chat("Transcribe.<|audio|>", "x", audios=["odd/noise.wav"]),
        "escapes the data root": chat("<|image|>Describe.", "x", images=["../outside.png"]),
        "1 <|image|> placeholders but 0 images": chat("<|image|>Describe.", "x"),
        "audio: audio of 61.0s exceeds 60s": chat("Transcribe.<|audio|>", "x", audios=["odd/long.wav"]),
        "image: image of 200x200 exceeds 20000 pixels": chat("<|image|>Describe.", "x", images=["odd/huge.png"]),
        "unknown role": json.dumps({"messages": [{"role": "wizard", "content": "hi"},
                                                 {"role": "assistant", "content": "x"}]}),
    }
    broken.update(hostile_manifest_rows(root, LINE_LIMIT))
    lines = good + awkward + list(broken.values())
    path = root / "manifests" / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(good) + len(awkward), broken


@pytest.fixture(scope="module")
def tokenized(world, fixtures_dir, tmp_path_factory):
    out, _ = world
    manifest, n_good, broken = _broken_manifest(out)
    shards = tmp_path_factory.mktemp("shards")
    cfg = TokenizeConfig(manifest=str(manifest), data_root=str(out), out=str(shards),
                         image_tokenizer=str(fixtures_dir / "magvit_tiny_a"),
                         speech_tokenizer=str(fixtures_dir / "glm4voice_tiny_a"),
                         rows_per_part=8, parts_per_wave=2, batch_size=8,
                         max_audio_seconds=60, max_image_pixels=20_000, max_line_bytes=LINE_LIMIT)
    with step("tokenize a manifest with broken rows"):
        summary = tokenize_manifest(cfg)
    return cfg, summary, n_good, broken


def test_every_row_ends_in_a_shard_or_in_quarantine_with_its_reason(tokenized):
    cfg, summary, n_good, broken = tokenized
    lines = list(read_lines(cfg.manifest))
    assert summary["totals"] == {"rows": len(lines), "shard_rows": n_good, "quarantined": len(broken)}
    table = read_shards(cfg.out)
    quarantine = read_quarantine(cfg.out)
    assert table.num_rows == n_good and quarantine.num_rows == len(broken)
    ids = set(table.column("sample_id").to_pylist()) | set(quarantine.column("sample_id").to_pylist())
    assert len(ids) == len(lines)
    by_line = {r["line"]: r["reason"] for r in quarantine.to_pylist()}
    expected_lines = {line: raw for line, raw in lines}
    for reason, raw in broken.items():
        line = next(n for n, text in expected_lines.items() if text == raw)
        assert reason in by_line[line], (reason, by_line[line])


def test_shards_hold_codes_with_identity_and_awkward_media_normalised(tokenized):
    cfg, summary, _, _ = tokenized
    files = shard_files(cfg.out)
    meta = json.loads(pq.read_schema(files[0]).metadata[b"omni.tokenizers"])
    assert meta["image"]["fingerprint"].startswith("magvit2-")
    assert meta["speech"]["fingerprint"].startswith("glm4voice-")
    rows = read_shards(cfg.out).to_pylist()
    images = [p for r in rows for m in r["messages"] for p in m["parts"] if p["type"] == "image"]
    speech = [p for r in rows for m in r["messages"] for p in m["parts"] if p["type"] == "speech"]
    assert images and speech
    assert all(len(p["codes"]) == 64 and p["grid"] == [8, 8] for p in images)
    assert all(0 <= c < 8192 for p in images for c in p["codes"])
    assert all(p["frame_rate"] == 12.5 and 10 < len(p["codes"]) < 80 for p in speech)
    odd = [r for r in rows if r["sample_id"] and any(
        p["type"] == "text" and p["text"] in ("a scene", "words") for m in r["messages"] for p in m["parts"])]
    assert len(odd) == 8  # grey, RGBA, CMYK, wide, non-ASCII name, stereo 48k, 8k, FLAC
    assert all(to_messages(r)[-1].role == "assistant" for r in rows)
    assert sum(summary["tasks"].values()) == len(rows) and summary["tasks"]["asr"] > 0


def _contents(out):
    """Every committed row of a shard set: shards and quarantine, by sample id."""
    shards = {r["sample_id"]: r for r in read_shards(out).to_pylist()}
    quarantine = {r["sample_id"]: r["reason"] for r in read_quarantine(out).to_pylist()}
    return shards, quarantine


def test_rerun_is_idempotent_and_an_interrupted_run_resumes(tokenized):
    cfg, summary, _, _ = tokenized
    before = _contents(cfg.out)
    again = tokenize_manifest(cfg)
    assert again["this_run"]["rows"] == 0 and _contents(cfg.out) == before
    # A kill during the commit of part 1: its shard half-written, its marker not yet
    # written. Readers skip the part until it is committed again.
    out = Path(cfg.out)
    (out / "_parts" / "part-00001.json").unlink()
    victim = next((out / "shards").glob("part-00001-*.parquet"))
    victim.write_bytes(victim.read_bytes()[:100])
    assert victim not in shard_files(out)
    assert read_shards(cfg.out).num_rows < len(before[0])
    resumed = tokenize_manifest(cfg)
    assert resumed["this_run"]["rows"] == 8  # only the unfinished part is redone
    assert _contents(cfg.out) == before
    assert resumed["totals"] == summary["totals"]
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["manifest_fingerprint"] == summary["manifest_fingerprint"]
    assert not list(out.rglob(".*.tmp-*"))  # atomic writes leave no temporary files


def test_a_changed_manifest_redoes_exactly_what_changed(tokenized, tmp_path):
    """Edit one line and cut the tail: only the part holding the edit is redone, parts
    past the new end are dropped (shards and quarantine), nothing is duplicated; another
    part size into the same folder is refused."""
    cfg, summary, _, _ = tokenized
    out = Path(cfg.out)
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    lines = Path(cfg.manifest).read_text().splitlines()
    edited = json.loads(lines[2])
    edited["messages"][-1]["content"] += " (edited)"
    lines[2] = json.dumps(edited)
    keep = 4 * cfg.rows_per_part + 3  # parts 0..3 whole, part 4 shorter, the rest gone
    manifest = tmp_path / Path(cfg.manifest).name
    manifest.write_text("\n".join(lines[:keep]) + "\n")
    new_cfg = replace(cfg, manifest=str(manifest), out=str(copy))
    result = tokenize_manifest(new_cfg)
    assert result["this_run"]["rows"] == cfg.rows_per_part + 3  # part 0 and the cut part 4
    shards, quarantine = _contents(copy)
    assert len(shards) + len(quarantine) == keep
    assert {r["line"] for r in shards.values()} | {r["line"] for r in read_quarantine(copy).to_pylist()} \
        == set(range(1, keep + 1))
    texts = [p["text"] for r in shards.values() if r["line"] == 3 for m in r["messages"] for p in m["parts"]]
    assert any(t and t.endswith("(edited)") for t in texts)
    assert result["totals"]["rows"] == keep
    with pytest.raises(ValueError, match="rows_per_part=8; this run has rows_per_part=4"):
        tokenize_manifest(replace(new_cfg, rows_per_part=4))


def test_shard_codes_decode_to_scenes_the_checker_recognises(world, tmp_path):
    """Tokenize the world's t2i manifest with a trained world tokenizer, read the shards
    back with plain pyarrow, decode the image codes and check the scenes."""
    from omni_model.tokenizers.image import MagVitTokenizer
    from pipelines.world.checker import Agreement, check_image
    from pipelines.world.scenes import Scene
    from tests.conftest import ROOT

    out, _ = world
    tokenizer_dir = ROOT / "tests" / "assets" / "world_magvit32"
    cfg = TokenizeConfig(manifest=str(out / "manifests/train/t2i.jsonl"), data_root=str(out),
                         out=str(tmp_path / "t2i"), image_tokenizer=str(tokenizer_dir),
                         speech_tokenizer=None, batch_size=8)
    assert tokenize_manifest(cfg)["totals"]["shard_rows"] == 12
    table = pq.read_table(tmp_path / "t2i" / "shards")
    tokenizer = MagVitTokenizer.from_pretrained(tokenizer_dir)
    agreement = Agreement()
    for row in table.to_pylist():
        part = row["messages"][1]["parts"][0]
        image = tokenizer.decode_images([part["codes"]], tuple(part["grid"]))[0]
        agreement.add(Scene.from_dict(json.loads(row["meta"])["scene"]), check_image(image))
    assert agreement.rates()["overall"] >= 0.75, agreement.rates()


def test_sdvi_speaks_questions_and_answers_in_different_voices(world):
    out, counts = world
    cfg = SDVIConfig(vqa_manifests=(str(out / "manifests/train/vqa.jsonl"),),
                     caption_manifests=(str(out / "manifests/train/caption.jsonl"),),
                     data_root=str(out), out=str(out / "manifests/sdvi"), max_rows=6,
                     question_voices=(Voice("espeak", "en-us+m3", 1.0),),
                     answer_voices=(Voice("hibari", "heart", 1.0),), tts_workers=1)
    result = build_sdvi(cfg)
    assert result["svqa"] == 6 and result["s2i"] == 6
    rows = [json.loads(line) for _, line in read_lines(out / "manifests/sdvi/svqa.jsonl")]
    for row in rows:
        assert row["messages"][0]["content"] == "<|image|><|audio|>"
        assert row["messages"][1]["content"].endswith("<|audio|>")
        question, answer = (out / a for a in row["audios"])
        assert question.exists() and answer.exists() and question != answer
    s2i = [json.loads(line) for _, line in read_lines(out / "manifests/sdvi/s2i.jsonl")]
    assert all(r["messages"][1]["content"] == "<|image|>" and len(r["audios"]) == 1 for r in s2i)
