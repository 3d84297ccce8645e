"""Workflow and cluster descriptions for placement (SPEC.md layer 3).

A *workflow* is a set of agents (modules, pipeline stages, services) with memory and
CPU needs and the data volume each dependent pair exchanges per step. A *cluster* is
a set of nodes with memory and CPU capacity and the latency and bandwidth between
every pair of nodes. Both load from and dump to plain dicts / YAML (the Hydra
``deploy`` group), and :func:`workflow_from_model` builds a workflow from a PyTorch
model by measuring activation sizes with forward hooks.

Units everywhere: memory and data in MiB (2**20 bytes), CPU in cores, latency in
milliseconds, bandwidth in MiB/s.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

MIB = 2**20
"""Bytes per MiB."""


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
"""A Kubernetes label value (non-empty is checked separately)."""


class WorkflowError(ValueError):
    """A workflow or cluster description is invalid (the message names the field)."""


MAX_MEMORY_MIB = 2.0**43
"""Largest memory accepted, MiB (8 EiB: Kubernetes quantities are int64 bytes)."""
MAX_CPU = 2.0**53 / 1000
"""Largest CPU count accepted (millicores must stay exact integers)."""


def _finite_number(
    value: Any, what: str, *, positive: bool = False, maximum: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WorkflowError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise WorkflowError(f"{what} must be finite, got {value}")
    if maximum is not None and value > maximum:
        raise WorkflowError(f"{what} must be at most {maximum:g}, got {value:g}")
    if positive and value <= 0:
        raise WorkflowError(f"{what} must be > 0, got {value}")
    if value < 0:
        raise WorkflowError(f"{what} must be >= 0, got {value}")
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise WorkflowError(f"{what} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class Agent:
    """One placeable unit of work (a module, a pipeline stage, a service)."""

    name: str
    """Unique name within the workflow."""
    memory_mib: float
    """Memory the agent needs on its node, MiB, >= 0."""
    cpu: float
    """CPU the agent needs, cores, >= 0 (fractions allowed, e.g. 0.25)."""
    allowed_nodes: tuple[str, ...] | None = None
    """Nodes the agent may run on; ``None`` allows every node of the cluster."""

    def __post_init__(self) -> None:
        _name(self.name, "agent name")
        object.__setattr__(
            self,
            "memory_mib",
            _finite_number(
                self.memory_mib, f"agent {self.name!r} memory_mib", maximum=MAX_MEMORY_MIB
            ),
        )
        object.__setattr__(
            self, "cpu", _finite_number(self.cpu, f"agent {self.name!r} cpu", maximum=MAX_CPU)
        )
        if self.allowed_nodes is not None:
            nodes = tuple(self.allowed_nodes)
            if not nodes:
                raise WorkflowError(f"agent {self.name!r} allowed_nodes is empty")
            for node in nodes:
                _name(node, f"agent {self.name!r} allowed_nodes entry")
            object.__setattr__(self, "allowed_nodes", nodes)


@dataclass(frozen=True)
class Dependency:
    """``dst`` consumes ``data_mib`` MiB per step produced by ``src``."""

    src: str
    dst: str
    data_mib: float
    """Data volume sent from ``src`` to ``dst`` per step, MiB, >= 0."""

    def __post_init__(self) -> None:
        _name(self.src, "dependency src")
        _name(self.dst, "dependency dst")
        if self.src == self.dst:
            raise WorkflowError(f"dependency {self.src!r} -> {self.dst!r} is a self-loop")
        object.__setattr__(
            self,
            "data_mib",
            _finite_number(self.data_mib, f"dependency {self.src!r}->{self.dst!r} data_mib"),
        )


@dataclass(frozen=True)
class Workflow:
    """Agents and the data dependencies between them.

    With ``acyclic=True`` (the default) the dependencies must form a DAG and a cycle
    is an error that names it; a workflow whose agents talk both ways sets
    ``acyclic=False``.
    """

    name: str
    agents: tuple[Agent, ...]
    dependencies: tuple[Dependency, ...] = ()
    acyclic: bool = True

    def __post_init__(self) -> None:
        _name(self.name, "workflow name")
        object.__setattr__(self, "agents", tuple(self.agents))
        object.__setattr__(self, "dependencies", tuple(self.dependencies))
        if not self.agents:
            raise WorkflowError(f"workflow {self.name!r} has no agents")
        names = [a.name for a in self.agents]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise WorkflowError(f"workflow {self.name!r} has duplicate agent names {duplicates}")
        known = set(names)
        for dep in self.dependencies:
            for end in (dep.src, dep.dst):
                if end not in known:
                    raise WorkflowError(
                        f"dependency {dep.src!r} -> {dep.dst!r} names unknown agent {end!r}; "
                        f"agents are {names}"
                    )
        if self.acyclic:
            cycle = _find_cycle(names, [(d.src, d.dst) for d in self.dependencies])
            if cycle:
                raise WorkflowError(
                    f"workflow {self.name!r} has a dependency cycle "
                    f"{' -> '.join(cycle)} but acyclic=True (set acyclic: false to allow it)"
                )

    @property
    def agent_names(self) -> list[str]:
        return [a.name for a in self.agents]

    def agent(self, name: str) -> Agent:
        for a in self.agents:
            if a.name == name:
                return a
        raise KeyError(f"unknown agent {name!r}; agents are {self.agent_names}")

    def to_dict(self) -> dict[str, Any]:
        agents = []
        for a in self.agents:
            entry: dict[str, Any] = {"name": a.name, "memory_mib": a.memory_mib, "cpu": a.cpu}
            if a.allowed_nodes is not None:
                entry["allowed_nodes"] = list(a.allowed_nodes)
            agents.append(entry)
        return {
            "name": self.name,
            "acyclic": self.acyclic,
            "agents": agents,
            "dependencies": [
                {"src": d.src, "dst": d.dst, "data_mib": d.data_mib} for d in self.dependencies
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workflow:
        data = _plain(data)
        if not isinstance(data, dict):
            raise WorkflowError(f"workflow must be a mapping, got {type(data).__name__}")
        _reject_unknown(data, {"name", "acyclic", "agents", "dependencies"}, "workflow")
        agents = []
        for i, entry in enumerate(data.get("agents") or []):
            if not isinstance(entry, dict):
                raise WorkflowError(f"workflow agents[{i}] must be a mapping, got {entry!r}")
            _reject_unknown(
                entry, {"name", "memory_mib", "cpu", "allowed_nodes"}, f"workflow agents[{i}]"
            )
            _require(entry, ("name", "memory_mib", "cpu"), f"workflow agents[{i}]")
            allowed = entry.get("allowed_nodes")
            agents.append(
                Agent(
                    entry["name"],
                    entry["memory_mib"],
                    entry["cpu"],
                    tuple(allowed) if allowed is not None else None,
                )
            )
        deps = []
        for i, entry in enumerate(data.get("dependencies") or []):
            if not isinstance(entry, dict):
                raise WorkflowError(f"workflow dependencies[{i}] must be a mapping, got {entry!r}")
            _reject_unknown(entry, {"src", "dst", "data_mib"}, f"workflow dependencies[{i}]")
            _require(entry, ("src", "dst", "data_mib"), f"workflow dependencies[{i}]")
            deps.append(Dependency(entry["src"], entry["dst"], entry["data_mib"]))
        return cls(
            name=data.get("name", "workflow"),
            agents=tuple(agents),
            dependencies=tuple(deps),
            acyclic=bool(data.get("acyclic", True)),
        )


@dataclass(frozen=True)
class Node:
    """One machine of the cluster."""

    name: str
    """Unique node name; also its ``kubernetes.io/hostname`` label unless ``hostname``."""
    memory_mib: float
    """Allocatable memory, MiB, > 0."""
    cpu: float
    """Allocatable CPU, cores, > 0."""
    hostname: str | None = None
    """Value of the node's ``kubernetes.io/hostname`` label when it differs from ``name``."""

    def __post_init__(self) -> None:
        _name(self.name, "node name")
        object.__setattr__(
            self,
            "memory_mib",
            _finite_number(
                self.memory_mib,
                f"node {self.name!r} memory_mib",
                positive=True,
                maximum=MAX_MEMORY_MIB,
            ),
        )
        object.__setattr__(
            self,
            "cpu",
            _finite_number(self.cpu, f"node {self.name!r} cpu", positive=True, maximum=MAX_CPU),
        )
        if self.hostname is not None:
            _name(self.hostname, f"node {self.name!r} hostname")
        label = self.host_label
        if len(label) > 63 or not _LABEL_VALUE.match(label):
            what = "hostname" if self.hostname is not None else "name"
            raise WorkflowError(
                f"node {what} {label!r} is not a valid kubernetes.io/hostname label value (at "
                "most 63 characters: alphanumerics, '-', '_', '.', starting and ending "
                "alphanumeric); rename the node or give its real host name as `hostname:`"
            )

    @property
    def host_label(self) -> str:
        return self.hostname or self.name


