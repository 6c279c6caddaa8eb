"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and checks), launching nothing."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_validates_against_rays_cluster_config_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(), schema)
    validate_config(prepare_config(load()))  # what `ray up` checks after filling in the provider defaults


def test_a_cpu_head_and_an_autoscaling_gpu_worker_type_on_aws():
    config = load()
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no trial on the head
    types = config["available_node_types"]
    [worker] = [node for name, node in types.items() if name != config["head_node_type"]]
    assert worker["resources"]["GPU"] >= 1 and worker["min_workers"] == 0 < worker["max_workers"]


def test_project_is_installed_on_every_node_and_mlflow_serves_the_private_network_only():
    config = load()
    assert config["file_mounts"] == {"~/gan-stability": "."}
    assert any("pip install" in line and "-e ~/gan-stability" in line for line in config["setup_commands"])
    [server] = [line for line in config["head_start_ray_commands"] if line.startswith("nohup mlflow server")]
    assert "--host $(hostname -I | awk '{print $1}')" in server and "0.0.0.0" not in server
    assert "--backend-store-uri sqlite:///" in server and "--artifacts-destination s3://" in server
    exports = " ".join(config["head_setup_commands"])
    assert "MLFLOW_TRACKING_URI=http://$(hostname -I" in exports and "GAN_STABILITY_STORAGE=s3://" in exports
