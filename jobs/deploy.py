"""Deploy the any-to-any sampler on Ray Serve (FastAPI ingress, batching, autoscaling).

    python jobs/deploy.py --config configs/tiny/serve.yaml [model.model=runs/stage3/final ...]
    RAY_ADDRESS=http://127.0.0.1:8265 ray job submit --working-dir . -- \
        python jobs/deploy.py --config configs/tiny/serve.yaml

Run directly, it starts a local Ray, serves on `http.host:http.port` and keeps serving
until interrupted. Submitted to a cluster (RAY_ADDRESS set), it deploys the application,
waits until it answers, and returns; the application keeps running on the cluster
(`serve shutdown` or `serve delete omni` removes it). `--block` keeps the job attached.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import urllib.request

from omni_model.config import from_dict
from pipelines.ray_setup import RayConfig, start_ray, stop_ray
from serve.config import load_serve_config

logger = logging.getLogger("deploy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/serve.yaml")
    parser.add_argument("--block", action="store_true",
                        help="keep serving in the foreground even when joined to a cluster")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    cfg = load_serve_config(args.config, args.overrides)
    ray_config = from_dict(RayConfig, cfg.ray, "ray")  # an unknown key fails before Ray starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    owned = start_ray(ray_config)
    from ray import serve

    from serve.app import build

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build(cfg, root=os.getcwd()), name=cfg.deployment.app_name,
              route_prefix=cfg.deployment.route_prefix)
    url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.deployment.route_prefix.rstrip('/')}"
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as response:
        logger.info("serving %s at %s (healthz %d)", cfg.model.name, url, response.status)
    print(f"serving {cfg.model.name} at {url}/v1/generate (docs: {url}/docs)", flush=True)
    if not (owned or args.block):
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        if owned:
            serve.shutdown()
        stop_ray(owned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
