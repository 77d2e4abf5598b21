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
import socket
import sys
from pathlib import Path

# The hostile inputs are the tests' own (tests/hostile.py): the project root, not
# benchmarks/, must lead sys.path for `tests` to import.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipelines.manifest import parse_line, read_lines  # noqa: E402
from pipelines.ray_setup import RayConfig, start_ray, stop_ray  # noqa: E402
from serve.config import load_serve_config  # noqa: E402
from serve.soak import soak  # noqa: E402
from tests.hostile import iccp_bomb_png, lying_flac, nan_wav, pcx_named_png, pixel_bomb_png, png_bytes, wav_bytes  # noqa: E402

OUTPUTS = {"t2i": ["image"], "s2i": ["image"], "caption": ["text"], "vqa": ["text"], "asr": ["text"],
           "tts": ["speech"], "svqa": ["text", "speech"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def valid_requests(world: Path, per_task: int = 4) -> list[tuple[str, dict]]:
    """Requests built from the held-out manifests: the user turn's text and media, in order."""
    bodies = []
    for manifest in sorted((world / "manifests").glob("*eval*/*.jsonl")):
        taken: dict[str, int] = {}
        for _, line in read_lines(manifest):
            sample = parse_line(line, world)
            if sample.task not in OUTPUTS or taken.get(sample.task, 0) >= per_task:
                continue
            taken[sample.task] = taken.get(sample.task, 0) + 1
            images, audios = iter(sample.images), iter(sample.audios)
            inputs = []
            for piece in sample.messages[0]["content"].replace("<|image|>", "\0<|image|>\0") \
                    .replace("<|audio|>", "\0<|audio|>\0").split("\0"):
                if piece == "<|image|>":
                    inputs.append({"type": "image", "data": _b64(world / next(images))})
                elif piece == "<|audio|>":
                    inputs.append({"type": "audio", "data": _b64(world / next(audios))})
                elif piece.strip():
                    inputs.append({"type": "text", "text": piece})
            bodies.append((sample.task, {"inputs": inputs, "outputs": OUTPUTS[sample.task],
                                         "sampler": {"steps": 16, "seed": len(bodies)}}))
    return bodies


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


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
    port = _free_port()
    cfg = load_serve_config("configs/tiny/serve.yaml", [
        f"model.model={runs / 'stage3/final'}", f"model.image_tokenizer={runs / 'tokenizers/image'}",
        f"model.speech_tokenizer={runs / 'tokenizers/speech'}", "deployment.num_replicas=1",
        f"http.port={port}", *args.overrides])
    valid = valid_requests(runs / "world")
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
