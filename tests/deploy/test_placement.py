"""Placement MILP (Eq. 11-13) against brute force, capacities, baselines, failures."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sedma_torch.deploy import (
    Agent,
    Cluster,
    Dependency,
    InfeasiblePlacementError,
    Link,
    Node,
    Workflow,
    WorkflowError,
    adaptive_lambda_mem,
    first_fit_placement,
    least_allocated_placement,
    local_search,
    optimize_placement,
    random_instance,
    replace_after_failure,
)


def _random_small(seed: int, n_agents: int, n_nodes: int, tight: float):
    """A random instance built here, independently of sedma_torch.deploy.simulate."""
    rng = np.random.default_rng(seed)
    agents = [
        Agent(f"a{i}", float(rng.integers(100, 1000)), float(rng.integers(1, 8)) / 4)
        for i in range(n_agents)
    ]
    deps = []
    for i in range(n_agents):
        for j in range(i + 1, n_agents):
            if rng.random() < 0.5:
                deps.append(Dependency(f"a{i}", f"a{j}", float(rng.uniform(0.5, 50))))
    total_mem = sum(a.memory_mib for a in agents)
    total_cpu = sum(a.cpu for a in agents)
    nodes = [
        Node(
            f"n{k}",
            max(total_mem / n_nodes / tight * rng.uniform(0.7, 1.3), 1000.0),
            max(total_cpu / n_nodes / tight * rng.uniform(0.7, 1.3), 2.0),
        )
        for k in range(n_nodes)
    ]
    links = [
        Link(f"n{a}", f"n{b}", float(rng.uniform(0.1, 5)), float(rng.uniform(50, 2000)))
        for a in range(n_nodes)
        for b in range(a + 1, n_nodes)
    ]
    return Workflow("w", tuple(agents), tuple(deps)), Cluster(tuple(nodes), tuple(links))


def _objective(workflow, cluster, assign: dict[str, str], lam: float) -> float:
    """Eq. 11-13 written out from the definition (reference for brute force)."""
    nodes = {n.name: n for n in cluster.nodes}
    links = {frozenset((lk.a, lk.b)): lk for lk in cluster.links}
    comm = 0.0
    for d in workflow.dependencies:
        a, b = assign[d.src], assign[d.dst]
        if a != b:
            lk = links[frozenset((a, b))]
            comm += lk.latency_ms + 1000.0 * d.data_mib / lk.bandwidth_mib_s
    mem = sum(ag.memory_mib / nodes[assign[ag.name]].memory_mib for ag in workflow.agents)
    return comm + lam * mem


def _fits(workflow, cluster, assign) -> bool:
    for n in cluster.nodes:
        on = [a for a in workflow.agents if assign[a.name] == n.name]
        if sum(a.memory_mib for a in on) > n.memory_mib + 1e-6:
            return False
        if sum(a.cpu for a in on) > n.cpu + 1e-6:
            return False
    return True


def _brute_force(workflow, cluster, lam):
    names = [a.name for a in workflow.agents]
    best = math.inf
    for combo in itertools.product([n.name for n in cluster.nodes], repeat=len(names)):
        assign = dict(zip(names, combo, strict=True))
        if _fits(workflow, cluster, assign):
            best = min(best, _objective(workflow, cluster, assign, lam))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_milp_objective_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n_agents, n_nodes = int(rng.integers(3, 7)), int(rng.integers(2, 4))
    lam = float(rng.choice([0.0, 5.0, 50.0]))
    workflow, cluster = _random_small(seed, n_agents, n_nodes, tight=float(rng.uniform(0.6, 0.9)))
    expected = _brute_force(workflow, cluster, lam)
    placement = optimize_placement(workflow, cluster, lam)
    assert placement.status == "optimal"
    assert _fits(workflow, cluster, placement.assignment)
    assert placement.objective == pytest.approx(expected, rel=1e-7, abs=1e-7)
    assert _objective(workflow, cluster, placement.assignment, lam) == pytest.approx(
        placement.objective, rel=1e-9
    )


@pytest.mark.parametrize("seed", range(5))
def test_capacities_never_exceeded_by_any_method(seed):
    workflow, cluster = _random_small(50 + seed, 8, 3, tight=0.85)
    assert _fits(workflow, cluster, optimize_placement(workflow, cluster, 10.0).assignment)
    for method in (first_fit_placement, least_allocated_placement):
        try:
            placement = method(workflow, cluster, 10.0)
        except InfeasiblePlacementError as exc:  # greedy may fail where the MILP packs
            assert exc.agents, method.__name__
            continue
        assert _fits(workflow, cluster, placement.assignment), method.__name__


def test_milp_never_worse_than_baselines():
    workflow, cluster = _random_small(7, 6, 3, tight=0.4)
    best = optimize_placement(workflow, cluster, 10.0).objective
    for method in (first_fit_placement, least_allocated_placement):
        assert best <= method(workflow, cluster, 10.0).objective + 1e-9


def test_least_allocated_picks_emptiest_node_by_kubernetes_score():
    cluster = Cluster((Node("big", 4000, 4), Node("small", 1000, 1)))
    workflow = Workflow("w", (Agent("x", 500, 0.5), Agent("y", 500, 0.5)))
    # x: big scores ((4-.5)/4 + (4000-500)/4000)/2*100 = 87.5, small 50 -> big.
    # y: big (3/4 + 3000/4000)/2*100 = 75, small 50 -> big.
    assert least_allocated_placement(workflow, cluster).assignment == {"x": "big", "y": "big"}
    assert first_fit_placement(workflow, cluster).assignment == {"x": "big", "y": "big"}


def test_zero_lambda_colocates_chatty_pair_when_it_fits():
    cluster = Cluster((Node("n0", 1000, 2), Node("n1", 1000, 2)), (Link("n0", "n1", 1.0, 100.0),))
    workflow = Workflow(
        "w", (Agent("a", 400, 1), Agent("b", 400, 1)), (Dependency("a", "b", 10.0),)
    )
    placement = optimize_placement(workflow, cluster, 0.0)
    assert placement.assignment["a"] == placement.assignment["b"]
    assert placement.comm_cost_ms == 0.0


def test_capacity_forces_split_and_cost_is_latency_plus_transfer():
    cluster = Cluster((Node("n0", 1000, 2), Node("n1", 1000, 2)), (Link("n0", "n1", 1.5, 100.0),))
    workflow = Workflow(
        "w", (Agent("a", 600, 1), Agent("b", 600, 1)), (Dependency("a", "b", 10.0),)
    )
    placement = optimize_placement(workflow, cluster, 0.0)
    assert placement.assignment["a"] != placement.assignment["b"]
    assert placement.comm_cost_ms == pytest.approx(1.5 + 1000 * 10.0 / 100.0)


def test_infeasible_memory_names_memory():
    cluster = Cluster((Node("n0", 1000, 8), Node("n1", 1000, 8)))
    workflow = Workflow("w", (Agent("a", 800, 1), Agent("b", 800, 1), Agent("c", 800, 1)))
    with pytest.raises(InfeasiblePlacementError, match="memory_mib") as info:
        optimize_placement(workflow, cluster)
    assert info.value.resource == "memory_mib"


def test_infeasible_cpu_of_single_agent_names_agent_and_cpu():
    cluster = Cluster((Node("n0", 1000, 2), Node("n1", 1000, 4)))
    workflow = Workflow("w", (Agent("hungry", 10, 6),))
    with pytest.raises(InfeasiblePlacementError, match=r"cpu: agent 'hungry' needs 6") as info:
        optimize_placement(workflow, cluster)
    assert info.value.resource == "cpu"


def test_infeasible_packing_names_the_resource_that_cannot_be_packed():
    # total memory fits (1200 <= 1200) but 3 x 400 MiB cannot be packed into 700 + 500.
    cluster = Cluster((Node("n0", 700, 8), Node("n1", 500, 8)))
    workflow = Workflow("w", tuple(Agent(f"a{i}", 400, 1) for i in range(3)))
    with pytest.raises(
        InfeasiblePlacementError, match="packed into the nodes by memory_mib"
    ) as info:
        optimize_placement(workflow, cluster)
    assert info.value.resource == "memory_mib"


def test_unknown_allowed_node_is_an_error():
    cluster = Cluster((Node("n0", 1000, 2),))
    workflow = Workflow("w", (Agent("a", 10, 1, allowed_nodes=("gpu-7",)),))
    with pytest.raises(WorkflowError, match="unknown node 'gpu-7'"):
        optimize_placement(workflow, cluster)


def test_allowed_nodes_are_respected():
    workflow, cluster = _random_small(3, 5, 3, tight=0.5)
    agents = list(workflow.agents)
    agents[0] = Agent(agents[0].name, agents[0].memory_mib, agents[0].cpu, ("n2",))
    workflow = Workflow("w", tuple(agents), workflow.dependencies)
    assert optimize_placement(workflow, cluster, 1.0).assignment[agents[0].name] == "n2"


@pytest.mark.parametrize("seed", range(4))
def test_node_failure_replaces_agents_within_capacity(seed):
    workflow, cluster = _random_small(200 + seed, 6, 3, tight=0.4)
    placement = optimize_placement(workflow, cluster, 5.0)
    busiest = max(
        cluster.node_names, key=lambda n: sum(1 for v in placement.assignment.values() if v == n)
    )
    remaining, new = replace_after_failure(workflow, cluster, placement, busiest)
    assert busiest not in remaining.node_names
    assert busiest not in new.assignment.values()
    assert _fits(workflow, remaining, new.assignment)
    # pinned re-placement keeps every unaffected agent where it was when that is feasible
    kept = {a: n for a, n in placement.assignment.items() if n != busiest}
    if all(new.assignment[a] == n for a, n in kept.items()):
        best_pinned = math.inf
        moved = [a for a, n in placement.assignment.items() if n == busiest]
        for combo in itertools.product(remaining.node_names, repeat=len(moved)):
            assign = {**kept, **dict(zip(moved, combo, strict=True))}
            if _fits(workflow, remaining, assign):
                best_pinned = min(best_pinned, _objective(workflow, remaining, assign, 5.0))
        assert new.objective == pytest.approx(best_pinned, rel=1e-7)


def test_node_failure_that_cannot_fit_says_which_agents():
    cluster = Cluster((Node("n0", 1000, 4), Node("n1", 1000, 4)))
    workflow = Workflow("w", (Agent("a", 900, 1), Agent("b", 900, 1)))
    placement = optimize_placement(workflow, cluster)
    lost = placement.assignment["a"]
    with pytest.raises(InfeasiblePlacementError, match=r"agents \['a'\].*do not fit"):
        replace_after_failure(workflow, cluster, placement, lost)


def test_adaptive_lambda_rule():
    assert adaptive_lambda_mem(10.0, 0.0) == 10.0
    assert adaptive_lambda_mem(10.0, 0.5) == pytest.approx(20.0)
    assert adaptive_lambda_mem(10.0, 0.9) == pytest.approx(100.0)
    assert adaptive_lambda_mem(10.0, 1.0) == pytest.approx(1000.0)  # clipped at 0.99
    with pytest.raises(ValueError, match="pressure"):
        adaptive_lambda_mem(10.0, 1.5)
    with pytest.raises(ValueError, match="base"):
        adaptive_lambda_mem(float("nan"), 0.1)


def test_negative_lambda_rejected():
    workflow, cluster = _random_small(0, 3, 2, tight=0.5)
    with pytest.raises(ValueError, match="lambda_mem"):
        optimize_placement(workflow, cluster, -1.0)


@pytest.mark.parametrize("seed", range(3))
def test_local_search_is_feasible_and_never_worse_than_its_start(seed):
    workflow, cluster = _random_small(300 + seed, 6, 3, tight=0.5)
    start = least_allocated_placement(workflow, cluster, 5.0)
    polished = local_search(workflow, cluster, start.assignment, 5.0)
    assert _fits(workflow, cluster, polished)
    assert _objective(workflow, cluster, polished, 5.0) <= start.objective + 1e-9
    assert (
        _objective(workflow, cluster, polished, 5.0) >= _brute_force(workflow, cluster, 5.0) - 1e-9
    )


def test_time_limited_solve_reports_a_valid_bound_and_gap():
    workflow, cluster = random_instance(30, 12, seed=5)
    placement = optimize_placement(workflow, cluster, 10.0, time_limit_s=1.0)
    assert placement.status == "time_limit"
    assert _fits(workflow, cluster, placement.assignment)
    assert placement.lower_bound is not None
    assert placement.lower_bound <= placement.objective + 1e-6
    expected_gap = (placement.objective - placement.lower_bound) / placement.objective
    assert placement.mip_gap == pytest.approx(max(0.0, expected_gap))
