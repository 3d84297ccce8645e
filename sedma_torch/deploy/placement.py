"""Placement of a workflow's agents on a cluster's nodes (SPEC.md Eq. 11-13).

Objective (Eq. 11)::

    placement* = argmin_p  sum_i comm_cost(p_i) + lambda_mem * sum_i memory_overhead(p_i)

- ``comm_cost(p_i) = sum_{j in deps(i)} edge_cost(i->j, p_i, p_j)`` (Eq. 12), where the
  cost of one dependency carrying ``d`` MiB per step between two *different* nodes a, b is
  the time to send it, ``latency_ms(a, b) + 1000 * d / bandwidth_mib_s(a, b)`` (ms per
  step), and 0 on the same node (Eq. 13: network_cost = 0 on the same node, else
  latency and transfer time at the link's bandwidth).
- ``memory_overhead(p_i) = memory_mib_i / memory_mib(node p_i)``: the fraction of its
  node's memory the agent takes. Summed over agents it is placement dependent (large
  agents cost less on large nodes), so ``lambda_mem`` (ms per unit of node-memory
  fraction) trades communication against spreading memory load.
- Constraints: every agent on exactly one allowed node; on each node the agents'
  memory and CPU stay within the node's capacity.

Exact solution as a mixed-integer linear program solved by HiGHS
(``scipy.optimize.milp``). Variables: binaries ``x[i, a]`` (agent i on node a) and,
for every dependency e = (i -> j), continuous ``z[e, a, b] >= 0`` with the flow
(transportation) constraints::

    sum_b z[e, a, b] = x[i, a]   for every node a
    sum_a z[e, a, b] = x[j, b]   for every node b

For integral x these force ``z[e, a, b] = x[i, a] * x[j, b]``, so the quadratic
communication term ``sum_e sum_{a,b} cost_e(a, b) x[i, a] x[j, b]`` becomes the linear
``sum cost_e(a, b) z[e, a, b]`` exactly. This is the standard product linearisation
aggregated per row and column; its LP relaxation is tighter than the plain
``y >= x_ia + x_jb - 1`` form. ``z[e, a, a]`` is fixed to 0 where the two agents of e
cannot share node a (valid for every integer solution). The LP relaxation still allows
fractional co-location, so instances much beyond the paper's 20 x 10 may stop at the
time limit: then the best of the solver's incumbent and the greedy placements, each
polished by :func:`local_search`, is returned with HiGHS's proven lower bound and the
resulting gap (``status="time_limit"``).

Memory pressure: :func:`adaptive_lambda_mem` implements ``lambda_mem = base / (1 -
pressure)`` (pressure = used / total memory in [0, 1], clipped at 0.99), so lambda
grows without bound as memory runs out (SPEC.md: lambda_mem grows with pressure).
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from .workflow import Cluster, Workflow, WorkflowError, check_compatible

RESOURCES = ("memory_mib", "cpu")
_EPS = 1e-9


class InfeasiblePlacementError(ValueError):
    """No placement satisfies the capacities; ``resource`` names what does not fit."""

    def __init__(self, message: str, resource: str, agents: list[str] | None = None) -> None:
        super().__init__(message)
        self.resource = resource
        """``"memory_mib"``, ``"cpu"``, ``"memory_mib+cpu"`` or ``"allowed_nodes"``."""
        self.agents = agents or []
        """Agents that could not be placed (when known)."""


@dataclass(frozen=True)
class Placement:
    """A placement and its cost.

    ``objective = comm_cost_ms + lambda_mem * memory_overhead`` (Eq. 11).
    """

    assignment: dict[str, str]
    """Agent name -> node name."""
    comm_cost_ms: float
    """Communication cost, ms per step (Eq. 12-13)."""
    memory_overhead: float
    """Sum over agents of agent memory / node memory (dimensionless)."""
    lambda_mem: float
    """Weight of the memory term, ms per unit of node-memory fraction."""
    method: str
    """``"milp"``, ``"first_fit"``, ``"least_allocated"``, or after a time limit
    ``"milp_time_limit:<start>+local_search"`` naming the incumbent that won."""
    status: str
    """``"optimal"``, ``"time_limit"`` (best found, see ``mip_gap``) or ``"heuristic"``."""
    mip_gap: float | None = None
    """Relative gap (objective - bound) / objective reported by HiGHS; 0 when optimal."""
    lower_bound: float | None = None
    """Proven lower bound on the optimal objective (MILP only)."""
    solve_seconds: float = 0.0

    @property
    def objective(self) -> float:
        return self.comm_cost_ms + self.lambda_mem * self.memory_overhead


def adaptive_lambda_mem(base: float, pressure: float, *, max_pressure: float = 0.99) -> float:
    """``base / (1 - min(pressure, max_pressure))``: the memory weight under memory pressure.

    ``pressure`` is the used fraction of memory in [0, 1] (e.g. psutil's
    ``virtual_memory().percent / 100``, or requested / allocatable over the cluster).
    At no pressure lambda equals ``base``; at 50 % it doubles; at 90 % it is 10x.
    """
    if isinstance(base, bool) or not isinstance(base, int | float) or not math.isfinite(base):
        raise ValueError(f"base must be a finite number, got {base!r}")
    if base < 0:
        raise ValueError(f"base must be >= 0, got {base}")
    if not isinstance(pressure, int | float) or not 0.0 <= pressure <= 1.0:
        raise ValueError(f"pressure must be a fraction in [0, 1], got {pressure!r}")
    if not 0.0 <= max_pressure < 1.0:
        raise ValueError(f"max_pressure must be in [0, 1), got {max_pressure}")
    return float(base) / (1.0 - min(float(pressure), max_pressure))


def edge_costs(workflow: Workflow, cluster: Cluster) -> np.ndarray:
    """(dependencies, nodes, nodes) cost in ms of each dependency for each node pair."""
    lat = np.asarray(cluster.latency_ms(), dtype=np.float64)
    inv_bw = 1000.0 / np.asarray(cluster.bandwidth_mib_s(), dtype=np.float64)  # ms per MiB
    data = np.array([d.data_mib for d in workflow.dependencies], dtype=np.float64)
    costs = lat[None] + data[:, None, None] * inv_bw[None]
    n = len(cluster.nodes)
    costs[:, np.arange(n), np.arange(n)] = 0.0
    return costs


def memory_overhead_matrix(workflow: Workflow, cluster: Cluster) -> np.ndarray:
    """(agents, nodes) agent memory / node memory."""
    mem = np.array([a.memory_mib for a in workflow.agents], dtype=np.float64)
    cap = np.array([n.memory_mib for n in cluster.nodes], dtype=np.float64)
    return mem[:, None] / cap[None, :]


def placement_cost(
    workflow: Workflow, cluster: Cluster, assignment: Mapping[str, str]
) -> tuple[float, float]:
    """(comm_cost_ms, memory_overhead) of a complete assignment, evaluated directly."""
    _check_assignment(workflow, cluster, assignment)
    lat = cluster.latency_ms()
    bw = cluster.bandwidth_mib_s()
    comm = 0.0
    for dep in workflow.dependencies:
        a, b = cluster.index(assignment[dep.src]), cluster.index(assignment[dep.dst])
        if a != b:
            comm += lat[a][b] + 1000.0 * dep.data_mib / bw[a][b]
    overhead = sum(
        agent.memory_mib / cluster.nodes[cluster.index(assignment[agent.name])].memory_mib
        for agent in workflow.agents
    )
    return comm, overhead


def node_usage(
    workflow: Workflow, cluster: Cluster, assignment: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Per node: used and capacity of memory_mib and cpu."""
    usage = {
        n.name: {"memory_mib": 0.0, "cpu": 0.0, "memory_mib_cap": n.memory_mib, "cpu_cap": n.cpu}
        for n in cluster.nodes
    }
    for agent in workflow.agents:
        usage[assignment[agent.name]]["memory_mib"] += agent.memory_mib
        usage[assignment[agent.name]]["cpu"] += agent.cpu
    return usage


