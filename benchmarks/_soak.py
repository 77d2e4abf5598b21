"""A bounded soak run against a deployed app (HTTP only, no Ray): closed-loop clients
send a mix of valid requests of every task, streams (some hung up after their first
event), plain requests hung up while they wait or run, and hostile requests for a fixed
time; the replica's memory is read from /proc before and after (the replica must run on
this machine: loopback only), and its model queue must be empty once the clients stop.

    report = soak("http://127.0.0.1:8000", seconds=180, valid=[...], hostile=[...],
                  pids=lambda: replica_pids("omni", "OmniDiffusion"))

Used by `benchmarks/serve_soak.py` (the figures in README's "Measured" and docs/reliability.md) and, briefly,
by `tests/test_serve.py` (`from benchmarks._soak import soak`). A client of the app, not
part of it: it lives beside the benchmarks, not in `serve/`.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests


@dataclass
class SoakReport:
    seconds: float = 0.0
    requests: int = 0
    by_status: Counter = field(default_factory=Counter)  #: HTTP status -> count
    by_kind: Counter = field(default_factory=Counter)  #: "valid:t2i", "hostile:...", "stream", ...
    unexpected: list[str] = field(default_factory=list)  #: a valid request refused, a hostile one served...
    streams_hung_up: int = 0
    requests_hung_up: int = 0  #: plain requests whose client left before the answer
    replica_pids: set[int] = field(default_factory=set)
    replica_peak_rss_mib: float = 0.0  #: VmHWM of the replica process(es)
    replica_rss_start_mib: float = 0.0  #: VmRSS after one request of each valid kind, before the soak
    replica_rss_end_mib: float = 0.0  #: VmRSS once the soak's requests have left the replica
    replica_rss_series_mib: list = field(default_factory=list)  #: (seconds into the soak, VmRSS), every 10% of it
    left_in_queue: dict = field(default_factory=dict)  #: `pending` and `in_flight` after the soak (both 0)

    @property
    def server_errors(self) -> int:
        """5xx other than 503 (backpressure, with Retry-After) and 504 (request timeout)."""
        return sum(n for s, n in self.by_status.items() if s >= 500 and s not in (503, 504))

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds, 1), "requests": self.requests,
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "by_kind": dict(sorted(self.by_kind.items())), "server_errors": self.server_errors,
                "unexpected": self.unexpected[:20], "streams_hung_up": self.streams_hung_up,
                "requests_hung_up": self.requests_hung_up, "replica_pids": sorted(self.replica_pids),
                "replica_peak_rss_mib": round(self.replica_peak_rss_mib, 1),
                "replica_rss_start_mib": round(self.replica_rss_start_mib, 1),
                "replica_rss_end_mib": round(self.replica_rss_end_mib, 1),
                "replica_rss_series_mib": [(round(t), round(m, 1)) for t, m in self.replica_rss_series_mib],
                "left_in_queue": self.left_in_queue}


def _status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory (VmHWM) of a process on this machine, in MiB."""
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    """The resident memory (VmRSS) of a process on this machine now, in MiB."""
    return _status_mib(pid, "VmRSS")


def replica_pids(app: str, deployment: str) -> set[int]:
    """The processes of a Serve deployment's replicas on this machine: Ray names each
    replica's process after its actor, `ray::ServeReplica:<app>:<deployment>`."""
    title = f"ServeReplica:{app}:{deployment}".encode()
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if title in cmdline.split(b"\0")[0]:
                pids.add(int(proc.name))
    return pids


