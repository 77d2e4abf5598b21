"""Hostile manifest rows through the tokenize stages as plain callables (no Ray): each
kind ends with its reason, the valid rows beside them are encoded, and no file costs
more memory than its limits allow. The same rows through Ray Data and into Parquet are
in tests/test_data_pipeline.py."""

import json
import resource
import time

import numpy as np
import pytest

from pipelines.data.tokenize import ImageStage, SpeechStage, TokenizeConfig, read_parts, validate_rows
from tests.hostile import hostile_manifest_rows, png_bytes, wav_bytes

LINE_LIMIT = 100_000


def _batch(rows):
    return {k: np.array([r[k] for r in rows], dtype=object) for k in ("raw", "line", "bytes", "sample_id")}


def test_every_hostile_row_gets_its_reason_and_the_valid_ones_are_encoded(tmp_path, fixtures_dir):
    root = tmp_path / "data"
    hostile = hostile_manifest_rows(root, LINE_LIMIT)
    (root / "good.png").write_bytes(png_bytes(40, 24))
    (root / "good.wav").write_bytes(wav_bytes(1.0, rate=22_050, channels=2))
    good = [json.dumps({"messages": [{"role": "user", "content": "<|image|>Describe."},
                                     {"role": "assistant", "content": "red"}], "images": ["good.png"]}),
            json.dumps({"messages": [{"role": "user", "content": "<|audio|>"},
                                     {"role": "assistant", "content": "hum"}], "audios": ["good.wav"],
                        "meta": None})]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([good[0], *hostile.values(), good[1]]) + "\n")
    cfg = TokenizeConfig(max_audio_seconds=60)
    rows = read_parts(manifest, 1000, LINE_LIMIT)[0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    batch = validate_rows(_batch(rows), str(root), LINE_LIMIT)
    batch = ImageStage(str(root), str(fixtures_dir / "magvit_tiny_a"), max_pixels=cfg.max_image_pixels)(batch)
    batch = SpeechStage(str(root), str(fixtures_dir / "glm4voice_tiny_a"), max_seconds=cfg.max_audio_seconds,
                        max_sample_rate=cfg.max_sample_rate, max_channels=cfg.max_channels)(batch)

    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    reasons = list(batch["reason"])
    assert reasons[0] == "" and reasons[-1] == ""
    assert len(json.loads(batch["image_codes"][0])[0][0]) == 64
    assert len(json.loads(batch["audio_codes"][-1])[0]) > 5
    for (expected, _), reason in zip(hostile.items(), reasons[1:-1]):
        assert expected in reason, (expected, reason)
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB"


def test_an_overlong_line_is_never_held_whole(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"a": "' + "x" * 5_000_000 + '"}\n{"b": 1}\n')
    rows = read_parts(manifest, 10, 1000)[0]
    assert [r["line"] for r in rows] == [1, 2]
    assert len(rows[0]["raw"]) == 1000 and rows[0]["bytes"] == 5_000_009
    reasons = validate_rows(_batch(rows), str(tmp_path), 1000)["reason"]
    assert "line of 5000009 bytes is over the limit of 1000" in reasons[0]
    assert "'messages' must be a non-empty list" in reasons[1]


def _budget_attack(root):
    """The issue's measured data set at its own scale: one row naming a 128 KB PNG of
    6300 x 6300 64 times (10 GB decoded), one naming a 476 KB FLAC of 300 s at 192 kHz x
    8 channels 16 times (29 GB decoded), three valid rows. Every file is within the
    per-file limits: only the row's budget refuses them."""
    from tests.hostile import blank_png, long_flac

    root.mkdir(parents=True, exist_ok=True)
    (root / "wide.png").write_bytes(blank_png(6300))
    long_flac(root / "long.flac", 300)
    (root / "good.png").write_bytes(png_bytes(40, 24))
    (root / "good.wav").write_bytes(wav_bytes(1.0))
    chat = lambda user, **kw: json.dumps({"messages": [{"role": "user", "content": user},  # noqa: E731
                                                       {"role": "assistant", "content": "x"}], **kw})
    return [chat("<|image|>Describe.", images=["good.png"]),
            chat("<|image|>" * 64, images=["wide.png"] * 64),
            chat("Transcribe.<|audio|>", audios=["good.wav"]),
            chat("<|audio|>" * 16, audios=["long.flac"] * 16),
            chat("<|image|>Describe.", images=["good.png"])]


def test_a_rows_media_are_refused_from_their_headers_before_any_is_decoded(tmp_path, fixtures_dir):
    """The budget is per row and checked from headers: one 6300 x 6300 image (159 MB
    decoded) passes, four of them in one row do not, and refusing them costs no memory."""
    from tests.hostile import blank_png

    root = tmp_path / "data"
    root.mkdir()
    (root / "wide.png").write_bytes(blank_png(6300))
    chat = lambda n: json.dumps({"messages": [{"role": "user", "content": "<|image|>" * n},  # noqa: E731
                                              {"role": "assistant", "content": "x"}], "images": ["wide.png"] * n})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(chat(4) + "\n" + chat(3) + "\n")
    cfg = TokenizeConfig(max_row_decoded_bytes=500 * 2**20)
    rows = read_parts(manifest, 10)[0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batch = validate_rows(_batch(rows), str(root), limits=cfg.media_limits())
    batch = ImageStage(str(root), str(fixtures_dir / "magvit_tiny_a"), max_pixels=cfg.max_image_pixels)(
        {**batch, "reason": np.array([batch["reason"][0], "skipped here"], dtype=object)})
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert "the row's 4 media would decode to 606 MiB, over the budget of 500 MiB" in batch["reason"][0]
    assert batch["reason"][1] == "skipped here"  # (3 x 151 MiB is within it: decoding it is not this test's)
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB"


@pytest.mark.timeout(300)
def test_the_issues_budget_attack_ends_in_quarantine_fast_through_ray_data(ray_session, tmp_path, fixtures_dir):
    """Measured before: the tokenize job ran 15 minutes at 23 of 24 GB, its actor
    restarted 5 times, nothing written. Now: both rows in quarantine, the three valid
    rows in shards, in seconds."""
    from pipelines.data.shards import read_quarantine, read_shards
    from pipelines.data.tokenize import tokenize_manifest

    root = tmp_path / "data"
    manifest = tmp_path / "attack.jsonl"
    manifest.write_text("\n".join(_budget_attack(root)) + "\n")
    start = time.perf_counter()
    summary = tokenize_manifest(TokenizeConfig(
        manifest=str(manifest), data_root=str(root), out=str(tmp_path / "shards"),
        image_tokenizer=str(fixtures_dir / "magvit_tiny_a"), speech_tokenizer=str(fixtures_dir / "glm4voice_tiny_a"),
        rows_per_part=8, batch_size=8))
    seconds = time.perf_counter() - start
    assert summary["totals"] == {"rows": 5, "shard_rows": 3, "quarantined": 2}
    assert sorted(read_shards(tmp_path / "shards").column("line").to_pylist()) == [1, 3, 5]
    reasons = {r["line"]: r["reason"] for r in read_quarantine(tmp_path / "shards").to_pylist()}
    assert "the row's 64 media would decode to 9690 MiB, over the budget of 256 MiB" in reasons[2]
    assert "the row's 16 media would decode to 28125 MiB, over the budget of 256 MiB" in reasons[4]
    assert seconds < 120, f"took {seconds:.0f} s"
