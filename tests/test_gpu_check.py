"""The GPU check's CPU-testable parts (benchmarks/gpu_check.py, _gpu_harness.py): the FLOP
count behind MFU against a hand count and against the model's own weights, and the
staged runner: the report written after every stage, a stage's error or timeout recorded
without stopping the next one. No Ray, no GPU."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _gpu_harness as h  # noqa: E402
import gpu_check  # noqa: E402


def test_flops_match_a_hand_count():
    shape = h.Shape(hidden=8, layers=2, heads=2, kv_heads=1, ffn=16, vocab=10)
    # per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192, MLP 3 x 8 x 16 = 384; output layer 8 x 10
    assert shape.matmul_params == 2 * (192 + 384) + 80 == 1232
    context = h.mean_context([3, 1])  # (9 + 1) / 4: three tokens see 3 keys, one sees 1
    assert context == 2.5
    # attention: QK^T and AV, 2 FLOPs x context x (heads x head_dim) each, x3 for training
    assert h.train_flops_per_token(shape, context) == 6 * 1232 + 2 * 3 * 2 * 2 * 2.5 * (2 * 4)
    assert h.mfu(shape, context, 1000.0, 1e9) == pytest.approx(h.train_flops_per_token(shape, context) * 1e3 / 1e9)
    assert h.mfu(shape, context, 1000.0, None) is None


def test_matmul_parameters_are_the_models_linear_weights():
    vocab = gpu_check.padded_vocab(1024)
    assert vocab.size == 1024
    config = gpu_check.model_config("small", vocab)
    model = gpu_check.random_model(config, torch.device("cpu"), torch.float32)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpu_check.flop_shape(config).matmul_params == linear
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(config.initializer_range, rel=0.2)


def test_peaks_by_device_name():
    assert h.peak_flops("NVIDIA H200") == 989e12
    assert h.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert h.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert h.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert h.peak_flops("NVIDIA L40S") == 362e12
    assert h.peak_flops("NVIDIA L4") == 121e12
    assert h.peak_flops("cpu") is None


def test_packed_batches_fill_their_rows():
    vocab = gpu_check.padded_vocab(1024)
    batches, lengths = gpu_check.packed_batches(vocab, rows=2, seq=128, count=2)
    assert len(batches) == 2 and sum(lengths) == 2 * 2 * 128
    assert all(int(b.attention_mask.sum()) == 2 * 128 for b in batches)
    assert all(b.input_ids.shape == (2, 128) and b.doc_ids is not None for b in batches)


def test_stages_report_after_each_and_survive_errors(tmp_path):
    out = tmp_path / "report.json"
    report = h.Report(out, {"test": True})
    seen_on_disk = {}

    def good(record):
        record["result"]["x"] = 1

    def bad(record):
        record["result"]["partial"] = "kept"
        raise ValueError("injected failure")

    def slow(record):
        time.sleep(5)

    def after(record):
        seen_on_disk.update(json.loads(out.read_text())["stages"])

    stages = [h.Stage("a", "first", 10, good), h.Stage("b", "second", 10, bad), h.Stage("c", "third", 0.3, slow),
              h.Stage("d", "fourth", 10, after), h.Stage("e", "unselected", 10, good)]
    t0 = time.monotonic()
    ok = h.run_stages(stages, ["a", "b", "c", "d"], report, budget_s=60)
    assert time.monotonic() - t0 < 4
    assert not ok
    # the file held the earlier stages' outcomes before the last stage ran
    assert seen_on_disk["first"]["status"] == "ok" and seen_on_disk["first"]["result"] == {"x": 1}
    assert seen_on_disk["second"]["status"] == "error"
    assert seen_on_disk["third"]["status"] == "timeout"
    assert seen_on_disk["fourth"]["status"] == "running"
    final = json.loads(out.read_text())["stages"]
    assert set(final) == {"first", "second", "third", "fourth"}
    assert final["second"]["error"]["type"] == "ValueError"
    assert final["second"]["error"]["message"] == "injected failure"
    assert "raise ValueError" in final["second"]["error"]["traceback"]
    assert final["second"]["result"] == {"partial": "kept"}
    assert final["fourth"]["status"] == "ok" and "seconds" in final["fourth"]


def test_inner_time_cap_is_caught_and_the_outer_one_still_holds():
    with pytest.raises(h.CapExceeded) as outer:
        with h.time_cap(0.6, "outer"):
            with pytest.raises(h.CapExceeded) as inner:
                with h.time_cap(0.1, "inner"):
                    time.sleep(2)
            assert inner.value.label == "inner"
            time.sleep(2)
    assert outer.value.label == "outer"


def test_small_defaults_and_stage_selection(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_check.parse_args(["--small", "--stages", "a,c", "--caps", "a=5"])
    assert args.stage_keys == ["a", "c"] and args.cap_overrides == {"a": 5.0}
    assert args.vocab == 1024 and args.seq == 256 and args.batches == [1, 2, 4] and args.out is None
    monkeypatch.setenv("OUT", "/somewhere")
    full = gpu_check.parse_args([])
    assert full.vocab == 176264 and full.out == "/somewhere/gpu_check.json" and full.zero_stages == [2, 3]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--stages", "a,x"])
