"""cluster/*.yaml: launcher files validate against Ray's own schema (ray-schema.json shipped in the
ray package, plus the launcher's own prepare/validate steps, all offline); the KubeRay RayJob is
checked for structure. Security defaults are checked on every file."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
FILES = sorted(CLUSTER.glob("*.yaml"))
LAUNCHER = [f for f in FILES if yaml.safe_load(f.read_text()).get("kind") != "RayJob"]
RAYJOBS = [f for f in FILES if f not in LAUNCHER]
HYPERPARAMETERS = ("learning_rate", "lr:", "batch_size", "kl_coef", "temperature", "max_new_tokens")


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_expected_files_exist():
    names = {f.name for f in FILES}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml", "kuberay-rayjob.yaml"} <= names


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_file_matches_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, _ray_schema())  # the file as written
    validate_config(prepare_config(config))  # as `ray up` sees it, after defaults are merged


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_file_security_and_install(path):
    text = path.read_text()
    config = yaml.safe_load(text)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--metrics-export-port=8080" in head
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in cmds)
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    setup = " ".join(config["setup_commands"])
    assert "-e ~/e3rl" in setup and "git clone" in setup
    assert "download.pytorch.org/whl/cpu" not in setup and "+cpu" not in setup
    for usage in ("ray up", "ray dashboard", "ray job submit --address http://127.0.0.1:8265",
                  "python -m e3rl.run configs/"):
        assert usage in text, f"{path.name}: usage comment lacks {usage!r}"
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not [h for h in HYPERPARAMETERS if h in body]


def test_gpu_worker_types_declare_gpus():
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        types = yaml.safe_load((CLUSTER / name).read_text())["available_node_types"]
        gpus = [t["resources"].get("GPU", 0) for t in types.values()]
        assert max(gpus) == 8 and types["head"]["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_structure(path):
    job = yaml.safe_load(path.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert "python -m e3rl.run configs/" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        pods.append(group["template"]["spec"])
    pods.append(spec["submitterPodTemplate"]["spec"])
    for pod in pods:
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    assert gpus and all(int(n) >= 1 for n in gpus)
