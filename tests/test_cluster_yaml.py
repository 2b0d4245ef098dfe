"""cluster.yaml must be a config Ray's cluster launcher accepts."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu_groups = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_groups, "a GPU worker group for teacher replicas"
    assert not config["available_node_types"][config["head_node_type"]]["resources"].get("GPU")


def test_schema_catches_a_typo():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, schema)


def test_storage_credentials_come_from_the_nodes_environment():
    """The bucket is named only by URIs; keys reach the nodes as environment, never as config."""
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert "AWS_SECRET_ACCESS_KEY=" not in "".join(config["head_start_ray_commands"])
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert start.startswith("set -a; [ ! -f ~/.teacher-harvest/storage.env ] || . ~/.t")
    assert list(config["file_mounts"].values()) == ["~/.teacher-harvest/storage.env"]
