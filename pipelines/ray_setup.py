"""Starting (or joining) Ray the same way in every job.

Under `ray job submit` the driver finds its cluster through RAY_ADDRESS; run directly,
a job starts a local Ray in-process with the configured logical resources and stops it
at the end.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Settings that must be in place before `import ray` (see README, "Installing: notes").
#: Never `RAY_AUTH_MODE`: a job that joins a cluster keeps the cluster's authentication.
RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "HF_HUB_OFFLINE": "1",
}


@dataclass(frozen=True)
class RayConfig:
    """Which Ray a job or a deployment runs on (the `ray:` section of every job's YAML
    and of serve.yaml); `start_ray` starts or joins it."""

    address: str | None = None  #: a cluster to join; None: RAY_ADDRESS, else a new local Ray
    num_cpus: int = 4  #: logical CPUs of a local Ray (more than cores is fine: stages are light)
    num_gpus: int | None = None  #: GPUs of a local Ray (None: detect)


def start_ray(cfg: RayConfig = RayConfig()) -> bool:
    """Connect to or start Ray; returns True when this process started it (and owns it)."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray 2.60 asks for a token on every new cluster; ours is private to this process
        # and listens on 127.0.0.1 only, so it has none. Set before `import ray`, which
        # reads them; loopback is forced, not defaulted, since no token guards it. A joined
        # cluster keeps its own authentication (and the shell never exports "disabled").
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        logger.info("joined the Ray cluster at %s", address)
        return False
    # "local": a new Ray of our own even when a `ray start` cluster runs on this machine
    # (ray.init() would otherwise try to join it and refuse the resource arguments).
    #
    # With a dashboard of its own, named to every process of the cluster: Ray Train's
    # placement-group cleaner (a detached actor) asks the state API every second whether
    # the run's controller is alive, and finds that API through RAY_API_SERVER_ADDRESS,
    # else through the machine's *latest* Ray (/tmp/ray/ray_current_cluster), else port
    # 8265. With no dashboard, or another Ray started later on the machine, or another
    # Ray's dashboard on 8265, the answer came from a cluster that has no such actor: the
    # cleaner took the live controller for dead and removed the run's placement group
    # (the worker group died mid-stage). Set before ray.init, so that the raylet and
    # every worker inherit it; tests/test_ray_setup.py.
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _node_ip_address="127.0.0.1")
    url = ray._private.worker.get_dashboard_url()
    if url != f"127.0.0.1:{port}":
        ray.shutdown()
        raise RuntimeError(f"Ray's dashboard came up at {url or 'nowhere'}, not 127.0.0.1:{port} (port taken "
                           "meanwhile?); Ray Train needs its state API there: start the job again")
    logger.info("started a local Ray with %s", ray.cluster_resources())
    return True


def stop_ray(owned: bool) -> None:
    import ray

    if owned and ray.is_initialized():
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
