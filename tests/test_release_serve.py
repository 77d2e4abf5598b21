"""Serving a release folder (serve/release_engine.py): the replica's engine on the tiny
release folder the official code wrote, request by request without Ray, then the real
Ray Serve application on 127.0.0.1 queried over HTTP with real speech (espeak-ng)."""

from __future__ import annotations

import base64
import io
import json
import socket

import numpy as np
import pytest
import requests
import soundfile as sf
import torch
from PIL import Image

from serve.config import load_serve_config
from serve.errors import ClientError, Stopped
from tests.conftest import FIXTURES, ROOT
from tests.speech_decoder import wide_decoder
from tests.test_release_any_to_any import picture, speech

pytestmark = pytest.mark.timeout(600)

RELEASE = FIXTURES / "omni_release" / "tiny_a"
MAGVIT = FIXTURES / "magvit_tiny_a"


def _config(*more: str):
    return load_serve_config(ROOT / "configs/release/serve.yaml", [
        f"model.model={RELEASE}", f"model.image_tokenizer={MAGVIT}", "model.release_image_resolution=32",
        f"model.speech_decoder={wide_decoder()}",
        "limits.max_output_tokens=300", "limits.max_total_tokens=4096", *more])


def _wav(text: str) -> str:
    wave, rate = speech(text)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def _png() -> str:
    buf = io.BytesIO()
    picture(5).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _body(inputs: list[dict], outputs: list[str], **sampler) -> bytes:
    return json.dumps({"inputs": inputs, "outputs": outputs, "sampler": sampler}).encode()


@pytest.fixture(scope="module")
def engine():
    from serve.release_engine import ReleaseEngine

    return ReleaseEngine(_config())


def test_each_task_is_served_with_its_official_settings(engine):
    audio, image = {"type": "audio", "data": _wav("what colour is it")}, {"type": "image", "data": _png()}
    bodies = {"asr": _body([audio], ["text"], seed=1),
              "tts": json.dumps({"inputs": [{"type": "text", "text": "hello there"}], "outputs": ["speech"],
                                 "sampler": {"seed": 1}, "lengths": {"speech": 20}}).encode(),
              "vqa": _body([image, {"type": "text", "text": "what is it?"}], ["text"], seed=1),
              "t2i": _body([{"type": "text", "text": "a red house"}], ["image"], seed=1, steps=8),
              "svqa": _body([audio, image], ["text", "speech"], seed=1)}
    jobs = {task: engine.parse_body(raw) for task, raw in bodies.items()}
    assert {t: j.prepared.task for t, j in jobs.items()} == {t: t for t in bodies}
    assert jobs["asr"].config.alg == "entropy" and jobs["svqa"].config.add_boa_token
    assert (jobs["tts"].config.max_new_tokens, jobs["tts"].config.steps) == (20, 10)
    assert jobs["t2i"].config.steps == 8 and jobs["t2i"].config.max_position_penalty == 2.0
    results = dict(zip(jobs, engine.run(list(jobs.values()))))
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert results["asr"].text is not None and results["asr"].speech_codes is None
    assert isinstance(results["tts"].speech_codes, list) and results["tts"].speech_codes
    # spoken through GLM-4-Voice's decoder (the test's wide fixture decoder): a 22,050 Hz WAV
    wave, rate = sf.read(io.BytesIO(base64.b64decode(results["tts"].speech)), dtype="float32")
    assert rate == results["tts"].sample_rate == 22_050
    expected = engine.pipe.speech_decoder.decode([torch.tensor(results["tts"].speech_codes)])[0].numpy()
    assert len(wave) == len(expected) == 256 * engine.pipe.speech_decoder.flow.frames_for(
        len(results["tts"].speech_codes))
    assert np.abs(wave - np.clip(expected, -1, 1)).max() < 1 / 2**14  # 16-bit PCM
    assert results["svqa"].speech is not None or results["svqa"].speech_codes == []
    png = Image.open(io.BytesIO(base64.b64decode(results["t2i"].image)))
    assert png.size[0] > 0 and results["t2i"].usage.steps <= 8
    again = engine.run([engine.parse_body(bodies["tts"])])[0]
    assert again.speech_codes == results["tts"].speech_codes  # the same seed, the same answer