def soak(url: str, seconds: float, valid: list[tuple[str, dict]], hostile: list[tuple[str, dict, int]],
         clients: int = 6, hostile_share: float = 0.25, stream_share: float = 0.15,
         hang_up_share: float = 0.05, seed: int = 0, pids: Callable[[], set[int]] = set) -> SoakReport:
    """Run for `seconds`: each client draws a hostile request (name, body, expected 4xx)
    with `hostile_share`, a stream of a valid one with `stream_share` (half of them hung
    up after the first event), a valid request it hangs up on after 0.2 s with
    `hang_up_share`, else a valid request, which must answer 200. `pids()`: the
    replica processes (`replica_pids`), read before, during and after."""
    report = SoakReport()
    lock = threading.Lock()
    with requests.Session() as session:  # one of each valid kind first: memory is read after the warm-up
        for name, body in valid:
            r = session.post(url + "/v1/generate", json=body, timeout=300)
            if r.status_code != 200:
                report.unexpected.append(f"warm-up {name}: {r.status_code} {r.text[:120]}")
    report.replica_pids |= pids()
    report.replica_rss_start_mib = sum(rss_mib(p) for p in report.replica_pids if Path(f"/proc/{p}").exists())
    stop_at = time.perf_counter() + seconds

    def record(kind: str, status: int, problem: str | None = None) -> None:
        with lock:
            report.requests += 1
            report.by_status[status] += 1
            report.by_kind[kind] += 1
            if problem:
                report.unexpected.append(problem)

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        with requests.Session() as session:
            while time.perf_counter() < stop_at:
                draw = rng.random()
                if draw < hostile_share:
                    name, body, expected = rng.choice(hostile)
                    raw = body if isinstance(body, (str, bytes)) else json.dumps(body)  # malformed JSON too
                    r = session.post(url + "/v1/generate", data=raw, timeout=300,
                                     headers={"Content-Type": "application/json"})
                    record(f"hostile:{name}", r.status_code,
                           None if r.status_code == expected else f"{name}: {r.status_code} {r.text[:120]}")
                elif draw < hostile_share + hang_up_share:
                    name, body = rng.choice(valid)
                    try:  # the client leaves while the request waits or runs: Serve cancels it
                        r = session.post(url + "/v1/generate", json=body, timeout=(10, 0.2))
                        record(f"valid:{name}", r.status_code,
                               None if r.status_code == 200 else f"{name}: {r.status_code} {r.text[:120]}")
                    except requests.exceptions.ReadTimeout:
                        with lock:
                            report.requests_hung_up += 1
                    session.close()  # a fresh connection: the old one still waits for its answer
                elif draw < hostile_share + hang_up_share + stream_share:
                    name, body = rng.choice(valid)
                    hang_up = rng.random() < 0.5
                    events = []
                    with session.post(url + "/v1/generate/stream", json=body, stream=True, timeout=300) as r:
                        for line in r.iter_lines(decode_unicode=True) if r.status_code == 200 else ():
                            if line.startswith("event:"):
                                events.append(line)
                                if hang_up:
                                    break  # leaving the `with` closes the connection
                    ok = r.status_code == 200 and events and (hang_up or events[-1] == "event: result")
                    if hang_up:
                        with lock:
                            report.streams_hung_up += 1
                    record("stream", r.status_code, None if ok else f"stream {name}: {r.status_code} {events[-1:]}")
                else:
                    name, body = rng.choice(valid)
                    r = session.post(url + "/v1/generate", json=body, timeout=300)
                    record(f"valid:{name}", r.status_code,
                           None if r.status_code == 200 else f"{name}: {r.status_code} {r.text[:120]}")
                if rng.random() < 0.1:  # the replica (a new one, if it was replaced)
                    found = pids()
                    with lock:
                        report.replica_pids |= found

    def memory() -> None:  # is it flat? the replicas' resident memory every 10% of the soak
        while time.perf_counter() < stop_at:
            time.sleep(seconds / 10)
            alive = [p for p in report.replica_pids if Path(f"/proc/{p}").exists()]
            report.replica_rss_series_mib.append((time.perf_counter() - start, sum(rss_mib(p) for p in alive)))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    threads.append(threading.Thread(target=memory, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.perf_counter() - start
    deadline = time.perf_counter() + 60  # requests hung up last may still be in the queue
    while True:
        stats = requests.get(url + "/v1/stats", timeout=30).json()
        report.left_in_queue = {"pending": stats.get("pending"), "in_flight": stats.get("in_flight", 0)}
        if not any(report.left_in_queue.values()) or time.perf_counter() > deadline:
            break
        time.sleep(0.5)
    report.replica_pids |= pids()
    alive = [p for p in report.replica_pids if Path(f"/proc/{p}").exists()]
    report.replica_peak_rss_mib = max((peak_rss_mib(p) for p in alive), default=0.0)
    report.replica_rss_end_mib = sum(rss_mib(p) for p in alive)
    return report

