"""The Ray Serve application, started for real on 127.0.0.1 over the tiny any-to-any model
of tests/any2any.py, and queried over HTTP: every task, batching, streaming, limits and
errors (with a hypothesis fuzz), overload (503 + Retry-After) and a replica that is
killed and replaced."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from omni_model.templates import Image, Speech, Text
from omni_model.tokenizers.codec import SpeechCodec
from omni_model.tokenizers.image import MagVitTokenizer
from serve.config import load_serve_config
from tests.any2any import IMAGE_TOKENIZER, answer_lengths, request_part
from tests.hostile import iccp_bomb_png, lying_flac, nan_wav, pcx_named_png, pixel_bomb_png, png_bytes, wav_bytes
from tests.conftest import ROOT
from tests.step_clock import step

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, any2any):
    """A one-replica deployment in step mode (16 ongoing, 16 queued) and its base URL."""
    from ray import serve

    from serve.app import build

    folder, codec, tasks = any2any
    port = _free_port()
    cfg = load_serve_config(ROOT / "configs/tiny/serve.yaml", [
        f"model.model={folder}", f"model.image_tokenizer={IMAGE_TOKENIZER}", f"model.speech_tokenizer={codec}",
        "deployment.num_replicas=1", "deployment.num_cpus=0.5", "deployment.max_ongoing_requests=16",
        "deployment.max_queued_requests=16", "deployment.health_check_period_s=1",
        "batching.mode=step", "batching.max_batch_size=8", "batching.wait_timeout_s=0.05",
        "limits.max_steps=512", "limits.max_output_tokens=512", "limits.max_request_bytes=400000",
        "limits.max_image_pixels=65536", "limits.max_audio_seconds=5", "limits.max_pending=12",
        "limits.max_top_p=0.95", "limits.caches=[none,prefix]", f"http.port={port}"])
    with step("deploy the shared model on Serve"):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build(cfg), name="omni", route_prefix="/")
    yield f"http://127.0.0.1:{port}", tasks, codec
    serve.shutdown()


def _body(tasks, task: str, **sampler) -> dict:
    inputs, outputs, parts = tasks[task]
    return {"inputs": [request_part(x) for x in inputs], "outputs": outputs,
            "lengths": answer_lengths(parts, outputs), "sampler": {"steps": 64, **sampler}}


def _post(url: str, body, path: str = "/v1/generate") -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=120)


def _png(b64: str) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(b64))))


def _stats(url: str) -> dict:
    return requests.get(url + "/v1/stats", timeout=30).json()


def _replica_pid(app: str = "omni", deployment: str = "OmniDiffusion") -> int:
    from benchmarks._soak import replica_pids

    pids = replica_pids(app, deployment)
    assert len(pids) == 1, pids
    return pids.pop()


def test_health_models_and_schema(server):
    url, _, _ = server
    assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
    card = requests.get(url + "/v1/models", timeout=30).json()["data"][0]
    assert card["id"] == "omni-diffusion-tiny"
    assert ["text", "speech"] in card["outputs"] and set(card["inputs"]) == {"text", "image", "audio"}
    schema = requests.get(url + "/openapi.json", timeout=30).json()
    assert {"/v1/generate", "/v1/generate/stream", "/v1/models", "/healthz"} <= set(schema["paths"])
    assert "GenerateRequest" in schema["components"]["schemas"]
    body = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GenerateRequest"}
    assert {"InputPart", "SamplerOptions", "Lengths"} <= set(schema["components"]["schemas"])
    assert "pid" not in _stats(url)  # the replica's process id is nobody's business


@pytest.mark.parametrize("task", ["t2i", "vqa", "asr", "tts", "s2i", "svqa", "all"])
def test_every_task_over_http(server, task):
    """The trained answers come back through JSON, base64 PNG and base64 WAV."""
    url, tasks, codec_dir = server
    r = _post(url, _body(tasks, task))
    assert r.status_code == 200, r.text
    out = r.json()
    _, outputs, parts = tasks[task]
    assert out["usage"]["output_tokens"] > 0 and 0 < out["usage"]["steps"] <= 64
    for part in parts:
        if isinstance(part, Text):
            assert out["text"] == part.text
        elif isinstance(part, Image):
            tokenizer = MagVitTokenizer.from_pretrained(IMAGE_TOKENIZER)
            expected = tokenizer.decode_images(torch.tensor([part.codes]), (8, 8))[0]
            assert np.array_equal(_png(out["image"]), np.asarray(expected))
        else:
            assert isinstance(part, Speech)
            wave, rate = sf.read(io.BytesIO(base64.b64decode(out["speech"])), dtype="float32")
            expected = SpeechCodec.from_pretrained(codec_dir).decode([torch.tensor(part.codes)])[0].numpy()
            assert rate == out["sample_rate"] == 16000 and len(wave) == len(expected)
            assert np.abs(wave - np.clip(expected, -1, 1)).max() < 1e-3  # 16-bit PCM
    assert (out["text"] is None) == ("text" not in outputs) and (out["speech"] is None) == ("speech" not in outputs)


@pytest.fixture(scope="module")
def batch_server(server, any2any):
    """The same model in `@serve.batch` mode (batching.mode=batch), a second app on /batch."""
    from ray import serve

    from serve.app import build

    url, _, _ = server
    folder, codec, _ = any2any
    cfg = load_serve_config(ROOT / "configs/tiny/serve.yaml", [
        f"model.model={folder}", f"model.image_tokenizer={IMAGE_TOKENIZER}", f"model.speech_tokenizer={codec}",
        "deployment.num_replicas=1", "deployment.num_cpus=0.5", "deployment.name=OmniBatch",
        "batching.mode=batch", "batching.max_batch_size=8", "batching.wait_timeout_s=0.05"])
    serve.run(build(cfg), name="omni_batch", route_prefix="/batch")
    yield url + "/batch"
    serve.delete("omni_batch")


def _paintings() -> list[dict]:
    # a prompt it never saw, so the seed matters; one layout
    return [{"inputs": [{"type": "text", "text": f"Paint picture {seed}."}], "outputs": ["image"],
             "sampler": {"steps": 16, "temperature": 1.0, "seed": seed}} for seed in range(8)]


def _concurrently(url: str, bodies: list[dict]) -> list[dict]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: _post(url, b), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:300] for r in responses]
    return [r.json() for r in responses]


def test_concurrent_requests_share_steps_and_each_result_is_its_own(server):
    """Step mode (the default): concurrent requests share forward passes step by step."""
    url, _, _ = server
    bodies = _paintings()
    before = _stats(url)
    assert before["mode"] == "step"
    together = _concurrently(url, bodies)
    after = _stats(url)
    passes, steps = after["forward_passes"] - before["forward_passes"], sum(r["usage"]["steps"] for r in together)
    assert passes < steps, f"{len(bodies)} concurrent requests of {steps} steps took {passes} forward passes"
    assert max(r["usage"]["batch_size"] for r in together) > 1
    alone = [_post(url, b).json() for b in bodies]
    assert all(a["usage"]["batch_size"] == 1 for a in alone)
    assert [r["image"] for r in together] == [a["image"] for a in alone]
    assert len({r["image"] for r in together}) > 1  # the seeds differ, so do the images
    assert [r["usage"]["seed"] for r in together] == list(range(8))


def test_mixed_tasks_share_steps_in_step_mode(server):
    url, tasks, _ = server
    bodies = [_body(tasks, t, steps=32) for t in ("t2i", "vqa", "asr", "tts", "svqa")]
    before = _stats(url)
    results = _concurrently(url, bodies)
    after = _stats(url)
    assert after["forward_passes"] - before["forward_passes"] < sum(r["usage"]["steps"] for r in results)
    _, _, parts = tasks["vqa"]
    assert results[1]["text"] == parts[0].text


def test_concurrent_requests_are_batched_in_batch_mode(batch_server):
    url = batch_server
    bodies = _paintings()
    calls_before = _stats(url)["sampler_calls"]
    together = _concurrently(url, bodies)
    calls = _stats(url)["sampler_calls"] - calls_before
    assert calls < len(bodies), f"{len(bodies)} concurrent requests took {calls} sampler calls"
    assert max(r["usage"]["batch_size"] for r in together) > 1
    alone = [_post(url, b).json() for b in bodies]
    assert [r["image"] for r in together] == [a["image"] for a in alone]


def test_streaming_reports_progress_then_the_same_result(server):
    url, tasks, _ = server
    body = _body(tasks, "all", steps=24, seed=5)
    events = []
    with requests.post(url + "/v1/generate/stream", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
    progress = [e for k, e in events if k == "progress"]
    assert events[-1][0] == "result" and len(progress) == events[-1][1]["usage"]["steps"]
    assert [e["step"] for e in progress] == list(range(1, len(progress) + 1))
    assert progress[0]["masked"] > progress[-1]["masked"] == 0
    previews = [e["preview"] for e in progress if "preview" in e]
    assert len(previews) == 4 and any("image" in p for p in previews)
    assert _png(previews[-1]["image"]).shape == (32, 32, 3)
    plain = _post(url, body).json()
    result = events[-1][1]
    assert (result["text"], result["image"], result["speech"]) == (plain["text"], plain["image"], plain["speech"])


def _tone(seconds: float, rate: int = 16000, fmt: str = "WAV") -> str:
    buffer = io.BytesIO()
    sf.write(buffer, 0.1 * np.sin(np.arange(int(seconds * rate)) / 5), rate, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def _image_b64(size: int, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), (200, 10, 10)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def _image(raw: bytes) -> dict:
    return {"inputs": [{"type": "image", "data": base64.b64encode(raw).decode()},
                       {"type": "text", "text": "Describe the image."}], "outputs": ["text"]}


def _audio(raw: bytes) -> dict:
    return {"inputs": [{"type": "audio", "data": base64.b64encode(raw).decode()}], "outputs": ["text"]}


def _bad_requests() -> list[tuple[str, object, int, str]]:
    text = {"type": "text", "text": "Draw a red circle."}
    png = _image_b64(32)
    return [
        ("malformed JSON", '{"inputs": [', 400, "not valid JSON"),
        ("not an object", "[1, 2]", 422, "body"),
        ("no inputs", {"inputs": [], "outputs": ["text"]}, 422, "inputs"),
        ("unknown field", {"inputs": [text], "outputs": ["text"], "stream": True}, 422, "stream"),
        ("unknown output", {"inputs": [text], "outputs": ["video"]}, 422, "outputs"),
        ("unsupported combination", {"inputs": [text], "outputs": ["image", "speech"]}, 422, "unsupported outputs"),
        ("text part without text", {"inputs": [{"type": "text"}], "outputs": ["text"]}, 422, "needs `text`"),
        ("bad base64", {"inputs": [{"type": "image", "data": "%%%not base64"}], "outputs": ["text"]}, 400, "base64"),
        ("not an image", {"inputs": [{"type": "image", "data": base64.b64encode(b"hello").decode()}],
                          "outputs": ["text"]}, 415, "PNG or JPEG"),
        ("GIF image", {"inputs": [{"type": "image", "data": _image_b64(8, "GIF")}], "outputs": ["text"]}, 415, "GIF"),
        ("truncated PNG", {"inputs": [{"type": "image", "data": base64.b64encode(base64.b64decode(png)[:60]).decode()}],
                           "outputs": ["text"]}, 422, "cannot be decoded"),
        ("image too large", {"inputs": [{"type": "image", "data": _image_b64(300)}], "outputs": ["text"]}, 413, "pixels"),
        ("audio too long", {"inputs": [{"type": "audio", "data": _tone(6.0)}], "outputs": ["text"]}, 413, "5 s"),
        ("not audio", {"inputs": [{"type": "audio", "data": png}], "outputs": ["text"]}, 415, "WAV or FLAC"),
        ("too many steps", {"inputs": [text], "outputs": ["image"], "sampler": {"steps": 1000}}, 422, "steps"),
        ("negative temperature", {"inputs": [text], "outputs": ["text"], "sampler": {"temperature": -1}}, 422,
         "temperature"),
        ("bad confidence", {"inputs": [text], "outputs": ["text"], "sampler": {"confidence": "vibes"}}, 422,
         "confidence"),
        ("too many output tokens", {"inputs": [text], "outputs": ["text"], "lengths": {"text": 5000}}, 413,
         "positions"),
        ("body too large", {"inputs": [{"type": "text", "text": "x" * 500_000}], "outputs": ["text"]}, 413, "bytes"),
        # hostile media and sizes (tests/hostile.py): each refused from its header
        ("iCCP bomb", _image(iccp_bomb_png()), 422, "Decompressed data too large"),
        ("pixel bomb", _image(pixel_bomb_png()), 413, "(2500000000 pixels)"),
        ("PCX image", _image(pcx_named_png()), 415, "PCX"),
        ("lying FLAC", _audio(lying_flac()), 413, "lasts 4294967.3 s"),
        ("384 kHz audio", _audio(wav_bytes(seconds=0.05, rate=384_000)), 413, "sample rate of 384000 Hz"),
        ("16 channels", _audio(wav_bytes(channels=16, seconds=0.1)), 413, "16 channels"),
        ("NaN audio", _audio(nan_wav()), 422, "non-finite"),
        ("8 x 2,000 emoji", {"inputs": [{"type": "text", "text": "\U0001F600" * 2000}] * 8, "outputs": ["text"]},
         413, "the prompt (at least 64019 tokens"),  # byte-level: 4 tokens an emoji, counted before any model work
        # hardening round two: caps, bounds, list lengths, tokens counted before the media are tokenized
        ("cfg_scale over the cap", {"inputs": [text], "outputs": ["image"], "sampler": {"cfg_scale": 50}}, 422,
         "limits.max_cfg_scale"),
        ("temperature over the cap", {"inputs": [text], "outputs": ["text"], "sampler": {"temperature": 9}}, 422,
         "limits.max_temperature"),
        ("top_p over the cap", {"inputs": [text], "outputs": ["text"], "sampler": {"top_p": 1.0}}, 422,
         "limits.max_top_p"),
        ("cache not allowed", {"inputs": [text], "outputs": ["text"], "sampler": {"cache": "dual"}}, 422,
         "limits.caches"),
        ("10,000 input parts", {"inputs": [{"type": "text", "text": ""}] * 10_000, "outputs": ["text"]}, 413,
         "10000 input parts"),
        ("1,000 outputs", {"inputs": [text], "outputs": ["text"] * 1000}, 422, "at most 3"),
        ("steps of 10^30", {"inputs": [text], "outputs": ["text"], "sampler": {"steps": 10**30}}, 422, "steps"),
        ("top_k of 10^12", {"inputs": [text], "outputs": ["text"], "sampler": {"top_k": 10**12}}, 422, "top_k"),
        ("a text length of 10^12", {"inputs": [text], "outputs": ["text"], "lengths": {"text": 10**12}}, 422,
         "lengths.text"),
        ("position_penalty_start of 2^70", {"inputs": [text], "outputs": ["image"],
                                            "sampler": {"position_penalty_start": 2**70}}, 422,
         "position_penalty_start"),
        ("100,000 nested brackets", '{"inputs": ' + "[" * 100_000, 400, "not valid JSON"),
        ("audio over the token limit", {"inputs": [{"type": "audio", "data": _tone(4.5)}], "outputs": ["text"],
                                        "lengths": {"text": 480}}, 413, "counted from the inputs' sizes"),
    ]


@pytest.mark.parametrize("name,body,status,message", _bad_requests(), ids=[b[0] for b in _bad_requests()])
def test_bad_requests_get_a_4xx_with_a_message(server, name, body, status, message):
    url, _, _ = server
    r = _post(url, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize("width, height", [(1, 1), (3, 200), (200, 3)])
def test_tiny_and_thin_images_are_served(server, width, height):
    url, _, _ = server
    body = {**_image(png_bytes(width, height)), "sampler": {"steps": 4}, "lengths": {"text": 8}}
    r = _post(url, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 64  # the image's 64 codes are in the prompt


def test_one_step_in_blocks_of_one_is_one_forward_pass(server):
    url, _, _ = server
    r = _post(url, {"inputs": [{"type": "text", "text": "Say something long."}], "outputs": ["text"],
                    "lengths": {"text": 200}, "sampler": {"steps": 1, "block_length": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["steps"] == 1


def test_a_disconnected_stream_stops_its_generation(server):
    """Read one progress event of a long stream, hang up: the replica stops generating
    at its next step (the `stopped` counter) instead of running the remaining steps."""
    url, _, _ = server
    body = {"inputs": [{"type": "text", "text": "Tell a long story."}], "outputs": ["text"],
            "lengths": {"text": 440}, "sampler": {"steps": 440, "cfg_scale": 1.0}}
    before = _stats(url)["stopped"]
    with requests.post(url + "/v1/generate/stream", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines(decode_unicode=True)
        assert next(lines) == "event: progress"
        first = json.loads(next(lines)[len("data: "):])
    assert first["step"] == 1 and first["max_steps"] == 440
    deadline = time.time() + 60
    stats = _stats(url)
    while time.time() < deadline and (stats["stopped"] == before or stats["pending"]):
        time.sleep(0.2)
        stats = _stats(url)
    assert stats["stopped"] == before + 1 and stats["pending"] == 0, stats


def test_flac_audio_and_jpeg_images_are_accepted(server):
    url, _, _ = server
    body = {"inputs": [{"type": "image", "data": _image_b64(32, "JPEG")},
                       {"type": "audio", "data": _tone(1.0, fmt="FLAC")}],
            "outputs": ["text"], "sampler": {"steps": 4}, "lengths": {"text": 8}}
    r = _post(url, body)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["text"], str)


_option = st.one_of(st.none(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=5), st.booleans())
_part_strategy = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "audio", "video"]),
                           "text": st.one_of(st.none(), st.text(max_size=40))}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "audio"]),
                           "data": st.one_of(st.sampled_from([_image_b64(16), _tone(0.5), "", "AAAA"]),
                                             st.text(max_size=20))}),
    st.dictionaries(st.text(max_size=6), _option, max_size=3))
_request_strategy = st.fixed_dictionaries(
    {"inputs": st.lists(_part_strategy, max_size=3),
     "outputs": st.lists(st.sampled_from(["text", "image", "speech", "audio", ""]), max_size=3)},
    optional={"sampler": st.dictionaries(st.sampled_from(
        ["steps", "temperature", "top_k", "top_p", "seed", "confidence", "cfg_scale", "threshold",
         "block_length", "position_penalty", "repetition_penalty", "other"]), _option, max_size=4),
              "lengths": st.dictionaries(st.sampled_from(["text", "speech", "spoken", "image"]),
                                         st.integers(-3, 600), max_size=2)})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_request_strategy)
def test_fuzzed_requests_never_get_a_5xx(server, body):
    url, _, _ = server
    r = _post(url, body)
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code == 200:
        assert r.json()["usage"]["steps"] >= 1
    else:
        assert r.json()["error"]


def test_a_short_soak_of_mixed_streamed_and_hostile_requests(server):
    """`benchmarks/_soak.py` for 12 s (benchmarks/serve_soak.py runs it for minutes): every valid
    request answered 200, every hostile one its 4xx, no 5xx, streams hung up, one replica
    process throughout, its memory bounded."""
    from benchmarks._soak import replica_pids, soak

    url, tasks, _ = server
    valid = [(task, _body(tasks, task, steps=16)) for task in ("t2i", "vqa", "asr", "tts", "s2i", "svqa")]
    hostile = [(name, body, status) for name, body, status, _ in _bad_requests()]
    pid = _replica_pid()
    report = soak(url, 12, valid, hostile, clients=4, hang_up_share=0.1, pids=lambda: replica_pids("omni", "OmniDiffusion"))
    assert report.requests > 12 and report.server_errors == 0, report.to_dict()
    assert not report.unexpected, report.unexpected
    assert report.by_kind["stream"] > 0 and any(k.startswith("hostile:") for k in report.by_kind)
    assert report.replica_pids == {pid}
    assert report.left_in_queue == {"pending": 0, "in_flight": 0}, report.to_dict()  # no place leaked
    assert report.replica_peak_rss_mib < 4096


FAIL_SEED, KILL_SEED = 666, 667  #: seeds the faulty replica below fails on


def _faulty_deployment():
    """The real app's class with two faults injected in its replica: a request seeded
    FAIL_SEED raises in its own step (a progress callback bug, with internals in its
    message), one seeded KILL_SEED makes the scheduler's loop raise outside any step."""
    from serve.app import OmniDiffusion

    class Faulty(OmniDiffusion.func_or_class):
        async def __init__(self, cfg):  # Serve's ingress classes initialise asynchronously
            await super().__init__(cfg)
            engine, scheduler = self.engine, self.engine.scheduler
            make_ticket, admit = engine.ticket, scheduler._admit

            def ticket(job, emit=None):
                made = make_ticket(job, emit)
                if job.seed == FAIL_SEED:
                    inner = made.on_step

                    def on_step(done, most, ids):
                        if done == 2:
                            raise RuntimeError("secret: /srv/internal/weights.bin at 0xdeadbeef")
                        if inner is not None:
                            inner(done, most, ids)
                    made.on_step = on_step
                return made

            def broken_admit(arrived):
                if any(t.seed == KILL_SEED for t in arrived):
                    raise RuntimeError("a scheduler bug")
                return admit(arrived)

            engine.ticket, scheduler._admit = ticket, broken_admit

    return Faulty


