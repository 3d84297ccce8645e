"""Synthetic workflows/clusters and a pipeline throughput model (benchmarks, demos).

Throughput model (documented so the resilience figures can be checked by hand):
every agent does ``cpu`` core-seconds of work per sample (its CPU need is its work);
agents on one node share its cores, so the node needs ``sum(cpu_i) / cpu_node`` seconds
per sample; a dependency between different nodes needs ``latency_ms/1000 +
data_mib / bandwidth`` seconds per sample, and dependencies crossing the same node
pair share that link (times add). The workflow is pipelined, so throughput (samples/s)
is ``1 / max(node times, link times)``; an agent on no live node gives throughput 0
(a Pod pinned by node affinity to a dead node stays Pending).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .workflow import Agent, Cluster, Dependency, Link, Node, Workflow


def random_instance(
    n_agents: int,
    n_nodes: int,
    *,
    seed: int,
    extra_edges: float = 0.5,
    fill: float = 0.6,
) -> tuple[Workflow, Cluster]:
    """A random DAG workflow on a random heterogeneous cluster.

    The DAG is a chain ``a0 -> a1 -> ...`` plus ``extra_edges * n_agents`` forward
    edges; data volumes 1-64 MiB (log-uniform). Node capacities are scaled so the
    agents fill about ``fill`` of the total memory and CPU. Nodes sit in
    ``max(1, n_nodes // 4)`` racks: 0.1-0.3 ms and 1-2 GiB/s within a rack,
    1-5 ms and 100-500 MiB/s across racks.
    """
    if n_agents < 1 or n_nodes < 1:
        raise ValueError(f"need n_agents >= 1 and n_nodes >= 1, got {n_agents}, {n_nodes}")
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    rng = np.random.default_rng(seed)
    mem = rng.uniform(256, 4096, n_agents).round(0)
    cpu = rng.uniform(0.25, 2.0, n_agents).round(2)
    agents = tuple(Agent(f"a{i}", float(mem[i]), float(cpu[i])) for i in range(n_agents))
    edges: dict[tuple[int, int], float] = {}
    for i in range(n_agents - 1):
        edges[(i, i + 1)] = float(np.exp(rng.uniform(0, np.log(64))).round(2))
    for _ in range(int(extra_edges * n_agents)):
        if n_agents < 3:
            break
        i, j = sorted(rng.choice(n_agents, size=2, replace=False).tolist())
        edges.setdefault((i, j), float(np.exp(rng.uniform(0, np.log(64))).round(2)))
    deps = tuple(Dependency(f"a{i}", f"a{j}", v) for (i, j), v in edges.items())
    workflow = Workflow(f"random-{n_agents}x{n_nodes}-s{seed}", agents, deps)

    weights = rng.uniform(0.5, 1.5, n_nodes)
    weights /= weights.sum()
    node_mem = np.maximum(weights * mem.sum() / fill, mem.max() * 1.05).round(0)
    node_cpu = np.maximum(weights * cpu.sum() / fill, cpu.max() * 1.05).round(2)
    nodes = tuple(Node(f"n{k}", float(node_mem[k]), float(node_cpu[k])) for k in range(n_nodes))
    racks = max(1, n_nodes // 4)
    rack = rng.integers(0, racks, n_nodes)
    links = []
    for a in range(n_nodes):
        for b in range(a + 1, n_nodes):
            if rack[a] == rack[b]:
                lat, bw = rng.uniform(0.1, 0.3), rng.uniform(1024, 2048)
            else:
                lat, bw = rng.uniform(1, 5), rng.uniform(100, 500)
            links.append(Link(f"n{a}", f"n{b}", round(float(lat), 3), round(float(bw), 1)))
    return workflow, Cluster(nodes, tuple(links))


def pipeline_throughput(
    workflow: Workflow, cluster: Cluster, assignment: Mapping[str, str]
) -> float:
    """Samples per second under the model in the module docstring."""
    live = set(cluster.node_names)
    if any(assignment.get(a) not in live for a in workflow.agent_names):
        return 0.0
    node_work = dict.fromkeys(live, 0.0)
    for agent in workflow.agents:
        node_work[assignment[agent.name]] += agent.cpu
    times = [node_work[n.name] / n.cpu for n in cluster.nodes]
    lat = cluster.latency_ms()
    bw = cluster.bandwidth_mib_s()
    link_time: dict[tuple[int, int], float] = {}
    for dep in workflow.dependencies:
        a, b = cluster.index(assignment[dep.src]), cluster.index(assignment[dep.dst])
        if a != b:
            key = (min(a, b), max(a, b))
            link_time[key] = link_time.get(key, 0.0) + lat[a][b] / 1000 + dep.data_mib / bw[a][b]
    bottleneck = max(times + list(link_time.values()))
    return 1.0 / bottleneck if bottleneck > 0 else float("inf")


__all__ = ["pipeline_throughput", "random_instance"]
