"""The replica's engine without Ray: request timeouts and cancellation stop a generation
at its next denoising step (or before it starts), token limits are counted after the
inputs are tokenized. The same engine behind HTTP is tests/test_serve.py."""

from __future__ import annotations

import time

import pytest

from serve.config import load_serve_config
from serve.engine import Engine
from serve.errors import ClientError, Stopped
from serve.schemas import GenerateRequest
from tests.any2any import IMAGE_TOKENIZER
from tests.conftest import ROOT

LONG = {"inputs": [{"type": "text", "text": "Tell a long story."}], "outputs": ["text"],
        "lengths": {"text": 256}, "sampler": {"steps": 64}}


@pytest.fixture(scope="module")
def engine(any2any):
    folder, codec, _ = any2any
    cfg = load_serve_config(ROOT / "configs/tiny/serve.yaml", [
        f"model.model={folder}", f"model.image_tokenizer={IMAGE_TOKENIZER}", f"model.speech_tokenizer={codec}",
        "limits.max_total_tokens=600", "limits.request_timeout_s=30"])
    return Engine(cfg)


class ForwardCounter:
    """Counts the model's forward passes; `at(n, fn)` runs `fn` after the n-th."""

    def __init__(self, model):
        self.calls = 0
        self.actions = {}
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1
        self.actions.pop(self.calls, lambda: None)()

    def at(self, n, fn):
        self.actions[n] = fn


@pytest.fixture
def counter(engine):
    counter = ForwardCounter(engine.pipe.model)
    yield counter
    counter.handle.remove()


def test_a_job_past_its_deadline_or_cancelled_is_never_started(engine):
    late, gone, fine = (engine.parse(GenerateRequest(**LONG)) for _ in range(3))
    late.deadline = time.perf_counter() - 1
    gone.cancelled.set()
    calls, stopped = engine.sampler_calls, engine.stopped
    results = engine.run([late, gone, fine])
    assert isinstance(results[0], ClientError) and results[0].status == 504
    assert "limits.request_timeout_s" in results[0].message
    assert isinstance(results[1], Stopped)
    assert results[2].usage.steps == 64 and results[2].usage.batch_size == 1  # the others did not join it
    assert engine.sampler_calls == calls + 1 and engine.stopped == stopped + 2


def test_a_cancelled_stream_stops_at_the_next_step(engine, counter):
    job = engine.parse(GenerateRequest(**LONG))
    events = []

    def emit(event):
        events.append(event)
        if event["step"] == 3:
            job.cancelled.set()  # as the app does when the client disconnects

    with pytest.raises(Stopped):
        engine.stream(job, emit)
    assert [e["step"] for e in events] == [1, 2, 3] and counter.calls == 4  # the 4th step's pass, then stop


def test_a_batch_stops_once_no_request_in_it_is_wanted(engine, counter):
    a, b = (engine.parse(GenerateRequest(**LONG)) for _ in range(2))
    counter.at(3, lambda: setattr(a, "deadline", 0.0))  # a times out during step 3 ...
    counter.at(5, b.cancelled.set)  # ... b's client goes away during step 5
    results = engine.run([a, b])
    assert counter.calls == 5  # the batch went on for b, then stopped: not 64 steps
    assert isinstance(results[0], ClientError) and results[0].status == 504
    assert isinstance(results[1], Stopped)


def test_prompt_and_response_are_counted_in_tokens(engine):
    # 125 characters of emoji are 500 byte-level tokens: over the 512 with the response
    body = {**LONG, "inputs": [{"type": "text", "text": "\U0001F600" * 125}], "lengths": {"text": 8}}
    with pytest.raises(ClientError, match=r"the prompt \(5\d\d tokens\) and the response \(8 positions\)") as err:
        engine.parse(GenerateRequest(**body))
    assert err.value.status == 413
    assert engine.max_total_tokens == 512  # the limit (600) capped by the model's own positions


def test_the_models_presets_choose_sampler_options_a_request_leaves_out(engine):
    from dataclasses import replace

    kept = engine.pipe.presets
    engine.pipe.presets = replace(kept, sampler={"text": {"cache": "prefix", "early_stop": True, "steps": 3}})
    try:
        config, _ = engine.sampler_config(GenerateRequest(**LONG))
        assert config.cache == "prefix" and config.early_stop and config.steps == 64  # the request's steps
        config, _ = engine.sampler_config(GenerateRequest(**{**LONG, "sampler": {"cache": "none"}}))
        assert config.cache == "none" and config.early_stop  # the request's own value wins
        speech = {**LONG, "outputs": ["speech"]}  # another kind of output: no presets
        assert engine.sampler_config(GenerateRequest(**speech))[0].cache == "none"
    finally:
        engine.pipe.presets = kept
