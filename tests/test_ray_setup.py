"""The Ray the project starts for itself (pipelines/ray_setup.py): loopback only, no
token, and a state API of its own, so that Ray Train's placement-group cleaner never
takes a live run for dead."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _StrangerStateApi(BaseHTTPRequestHandler):
    """Another Ray's state API on the default dashboard port: it knows none of our actors."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"result": True, "msg": "", "data": {"result": {
            "result": [], "total": 0, "num_after_truncation": 0, "num_filtered": 0,
            "partial_failure_warning": "", "warnings": None}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stranger_on_default_dashboard_port():
    """Serves a foreign state API on 127.0.0.1:8265 while the test runs (when the port is
    taken, whatever holds it is just as foreign to our cluster)."""
    try:
        server = HTTPServer(("127.0.0.1", 8265), _StrangerStateApi)
    except OSError:
        yield
        return
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield
    server.shutdown()
    server.server_close()


def _spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


@pytest.mark.timeout(120)
def test_train_cleaner_keeps_a_live_runs_placement_group_under_cpu_load(
        ray_session, stranger_on_default_dashboard_port):
    import ray
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner
    from ray.util.placement_group import placement_group, placement_group_table

    @ray.remote(num_cpus=0)
    class Controller:  # stands in for Ray Train's controller: alive throughout
        def ping(self) -> bool:
            return True

    controller = Controller.remote()
    ray.get(controller.ping.remote())
    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready(), timeout=30)
    # Ray Train's own cleaner, started as Ray Train starts it (a detached actor checking
    # every second), watching a live controller while both cores are busy
    cleaner = ray.remote(num_cpus=0)(PlacementGroupCleaner).options(lifetime="detached").remote(
        controller_actor_id=controller._actor_id.hex(), check_interval_s=1.0,
        get_actor_timeout_s=10, stop_timeout=5.0)
    ray.get(cleaner.register_placement_group.remote(group))
    ray.get(cleaner.start_monitoring.remote())
    stop_at = time.time() + 8
    load = [multiprocessing.Process(target=_spin, args=(stop_at,)) for _ in range(os.cpu_count() or 2)]
    for p in load:
        p.start()
    try:
        for p in load:
            p.join()
        state = placement_group_table(group)["state"]
    finally:
        try:
            ray.get(cleaner.stop.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            pass  # it exits itself on stop (and on removing a group)
        ray.util.remove_placement_group(group)
        ray.kill(controller)
    assert state == "CREATED", f"the cleaner removed a live run's placement group ({state})"


def test_our_local_ray_listens_on_loopback_with_its_own_dashboard(ray_session):
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    url = ray._private.worker.get_dashboard_url()
    assert url.startswith("127.0.0.1:")


def test_every_process_of_our_ray_asks_its_own_state_api(ray_session):
    """The state API Ray Train's cleaner queries from its own worker process: ours, not
    the machine's latest Ray nor whatever listens on 8265."""
    import ray

    @ray.remote(num_cpus=0)
    def state_api_address() -> str:
        from ray.dashboard.utils import get_address_for_submission_client

        return get_address_for_submission_client(None)

    ours = ray._private.worker.get_dashboard_url()
    assert ray.get(state_api_address.remote(), timeout=60) == f"http://{ours}"


def test_the_shell_environment_never_turns_ray_authentication_off():
    out = subprocess.run(["bash", "-c", "unset RAY_AUTH_MODE; source scripts/env.sh; echo \"[${RAY_AUTH_MODE-}]\""],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