@pytest.fixture(scope="module")
def faulty_server(server, any2any):
    """The faulty replica as a third app on /faulty: step mode, 2 rows in flight (a
    guided request fills them), Serve's health check every second."""
    from ray import serve

    url, _, _ = server
    folder, codec, _ = any2any
    cfg = load_serve_config(ROOT / "configs/tiny/serve.yaml", [
        f"model.model={folder}", f"model.image_tokenizer={IMAGE_TOKENIZER}", f"model.speech_tokenizer={codec}",
        "deployment.num_replicas=1", "deployment.num_cpus=0.5", "deployment.name=Faulty",
        "deployment.health_check_period_s=1", "batching.mode=step", "batching.max_rows=2",
        "limits.max_steps=512", "limits.max_output_tokens=512"])
    options = cfg.deployment_options()
    serve.run(serve.deployment(_faulty_deployment()).options(**options).bind(cfg), name="omni_faulty",
              route_prefix="/faulty")
    yield url + "/faulty"
    serve.delete("omni_faulty")


def _events(url: str, body: dict) -> list[tuple[str, dict]]:
    events, kind = [], None
    with requests.post(url + "/v1/generate/stream", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[len("data: "):])))
    return events


def test_a_request_that_fails_in_its_step_fails_alone_with_a_fixed_message(faulty_server):
    """One of 4 concurrent requests fails in its own step: it gets 500 saying what failed
    (nothing of the exception's text), the 3 others their answers; a stream that fails
    the same way ends with an error event saying the same."""
    url = faulty_server
    bodies = [{"inputs": [{"type": "text", "text": f"Say {i}."}], "outputs": ["text"], "lengths": {"text": 8},
               "sampler": {"steps": 8, "seed": FAIL_SEED if i == 1 else i}} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: _post(url, b), bodies))
    assert [r.status_code for r in responses] == [200, 500, 200, 200], [r.text[:200] for r in responses]
    assert responses[1].json() == {"error": "the request's sampling failed"}
    events = _events(url, bodies[1])
    assert events[-1] == ("error", {"error": "the request's sampling failed", "status": 500})
    assert [e["step"] for k, e in events if k == "progress"] == [1]
    assert "secret" not in json.dumps(events) and "secret" not in responses[1].text
    assert _stats(url)["failed"] == 2


