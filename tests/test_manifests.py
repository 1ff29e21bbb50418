"""The cluster manifests, checked by the schemas their tools use, and against what our jobs accept.

- `infra/rayjob.yaml` and `infra/raycluster.yaml` against the KubeRay v1.7 CRDs (the OpenAPI v3
  schema of `ray.io/v1`), strictly: a field the CRD does not declare is an error, as with
  `kubectl apply --validate=strict` (the API server would otherwise drop it silently).
- `infra/cluster.yaml` against the cluster-launcher schema inside the `ray` wheel.
- All three: the job's entrypoint parses as our command line and its config loads; the cluster
  shares no disk, so storage and data are object-store URIs, the tracking server is HTTP, and
  Ray's token authentication is on.

The CRDs are not shipped with the project (data from ray-project/kuberay, see their README); the
test reads them from $RNA_KUBERAY_SCHEMAS or the machine's shared folder.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from jobs import train as train_job
from jobs.cli import config_from_args
from pipelines.preflight import check_cluster_paths

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SCHEMA_CANDIDATES = [
    os.environ.get("RNA_KUBERAY_SCHEMAS", ""),
    "/work/shared/schemas/kuberay-v1.7",
    str(REPO.parent / "shared" / "schemas" / "kuberay-v1.7"),
]
KUBERAY = next((Path(p) for p in SCHEMA_CANDIDATES if p and (Path(p) / "ray.io_rayjobs.yaml").is_file()), None)
needs_crds = pytest.mark.skipif(KUBERAY is None, reason="KubeRay CRDs not found (set RNA_KUBERAY_SCHEMAS)")
TRACKING_URI = "MLFLOW_TRACKING_URI"


@functools.cache
def strict_crd_schema(kind_file: str, version: str) -> str:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    doc = next(d for d in yaml.load_all((KUBERAY / kind_file).read_text(), Loader=loader) if d)
    schema = next(v for v in doc["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    return json.dumps(strict(schema))


def crd_schema(kind_file: str, version: str = "v1") -> dict[str, Any]:
    """The OpenAPI v3 schema of one version of a CRD, made strict (undeclared fields are errors)."""
    return json.loads(strict_crd_schema(kind_file, version))


def strict(node: Any) -> Any:
    """additionalProperties: false wherever an object lists its properties and keeps no unknown fields."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def errors(schema: dict[str, Any], doc: Any) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in validator.iter_errors(doc)]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((INFRA / name).read_text())


def entrypoint_config(entrypoint: str):
    """The Config the entrypoint's `python jobs/train.py ...` would run with (the job's own parser)."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "jobs/train.py"], argv
    return config_from_args(train_job.parse_args(argv[2:]))


def container_env(pod_template: dict[str, Any]) -> dict[str, str]:
    (container,) = pod_template["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def check_cluster_spec(spec: dict[str, Any]) -> None:
    """What every KubeRay cluster of ours shares: token auth, our Ray version, tracking server, secrets."""
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        env = container_env(group["template"])
        assert env[TRACKING_URI].startswith(("http://", "https://")), env
        (container,) = group["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "rna-credentials"}} in container["envFrom"]
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # drivers only, as on the local cluster


def test_the_strict_schema_catches_a_misspelt_field():
    """The checks below could fail: an undeclared field and a wrong type are both reported."""
    if KUBERAY is None:
        pytest.skip("KubeRay CRDs not found (set RNA_KUBERAY_SCHEMAS)")
    doc = load("rayjob.yaml")
    doc["spec"]["shutdownAfterJobFinish"] = True  # missing "es"
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    found = errors(crd_schema("ray.io_rayjobs.yaml"), doc)
    assert any("shutdownAfterJobFinish" in e for e in found), found
    assert any("replicas" in e for e in found), found


@needs_crds
def test_rayjob_manifest_is_a_valid_rayjob_running_our_job_on_object_storage():
    doc = load("rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert errors(crd_schema("ray.io_rayjobs.yaml"), doc) == []
    spec = doc["spec"]
    check_cluster_spec(spec["rayClusterSpec"])
    cfg = entrypoint_config(spec["entrypoint"])
    assert cfg.ray.storage_path.startswith("s3://") and cfg.data.data_dir.startswith("s3://")
    uri = container_env(spec["rayClusterSpec"]["headGroupSpec"]["template"])[TRACKING_URI]
    check_cluster_paths(cfg, uri, "workers on other nodes")  # what the driver checks there: no error
    workers = sum(g["replicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.ray.num_workers <= workers


@needs_crds
def test_raycluster_manifest_is_a_valid_raycluster_with_the_same_settings():
    doc = load("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert errors(crd_schema("ray.io_rayclusters.yaml"), doc) == []
    check_cluster_spec(doc["spec"])
    job = load("rayjob.yaml")["spec"]["rayClusterSpec"]
    for a, b in zip(
        [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]],
        [job["headGroupSpec"], *job["workerGroupSpecs"]],
    ):
        assert container_env(a["template"]) == container_env(b["template"])


def test_cluster_launcher_config_is_valid_for_the_ray_wheel_and_uses_token_auth():
    schema_file = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_file.read_text())
    doc = load("cluster.yaml")
    assert errors(schema, doc) == []
    bad = copy.deepcopy(doc)
    bad["head_start_ray_command"] = bad.pop("head_start_ray_commands")  # the schema rejects a misspelt key
    assert errors(schema, bad) != []
    assert doc["head_node_type"] in doc["available_node_types"]
    assert doc["available_node_types"][doc["head_node_type"]]["resources"] == {"CPU": 0}
    starts = doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in doc["head_start_ray_commands"])
    assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"]
    for local_file in doc["file_mounts"].values():
        assert local_file.startswith("~/"), local_file  # the credentials file stays out of the repository
