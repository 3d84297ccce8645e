"""Manifests: schema validation, node affinity, resources, names, writing, applying."""

from __future__ import annotations

import copy
import re

import pytest

from sedma_torch.deploy import (
    Agent,
    Cluster,
    Dependency,
    KubernetesApplyError,
    ManifestError,
    Node,
    Workflow,
    apply_manifests,
    dns1123_label,
    load_manifests,
    optimize_placement,
    random_instance,
    render_manifests,
    validate_manifests,
    write_manifests,
)

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.fixture(scope="module")
def deployed():
    workflow, cluster = random_instance(12, 5, seed=4)
    placement = optimize_placement(workflow, cluster, 10.0)
    return workflow, cluster, placement, render_manifests(workflow, cluster, placement)


def test_every_generated_manifest_passes_schema_validation(deployed):
    workflow, _, _, manifests = deployed
    assert validate_manifests(manifests) == len(manifests)
    kinds = [m["kind"] for m in manifests]
    assert kinds.count("Deployment") == len(workflow.agents)
    talking = {d.src for d in workflow.dependencies} | {d.dst for d in workflow.dependencies}
    assert kinds.count("Service") == len(talking)


def test_deployments_pin_agents_to_their_node_with_requests(deployed):
    workflow, _, placement, manifests = deployed
    for m in (m for m in manifests if m["kind"] == "Deployment"):
        agent = workflow.agent(m["metadata"]["annotations"]["sedma.io/agent"])
        spec = m["spec"]["template"]["spec"]
        term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        expr = term["nodeSelectorTerms"][0]["matchExpressions"][0]
        assert expr == {
            "key": "kubernetes.io/hostname",
            "operator": "In",
            "values": [placement.assignment[agent.name]],
        }
        res = spec["containers"][0]["resources"]
        assert res["requests"]["memory"] == f"{-(-agent.memory_mib // 1):.0f}Mi"
        assert int(res["requests"]["cpu"].rstrip("m")) == round(agent.cpu * 1000)
        assert res["limits"] == res["requests"]
        assert DNS1123.match(m["metadata"]["name"]) and len(m["metadata"]["name"]) <= 63


def test_schema_rejects_a_broken_manifest_and_names_the_field(deployed):
    manifests = copy.deepcopy(deployed[3])
    manifests[0]["spec"]["replicas"] = "one"
    with pytest.raises(ManifestError, match=r"spec/replicas"):
        validate_manifests(manifests)
    manifests = copy.deepcopy(deployed[3])
    manifests[0]["spec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(ManifestError, match="'bogus' was unexpected"):
        validate_manifests(manifests)
    manifests = copy.deepcopy(deployed[3])
    manifests[0]["metadata"]["name"] = "Not_A_Name"
    with pytest.raises(ManifestError, match="not a DNS-1123 label"):
        validate_manifests(manifests)


@pytest.mark.parametrize(
    "raw",
    ["Encoder.Layer_1", "7up", "a" * 100, "-weird--name-", "résumé/ß", "layer1.0.conv1"],
)
def test_dns1123_label_is_valid(raw):
    name = dns1123_label(raw)
    assert DNS1123.match(name) and len(name) <= 63 and name[0].isalpha()


def test_long_names_stay_unique():
    assert dns1123_label("x" * 80 + "a") != dns1123_label("x" * 80 + "b")


def test_agent_names_that_collide_are_rejected():
    cluster = Cluster((Node("n", 1000, 4),))
    workflow = Workflow("w", (Agent("enc.1", 1, 0.1), Agent("enc_1", 1, 0.1)))
    placement = optimize_placement(workflow, cluster)
    with pytest.raises(ManifestError, match="map to the same Kubernetes name 'w-enc-1'"):
        render_manifests(workflow, cluster, placement)


def test_write_and_load_round_trip(deployed, tmp_path):
    manifests = deployed[3]
    paths = write_manifests(manifests, tmp_path / "m")
    assert len(paths) == len(deployed[0].agents)
    loaded = load_manifests(paths)
    key = lambda m: (m["kind"], m["metadata"]["name"])  # noqa: E731
    assert sorted(loaded, key=key) == sorted(manifests, key=key)
    assert validate_manifests(loaded) == len(manifests)


def test_peers_env_lists_downstream_services():
    cluster = Cluster((Node("n0", 1000, 4), Node("n1", 1000, 4)))
    workflow = Workflow(
        "pipe",
        (Agent("a", 600, 1), Agent("b", 600, 1), Agent("c", 10, 1)),
        (Dependency("a", "b", 1.0),),
    )
    manifests = render_manifests(workflow, cluster, optimize_placement(workflow, cluster))
    env = {
        m["metadata"]["name"]: {
            e["name"]: e["value"] for e in m["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        for m in manifests
        if m["kind"] == "Deployment"
    }
    assert env["pipe-a"]["SEDMA_PEERS"] == "pipe-b:29500"
    assert env["pipe-b"]["SEDMA_PEERS"] == ""
    assert {m["metadata"]["name"] for m in manifests if m["kind"] == "Service"} == {
        "pipe-a",
        "pipe-b",
    }


def test_apply_with_missing_kubeconfig_is_a_clear_error(deployed, tmp_path):
    with pytest.raises(KubernetesApplyError, match="does not exist"):
        apply_manifests(deployed[3], tmp_path / "missing-kubeconfig")


def test_apply_with_garbage_kubeconfig_is_a_clear_error(deployed, tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text("this: [is not a kubeconfig\n")
    with pytest.raises(KubernetesApplyError, match="is not usable"):
        apply_manifests(deployed[3], path)


def test_apply_to_unreachable_server_is_a_clear_error(deployed, tmp_path):
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    with pytest.raises(
        KubernetesApplyError,
        match=f"cannot reach the Kubernetes API server https://127.0.0.1:{port}",
    ):
        apply_manifests(deployed[3], path, dry_run="All")