def check_capacity(workflow: Workflow, cluster: Cluster, assignment: Mapping[str, str]) -> None:
    """Raise :class:`InfeasiblePlacementError` when a node's memory or CPU is exceeded."""
    _check_assignment(workflow, cluster, assignment)
    for node, use in node_usage(workflow, cluster, assignment).items():
        for res in RESOURCES:
            if use[res] > use[f"{res}_cap"] * (1 + 1e-9) + _EPS:
                raise InfeasiblePlacementError(
                    f"node {node!r} {res}: placed agents need {use[res]:g}, capacity "
                    f"{use[f'{res}_cap']:g}",
                    res,
                )


def optimize_placement(
    workflow: Workflow,
    cluster: Cluster,
    lambda_mem: float = 0.0,
    *,
    fixed: Mapping[str, str] | None = None,
    time_limit_s: float | None = 60.0,
    mip_rel_gap: float = 0.0,
) -> Placement:
    """Solve Eq. 11-13 exactly (MILP, HiGHS) under node memory and CPU capacities.

    ``fixed`` pins agents to nodes (used to re-place only a failed node's agents).
    ``time_limit_s`` bounds the solve; if it is hit, the best placement found is
    returned with ``status="time_limit"`` and its ``mip_gap``. Raises
    :class:`InfeasiblePlacementError` naming the resource that does not fit.
    """
    if not isinstance(lambda_mem, int | float) or not math.isfinite(lambda_mem) or lambda_mem < 0:
        raise ValueError(f"lambda_mem must be a finite number >= 0, got {lambda_mem!r}")
    check_compatible(workflow, cluster)
    allowed = _allowed_matrix(workflow, cluster, fixed)
    _precheck(workflow, cluster, allowed)

    n_agents, n_nodes = len(workflow.agents), len(cluster.nodes)
    n_deps = len(workflow.dependencies)
    nx = n_agents * n_nodes
    nz = n_deps * n_nodes * n_nodes
    costs = edge_costs(workflow, cluster)
    c = np.concatenate(
        [lambda_mem * memory_overhead_matrix(workflow, cluster).ravel(), costs.ravel()]
    )
    upper = np.concatenate([allowed.ravel().astype(np.float64), _pair_bounds(workflow, cluster)])
    integrality = np.concatenate([np.ones(nx), np.zeros(nz)])

    constraints = [_assignment_rows(n_agents, n_nodes, nx + nz)]
    constraints += _capacity_rows(workflow, cluster, nx + nz)
    if n_deps:
        constraints.append(_flow_rows(workflow, n_nodes, nx, nz))

    options: dict[str, float | bool] = {"disp": False, "mip_rel_gap": mip_rel_gap}
    if time_limit_s is not None:
        options["time_limit"] = float(time_limit_s)
    start = time.perf_counter()
    res = milp(
        c,
        integrality=integrality,
        bounds=Bounds(np.zeros(nx + nz), upper),
        constraints=constraints,
        options=options,
    )
    elapsed = time.perf_counter() - start
    if res.status == 2 or (res.x is None and res.status != 1):
        raise _explain_infeasible(workflow, cluster, allowed)
    optimal = res.status == 0
    bound = getattr(res, "mip_dual_bound", None)
    starts: dict[str, dict[str, str]] = {}
    if res.x is not None:
        chosen = np.argmax(res.x[:nx].reshape(n_agents, n_nodes), axis=1)
        starts["milp"] = {
            a.name: cluster.nodes[int(k)].name for a, k in zip(workflow.agents, chosen, strict=True)
        }
        check_capacity(workflow, cluster, starts["milp"])
    if not optimal:
        # Time limit: HiGHS in SciPy takes no start solution, so polish its incumbent
        # (if any) and the greedy placements (all feasible) by local search and keep the
        # best; HiGHS's dual bound stays valid, so the gap below is honest for the winner.
        for name in ("first_fit", "least_allocated"):
            try:
                starts[name] = _greedy(workflow, cluster, lambda_mem, name, allowed).assignment
            except InfeasiblePlacementError:
                continue
        starts = {
            f"{name}+local_search": local_search(workflow, cluster, a, lambda_mem, allowed)
            for name, a in starts.items()
        }
    if not starts:
        raise TimeoutError(
            f"no feasible placement found within time_limit_s={time_limit_s} "
            f"({n_agents} agents x {n_nodes} nodes) and the greedy placements fail; raise the limit"
        )
    scored = {name: placement_cost(workflow, cluster, a) for name, a in starts.items()}
    name = min(scored, key=lambda n: scored[n][0] + lambda_mem * scored[n][1])
    assignment = starts[name]
    comm, overhead = scored[name]
    method = "milp" if optimal else f"milp_time_limit:{name}"
    objective = comm + lambda_mem * overhead
    if optimal:
        gap = 0.0
    elif bound is not None and objective > 0:
        gap = max(0.0, (objective - float(bound)) / abs(objective))
    else:
        gap = None
    return Placement(
        assignment=assignment,
        comm_cost_ms=comm,
        memory_overhead=overhead,
        lambda_mem=float(lambda_mem),
        method=method,
        status="optimal" if optimal else "time_limit",
        mip_gap=gap,
        lower_bound=float(bound) if bound is not None else None,
        solve_seconds=elapsed,
    )