def test_a_disconnected_request_keeps_its_place_until_its_waiting_ticket_leaves(faulty_server):
    """A guided request fills the 2 rows; 3 more wait. Their clients hang up: their
    tickets leave the queue at the next step, never computed, and only then give their
    places in the model queue back (`pending` and the scheduler's `in_flight` agree)."""
    url = faulty_server
    long = {"inputs": [{"type": "text", "text": "Tell a long story."}], "outputs": ["text"],
            "lengths": {"text": 400}, "sampler": {"steps": 400, "cfg_scale": 1.0}}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_post, url, long)
        deadline = time.time() + 60
        while _stats(url).get("in_flight", 0) < 1 and time.time() < deadline:
            time.sleep(0.1)
        before = _stats(url)
        short = {"inputs": [{"type": "text", "text": "Say hi."}], "outputs": ["text"], "lengths": {"text": 8},
                 "sampler": {"steps": 8}}
        for _ in range(3):
            with pytest.raises(requests.exceptions.ReadTimeout):  # the client leaves while it waits
                requests.post(url + "/v1/generate", json=short, timeout=(10, 1.0))
        deadline = time.time() + 30
        stats = _stats(url)
        while time.time() < deadline and (stats["in_flight"] > 1 or stats["stopped"] < before["stopped"] + 3):
            time.sleep(0.2)
            stats = _stats(url)
        assert not running.done(), "the long request finished before the test could look"
        assert stats["in_flight"] == 1 and stats["pending"] == 1, stats
        assert stats["stopped"] == before["stopped"] + 3, stats
        assert running.result().status_code == 200
    assert _stats(url)["pending"] == 0


