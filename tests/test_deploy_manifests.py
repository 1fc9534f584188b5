"""The KubeRay manifest against KubeRay's RayService CRD schema, and its Serve config against Ray's.

Offline: the CRD's ``openAPIV3Schema`` is a JSON schema (its ``x-kubernetes-*`` keys are ignored by
a JSON-schema validator), so a misspelt or misplaced field fails here instead of at ``kubectl apply``.
The CRD is KubeRay's ``ray-operator/config/crd/bases/ray.io_rayservices.yaml`` (ray-project/kuberay,
commit feeaf72facab4881ba2b179248bb67315634e229, Apache-2.0), unchanged, gzipped in ``tests/data/``;
``SHOPREEL_KUBERAY_CRD`` points the check at another copy (e.g. the CRD of the KubeRay you run).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


VENDORED_CRD = ROOT / "tests" / "data" / "kuberay-rayservice-crd.yaml.gz"


def _crd_text() -> str:
    chosen = os.environ.get("SHOPREEL_KUBERAY_CRD")
    if chosen:
        return Path(chosen).read_text()
    return gzip.decompress(VENDORED_CRD.read_bytes()).decode()


def _strict(node: object) -> None:
    """Close every object schema that lists its properties, as kubectl's strict field validation does
    (the default since Kubernetes 1.25): an unknown, e.g. misspelt, field is an error, not pruned."""
    if isinstance(node, dict):
        closable = "properties" in node and "additionalProperties" not in node
        if closable and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


def _schema(version: str) -> dict:
    crd = yaml.safe_load(_crd_text())
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema = served["schema"]["openAPIV3Schema"]
            _strict(schema)
            return schema
    raise AssertionError(f"the CRD has no version {version}")


def test_the_rayservice_manifest_matches_kuberays_crd():
    import jsonschema

    manifest = yaml.safe_load(MANIFEST.read_text())
    assert manifest["kind"] == "RayService"
    version = manifest["apiVersion"].split("/")[1]
    validator = jsonschema.Draft7Validator(_schema(version))
    errors = sorted(validator.iter_errors(manifest), key=lambda error: list(error.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("rayClusterConfig", "headGroupSpec", "rayStartParam"), {}),  # misspelt rayStartParams
        (("rayClusterConfig", "workerGroupSpecs", 0, "replicas"), "two"),  # not an integer
    ],
)
def test_a_misspelt_or_mistyped_field_is_caught(path, value):
    """The check has teeth: it refuses what kubectl's strict validation would."""
    import jsonschema

    manifest = yaml.safe_load(MANIFEST.read_text())
    node = manifest["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    validator = jsonschema.Draft7Validator(_schema(manifest["apiVersion"].split("/")[1]))
    assert list(validator.iter_errors(manifest))


def test_the_manifests_serve_config_is_a_valid_ray_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    from shopreel.serve.config import ServeConfig

    manifest = yaml.safe_load(MANIFEST.read_text())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    for application in serve_config["applications"]:
        ServeConfig.model_validate(application.get("args") or {})


def test_every_ray_pod_runs_serves_fast_path_as_the_embedded_cluster_does():
    """Ray reads these at process start on each node: a pod without them runs a slower request path."""
    from shopreel.serve.runner import PROCESS_ENV, SERVE_FAST_PATH_ENV

    cluster = yaml.safe_load(MANIFEST.read_text())["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            wanted = {**SERVE_FAST_PATH_ENV, **PROCESS_ENV}
            assert {name: env.get(name) for name in wanted} == wanted, container["name"]
