"""A bounded load test of the Serve application on loopback: requests/s and p50/p99
latency at 1, 4 and 16 concurrent clients, with batching (`batching.max_batch_size`)
and without (max_batch_size 1), measured in the same run against the same replica
settings. Prints a table and the batched/unbatched throughput ratio per level.

    .venv/bin/python benchmarks/serve_load.py [--requests 48] [--task t2i] [serve.yaml overrides]

The default model is the quickstart's (configs/tiny/serve.yaml: runs/stage3/final and
its tokenizers); pass `model.model=...` overrides to load another.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from pipelines.ray_setup import RayConfig, start_ray, stop_ray
from serve.config import load_serve_config

BODIES = {  # one request per task kind, each client varies the prompt and the seed
    "t2i": lambda i: {"inputs": [{"type": "text", "text": f"Generate an image of {['a red circle', 'two blue squares', 'a small green triangle on the left'][i % 3]}."}],
                      "outputs": ["image"], "sampler": {"steps": 16, "seed": i}},
    "text": lambda i: {"inputs": [{"type": "text", "text": f"Describe scene {i}."}],
                       "outputs": ["text"], "sampler": {"steps": 16, "seed": i}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, task: str, clients: int, total: int) -> dict:
    """`total` requests from `clients` closed-loop clients; latency percentiles and rate."""
    latencies: list[float] = []

    def client(c: int) -> None:
        with requests.Session() as session:
            for i in range(c, total, clients):
                start = time.perf_counter()
                r = session.post(url + "/v1/generate", data=json.dumps(BODIES[task](i)), timeout=300,
                                 headers={"Content-Type": "application/json"})
                r.raise_for_status()
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(ordered), "rps": len(ordered) / wall,
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/serve.yaml")
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--task", choices=sorted(BODIES), default="t2i")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    port = _free_port()
    base = [*args.overrides, "deployment.num_replicas=1", f"http.port={port}",
            "deployment.max_ongoing_requests=64", "deployment.max_queued_requests=256"]
    owned = start_ray(RayConfig(num_cpus=4))
    from ray import serve

    from serve.app import build

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    levels = [int(c) for c in args.clients.split(",")]
    rows: dict[str, list[dict]] = {}
    try:
        for mode, batch in (("unbatched", 1), ("batched", None)):
            overrides = base + ([f"batching.max_batch_size={batch}"] if batch else [])
            cfg = load_serve_config(args.config, overrides)
            serve.run(build(cfg), name="omni", route_prefix="/")
            load(url, args.task, 1, 4)  # warm-up
            rows[mode] = [load(url, args.task, c, max(args.requests, c)) for c in levels]
            serve.delete("omni")
    finally:
        serve.shutdown()
        stop_ray(owned)

    print(f"\nServe load test, task {args.task}, {args.requests} requests per level, one replica")
    print("| clients | mode | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for i, c in enumerate(levels):
        for mode in ("unbatched", "batched"):
            r = rows[mode][i]
            print(f"| {c} | {mode} | {r['rps']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    for i, c in enumerate(levels):
        ratio = rows["batched"][i]["rps"] / rows["unbatched"][i]["rps"]
        print(f"{c} clients: batched/unbatched throughput {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
