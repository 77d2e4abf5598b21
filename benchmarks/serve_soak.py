"""Soak the Serve app: mixed tasks, streams (half hung up) and hostile requests against one
replica for a bounded time, on loopback; prints requests served, statuses, unexpected
answers and the replica's peak memory (the figures of docs/reliability.md).

    .venv/bin/python benchmarks/serve_soak.py --runs runs --seconds 180

`--runs` is a folder the quickstart (`runs`, or `runs-ci` from `scripts/pipeline.sh ci`) made: the model
(`stage3/final`), the tokenizers, and the held-out world whose manifests give the valid
requests (t2i, caption, VQA, ASR, TTS, spoken VQA, s2i, each with its real media).
`--any2any DIR` instead trains the tests' tiny any-to-any model (`tests/any2any.py`,
minutes on a CPU) into DIR and sends its seven tasks with their real media: no run folder
needed.

    .venv/bin/python benchmarks/serve_soak.py --any2any /tmp/soak_any2any --seconds 120 batching.mode=step
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
from _soak import replica_pids, soak  # noqa: E402

from pipelines.ray_setup import RayConfig, start_ray, stop_ray  # noqa: E402
from serve.config import load_serve_config  # noqa: E402
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
        # hardening round two (docs/reliability.md): caps, bounds, list lengths, token estimates
        ("cfg_scale over the cap", {"inputs": [text], "outputs": ["image"], "sampler": {"cfg_scale": 50}}, 422),
        ("temperature over the cap", {"inputs": [text], "outputs": ["text"], "sampler": {"temperature": 9}}, 422),
        ("cache_refresh over the cap", {"inputs": [text], "outputs": ["text"],
                                        "sampler": {"cache": "prefix", "cache_refresh": 1000}}, 422),
        ("10,000 input parts", {"inputs": [text] * 10_000, "outputs": ["text"]}, 413),
        ("1,000 outputs", {"inputs": [text], "outputs": ["text"] * 1000}, 422),
        ("steps of 10^30", {"inputs": [text], "outputs": ["text"], "sampler": {"steps": 10**30}}, 422),
        ("top_k of 10^12", {"inputs": [text], "outputs": ["text"], "sampler": {"top_k": 10**12}}, 422),
        ("a text length of 10^12", {"inputs": [text], "outputs": ["text"], "lengths": {"text": 10**12}}, 422),
        ("100,000 nested brackets", '{"inputs": ' + "[" * 100_000, 400),
        ("audio over the token limit", {"inputs": [audio(wav_bytes(seconds=28.0))["inputs"][0]] * 5, "outputs": ["text"],
                                        "lengths": {"text": 1000}}, 413),  # 6 MB, refused before any is tokenized
    ]


def any2any_requests(root: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """(model overrides, (task, body) of each of the seven tasks) of the tests' tiny
    any-to-any model, trained into `root`."""
    from tests.any2any import IMAGE_TOKENIZER, answer_lengths, request_part, train_any2any

    folder, codec, tasks = train_any2any(root)
    valid = [(task, {"inputs": [request_part(x) for x in inputs], "outputs": outputs,
                     "lengths": answer_lengths(parts, outputs), "sampler": {"steps": 16}})
             for task, (inputs, outputs, parts) in tasks.items()]
    return [f"model.model={folder}", f"model.image_tokenizer={IMAGE_TOKENIZER}", f"model.speech_tokenizer={codec}"], valid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--any2any", default=None, help="train the tests' tiny model into this folder and soak it")
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of configs/tiny/serve.yaml")
    args = parser.parse_args()
    runs = Path(args.runs)
    port = free_port()
    if args.any2any:
        model, valid = any2any_requests(Path(args.any2any))
    else:
        model = [f"model.model={runs / 'stage3/final'}", f"model.image_tokenizer={runs / 'tokenizers/image'}",
                 f"model.speech_tokenizer={runs / 'tokenizers/speech'}"]
        valid = world_requests(runs / "world")
    cfg = load_serve_config("configs/tiny/serve.yaml", [*model, "deployment.num_replicas=1", f"http.port={port}",
                                                         *args.overrides])
    owned = start_ray(RayConfig(num_cpus=4))
    from ray import serve

    from serve.app import build

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build(cfg), name="omni", route_prefix="/")
        report = soak(f"http://127.0.0.1:{port}", args.seconds, valid, hostile_requests(), clients=args.clients,
                      pids=lambda: replica_pids("omni", cfg.deployment.name))
    finally:
        serve.shutdown()
        stop_ray(owned)
    out = report.to_dict()
    print(json.dumps(out, indent=2))
    print(f"\n{out['requests']} requests in {out['seconds']} s from {args.clients} clients "
          f"({len(valid)} valid kinds of {len({t for t, _ in valid})} tasks, {len(hostile_requests())} hostile); "
          f"statuses {out['by_status']}; 5xx other than 503/504: {out['server_errors']}; "
          f"unexpected answers: {len(report.unexpected)}; streams hung up: {out['streams_hung_up']}; "
          f"plain requests hung up: {out['requests_hung_up']}; left in the queue: {out['left_in_queue']}; "
          f"replica memory {out['replica_rss_start_mib']} MiB after the warm-up, {out['replica_rss_end_mib']} MiB "
          f"after, peak {out['replica_peak_rss_mib']} MiB; replica processes {len(out['replica_pids'])}")
    leaked = any(out["left_in_queue"].values())
    return 0 if not report.server_errors and not report.unexpected and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
