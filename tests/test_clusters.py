"""clusters/: the shipped cluster definitions pass their tools' own checks (Ray's launcher validator) or, for
KubeRay (no offline schema package), KubeRay's v1 field names, replica arithmetic and the security rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_launcher_yamls_pass_rays_own_validator(name):
    """What `ray up` runs before touching a cloud: fill the provider's defaults, validate against Ray's schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / name).read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert config["head_node_type"] == "head" and {"gpu_1x", "gpu_8x"} <= set(config["available_node_types"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # nothing exposed: the job port is reached by SSH tunnel
    assert "0.0.0.0" not in (CLUSTERS / name).read_text()
    # token auth on every node, with the submitting machine's token (Ray reads ~/.ray/auth_token)
    for command in (*config["head_start_ray_commands"], *config["worker_start_ray_commands"]):
        assert "ray start" not in command or command.startswith("export RAY_AUTH_MODE=token;"), command
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    with pytest.raises(jsonschema.ValidationError):  # the validator does reject what the tool would refuse
        validate_config(prepare_config({**raw, "head_node_typo": "head"}))


KUBERAY_SPEC_KEYS = {
    "RayCluster": {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "headServiceAnnotations", "suspend", "managedBy"},
    "RayJob": {"entrypoint", "runtimeEnvYAML", "jobId", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "clusterSelector", "submitterPodTemplate",
               "submissionMode", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "suspend",
               "managedBy", "metadata", "deletionStrategy"},
}


def _check_ray_cluster_spec(spec: dict) -> None:
    assert set(spec) <= KUBERAY_SPEC_KEYS["RayCluster"], set(spec) - KUBERAY_SPEC_KEYS["RayCluster"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # never LoadBalancer/NodePort: reach it with kubectl port-forward
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] and container["resources"]["limits"]
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            for name, entry in env.items():  # credentials only from Secrets, never literal values
                if any(word in name for word in ("TOKEN", "SECRET", "KEY", "PASSWORD")):
                    assert "valueFrom" in entry and "value" not in entry, name
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["groupName"]
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]]
    assert any(gpus), "no GPU worker group"


@pytest.mark.parametrize(("name", "kind"), [("kuberay-raycluster.yaml", "RayCluster"), ("kuberay-rayjob.yaml", "RayJob")])
def test_kuberay_manifests_use_the_fields_kuberay_accepts(name, kind):
    """No package ships KubeRay's CRD schema for offline validation: check the v1 fields, the security rules and
    the replica arithmetic the operator enforces."""
    manifest = yaml.safe_load((CLUSTERS / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind and manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert set(spec) <= KUBERAY_SPEC_KEYS[kind], set(spec) - KUBERAY_SPEC_KEYS[kind]
    if kind == "RayJob":
        assert spec["entrypoint"].startswith("slam-ray run ")
        yaml.safe_load(spec["runtimeEnvYAML"])
        spec = spec["rayClusterSpec"]
    _check_ray_cluster_spec(spec)