def test_zz_a_replica_whose_scheduler_died_says_so_and_is_replaced(faulty_server):
    """The scheduler's loop raises outside any step: the request answers 503 with
    Retry-After (so do new ones, at once), /healthz answers 503, Serve's health check
    fails and Serve replaces the replica, which then serves again."""
    url = faulty_server
    body = {"inputs": [{"type": "text", "text": "Say hi."}], "outputs": ["text"], "lengths": {"text": 8},
            "sampler": {"steps": 8, "seed": KILL_SEED}}
    r = _post(url, body)
    assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
    assert r.json() == {"error": "this replica's scheduler stopped; retry"}
    health = requests.get(url + "/healthz", timeout=30)
    assert health.status_code == 503 and "scheduler" in health.json()["error"]
    again = _post(url, {**body, "sampler": {"steps": 8, "seed": 1}})
    assert again.status_code == 503, again.text  # refused at once, not left waiting
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        pytest.fail("the replica was not replaced within 120 s")
    assert _post(url, {**body, "sampler": {"steps": 8, "seed": 1}}).status_code == 200


def test_overload_gets_503_with_retry_after_then_recovers(server):
    """16 ongoing + 16 queued fit; the rest of 60 concurrent slow requests are refused
    (the queue counts requests waiting for a replica slot, so it must exceed the
    concurrency of the batching test above). The 60 client threads meet at a barrier and
    send together: on a loaded machine, threads that start one by one let the first
    batches finish before the last requests arrive, and then nothing is refused."""
    url, tasks, _ = server
    body = _body(tasks, "t2i", steps=64, temperature=1.0)
    together = threading.Barrier(60)

    def send(i: int) -> requests.Response:
        data = json.dumps({**body, "sampler": {**body["sampler"], "seed": i}})
        together.wait(timeout=60)
        return _post(url, data)

    with ThreadPoolExecutor(60) as pool:
        responses = list(pool.map(send, range(60)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    refused = [r for r in responses if r.status_code == 503]
    assert refused and codes.count(200) >= 8
    assert all(r.headers.get("retry-after") == "1" for r in refused)
    # Serve admits 16 ongoing to the replica, whose own model queue takes 12
    assert any("limits.max_pending" in r.text for r in refused), [r.text[:100] for r in refused]
    assert _post(url, body).status_code == 200  # recovered


def test_zz_a_killed_replica_is_replaced(server):
    """SIGKILL the replica's process: Serve starts a new one and requests succeed again."""
    from benchmarks._soak import replica_pids

    url, tasks, _ = server
    pid = _replica_pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 120
    new_pid = None
    while time.time() < deadline:
        try:
            r = requests.get(url + "/healthz", timeout=5)
            if r.status_code == 200 and replica_pids("omni", "OmniDiffusion") - {pid}:
                new_pid = _replica_pid()
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    assert new_pid is not None and new_pid != pid, "no replacement replica within 120 s"
    r = _post(url, _body(tasks, "vqa"))
    assert r.status_code == 200 and r.json()["text"] == "two"
