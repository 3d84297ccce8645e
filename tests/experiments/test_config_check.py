"""Config validation (issue 16 item 10): unknown keys and mistyped values fail before
anything runs, naming the key; deploy inputs a cluster would reject fail at the source."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from sedma_torch.deploy import (
    Agent,
    DeployConfig,
    ManifestError,
    Node,
    load_deploy_yaml,
    load_manifests,
    optimize_placement,
    random_instance,
    render_manifests,
    validate_manifests,
)
from sedma_torch.deploy.workflow import WorkflowError
from sedma_torch.experiments.config_check import ConfigError, check_app_config

from ..conftest import REPO
from .helpers import app_env, compose_cfg


def _check(overrides: list[str]) -> None:
    choices = {o.split("=")[0]: o.split("=")[1] for o in overrides if "." not in o.split("=")[0]}
    check_app_config(compose_cfg(overrides), choices)


def test_the_shipped_configs_and_every_group_option_pass():
    _check([])
    for group, option in [
        ("dataset", "imagenet"),
        ("dataset", "coco"),
        ("dataset", "squad"),
        ("model", "efficientnet_lite0"),
        ("model", "minilm_qa"),
        ("deploy", "default"),
        ("distributed", "memory_aware"),
        ("memory", "none"),
        ("logger", "none"),
        ("rram", "corrected"),
    ]:
        _check([f"{group}={option}"])
    _check(["train.resume=false", "train.amp=true", "threads=2", "eval.limit=5", "seed=3"])
    _check(["+model.preprocess={image_size: 8}"])  # an optional key the model builder reads


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+train.foo=1"], r"unknown config key 'train\.foo'.*known keys in 'train': amp,"),
        (["+bogus=1"], r"unknown config key 'bogus'.*at the top level"),
        (["deploy=default", "+deploy.thetta=0.5"], r"unknown config key 'deploy\.thetta'"),
        (["train.lr=fast"], r"'train\.lr' must be a number \(default 0\.003\), got 'fast'"),
        (["seed=abc"], r"'seed' must be an integer.*got 'abc'"),
        (["train.epochs=2.5"], r"'train\.epochs' must be an integer"),
        (["train.progress=3"], r"'train\.progress' must be true or false"),
        (["deploy=default", "deploy.theta=high"], r"'deploy\.theta' must be a number"),
        (["deploy=default", "deploy.port=http"], r"'deploy\.port' must be an integer"),
        (["threads=many"], r"'threads' must be int or null"),
        (["train.lr=nan"], r"'train\.lr' must be finite"),
        (["train.resume=3"], r"'train\.resume' must be a string or bool"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _check(overrides)


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_the_apps_refuse_an_unknown_key_before_running(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / script), "+train.foo=1", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "unknown config key 'train.foo'" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_eval_weights_that_are_a_directory_say_so(tmp_path):
    from sedma_torch.experiments.builders import build_model

    cfg = compose_cfg([f"model.weights={tmp_path}"])
    with pytest.raises(IsADirectoryError, match="is a directory; give the weights file"):
        build_model(cfg["model"])


def test_deploy_config_types_are_checked_where_it_is_built():
    base = {"enabled": True, "cluster": {"nodes": []}}
    with pytest.raises(TypeError, match=r"deploy\.theta must be float, got 'high'"):
        DeployConfig(**base, theta="high")
    with pytest.raises(TypeError, match=r"deploy\.port must be int, got 'http'"):
        DeployConfig(**base, port="http")
    with pytest.raises(TypeError, match=r"deploy\.window must be int, got True"):
        DeployConfig(**base, window=True)
    with pytest.raises(ValueError, match=r"deploy\.rho must be finite"):
        DeployConfig(**base, rho=float("nan"))
    assert DeployConfig(**base, theta=1).theta == 1


def test_node_names_must_be_valid_hostname_label_values():
    with pytest.raises(WorkflowError, match=r"node name 'Node A!' is not a valid kubernetes"):
        Node("Node A!", 1024, 2)
    with pytest.raises(WorkflowError, match="node hostname"):
        Node("a", 1024, 2, hostname="x" * 64)
    assert Node("Node A!", 1024, 2, hostname="node-a").host_label == "node-a"
    assert Node("gpu_1.rack-2", 1024, 2).host_label == "gpu_1.rack-2"


def test_manifest_validation_checks_node_affinity_values():
    workflow, cluster = random_instance(4, 2, seed=1)
    manifests = render_manifests(workflow, cluster, optimize_placement(workflow, cluster, 5.0))
    validate_manifests(manifests)
    broken = copy.deepcopy(manifests)
    pod = broken[0]["spec"]["template"]["spec"]
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    term["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] = ["Node A!"]
    with pytest.raises(ManifestError, match=r"node affinity kubernetes.io/hostname='Node A!'"):
        validate_manifests(broken)


def test_port_memory_and_yaml_errors_name_what_was_wrong(tmp_path):
    workflow, cluster = random_instance(3, 2, seed=2)
    placement = optimize_placement(workflow, cluster, 5.0)
    with pytest.raises(ManifestError, match=r"port must be an integer in \[1, 65535\], got 'http'"):
        render_manifests(workflow, cluster, placement, port="http")
    with pytest.raises(WorkflowError, match=r"memory_mib must be at most"):
        Node("a", 1e300, 2)
    with pytest.raises(WorkflowError, match=r"memory_mib must be at most"):
        Agent("x", 1e300, 1)
    bad = tmp_path / "cluster.yaml"
    bad.write_text("workflow: {agents: [\ncluster: 1\n")
    with pytest.raises(WorkflowError, match=r"cluster\.yaml' is not valid YAML"):
        load_deploy_yaml(bad)
    with pytest.raises(ManifestError, match=r"cluster\.yaml' is not valid YAML"):
        load_manifests([bad])
    assert torch.isfinite(torch.tensor(Node("a", 2.0**43, 2).memory_mib))
