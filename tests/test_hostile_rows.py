"""Hostile manifest rows through the tokenize stages as plain callables (no Ray): each
kind ends with its reason, the valid rows beside them are encoded, and no file costs
more memory than its limits allow. The same rows through Ray Data and into Parquet are
in tests/test_data_pipeline.py."""

import json
import resource

import numpy as np

from pipelines.tokenize import ImageStage, SpeechStage, TokenizeConfig, read_parts, validate_rows
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