def first_fit_placement(workflow: Workflow, cluster: Cluster, lambda_mem: float = 0.0) -> Placement:
    """Greedy baseline: each agent (workflow order) on the first node with room."""
    check_compatible(workflow, cluster)
    return _greedy(
        workflow, cluster, lambda_mem, "first_fit", _allowed_matrix(workflow, cluster, None)
    )


def least_allocated_placement(
    workflow: Workflow, cluster: Cluster, lambda_mem: float = 0.0
) -> Placement:
    """Kubernetes-style baseline (NodeResourcesFit, ``LeastAllocated`` strategy).

    Agents are scheduled one by one in workflow order; each feasible node is scored
    ``mean over (cpu, memory) of (capacity - requested_after) / capacity * 100`` and the
    highest score wins (ties: first node), as kube-scheduler's LeastAllocated scoring
    with equal resource weights. It ignores communication, like the scheduler.
    """
    check_compatible(workflow, cluster)
    allowed = _allowed_matrix(workflow, cluster, None)
    return _greedy(workflow, cluster, lambda_mem, "least_allocated", allowed)


def replace_after_failure(
    workflow: Workflow,
    cluster: Cluster,
    placement: Placement,
    failed_node: str,
    *,
    lambda_mem: float | None = None,
    move_others: bool | None = None,
    time_limit_s: float | None = 60.0,
) -> tuple[Cluster, Placement]:
    """Re-place the agents of ``failed_node`` on the remaining nodes.

    ``move_others=False`` keeps every other agent where it is and places only the
    displaced ones (optimally, given the rest); ``True`` re-solves everything; ``None``
    (default) tries the first and falls back to the second. Returns the reduced
    cluster and the new placement, or raises :class:`InfeasiblePlacementError` saying
    which displaced agents no longer fit and which resource is short.
    """
    remaining = cluster.without_node(failed_node)
    lam = placement.lambda_mem if lambda_mem is None else lambda_mem
    displaced = [a for a, n in placement.assignment.items() if n == failed_node]
    pinned = {a: n for a, n in placement.assignment.items() if n != failed_node}
    attempts = [False, True] if move_others is None else [bool(move_others)]
    error: InfeasiblePlacementError | None = None
    for move in attempts:
        try:
            new = optimize_placement(
                workflow,
                remaining,
                lam,
                fixed=None if move else pinned,
                time_limit_s=time_limit_s,
            )
            return remaining, new
        except InfeasiblePlacementError as exc:
            error = exc
    assert error is not None
    need = {res: sum(getattr(workflow.agent(a), res) for a in displaced) for res in RESOURCES}
    raise InfeasiblePlacementError(
        f"after node {failed_node!r} failed, its agents {displaced} (memory_mib "
        f"{need['memory_mib']:g}, cpu {need['cpu']:g}) do not fit on the remaining nodes: "
        f"{error}",
        error.resource,
        displaced,
    ) from error