@dataclass(frozen=True)
class Link:
    """Network between two nodes (symmetric)."""

    a: str
    b: str
    latency_ms: float
    """One-way latency per message, ms, >= 0."""
    bandwidth_mib_s: float
    """Bandwidth, MiB/s, > 0."""

    def __post_init__(self) -> None:
        _name(self.a, "link a")
        _name(self.b, "link b")
        if self.a == self.b:
            raise WorkflowError(f"link {self.a!r} -> {self.b!r} joins a node to itself")
        object.__setattr__(
            self, "latency_ms", _finite_number(self.latency_ms, f"link {self.a}-{self.b} latency")
        )
        object.__setattr__(
            self,
            "bandwidth_mib_s",
            _finite_number(
                self.bandwidth_mib_s, f"link {self.a}-{self.b} bandwidth_mib_s", positive=True
            ),
        )


@dataclass(frozen=True)
class Cluster:
    """Nodes and the network between them.

    Pairs without an explicit :class:`Link` use ``default_latency_ms`` and
    ``default_bandwidth_mib_s``.
    """

    nodes: tuple[Node, ...]
    links: tuple[Link, ...] = ()
    default_latency_ms: float = 0.5
    default_bandwidth_mib_s: float = 1000.0
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "links", tuple(self.links))
        if not self.nodes:
            raise WorkflowError("cluster has no nodes")
        names = [n.name for n in self.nodes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise WorkflowError(f"cluster has duplicate node names {duplicates}")
        self._index.update({n: i for i, n in enumerate(names)})
        seen = set()
        for link in self.links:
            for end in (link.a, link.b):
                if end not in self._index:
                    raise WorkflowError(
                        f"link {link.a!r}-{link.b!r} names unknown node {end!r}; nodes are {names}"
                    )
            key = frozenset((link.a, link.b))
            if key in seen:
                raise WorkflowError(f"link {link.a!r}-{link.b!r} is given twice")
            seen.add(key)
        object.__setattr__(
            self,
            "default_latency_ms",
            _finite_number(self.default_latency_ms, "cluster default_latency_ms"),
        )
        object.__setattr__(
            self,
            "default_bandwidth_mib_s",
            _finite_number(
                self.default_bandwidth_mib_s, "cluster default_bandwidth_mib_s", positive=True
            ),
        )

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def index(self, node: str) -> int:
        if node not in self._index:
            raise WorkflowError(f"unknown node {node!r}; nodes are {self.node_names}")
        return self._index[node]

    def latency_ms(self) -> list[list[float]]:
        """(nodes, nodes) latency in ms, 0 on the diagonal."""
        n = len(self.nodes)
        lat = [[0.0 if a == b else self.default_latency_ms for b in range(n)] for a in range(n)]
        for link in self.links:
            i, j = self._index[link.a], self._index[link.b]
            lat[i][j] = lat[j][i] = link.latency_ms
        return lat

    def bandwidth_mib_s(self) -> list[list[float]]:
        """(nodes, nodes) bandwidth in MiB/s (``inf`` on the diagonal: same node is free)."""
        n = len(self.nodes)
        bw = [
            [math.inf if a == b else self.default_bandwidth_mib_s for b in range(n)]
            for a in range(n)
        ]
        for link in self.links:
            i, j = self._index[link.a], self._index[link.b]
            bw[i][j] = bw[j][i] = link.bandwidth_mib_s
        return bw

    def without_node(self, node: str) -> Cluster:
        """The cluster after ``node`` failed (its links removed)."""
        self.index(node)
        if len(self.nodes) == 1:
            raise WorkflowError(f"removing node {node!r} leaves the cluster without nodes")
        return Cluster(
            nodes=tuple(n for n in self.nodes if n.name != node),
            links=tuple(lk for lk in self.links if node not in (lk.a, lk.b)),
            default_latency_ms=self.default_latency_ms,
            default_bandwidth_mib_s=self.default_bandwidth_mib_s,
        )

    def to_dict(self) -> dict[str, Any]:
        nodes = []
        for n in self.nodes:
            entry: dict[str, Any] = {"name": n.name, "memory_mib": n.memory_mib, "cpu": n.cpu}
            if n.hostname is not None:
                entry["hostname"] = n.hostname
            nodes.append(entry)
        return {
            "default_latency_ms": self.default_latency_ms,
            "default_bandwidth_mib_s": self.default_bandwidth_mib_s,
            "nodes": nodes,
            "links": [
                {
                    "a": lk.a,
                    "b": lk.b,
                    "latency_ms": lk.latency_ms,
                    "bandwidth_mib_s": lk.bandwidth_mib_s,
                }
                for lk in self.links
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cluster:
        data = _plain(data)
        if not isinstance(data, dict):
            raise WorkflowError(f"cluster must be a mapping, got {type(data).__name__}")
        _reject_unknown(
            data, {"nodes", "links", "default_latency_ms", "default_bandwidth_mib_s"}, "cluster"
        )
        nodes = []
        for i, entry in enumerate(data.get("nodes") or []):
            if not isinstance(entry, dict):
                raise WorkflowError(f"cluster nodes[{i}] must be a mapping, got {entry!r}")
            _reject_unknown(entry, {"name", "memory_mib", "cpu", "hostname"}, f"cluster nodes[{i}]")
            _require(entry, ("name", "memory_mib", "cpu"), f"cluster nodes[{i}]")
            nodes.append(
                Node(entry["name"], entry["memory_mib"], entry["cpu"], entry.get("hostname"))
            )
        links = []
        for i, entry in enumerate(data.get("links") or []):
            if not isinstance(entry, dict):
                raise WorkflowError(f"cluster links[{i}] must be a mapping, got {entry!r}")
            _reject_unknown(
                entry, {"a", "b", "latency_ms", "bandwidth_mib_s"}, f"cluster links[{i}]"
            )
            _require(entry, ("a", "b", "latency_ms", "bandwidth_mib_s"), f"cluster links[{i}]")
            links.append(
                Link(entry["a"], entry["b"], entry["latency_ms"], entry["bandwidth_mib_s"])
            )
        kwargs = {
            k: data[k] for k in ("default_latency_ms", "default_bandwidth_mib_s") if k in data
        }
        return cls(nodes=tuple(nodes), links=tuple(links), **kwargs)


def check_compatible(workflow: Workflow, cluster: Cluster) -> None:
    """Raise :class:`WorkflowError` when an agent's ``allowed_nodes`` names an unknown node."""
    known = set(cluster.node_names)
    for agent in workflow.agents:
        for node in agent.allowed_nodes or ():
            if node not in known:
                raise WorkflowError(
                    f"agent {agent.name!r} allowed_nodes names unknown node {node!r}; "
                    f"nodes are {cluster.node_names}"
                )


def deployment_pattern(workflow: Workflow, cluster: Cluster) -> str:
    """A stable key for (workflow, cluster): ``<workflow>:<agents>x<nodes>:<hash>``.

    Deployment history in memory is kept per pattern, so a later run on the same
    workflow and cluster finds what earlier runs stored.
    """
    blob = json.dumps([workflow.to_dict(), cluster.to_dict()], sort_keys=True)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:12]
    return f"{workflow.name}:{len(workflow.agents)}x{len(cluster.nodes)}:{digest}"


def load_deploy_yaml(path: str | Path) -> tuple[Workflow, Cluster]:
    """Read a YAML file with top-level ``workflow`` and ``cluster`` mappings."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"deploy description {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise WorkflowError(f"deploy description {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or "workflow" not in data or "cluster" not in data:
        raise WorkflowError(f"{str(path)!r} must hold top-level 'workflow' and 'cluster' mappings")
    workflow, cluster = Workflow.from_dict(data["workflow"]), Cluster.from_dict(data["cluster"])
    check_compatible(workflow, cluster)
    return workflow, cluster


def dump_deploy_yaml(workflow: Workflow, cluster: Cluster, path: str | Path) -> Path:
    """Write ``workflow`` and ``cluster`` as YAML (inverse of :func:`load_deploy_yaml`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(
        {"workflow": workflow.to_dict(), "cluster": cluster.to_dict()}, sort_keys=False
    )
    path.write_text(text)
    return path


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


class ActivationRecorder:
    """Forward hooks on a model's agents that record output bytes and time per call.

    Attach, run one forward pass (an example input, or the first training batch),
    then :meth:`workflow` turns the record into a :class:`Workflow` and :meth:`remove`
    detaches the hooks. Agents are the model's top-level children by default.
    """

    def __init__(self, model: nn.Module, agents: Sequence[str] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        children = dict(model.named_children())
        modules = dict(model.named_modules())
        if agents is None:
            names = list(children)
            if not names:
                names = [""]
        else:
            names = list(agents)
            for name in names:
                if name not in modules:
                    raise WorkflowError(
                        f"agent module {name!r} is not in the model; top-level children are "
                        f"{list(children)}"
                    )
        self.model = model
        self.names = names
        self.calls: list[tuple[str, int, float]] = []
        """(agent, output bytes, seconds) per forward call, in execution order."""
        self._starts: dict[str, float] = {}
        self._handles = []
        for name in names:
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._post_hook(name)))

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            self._starts[name] = time.perf_counter()

        return hook

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            elapsed = time.perf_counter() - self._starts.pop(name, time.perf_counter())
            self.calls.append((name, _tensor_bytes(output), elapsed))

        return hook

    @property
    def recorded(self) -> bool:
        return bool(self.calls)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def workflow(
        self, name: str = "model", *, cpu_total: float = 1.0, min_cpu: float = 0.05
    ) -> Workflow:
        """The recorded forward pass as a workflow.

        - memory_mib of an agent = (parameter + buffer bytes of its module + bytes of
          every output it produced) / 2**20;
        - a dependency joins consecutive calls in execution order (a sequential
          pipeline), carrying the earlier call's output bytes; repeated pairs add up;
        - cpu = ``cpu_total`` cores shared in proportion to each agent's measured forward
          time, at least ``min_cpu``, rounded to 0.01 cores.
        """
        if not self.calls:
            raise WorkflowError(
                "no forward pass was recorded: run the model once after attaching the recorder"
            )
        modules = dict(self.model.named_modules())
        out_bytes: dict[str, int] = dict.fromkeys(self.names, 0)
        seconds: dict[str, float] = dict.fromkeys(self.names, 0.0)
        volumes: dict[tuple[str, str], int] = {}
        previous: tuple[str, int] | None = None
        for agent, nbytes, elapsed in self.calls:
            out_bytes[agent] += nbytes
            seconds[agent] += elapsed
            if previous is not None and previous[0] != agent:
                key = (previous[0], agent)
                volumes[key] = volumes.get(key, 0) + previous[1]
            previous = (agent, nbytes)
        used = [n for n in self.names if any(c[0] == n for c in self.calls)]
        total_time = sum(seconds[n] for n in used) or 1.0
        agents = []
        for n in used:
            module = modules[n]
            static = sum(p.numel() * p.element_size() for p in module.parameters())
            static += sum(b.numel() * b.element_size() for b in module.buffers())
            cpu = max(min_cpu, round(cpu_total * seconds[n] / total_time, 2))
            agents.append(Agent(_agent_name(n), (static + out_bytes[n]) / MIB, cpu))
        deps = tuple(
            Dependency(_agent_name(a), _agent_name(b), v / MIB) for (a, b), v in volumes.items()
        )
        edges = [(d.src, d.dst) for d in deps]
        acyclic = not _find_cycle([a.name for a in agents], edges)
        return Workflow(name=name, agents=tuple(agents), dependencies=deps, acyclic=acyclic)


def _agent_name(module_name: str) -> str:
    return module_name or "model"


def workflow_from_model(
    model: nn.Module,
    example_input: Any,
    *,
    agents: Sequence[str] | None = None,
    name: str = "model",
    cpu_total: float = 1.0,
) -> Workflow:
    """Build a workflow from one forward pass of ``model`` on ``example_input``.

    ``agents`` names the modules that become agents (default: the top-level children,
    e.g. the layers of an ``nn.Sequential``). ``example_input`` is a tensor, a tuple of
    positional arguments, or a dict of keyword arguments. See
    :meth:`ActivationRecorder.workflow` for how sizes and dependencies are derived.
    """
    recorder = ActivationRecorder(model, agents)
    try:
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        recorder.remove()
    return recorder.workflow(name, cpu_total=cpu_total)


def _find_cycle(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """One cycle as [n0, n1, ..., n0], or [] for a DAG (iterative DFS)."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    state = dict.fromkeys(graph, 0)  # 0 new, 1 on stack, 2 done
    for root in graph:
        if state[root]:
            continue
        stack = [(root, iter(graph[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state[child] == 1:
                return [*path[path.index(child) :], child]
            elif state[child] == 0:
                state[child] = 1
                stack.append((child, iter(graph[child])))
                path.append(child)
    return []


def _plain(data: Any) -> Any:
    """omegaconf containers -> plain dicts/lists; anything else unchanged."""
    if isinstance(data, DictConfig | ListConfig):
        return OmegaConf.to_container(data, resolve=True)
    return data


def _reject_unknown(entry: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise WorkflowError(f"{what} has unknown keys {unknown}; allowed are {sorted(allowed)}")


def _require(entry: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        raise WorkflowError(f"{what} is missing {missing}")


__all__ = [
    "MIB",
    "ActivationRecorder",
    "Agent",
    "Cluster",
    "Dependency",
    "Link",
    "Node",
    "Workflow",
    "WorkflowError",
    "check_compatible",
    "deployment_pattern",
    "dump_deploy_yaml",
    "load_deploy_yaml",
    "workflow_from_model",
]
