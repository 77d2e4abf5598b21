"""The cluster manifests in deploy/ (KubeRay RayJob for stage 2, RayService for the
sampler, the shared run folder, the image): they parse, name real files and configs
that load, ask for the GPUs and CPUs their configs use, mount the shared folder where
the configs' paths point, and keep Ray's token authentication on. No Kubernetes here:
what a cluster would do with them is not exercised (said in deploy/README.md)."""

import shlex
from pathlib import Path

import pytest
import yaml

from omni_model.config import load_config
from serve.config import load_serve_config
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
APP = "/app/"  # where deploy/Dockerfile puts the repository


def _doc(name: str) -> dict:
    docs = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    assert len(docs) == 1
    return docs[0]


def _local(path: str) -> Path:
    assert path.startswith(APP), path
    return ROOT / path[len(APP):]


def _pods(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                             for g in cluster["workerGroupSpecs"]]


def _check_pods(pods: list[dict], writes_runs: bool) -> None:
    """Token authentication, the shared run folder (written only where `writes_runs`,
    the models never) and the security settings in every Ray container."""
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        assert claims == {"shared": _doc("shared-storage.yaml")["metadata"]["name"]}
        _check_security(pod)
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "omni-ray-token", "key": "token"}
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/shared"]["name"] == "shared" and mounts["/models"]["subPath"] == "models"
            assert mounts["/models"].get("readOnly") is True
            assert mounts["/shared"].get("readOnly", False) is (not writes_runs)
            assert container["image"] == _image()


def _check_security(pod: dict) -> None:
    """Non-root, no privilege escalation, no capabilities, a read-only root filesystem
    with a size-limited scratch folder at /tmp, and limits on CPU, memory and disk."""
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    scratch = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
        limits = container["resources"]["limits"]
        assert {"cpu", "memory", "ephemeral-storage"} <= set(limits)
        tmp = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/tmp"]
        assert scratch[tmp]["sizeLimit"]


def _image() -> str:
    return "ghcr.io/your-org/omni-diffusion-ray:0.1.0"


def test_the_shared_folder_is_read_write_many():
    claim = _doc("shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_stage2_rayjob_runs_the_stage2_job_with_the_gpus_its_config_asks_for():
    job = _doc("rayjob-stage2.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and _local(argv[1]) == ROOT / "jobs" / "stage2.py" and argv[2] == "--config"
    from pipelines.train import StageConfig

    cfg = load_config(StageConfig, _local(argv[3]), argv[4:])
    assert cfg.stage == 2
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["PYTHONPATH"] == APP.rstrip("/")
    # every path of the config lies in the shared folder or the models under it
    for path in (cfg.run.dir, cfg.data.shards, cfg.data.text_tokenizer, cfg.model.path.removeprefix("latest:")):
        assert path.startswith(("/shared/", "/models/")), path
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == __import__("ray").__version__
    _check_pods(_pods(cluster), writes_runs=True)
    _check_security(job["spec"]["submitterPodTemplate"]["spec"])
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert {e["name"] for e in submitter["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               * g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    cpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) * g["maxReplicas"]
               for g in cluster["workerGroupSpecs"])
    assert cfg.scaling.use_gpu and gpus == cfg.scaling.num_workers
    assert cpus >= cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_the_rayservice_builds_the_serve_app_from_the_gpu_config():
    service = _doc("rayservice-sampler.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert len(apps) == 1
    app = apps[0]
    module, attr = app["import_path"].split(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    args = dict(app["args"])
    cfg = load_serve_config(_local(args.pop("config")), [f"{k}={v}" for k, v in args.items()])
    assert cfg.model.model.startswith("/shared/") and cfg.model.image_tokenizer.startswith("/models/")
    assert cfg.batching.mode == "step" and cfg.deployment.num_gpus == 1
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    _check_pods(_pods(cluster), writes_runs=False)  # a replica only reads the model folders
    for pod in _pods(cluster):
        assert all(v["persistentVolumeClaim"]["readOnly"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
    (group,) = cluster["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == cfg.deployment.num_gpus
    assert int(limits["cpu"]) >= cfg.deployment.num_cpus
    # one replica a GPU: the worker group can grow as far as the replicas do
    assert group["minReplicas"] >= cfg.deployment.autoscaling.min_replicas
    assert group["maxReplicas"] == cfg.deployment.autoscaling.max_replicas


def test_the_image_installs_the_project_with_its_torch_pin():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{__import__('ray').__version__}-py311-gpu" in dockerfile
    assert "PIP_CONSTRAINT=/app/constraints.txt" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), source
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


@pytest.mark.parametrize("name", ["rayjob-stage2.yaml", "rayservice-sampler.yaml"])
def test_no_manifest_turns_authentication_off(name):
    text = (DEPLOY / name).read_text()
    assert "RAY_AUTH_MODE, value: disabled" not in text and "disabled" not in text


def test_the_network_policy_admits_only_the_ingress_to_the_serve_port():
    policy = _doc("networkpolicy-sampler.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    service = _doc("rayservice-sampler.yaml")
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    # it selects every pod of the sampler's cluster
    for pod in [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]] + [
            g["template"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        assert selected.items() <= pod["metadata"]["labels"].items()
    rules = policy["spec"]["ingress"]
    from_outside = [r for r in rules if any("namespaceSelector" in f for f in r["from"])]
    ports = sorted(p["port"] for r in from_outside for p in r["ports"])
    serve_port = 8000
    assert serve_cfg["applications"][0]["route_prefix"] == "/"
    assert ports == [serve_port, 8265]  # the ingress to Serve; the KubeRay operator to the dashboard
    assert all(r.get("ports") for r in from_outside)  # no rule from outside without a port
    (inside,) = [r for r in rules if r not in from_outside]
    assert [f["podSelector"]["matchLabels"] for f in inside["from"]] == [selected]
