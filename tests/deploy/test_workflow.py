"""Workflow/cluster descriptions: validation errors, YAML round trip, building from a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sedma_torch.deploy import (
    Agent,
    Cluster,
    Dependency,
    Node,
    Workflow,
    WorkflowError,
    deployment_pattern,
    dump_deploy_yaml,
    load_deploy_yaml,
    random_instance,
    workflow_from_model,
)

MIB = 2**20


def test_cycle_is_rejected_with_the_cycle_named():
    agents = tuple(Agent(n, 10, 1) for n in "abc")
    deps = (Dependency("a", "b", 1), Dependency("b", "c", 1), Dependency("c", "a", 1))
    with pytest.raises(WorkflowError, match=r"cycle a -> b -> c -> a"):
        Workflow("w", agents, deps)
    assert not Workflow("w", agents, deps, acyclic=False).acyclic  # allowed when asked


def test_negative_memory_is_rejected():
    with pytest.raises(WorkflowError, match=r"agent 'x' memory_mib must be >= 0, got -5"):
        Agent("x", -5, 1)


def test_nan_cpu_and_zero_node_memory_are_rejected():
    with pytest.raises(WorkflowError, match="cpu must be finite"):
        Agent("x", 5, float("nan"))
    with pytest.raises(WorkflowError, match=r"node 'n' memory_mib must be > 0"):
        Node("n", 0, 1)


def test_unknown_agent_in_dependency_is_rejected():
    with pytest.raises(WorkflowError, match="unknown agent 'ghost'"):
        Workflow("w", (Agent("a", 1, 1),), (Dependency("a", "ghost", 1),))


def test_unknown_node_in_link_and_yaml_allowed_nodes_are_rejected(tmp_path):
    with pytest.raises(WorkflowError, match="unknown node 'z'"):
        Cluster.from_dict(
            {
                "nodes": [{"name": "n", "memory_mib": 10, "cpu": 1}],
                "links": [{"a": "n", "b": "z", "latency_ms": 1, "bandwidth_mib_s": 1}],
            }
        )
    path = tmp_path / "bad.yaml"
    path.write_text(
        "workflow:\n  name: w\n  agents:\n"
        "    - {name: a, memory_mib: 1, cpu: 1, allowed_nodes: [nowhere]}\n"
        "cluster:\n  nodes:\n    - {name: n, memory_mib: 10, cpu: 1}\n"
    )
    with pytest.raises(WorkflowError, match="unknown node 'nowhere'"):
        load_deploy_yaml(path)


def test_unknown_key_and_missing_key_are_named():
    with pytest.raises(WorkflowError, match=r"unknown keys \['memroy'\]"):
        Workflow.from_dict({"agents": [{"name": "a", "memroy": 1, "cpu": 1}]})
    with pytest.raises(WorkflowError, match=r"missing \['cpu'\]"):
        Workflow.from_dict({"agents": [{"name": "a", "memory_mib": 1}]})


def test_duplicate_names_are_rejected():
    with pytest.raises(WorkflowError, match=r"duplicate agent names \['a'\]"):
        Workflow("w", (Agent("a", 1, 1), Agent("a", 2, 1)))


@pytest.mark.parametrize("seed", [0, 1])
def test_yaml_round_trip_preserves_workflow_and_cluster(tmp_path, seed):
    workflow, cluster = random_instance(7, 4, seed=seed)
    path = dump_deploy_yaml(workflow, cluster, tmp_path / "d.yaml")
    loaded_wf, loaded_cl = load_deploy_yaml(path)
    assert loaded_wf == workflow
    assert loaded_cl.to_dict() == cluster.to_dict()
    assert np.array_equal(loaded_cl.latency_ms(), cluster.latency_ms())
    assert deployment_pattern(loaded_wf, loaded_cl) == deployment_pattern(workflow, cluster)


def test_omegaconf_config_is_accepted():
    cfg = OmegaConf.create(
        {"nodes": [{"name": "n0", "memory_mib": 100, "cpu": 2}], "default_latency_ms": 1.0}
    )
    cluster = Cluster.from_dict(cfg)
    assert cluster.node_names == ["n0"] and cluster.default_latency_ms == 1.0


def test_cluster_matrices_and_node_removal():
    cluster = Cluster.from_dict(
        {
            "default_latency_ms": 3.0,
            "default_bandwidth_mib_s": 10.0,
            "nodes": [{"name": n, "memory_mib": 1, "cpu": 1} for n in ("a", "b", "c")],
            "links": [{"a": "a", "b": "c", "latency_ms": 0.5, "bandwidth_mib_s": 99.0}],
        }
    )
    lat = cluster.latency_ms()
    assert lat[0][2] == lat[2][0] == 0.5 and lat[0][1] == 3.0 and lat[1][1] == 0.0
    reduced = cluster.without_node("c")
    assert reduced.node_names == ["a", "b"] and reduced.links == ()
    with pytest.raises(WorkflowError, match="unknown node 'q'"):
        cluster.without_node("q")


def test_workflow_from_sequential_matches_hand_computed_sizes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model.eval()
    x = torch.randn(5, 8)
    wf = workflow_from_model(model, x, name="seq")
    # float32: 4 bytes; BatchNorm buffers: running_mean, running_var (16 floats each) and
    # num_batches_tracked (one int64).
    act16 = 5 * 16 * 4
    expected_memory = {
        "0": (8 * 16 + 16) * 4 + act16,
        "1": 2 * 16 * 4 + (2 * 16 * 4 + 8) + act16,
        "2": act16,
        "3": (16 * 4 + 4) * 4 + 5 * 4 * 4,
    }
    assert wf.agent_names == ["0", "1", "2", "3"]
    for name, nbytes in expected_memory.items():
        assert wf.agent(name).memory_mib * MIB == pytest.approx(nbytes), name
    volumes = {(d.src, d.dst): d.data_mib * MIB for d in wf.dependencies}
    assert volumes == pytest.approx({("0", "1"): act16, ("1", "2"): act16, ("2", "3"): act16})
    assert wf.acyclic


def test_workflow_from_model_with_named_agents_and_double_input():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    wf = workflow_from_model(model, torch.zeros(7, 3, dtype=torch.float64), agents=["0", "2"])
    assert wf.agent_names == ["0", "2"]
    # the recorder sees only the named modules, so 0 -> 2 carries 0's output (7 x 6 doubles)
    assert [(d.src, d.dst, d.data_mib * MIB) for d in wf.dependencies] == [("0", "2", 7 * 6 * 8)]
    assert wf.agent("2").memory_mib * MIB == pytest.approx((6 * 2 + 2) * 8 + 7 * 2 * 8)


def test_workflow_from_model_rejects_unknown_module():
    with pytest.raises(WorkflowError, match="agent module 'nope' is not in the model"):
        workflow_from_model(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2), agents=["nope"])