def local_search(
    workflow: Workflow,
    cluster: Cluster,
    assignment: Mapping[str, str],
    lambda_mem: float,
    allowed: np.ndarray | None = None,
    *,
    max_passes: int = 50,
) -> dict[str, str]:
    """Best-improvement single-agent moves from a feasible ``assignment`` until none helps.

    Each pass evaluates, for every agent, its objective contribution on every node it
    fits on (others fixed; vectorised over nodes) and applies the best improving move.
    Used to polish incumbents when the MILP stops at its time limit.
    """
    if allowed is None:
        allowed = _allowed_matrix(workflow, cluster, None)
    names = workflow.agent_names
    index = {n: i for i, n in enumerate(names)}
    node_index = {n: k for k, n in enumerate(cluster.node_names)}
    place = np.array([node_index[assignment[n]] for n in names])
    costs = edge_costs(workflow, cluster)
    overhead = lambda_mem * memory_overhead_matrix(workflow, cluster)
    src = np.array([index[d.src] for d in workflow.dependencies], dtype=int)
    dst = np.array([index[d.dst] for d in workflow.dependencies], dtype=int)
    need = {r: np.array([getattr(a, r) for a in workflow.agents]) for r in RESOURCES}
    cap = {r: np.array([getattr(n, r) for n in cluster.nodes]) for r in RESOURCES}
    used = {r: np.bincount(place, weights=need[r], minlength=len(cluster.nodes)) for r in RESOURCES}
    out_edges = [np.flatnonzero(src == i) for i in range(len(names))]
    in_edges = [np.flatnonzero(dst == i) for i in range(len(names))]
    for _ in range(max_passes):
        improved = False
        for i in range(len(names)):
            here = place[i]
            contrib = overhead[i].copy()
            for e in out_edges[i]:
                contrib += costs[e, :, place[dst[e]]]
            for e in in_edges[i]:
                contrib += costs[e, place[src[e]], :]
            fits = allowed[i].copy()
            for r in RESOURCES:
                room = cap[r] * (1 + 1e-9) + _EPS - used[r]
                room[here] += need[r][i]
                fits &= need[r][i] <= room
            contrib[~fits] = np.inf
            target = int(np.argmin(contrib))
            if contrib[target] < contrib[here] - 1e-9:
                for r in RESOURCES:
                    used[r][here] -= need[r][i]
                    used[r][target] += need[r][i]
                place[i] = target
                improved = True
        if not improved:
            break
    return {n: cluster.nodes[int(k)].name for n, k in zip(names, place, strict=True)}


