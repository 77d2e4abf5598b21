"""Soak the Serve app: mixed tasks, streams (half hung up) and hostile requests against one
replica for a bounded time, on loopback; prints requests served, statuses, unexpected
answers and the replica's peak memory (the figures of docs/reliability.md).

    .venv/bin/python benchmarks/serve_soak.py --runs runs --seconds 180

`--runs` is a folder the quickstart (or `scripts/pipeline.sh ci DIR`) made: the model
(`stage3/final`), the tokenizers, and the held-out world whose manifests give the valid
requests (t2i, caption, VQA, ASR, TTS, spoken VQA, s2i, each with its real media).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

# The hostile inputs are the tests' own (tests/hostile.py): the project root must be on
# sys.path for `tests` to import (benchmarks/, first, keeps `_requests` importable).
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _requests import free_port, world_requests  # noqa: E402

from pipelines.ray_setup import RayConfig, start_ray, stop_ray  # noqa: E402
from serve.config import load_serve_config  # noqa: E402
from serve.soak import soak  # noqa: E402
from tests.hostile import iccp_bomb_png, lying_flac, nan_wav, pcx_named_png, pixel_bomb_png, png_bytes, wav_bytes  # noqa: E402

def hostile_requests() -> list[tuple[str, object, int]]:
    """(name, body, the status it must get)."""
    def image(raw: bytes) -> dict:
        return {"inputs": [{"type": "image", "data": base64.b64encode(raw).decode()},
                           {"type": "text", "text": "Describe the image."}], "outputs": ["text"]}

    def audio(raw: bytes) -> dict:
        return {"inputs": [{"type": "audio", "data": base64.b64encode(raw).decode()}], "outputs": ["text"]}

    text = {"type": "text", "text": "Draw a red circle."}
    return [
        ("iCCP bomb PNG", image(iccp_bomb_png()), 422),
        ("50000x50000 PNG header", image(pixel_bomb_png()), 413),
        ("PCX as PNG", image(pcx_named_png()), 415),
        ("truncated PNG", image(png_bytes(32, 32)[:60]), 422),
        ("FLAC claiming 2^36 frames", audio(lying_flac()), 413),
        ("384 kHz WAV", audio(wav_bytes(seconds=0.05, rate=384_000)), 413),
        ("16-channel WAV", audio(wav_bytes(seconds=0.1, channels=16)), 413),
        ("NaN WAV", audio(nan_wav()), 422),
        ("8 x 2,000 emoji", {"inputs": [{"type": "text", "text": "\U0001F600" * 2000}] * 8, "outputs": ["text"]}, 413),
        ("malformed JSON", '{"inputs": [', 400),
        ("bad base64", {"inputs": [{"type": "image", "data": "%%%"}], "outputs": ["text"]}, 400),
        ("steps over the limit", {"inputs": [text], "outputs": ["image"], "sampler": {"steps": 100000}}, 422),
        ("unsupported outputs", {"inputs": [text], "outputs": ["image", "speech"]}, 422),
        ("NaN temperature", '{"inputs": [{"type": "text", "text": "x"}], "outputs": ["text"], '
                            '"sampler": {"temperature": NaN}}', 422),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of configs/tiny/serve.yaml")
    args = parser.parse_args()
    runs = Path(args.runs)
    port = free_port()
    cfg = load_serve_config("configs/tiny/serve.yaml", [
        f"model.model={runs / 'stage3/final'}", f"model.image_tokenizer={runs / 'tokenizers/image'}",
        f"model.speech_tokenizer={runs / 'tokenizers/speech'}", "deployment.num_replicas=1",
        f"http.port={port}", *args.overrides])
    valid = world_requests(runs / "world")
    owned = start_ray(RayConfig(num_cpus=4))
    from ray import serve

    from serve.app import build

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(cfg), name="omni", route_prefix="/")
        report = soak(f"http://127.0.0.1:{port}", args.seconds, valid, hostile_requests(), clients=args.clients)
    finally:
        serve.shutdown()
        stop_ray(owned)
    out = report.to_dict()
    print(json.dumps(out, indent=2))
    print(f"\n{out['requests']} requests in {out['seconds']} s from {args.clients} clients "
          f"({len(valid)} valid kinds of {len({t for t, _ in valid})} tasks, {len(hostile_requests())} hostile); "
          f"statuses {out['by_status']}; 5xx other than 503/504: {out['server_errors']}; "
          f"unexpected answers: {len(report.unexpected)}; streams hung up: {out['streams_hung_up']}; "
          f"replica peak memory {out['replica_peak_rss_mib']} MiB; replica processes {len(out['replica_pids'])}")
    return 0 if not report.server_errors and not report.unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