def test_a_stream_sends_the_spoken_answer_in_chunks(engine):
    """`stream` with an audio sink: progress per pass, then the answer chunk by chunk as
    the decoder makes them (GLM-4-Voice's schedule: 25 codes first), then the result
    holding the chunks joined; a client that leaves stops the decoding."""
    raw = json.dumps({"inputs": [{"type": "text", "text": "hello there"}], "outputs": ["speech"],
                      "sampler": {"seed": 1}, "lengths": {"speech": 80}}).encode()
    progress, audio = [], []
    result = engine.stream(engine.parse_body(raw), progress.append, audio.append)
    codes = result.speech_codes
    assert progress and len(codes) > 25, len(codes)  # long enough for two chunks
    assert [a["index"] for a in audio] == list(range(len(audio))) and audio[-1]["final"] and len(audio) >= 3
    waves = [sf.read(io.BytesIO(base64.b64decode(a["speech"])), dtype="float32") for a in audio[:-1]]
    assert {rate for _, rate in waves} == {22_050} and [len(w) for w, _ in waves] == [a["samples"] for a in audio[:-1]]
    joined, rate = sf.read(io.BytesIO(base64.b64decode(result.speech)), dtype="float32")
    assert rate == 22_050 and len(joined) == sum(len(w) for w, _ in waves)
    # the chunks cover the utterance: about as long as the one-pass rendering (each chunk's
    # frames are rounded on their own, as in the original), whose samples differ
    one_pass = engine.pipe.speech_decoder.decode([torch.tensor(codes)])[0]
    assert abs(len(joined) - len(one_pass)) <= 256 * len(waves)
    job = engine.parse_body(raw)
    chunks = []

    def leave(event: dict) -> None:
        chunks.append(event)
        job.cancelled.set()  # the client disconnects after the first chunk
    with pytest.raises(Stopped):
        engine.stream(job, lambda event: None, leave)
    assert len(chunks) == 1


def test_our_techniques_are_options_off_by_default(engine):
    """threshold, early_stop and the prompt cache reach the release's sampler only when a
    request asks; cache_refresh 1 (a full pass every step) gives the official ids."""
    text = [{"type": "text", "text": "hello there"}]
    plain = engine.parse_body(_body(text, ["speech"], seed=4))
    assert plain.config.threshold is None and not plain.config.early_stop and plain.prepared.cache_refresh is None
    fast = engine.parse_body(_body(text, ["speech"], seed=4, threshold=0.3, early_stop=True, cache="prefix"))
    assert fast.config.threshold == 0.3 and fast.config.early_stop and fast.prepared.cache_refresh == 4
    exact = engine.parse_body(_body(text, ["speech"], seed=4, cache="prefix", cache_refresh=1))
    assert exact.prepared.cache_refresh == 1
    results = engine.run([plain, fast, exact])
    assert results[2].speech_codes == results[0].speech_codes
    assert results[1].usage.steps <= results[0].usage.steps