def _check_assignment(workflow: Workflow, cluster: Cluster, assignment: Mapping[str, str]) -> None:
    missing = [a for a in workflow.agent_names if a not in assignment]
    if missing:
        raise WorkflowError(f"assignment misses agents {missing}")
    extra = sorted(set(assignment) - set(workflow.agent_names))
    if extra:
        raise WorkflowError(f"assignment names unknown agents {extra}")
    for agent, node in assignment.items():
        try:
            cluster.index(node)
        except WorkflowError as exc:
            raise WorkflowError(f"agent {agent!r}: {exc}") from None


def _allowed_matrix(
    workflow: Workflow, cluster: Cluster, fixed: Mapping[str, str] | None
) -> np.ndarray:
    allowed = np.ones((len(workflow.agents), len(cluster.nodes)), dtype=bool)
    for i, agent in enumerate(workflow.agents):
        if agent.allowed_nodes is not None:
            allowed[i] = False
            for node in agent.allowed_nodes:
                allowed[i, cluster.index(node)] = True
    for agent_name, node in (fixed or {}).items():
        i = workflow.agent_names.index(workflow.agent(agent_name).name)
        k = cluster.index(node)
        if not allowed[i, k]:
            raise InfeasiblePlacementError(
                f"agent {agent_name!r} is fixed to node {node!r}, which its allowed_nodes exclude",
                "allowed_nodes",
                [agent_name],
            )
        allowed[i] = False
        allowed[i, k] = True
    return allowed


def _precheck(workflow: Workflow, cluster: Cluster, allowed: np.ndarray) -> None:
    """Cheap necessary conditions, each with a message naming the resource."""
    for res in RESOURCES:
        total_need = sum(getattr(a, res) for a in workflow.agents)
        total_cap = sum(getattr(n, res) for n in cluster.nodes)
        if total_need > total_cap * (1 + 1e-9) + _EPS:
            raise InfeasiblePlacementError(
                f"{res}: the agents need {total_need:g} in total but the cluster has "
                f"{total_cap:g} ({len(cluster.nodes)} nodes)",
                res,
                workflow.agent_names,
            )
    for i, agent in enumerate(workflow.agents):
        candidates = [cluster.nodes[k] for k in np.flatnonzero(allowed[i])]
        if not candidates:
            raise InfeasiblePlacementError(
                f"agent {agent.name!r} has no allowed node", "allowed_nodes", [agent.name]
            )
        for res in RESOURCES:
            need = getattr(agent, res)
            biggest = max(candidates, key=operator.attrgetter(res))
            if need > getattr(biggest, res) * (1 + 1e-9) + _EPS:
                raise InfeasiblePlacementError(
                    f"{res}: agent {agent.name!r} needs {need:g} but the largest node it may "
                    f"use, {biggest.name!r}, has {getattr(biggest, res):g}",
                    res,
                    [agent.name],
                )


