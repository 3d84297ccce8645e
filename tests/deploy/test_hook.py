"""DeploymentHook: trigger on a throughput drop, manifests, memory records, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sedma_torch.deploy import (
    DeployConfig,
    DeploymentHook,
    InProcessDeploymentMemory,
    load_manifests,
    random_instance,
    validate_manifests,
)

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, **overrides):
    workflow, cluster = random_instance(8, 4, seed=11)
    cfg = {
        "enabled": True,
        "workflow": workflow.to_dict(),
        "cluster": cluster.to_dict(),
        "window": 10,
        "warmup_steps": 10,
        "cooldown_steps": 10,
        "out_dir": str(tmp_path / "deploy"),
    }
    cfg.update(overrides)
    return OmegaConf.create(cfg)


def _calm():
    return (0.30, 0.40)


def _run(hook, start, n, throughput, samples=32):
    events = []
    for step in range(start, start + n):
        event = hook.on_step(step=step, samples=samples, seconds=samples / throughput)
        if event is not None:
            events.append(event)
    return events


def test_hook_fires_on_throughput_drop_writes_validated_manifests_and_records(tmp_path):
    from sedma_torch.memory import LongTermMemory

    memory = LongTermMemory(f"sqlite:///{tmp_path / 'ltm.db'}")
    try:
        hook = DeploymentHook.from_config(_cfg(tmp_path), None, memory, utilisation_fn=_calm)
        (initial,) = _run(hook, 0, 1, 100.0)
        assert initial.reason == "initial"
        assert _run(hook, 1, 10, 100.0) == []  # warm-up, then outcome recorded
        history = memory.deployment_history(hook.pattern)
        assert len(history) == 1 and history[0]["performance"] == pytest.approx(100.0)
        assert history[0]["placement"] == initial.placement.assignment
        # throughput halves: window mean (100(10-k) + 50k)/10 < 80 first at k = 5
        events = _run(hook, 11, 10, 50.0)
        assert len(events) == 1
        event = events[0]
        assert event.step == 15 and event.reason == "performance"
        assert event.decision.performance_ratio == pytest.approx(0.75)
        assert all(p.parent.name == "v001" for p in event.manifest_paths)
        manifests = load_manifests(event.manifest_paths)
        assert validate_manifests(manifests) == len(manifests)
        assert {
            m["metadata"]["annotations"]["sedma.io/node"]
            for m in manifests
            if m["kind"] == "Deployment"
        } <= set(hook.cluster.node_names)
        lines = (tmp_path / "deploy" / "decisions.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["reason"] for r in records] == ["initial", "performance"]
        stored = memory.get("deploy_decision", records[1]["key"])
        assert stored["performance_ratio"] == pytest.approx(0.75)
        assert stored["assignment"] == event.placement.assignment
        _run(hook, 21, 10, 50.0)  # outcome of the new placement
        hook.close()
        perfs = [r["performance"] for r in memory.deployment_history(hook.pattern)]
        assert perfs == pytest.approx([50.0, 100.0])  # newest first
    finally:
        memory.close()


def test_hook_stays_quiet_on_steady_throughput(tmp_path):
    hook = DeploymentHook.from_config(_cfg(tmp_path), utilisation_fn=_calm)
    gen = torch.Generator().manual_seed(0)
    events = []
    for step in range(80):
        rate = 100.0 * (1 + 0.1 * (torch.rand((), generator=gen).item() - 0.5))
        event = hook.on_step(step=step, samples=32, seconds=32 / rate)
        if event is not None:
            events.append(event.reason)
    hook.close()
    assert events == ["initial"]


def test_hook_fires_on_high_utilisation_after_cooldown(tmp_path):
    hook = DeploymentHook.from_config(
        _cfg(tmp_path, cooldown_steps=15), utilisation_fn=lambda: (0.95, 0.5)
    )
    events = _run(hook, 0, 31, 100.0)
    assert [(e.step, e.reason) for e in events] == [
        (0, "initial"),
        (15, "utilisation"),
        (30, "utilisation"),
    ]
    # memory pressure 0.5 doubles lambda_mem (base 10)
    assert events[1].placement.lambda_mem == pytest.approx(20.0)


def test_hook_builds_workflow_from_the_first_training_forward(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = OmegaConf.load(REPO / "configs" / "deploy" / "default.yaml")
    cfg.out_dir = str(tmp_path / "deploy")
    hook = DeploymentHook.from_config(cfg, model, memory=None, utilisation_fn=_calm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        loss = model(torch.randn(8, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook.on_step(step=step, samples=8, seconds=0.01)
    hook.close()
    assert hook.workflow.agent_names == ["0", "1", "2"]
    # the recorder saw only the first forward: 8 x 32 floats between 0 and 1
    assert hook.workflow.dependencies[0].data_mib * 2**20 == 8 * 32 * 4
    assert hook.recorder is None and not model[0]._forward_hooks  # hooks removed
    assert [e.reason for e in hook.events] == ["initial"]
    paths = hook.events[0].manifest_paths
    assert len(paths) == 3 and all(p.is_file() for p in paths)


def test_hook_node_failure_replaces_and_reemits(tmp_path):
    hook = DeploymentHook.from_config(_cfg(tmp_path), utilisation_fn=_calm)
    (initial,) = _run(hook, 0, 1, 100.0)
    busiest = max(
        hook.cluster.node_names,
        key=lambda n: list(initial.placement.assignment.values()).count(n),
    )
    event = hook.fail_node(busiest, step=1)
    assert event.reason == f"node_failure:{busiest}"
    assert busiest not in event.placement.assignment.values()
    manifests = load_manifests(event.manifest_paths)
    hosts = {
        m["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0]
        for m in manifests
        if m["kind"] == "Deployment"
    }
    assert busiest not in hosts and validate_manifests(manifests) == len(manifests)


def test_disabled_config_and_bad_config_are_clear():
    none_cfg = OmegaConf.load(REPO / "configs" / "deploy" / "none.yaml")
    assert none_cfg.enabled is False
    with pytest.raises(ValueError, match=r"unknown keys \['windw'\]"):
        DeployConfig.from_mapping({"windw": 3, "cluster": {}})
    with pytest.raises(ValueError, match="warmup_steps"):
        DeployConfig(cluster={"nodes": []}, window=10, warmup_steps=5)
    with pytest.raises(ValueError, match="needs a cluster"):
        DeployConfig()


def test_on_step_rejects_bad_numbers(tmp_path):
    hook = DeploymentHook.from_config(_cfg(tmp_path), memory=InProcessDeploymentMemory())
    with pytest.raises(ValueError, match="seconds"):
        hook.on_step(step=0, samples=8, seconds=0.0)
    with pytest.raises(ValueError, match="samples"):
        hook.on_step(step=0, samples=-1, seconds=1.0)


def test_watch_moves_the_recorder_to_the_model_that_trains(tmp_path):
    cluster = OmegaConf.load(REPO / "configs" / "deploy" / "default.yaml").cluster
    first = nn.Sequential(nn.Linear(4, 4))
    second = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    hook = DeploymentHook.from_config(
        {"enabled": True, "cluster": cluster, "out_dir": str(tmp_path)}, first, utilisation_fn=_calm
    )
    with pytest.raises(RuntimeError, match=r"hook.watch\(model\)"):
        hook.on_step(step=0, samples=1, seconds=0.1)
    hook.watch(second)
    assert not first[0]._forward_hooks
    second(torch.zeros(3, 4))
    hook.on_step(step=0, samples=3, seconds=0.1)
    assert hook.workflow.agent_names == ["0", "1"]
    assert hook.workflow.dependencies[0].data_mib * 2**20 == 3 * 6 * 4
    with pytest.raises(RuntimeError, match="already known"):
        hook.watch(first)
    hook.close()
