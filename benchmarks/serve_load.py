"""A bounded load test of the Serve application on loopback: requests/s, p50/p99 latency
and the time to the first progress event of a stream, at several numbers of closed-loop
clients, for each way the replica shares the model, measured in the same run with the
same replica settings:

- `step`: the step-level scheduler (`batching.mode=step`);
- `step+fast`: the same with the fast sampler options as the server's defaults for
  every request (`sampler.options`: prefix cache, early stop, threshold 0.9);
- `step+presets`: the step-level scheduler with the model's own presets
  (`presets.json`'s `sampler`: the options per kind of output its evaluation measured);
- `batch`: `@serve.batch` (`batching.mode=batch`), the previous default;
- `none`: no batching (`batching.mode=batch`, `max_batch_size=1`).

Every mode but `step+presets` sets the plain sampler (no cache, threshold or early stop)
over the model's presets, so they measure the sampler as it was.

    .venv/bin/python benchmarks/serve_load.py --runs runs [--task mixed] [--clients 1,4,16,64]
        [--requests 48] [--modes step,step+fast,step+presets,batch,none] [serve.yaml overrides]

`--task mixed` interleaves the held-out world's t2i, VQA, TTS and spoken VQA requests
(real images and speech from `RUNS/world`); `t2i` sends only those. The model is the
quickstart's (`RUNS/stage3/final` and its tokenizers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from _requests import free_port, world_requests

from pipelines.ray_setup import RayConfig, start_ray, stop_ray
from serve.config import load_serve_config

PLAIN = "sampler.options={cache: none, early_stop: false, threshold: null}"
MODES = {
    "step": ["batching.mode=step", PLAIN],
    "step+fast": ["batching.mode=step", "sampler.options={cache: prefix, cache_refresh: 4, early_stop: true, "
                  "threshold: 0.9}"],
    "step+presets": ["batching.mode=step"],
    "batch": ["batching.mode=batch", PLAIN],
    "none": ["batching.mode=batch", "batching.max_batch_size=1", PLAIN],
}
MIXED = ("t2i", "vqa", "tts", "svqa")


def load(url: str, bodies: list[dict], clients: int, total: int) -> dict:
    """`total` requests from `clients` closed-loop clients (bodies in turn), while one more
    client streams requests and times their first progress event."""
    latencies: list[float] = []
    first_events: list[float] = []
    done = threading.Event()

    def client(c: int) -> None:
        with requests.Session() as session:
            for i in range(c, total, clients):
                start = time.perf_counter()
                r = session.post(url + "/v1/generate", data=json.dumps(bodies[i % len(bodies)]), timeout=600,
                                 headers={"Content-Type": "application/json"})
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)

    def prober() -> None:
        with requests.Session() as session:
            for i in itertools.count():
                if done.is_set():
                    return
                start = time.perf_counter()
                with session.post(url + "/v1/generate/stream", json=bodies[i % len(bodies)], stream=True,
                                  timeout=600) as r:
                    for line in r.iter_lines(decode_unicode=True):
                        if line == "event: progress":
                            first_events.append(time.perf_counter() - start)
                            break

    probe = threading.Thread(target=prober, daemon=True)
    start = time.perf_counter()
    probe.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    done.set()
    probe.join(timeout=600)
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(ordered), "rps": len(ordered) / wall,
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "first_event_ms": 1000 * statistics.median(first_events) if first_events else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/serve.yaml")
    parser.add_argument("--runs", default="runs", help="a quickstart folder: model, tokenizers, world")
    parser.add_argument("--requests", type=int, default=48, help="requests per level (at least 2 per client)")
    parser.add_argument("--task", choices=("mixed", "t2i"), default="mixed")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs = Path(args.runs)
    tasks = MIXED if args.task == "mixed" else ("t2i",)
    by_task = {t: [b for task, b in world_requests(runs / "world", per_task=8, tasks=tasks) if task == t]
               for t in tasks}
    bodies = [b for group in itertools.zip_longest(*by_task.values()) for b in group if b is not None]
    port = free_port()
    base = [f"model.model={runs / 'stage3' / 'final'}", f"model.image_tokenizer={runs / 'tokenizers' / 'image'}",
            f"model.speech_tokenizer={runs / 'tokenizers' / 'speech'}", *args.overrides,
            "deployment.num_replicas=1", f"http.port={port}", "deployment.max_ongoing_requests=256",
            "deployment.max_queued_requests=1024", "limits.max_pending=1024", "batching.max_rows=128"]
    owned = start_ray(RayConfig(num_cpus=4))
    from ray import serve

    from serve.app import build

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    levels = [int(c) for c in args.clients.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    rows: dict[str, list[dict]] = {}
    try:
        for mode in modes:
            cfg = load_serve_config(args.config, base + MODES[mode])
            serve.run(build(cfg), name="omni", route_prefix="/")
            load(url, bodies, 2, 8)  # warm-up
            rows[mode] = [load(url, bodies, c, max(args.requests, 2 * c)) for c in levels]
            serve.delete("omni")
    finally:
        serve.shutdown()
        stop_ray(owned)

    print(f"\nServe load, task {args.task} ({', '.join(tasks)} interleaved), one replica")
    print("| clients | mode | requests/s | p50 ms | p99 ms | first event ms |")
    print("|---|---|---|---|---|---|")
    for i, c in enumerate(levels):
        for mode in modes:
            r = rows[mode][i]
            print(f"| {c} | {mode} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['first_event_ms']:.0f} |")
    if "batch" in rows:
        for mode in (m for m in modes if m != "batch"):
            ratios = ", ".join(f"{c}: {rows[mode][i]['rps'] / rows['batch'][i]['rps']:.2f}x"
                               for i, c in enumerate(levels))
            print(f"{mode} / batch requests/s by clients: {ratios}")
    if args.out:
        Path(args.out).write_text(json.dumps({"task": args.task, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