@pytest.mark.parametrize("raw, status, message", [
    (_body([{"type": "text", "text": "hi"}], ["speech"], factor=1.0), 422, "not an option of the released"),
    (_body([{"type": "text", "text": "hi"}], ["speech"], text_threshold=0.9), 422, "not an option of the released"),
    (_body([{"type": "text", "text": "hi"}], ["speech"], cache="dual"), 422, "sampler.cache"),
    (_body([{"type": "text", "text": "hi"}], ["speech"], cfg_scale=2.0), 422, "cfg > 0 needs task s2i or t2i"),
    (_body([{"type": "text", "text": "hi"}], ["speech"], confidence="margin", repetition_penalty=1.2), 422,
     "entropy confidence only"),
    (_body([{"type": "text", "text": "hi"}], ["speech"], steps=10_000), 422, "over this deployment's cap"),
    (_body([{"type": "text", "text": "just chat"}], ["text"]), 422, "no task for outputs"),
    (json.dumps({"inputs": [{"type": "text", "text": "hi"}], "outputs": ["speech"],
                 "lengths": {"speech": 5000}}).encode(), 413, "over the limit of 300"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(engine, raw, status, message):
    with pytest.raises(ClientError, match=message) as err:
        engine.parse_body(raw)
    assert err.value.status == status


def test_step_mode_and_presets_over_a_cap_are_refused_at_start():
    from serve.release_engine import ReleaseEngine

    with pytest.raises(ValueError, match="batching.mode: batch"):
        ReleaseEngine(_config("batching.mode=step"))
    with pytest.raises(ValueError, match="s2i settings break a cap: sampler.steps 260"):
        ReleaseEngine(_config("limits.max_steps=100"))


def test_a_request_past_its_deadline_stops_at_the_next_pass(engine):
    job = engine.parse_body(_body([{"type": "text", "text": "hello"}], ["speech"], seed=3))
    job.deadline = 0.0
    result = engine.run([job])[0]
    assert isinstance(result, ClientError) and result.status == 504


@pytest.mark.slow
def test_a_release_folder_served_over_http(ray_session):
    """The real application: /v1/models lists the release's combinations, a spoken
    question is transcribed, a text is spoken (codes and a 22,050 Hz WAV), a stream
    reports progress and sends the audio in chunks, a bad option gets its 422."""
    from ray import serve

    from serve.app import build

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _config("deployment.num_replicas=1", "deployment.num_cpus=0.5", "deployment.num_gpus=0",
                  "deployment.threads=1", f"http.port={port}")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(cfg), name="omni_release", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        card = requests.get(f"{url}/v1/models", timeout=60).json()["data"][0]
        assert ["text", "speech"] in card["outputs"] and card["inputs"] == ["text", "image", "audio"]
        asr = requests.post(f"{url}/v1/generate", data=_body([{"type": "audio", "data": _wav("good morning")}],
                                                            ["text"], seed=2), timeout=120)
        assert asr.status_code == 200, asr.text
        assert isinstance(asr.json()["text"], str) and asr.json()["usage"]["prompt_tokens"] > 10
        tts = requests.post(f"{url}/v1/generate", data=json.dumps({
            "inputs": [{"type": "text", "text": "see you soon"}], "outputs": ["speech"],
            "lengths": {"speech": 16}, "sampler": {"seed": 2}}), timeout=120)
        assert tts.status_code == 200 and isinstance(tts.json()["speech_codes"], list)
        spoken = tts.json()
        if spoken["speech_codes"]:  # a spoken answer comes back as a WAV at 22,050 Hz
            wave, rate = sf.read(io.BytesIO(base64.b64decode(spoken["speech"])), dtype="float32")
            assert rate == spoken["sample_rate"] == 22_050 and len(wave) > 0
        with requests.post(f"{url}/v1/generate/stream", data=json.dumps({
                "inputs": [{"type": "text", "text": "see you soon"}], "outputs": ["speech"],
                "lengths": {"speech": 16}, "sampler": {"seed": 2}}), stream=True, timeout=120) as stream:
            lines = list(stream.iter_lines(decode_unicode=True))
        events = [line for line in lines if line.startswith("event:")]
        assert events[-1] == "event: result" and events.count("event: progress") >= 1
        if spoken["speech_codes"]:
            assert events.count("event: audio") >= 2  # a chunk and the final marker
            first = json.loads(lines[lines.index("event: audio") + 1][len("data: "):])
            assert first["sample_rate"] == 22_050 and first["index"] == 0
        bad = requests.post(f"{url}/v1/generate", data=_body([{"type": "text", "text": "hi"}], ["speech"],
                                                            factor=1.0), timeout=60)
        assert bad.status_code == 422 and "factor" in bad.json()["error"]
    finally:
        serve.delete("omni_release")
        serve.shutdown()


def test_a_batch_may_share_each_step_forward_pass():
    """`batching.release_shared_steps`: one call for a batch, each request's answer its
    own (rows of one prompt length, unpadded: the same ids as alone); a request past
    its deadline in the batch answers 504 and the others still answer."""
    from serve.release_engine import ReleaseEngine

    shared = ReleaseEngine(_config("batching.release_shared_steps=0"))
    bodies = [json.dumps({"inputs": [{"type": "text", "text": text}], "outputs": ["speech"],
                          "lengths": {"speech": 16}, "sampler": {"seed": seed, "temperature": 0.7}}).encode()
              for text, seed in (("hello there", 1), ("hello there", 2), ("good morning to you all", 3))]
    together = shared.run([shared.parse_body(b) for b in bodies])
    alone = [shared.run([shared.parse_body(b)])[0] for b in bodies]
    assert shared.sampler_calls == 1 + 3
    assert [r.speech_codes for r in together] == [r.speech_codes for r in alone]
    assert [r.usage.batch_size for r in together] == [3, 3, 3]
    late = [shared.parse_body(b) for b in bodies]
    late[1].deadline = 0.0
    results = shared.run(late)
    assert isinstance(results[1], ClientError) and results[1].status == 504
    assert results[0].speech_codes == alone[0].speech_codes and results[2].speech_codes == alone[2].speech_codes
