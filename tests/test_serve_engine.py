"""The replica's engine without Ray: request timeouts and cancellation stop a generation
at its next denoising step (or before it starts), token limits are counted before the
media are tokenized (and exactly after), the operator's caps bound the sampler options,
list lengths are checked before validation, previews run off the scheduler's thread.
The same engine behind HTTP is tests/test_serve.py."""

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
    # the tests that time out set deadlines themselves; the default only has to let a
    # 64-step request finish on a slow, loaded machine (30 s did not, once)
    cfg = load_serve_config(ROOT / "configs/tiny/serve.yaml", [
        f"model.model={folder}", f"model.image_tokenizer={IMAGE_TOKENIZER}", f"model.speech_tokenizer={codec}",
        "limits.max_total_tokens=600", "limits.request_timeout_s=300"])
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
    # counted before any model work: the text's tokens exactly (the estimate's own count)
    with pytest.raises(ClientError, match=r"the prompt \(at least 5\d\d tokens.*the response \(at least 8 positions\)") as err:
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


def _capped_config(any2any, *overrides):
    folder, codec, _ = any2any
    return load_serve_config(ROOT / "configs/tiny/serve.yaml", [
        f"model.model={folder}", f"model.image_tokenizer={IMAGE_TOKENIZER}", f"model.speech_tokenizer={codec}",
        "limits.max_cfg_scale=2", "limits.max_top_p=0.9", "limits.max_top_k=40", "limits.caches=[none,prefix]",
        "limits.max_cache_refresh=8", *overrides])


def test_operator_caps_bound_what_a_request_asks_and_fill_what_it_leaves_out(any2any):
    """The request may ask for less than a cap, never more (422 naming the cap); options
    it leaves out that would be unbounded (top_p, top_k) take the cap."""
    engine = Engine(_capped_config(any2any))
    try:
        for sampler, cap in (({"cfg_scale": 3.0}, "limits.max_cfg_scale"), ({"top_p": 0.95}, "limits.max_top_p"),
                             ({"top_k": 41}, "limits.max_top_k"), ({"cache": "dual"}, "limits.caches"),
                             ({"cache": "prefix", "cache_refresh": 9}, "limits.max_cache_refresh"),
                             ({"temperature": 2.5}, "limits.max_temperature")):
            with pytest.raises(ClientError, match=cap) as err:
                engine.parse(GenerateRequest(**{**LONG, "sampler": {**LONG["sampler"], **sampler}}))
            assert err.value.status == 422
        config, _ = engine.sampler_config(GenerateRequest(**LONG))
        assert (config.top_p, config.top_k, config.cfg_scale) == (0.9, 40, 0.0)
        lower = {**LONG, "sampler": {"steps": 8, "cfg_scale": 1.5, "top_p": 0.5, "top_k": 5, "cache": "prefix"}}
        config, _ = engine.sampler_config(GenerateRequest(**lower))
        assert (config.steps, config.cfg_scale, config.top_p, config.top_k, config.cache) == (8, 1.5, 0.5, 5, "prefix")
    finally:
        engine.scheduler is not None and engine.scheduler.close()


def test_defaults_or_presets_over_a_cap_are_refused_at_start(any2any, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="limits.max_cfg_scale"):
        _capped_config(any2any, "sampler.options={cfg_scale: 5}")
    folder, _, _ = any2any
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    (model / "presets.json").write_text('{"sampler": {"text": {"cache": "dual"}}}')
    with pytest.raises(ValueError, match=r"presets.json \(text\).*limits.caches"):
        Engine(_capped_config(any2any, f"model.model={model}"))


def test_media_are_not_tokenized_when_the_token_limit_cannot_be_met(engine):
    """5 s of audio and a 480-position answer cannot fit 512 positions: refused from the
    audio's length before the speech tokenizer runs."""
    import io

    import numpy as np
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, 0.1 * np.sin(np.arange(5 * 16000) / 5), 16000, format="WAV")
    import base64

    audio = {"type": "audio", "data": base64.b64encode(buffer.getvalue()).decode()}
    codec = engine.pipe.speech_codec
    calls = []
    encode = codec.encode
    codec.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try:
        with pytest.raises(ClientError, match="counted from the inputs' sizes") as err:
            engine.parse(GenerateRequest(inputs=[audio], outputs=["text"], lengths={"text": 480}))
        assert err.value.status == 413 and calls == []
        job = engine.parse(GenerateRequest(inputs=[audio], outputs=["text"], lengths={"text": 32}))
        assert calls == [1] and len(job.prepared.prompt) + 32 <= 512  # one that fits is tokenized once
    finally:
        del codec.encode


def test_list_lengths_are_checked_before_the_items_are_validated(engine, monkeypatch):
    import json

    import serve.engine as engine_module

    class Unreachable:
        @staticmethod
        def model_validate(body):
            raise AssertionError("validated a body whose lists are over their limits")

    monkeypatch.setattr(engine_module, "GenerateRequest", Unreachable)
    part = {"type": "text", "text": "x"}
    with pytest.raises(ClientError, match="200000 input parts, over the limit of 8") as err:
        engine.parse_body(json.dumps({"inputs": [part] * 200_000, "outputs": ["text"]}).encode())
    assert err.value.status == 413
    with pytest.raises(ClientError, match="at most 3") as err:
        engine.parse_body(json.dumps({"inputs": [part], "outputs": ["text"] * 100_000}).encode())
    with pytest.raises(ClientError, match="not valid JSON") as err:
        engine.parse_body(b'{"inputs": ' + b"[" * 100_000)
    assert err.value.status == 400


def test_a_slow_preview_does_not_hold_up_the_other_requests_steps(any2any):
    """Previews are drawn off the scheduler's thread: while one stream's preview is stuck,
    another request runs all its steps; the stream's events then arrive in order."""
    import threading

    folder, codec, _ = any2any
    engine = Engine(load_serve_config(ROOT / "configs/tiny/serve.yaml", [
        f"model.model={folder}", f"model.image_tokenizer={IMAGE_TOKENIZER}", f"model.speech_tokenizer={codec}",
        "batching.mode=step", "sampler.stream_previews=2"]))
    release = threading.Event()
    preview = engine.preview

    def stuck_preview(*args):
        release.wait(120)
        return preview(*args)

    engine.preview = stuck_preview
    try:
        streamed = engine.parse(GenerateRequest(**{**LONG, "lengths": {"text": 16}, "sampler": {"steps": 16}}))
        events = []
        stream = engine.scheduler.submit(engine.ticket(streamed, events.append))
        plain = engine.parse(GenerateRequest(**{**LONG, "lengths": {"text": 8}, "sampler": {"steps": 8}}))
        out = engine.scheduler.submit(engine.ticket(plain)).result(timeout=30)  # not stuck behind the preview
        assert out.steps == 8 and not release.is_set()
        release.set()
        assert stream.result(timeout=60).steps == 16
        done = threading.Event()
        engine.after_events(done.set)
        assert done.wait(60)
        assert [e["step"] for e in events] == list(range(1, 17))
        assert sum("preview" in e for e in events) == 2
    finally:
        release.set()
        engine.scheduler.close()