def _explain_infeasible(
    workflow: Workflow, cluster: Cluster, allowed: np.ndarray
) -> InfeasiblePlacementError:
    """Find which resource makes packing impossible by solving with one resource at a time."""
    short = [res for res in RESOURCES if not _packable(workflow, cluster, allowed, [res])]
    resource = "+".join(short) if short else "memory_mib+cpu"
    detail = {
        res: (
            sum(getattr(a, res) for a in workflow.agents),
            sum(getattr(n, res) for n in cluster.nodes),
        )
        for res in RESOURCES
    }
    if not short:
        why = "memory and CPU fit separately but not together"
    else:
        why = "the agents cannot be packed into the nodes by " + " and ".join(short)
    return InfeasiblePlacementError(
        f"no placement fits: {why} (need/capacity: "
        + ", ".join(f"{r} {need:g}/{cap:g}" for r, (need, cap) in detail.items())
        + ")",
        resource,
        workflow.agent_names,
    )


def _packable(
    workflow: Workflow, cluster: Cluster, allowed: np.ndarray, resources: list[str]
) -> bool:
    n_agents, n_nodes = allowed.shape
    nx = n_agents * n_nodes
    constraints = [_assignment_rows(n_agents, n_nodes, nx)]
    constraints += _capacity_rows(workflow, cluster, nx, resources)
    res = milp(
        np.zeros(nx),
        integrality=np.ones(nx),
        bounds=Bounds(np.zeros(nx), allowed.ravel().astype(np.float64)),
        constraints=constraints,
        options={"disp": False, "time_limit": 30.0},
    )
    return res.status != 2


def _pair_bounds(workflow: Workflow, cluster: Cluster) -> np.ndarray:
    """Upper bounds of z[e, a, b]: 1, except 0 on a == b when the two agents of e cannot
    share node a (their memory or CPU together exceeds it). Valid for every integer
    solution and it removes fractional co-location from the LP relaxation."""
    index = {name: i for i, name in enumerate(workflow.agent_names)}
    n_nodes = len(cluster.nodes)
    upper = np.ones((len(workflow.dependencies), n_nodes, n_nodes))
    for res in RESOURCES:
        need = np.array([getattr(a, res) for a in workflow.agents])
        cap = np.array([getattr(n, res) for n in cluster.nodes])
        for e, dep in enumerate(workflow.dependencies):
            pair = need[index[dep.src]] + need[index[dep.dst]]
            too_big = pair > cap * (1 + 1e-9) + _EPS
            upper[e, too_big, too_big] = 0.0
    return upper.ravel()


def _assignment_rows(n_agents: int, n_nodes: int, width: int) -> LinearConstraint:
    rows = np.repeat(np.arange(n_agents), n_nodes)
    cols = np.arange(n_agents * n_nodes)
    a = sparse.csr_array((np.ones(cols.size), (rows, cols)), shape=(n_agents, width))
    return LinearConstraint(a, np.ones(n_agents), np.ones(n_agents))


def _capacity_rows(
    workflow: Workflow, cluster: Cluster, width: int, resources: list[str] | None = None
) -> list[LinearConstraint]:
    n_agents, n_nodes = len(workflow.agents), len(cluster.nodes)
    out = []
    for res in resources or list(RESOURCES):
        need = np.array([getattr(a, res) for a in workflow.agents], dtype=np.float64)
        cap = np.array([getattr(n, res) for n in cluster.nodes], dtype=np.float64)
        rows = np.tile(np.arange(n_nodes), n_agents)
        cols = np.arange(n_agents * n_nodes)
        vals = np.repeat(need, n_nodes)
        a = sparse.csr_array((vals, (rows, cols)), shape=(n_nodes, width))
        out.append(LinearConstraint(a, -np.inf, cap * (1 + 1e-9) + _EPS))
    return out


