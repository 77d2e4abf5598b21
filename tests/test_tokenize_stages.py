"""The tokenize stages are plain batch -> batch callables: exercised here without Ray."""

import json

import numpy as np
from PIL import Image

from pipelines.data.tokenize import ImageStage, _encode_or_isolate, shard_row, validate_rows
from pipelines.world.scenes import make_scene, render


def _batch(lines):
    return {"raw": np.array(lines, dtype=object), "line": np.arange(1, len(lines) + 1),
            "sample_id": np.array([f"id{i}" for i in range(len(lines))], dtype=object)}


def test_stages_run_without_ray_and_build_shard_rows(tmp_path, fixtures_dir):
    render(make_scene(0, 0), 32).save(tmp_path / "a.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    rows = [{"messages": [{"role": "user", "content": "<|image|>Describe."},
                          {"role": "assistant", "content": "a scene"}], "images": [name]}
            for name in ("a.png", "dot.png")]
    batch = validate_rows(_batch([json.dumps(r) for r in rows] + ["nope"]), str(tmp_path))
    assert list(batch["reason"][:2]) == ["", ""] and "not valid JSON" in batch["reason"][2]
    stage = ImageStage(str(tmp_path), str(fixtures_dir / "magvit_tiny_a"))
    out = stage(batch)
    assert list(out["reason"][:2]) == ["", ""]  # a 1x1 image is an image
    assert json.loads(out["image_codes"][1])[0][1] == [8, 8]
    assert out["image_encode_s"][0] > 0
    row = shard_row({k: v[0] for k, v in out.items()}, "m.jsonl", 12.5)
    image = row["messages"][0]["parts"][0]
    assert image["type"] == "image" and len(image["codes"]) == 64 and image["grid"] == [8, 8]
    assert row["messages"][0]["parts"][1] == {"type": "text", "text": "Describe.", "codes": None,
                                              "grid": None, "frame_rate": None}


def test_a_tokenizer_failure_costs_only_its_row():
    def encode(groups):
        if any(g == "poison" for g in groups):
            raise RuntimeError("boom")
        return [len(g) for g in groups]

    out = _encode_or_isolate(encode, ["ab", "poison", "c"], [1, 1, 1])
    assert out[0] == [2] and out[2] == [1] and isinstance(out[1], RuntimeError)
    assert _encode_or_isolate(encode, ["ab", "c"], [1, 1]) == [[2], [1]]