def _flow_rows(workflow: Workflow, n_nodes: int, nx: int, nz: int) -> LinearConstraint:
    """sum_b z[e,a,b] - x[i,a] = 0 and sum_a z[e,a,b] - x[j,b] = 0 for every e, a, b."""
    index = {name: i for i, name in enumerate(workflow.agent_names)}
    n_deps = len(workflow.dependencies)
    nn = n_nodes * n_nodes
    e = np.arange(n_deps)
    a_idx, b_idx = np.meshgrid(np.arange(n_nodes), np.arange(n_nodes), indexing="ij")
    z_col = nx + e[:, None, None] * nn + a_idx[None] * n_nodes + b_idx[None]  # (E, N, N)
    out_row = e[:, None, None] * 2 * n_nodes + a_idx[None]
    in_row = e[:, None, None] * 2 * n_nodes + n_nodes + b_idx[None]
    src = np.array([index[d.src] for d in workflow.dependencies])
    dst = np.array([index[d.dst] for d in workflow.dependencies])
    node = np.arange(n_nodes)
    x_out_col = (src[:, None] * n_nodes + node[None]).ravel()
    x_in_col = (dst[:, None] * n_nodes + node[None]).ravel()
    x_out_row = (e[:, None] * 2 * n_nodes + node[None]).ravel()
    x_in_row = (e[:, None] * 2 * n_nodes + n_nodes + node[None]).ravel()
    rows = np.concatenate([out_row.ravel(), in_row.ravel(), x_out_row, x_in_row])
    cols = np.concatenate([z_col.ravel(), z_col.ravel(), x_out_col, x_in_col])
    vals = np.concatenate([np.ones(2 * nz), -np.ones(2 * n_deps * n_nodes)])
    n_rows = 2 * n_deps * n_nodes
    a = sparse.csr_array((vals, (rows, cols)), shape=(n_rows, nx + nz))
    return LinearConstraint(a, np.zeros(n_rows), np.zeros(n_rows))


def _greedy(
    workflow: Workflow, cluster: Cluster, lambda_mem: float, method: str, allowed: np.ndarray
) -> Placement:
    _precheck(workflow, cluster, allowed)
    start = time.perf_counter()
    used = {n.name: {"memory_mib": 0.0, "cpu": 0.0} for n in cluster.nodes}
    assignment: dict[str, str] = {}
    for i, agent in enumerate(workflow.agents):
        best: tuple[float, str] | None = None
        for k, node in enumerate(cluster.nodes):
            if not allowed[i, k]:
                continue
            after = {res: used[node.name][res] + getattr(agent, res) for res in RESOURCES}
            if any(after[r] > getattr(node, r) * (1 + 1e-9) + _EPS for r in RESOURCES):
                continue
            if method == "first_fit":
                best = (0.0, node.name)
                break
            score = np.mean(
                [(getattr(node, r) - after[r]) / getattr(node, r) * 100 for r in RESOURCES]
            )
            if best is None or score > best[0]:
                best = (float(score), node.name)
        if best is None:
            short = [
                r
                for r in RESOURCES
                if not any(
                    used[n.name][r] + getattr(agent, r) <= getattr(n, r) * (1 + 1e-9) + _EPS
                    for k, n in enumerate(cluster.nodes)
                    if allowed[i, k]
                )
            ]
            raise InfeasiblePlacementError(
                f"{method}: agent {agent.name!r} (memory_mib {agent.memory_mib:g}, cpu "
                f"{agent.cpu:g}) fits on no node after placing {len(assignment)} agents "
                f"(short of {'+'.join(short) or 'memory_mib and cpu on the same node'})",
                "+".join(short) or "memory_mib+cpu",
                [agent.name],
            )
        assignment[agent.name] = best[1]
        for res in RESOURCES:
            used[best[1]][res] += getattr(agent, res)
    comm, overhead = placement_cost(workflow, cluster, assignment)
    return Placement(
        assignment=assignment,
        comm_cost_ms=comm,
        memory_overhead=overhead,
        lambda_mem=float(lambda_mem),
        method=method,
        status="heuristic",
        solve_seconds=time.perf_counter() - start,
    )


__all__ = [
    "InfeasiblePlacementError",
    "Placement",
    "adaptive_lambda_mem",
    "check_capacity",
    "edge_costs",
    "first_fit_placement",
    "least_allocated_placement",
    "local_search",
    "memory_overhead_matrix",
    "node_usage",
    "optimize_placement",
    "placement_cost",
    "replace_after_failure",
]
