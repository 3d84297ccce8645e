"""Training-loop hook that watches throughput and recompiles the placement (layer 3).

Life cycle (``train.py`` calls exactly these)::

    hook = DeploymentHook.from_config(cfg.deploy, model, memory=None)
    for step, batch in ...:
        ...                                   # forward/backward/optimiser step
        hook.on_step(step=step, samples=batch_size, seconds=step_seconds)
    hook.close()

1. The workflow comes from the config (inline or a YAML file) or, by default, from the
   model: forward hooks on its top-level children (or the modules named in
   ``cfg.agents``) measure the first training forward pass, then are removed.
2. The first placement is solved (:func:`optimize_placement`), its manifests rendered,
   validated against the Kubernetes schema, written to ``out_dir`` and applied when a
   kubeconfig is given.
3. Every step: throughput ``samples / seconds`` goes to short-term memory
   (:class:`~sedma_torch.memory.ShortTermMemory`, ``window`` steps);
   utilisation is psutil's system CPU and memory utilisation (the larger counts).
   ``warmup_steps`` after each deployment the window mean is stored as that
   deployment's performance (``memory.record_deployment``: the outcome).
4. After warm-up and outside the cooldown, Eq. 14 is evaluated with the window mean as
   current performance and the history median as expected performance; on a trigger
   the placement is re-solved with ``lambda_mem = base / (1 - memory pressure)``,
   manifests are re-emitted, and the decision is stored (``memory.put("deploy_decision",
   ...)``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from torch import nn

from ..memory import ShortTermMemory
from .kubernetes import (
    DEFAULT_K8S_VERSION,
    apply_manifests,
    render_manifests,
    validate_manifests,
    write_manifests,
)
from .placement import Placement, adaptive_lambda_mem, optimize_placement, replace_after_failure
from .trigger import (
    RHO,
    THETA,
    InProcessDeploymentMemory,
    RecompileDecision,
    expected_performance,
    should_recompile,
)
from .workflow import (
    ActivationRecorder,
    Cluster,
    Workflow,
    _plain,
    check_compatible,
    deployment_pattern,
    load_deploy_yaml,
)


@dataclass(frozen=True)
class DeployConfig:
    """Options of the Hydra ``deploy`` group (``configs/deploy/*.yaml``)."""

    enabled: bool = False
    """Run the hook at all (``configs/deploy/none.yaml`` sets false)."""
    description: str | None = None
    """YAML file with ``workflow`` and ``cluster`` mappings (overrides the two below)."""
    workflow: dict | None = None
    """Inline workflow; ``None`` builds it from the model's first forward pass."""
    cluster: dict | None = None
    """Inline cluster (required unless ``description`` is given)."""
    agents: list[str] | None = None
    """Module names that become agents when the workflow is built from the model
    (default: the model's top-level children)."""
    cpu_total: float = 1.0
    """Cores the model-built workflow needs in total, shared by measured forward time."""
    theta: float = THETA
    """Eq. 14 performance-ratio threshold."""
    rho: float = RHO
    """Eq. 14 utilisation threshold (system-wide CPU/memory: on a machine shared with
    other jobs it fires every ``cooldown_steps``; ``rho: 1.0`` switches the clause off)."""
    lambda_mem_base: float = 10.0
    """lambda_mem at zero memory pressure, ms per unit of node-memory fraction."""
    window: int = 10
    """Steps in the short-term throughput window (current performance = its mean)."""
    warmup_steps: int = 20
    """Steps after a deployment before its performance is recorded and Eq. 14 is
    evaluated; must be >= window."""
    cooldown_steps: int = 50
    """Minimum steps between two recompilations."""
    history_k: int = 10
    """Newest deployment records whose median is the expected performance."""
    time_limit_s: float = 30.0
    """Placement solver time limit, s."""
    out_dir: str | None = None
    """Where manifests (``<out_dir>/v<n>/``) and ``decisions.jsonl`` are written; ``None``:
    the training run's own folder, ``<run dir>/deploy`` (``train.py``), or ``./deploy``
    for a hook built outside a run."""
    kubeconfig: str | None = None
    """Apply manifests to this cluster (server-side apply) when set."""
    dry_run: str | None = "All"
    """``"All"``: server-side dry run; ``None``: apply for real."""
    image: str = "python:3.11-slim"
    namespace: str = "default"
    port: int = 29500
    k8s_version: str = DEFAULT_K8S_VERSION

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_field_type(f"deploy.{f.name}", getattr(self, f.name), str(f.type))
        for name in ("window", "warmup_steps", "history_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"deploy.{name} must be >= 1, got {getattr(self, name)}")
        if self.cooldown_steps < 0:
            raise ValueError(f"deploy.cooldown_steps must be >= 0, got {self.cooldown_steps}")
        if self.warmup_steps < self.window:
            raise ValueError(
                f"deploy.warmup_steps ({self.warmup_steps}) must be >= deploy.window "
                f"({self.window}) so a recorded performance covers only the new placement"
            )
        if not isinstance(self.k8s_version, str):
            raise ValueError(
                f"deploy.k8s_version must be a string such as '1.30' (quote it in YAML), "
                f"got {self.k8s_version!r}"
            )
        if self.description is None and self.cluster is None:
            raise ValueError("deploy needs a cluster: set deploy.cluster or deploy.description")

    @classmethod
    def from_mapping(cls, cfg: Any) -> DeployConfig:
        data = _plain(cfg)
        if not isinstance(data, Mapping):
            raise TypeError(f"deploy config must be a mapping, got {type(cfg).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"deploy config has unknown keys {unknown}; allowed are {sorted(known)}"
            )
        return cls(**dict(data))


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "dict": (Mapping,),
    "None": (type(None),),
}


def _check_field_type(name: str, value: Any, annotation: str) -> None:
    """TypeError naming ``name`` unless ``value`` fits ``annotation`` (``"float"``,
    ``"str | None"``, ``"list[str] | None"``, ...): bools are not numbers, numbers finite."""
    allowed: list[type] = []
    for part in annotation.replace(" ", "").split("|"):
        allowed.extend((list,) if part.startswith("list") else _FIELD_TYPES.get(part, (object,)))
    is_bool = isinstance(value, bool)
    ok = any(isinstance(value, t) and (t is bool or not is_bool or t is object) for t in allowed)
    if not ok:
        raise TypeError(f"{name} must be {annotation}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


@dataclass(frozen=True)
class DeploymentEvent:
    """One (re)deployment: why, what was placed, where the manifests went, how long it took."""

    step: int
    reason: str
    """``"initial"``, ``"performance"``, ``"utilisation"``, ``"performance+utilisation"`` or
    ``"node_failure:<node>"``."""
    placement: Placement
    manifest_paths: list[Path]
    seconds: float
    """Wall time from the decision to validated (and applied) manifests, s."""
    decision: RecompileDecision | None = None
    applied: bool = False


def system_utilisation() -> tuple[float, float]:
    """(CPU, memory) utilisation of this machine as fractions (psutil, non-blocking)."""
    return psutil.cpu_percent(interval=None) / 100.0, psutil.virtual_memory().percent / 100.0


@dataclass
class DeploymentHook:
    """Collects throughput/utilisation, evaluates Eq. 14, re-places, emits manifests.

    ``memory`` is duck-typed to ``LongTermMemory`` (``record_deployment``,
    ``deployment_history``, ``put``); ``None`` keeps the history in process.
    ``utilisation_fn`` returns (cpu, memory) fractions; the default reads psutil.
    """

    config: DeployConfig
    cluster: Cluster
    workflow: Workflow | None = None
    recorder: ActivationRecorder | None = None
    memory: Any = None
    utilisation_fn: Callable[[], tuple[float, float]] = system_utilisation
    events: list[DeploymentEvent] = field(default_factory=list)
    placement: Placement | None = None
    stm: ShortTermMemory | None = None
    """Short-term windows of ``throughput``, ``cpu_util``, ``mem_util`` (``window`` steps)."""
    _steps_since_deploy: int = 0
    _outcome_recorded: bool = False
    _closed: bool = False

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = InProcessDeploymentMemory()
        for method in ("record_deployment", "deployment_history"):
            if not callable(getattr(self.memory, method, None)):
                raise TypeError(
                    f"memory must provide {method}() (the LongTermMemory API), got "
                    f"{type(self.memory).__name__}"
                )
        if self.stm is None:
            self.stm = ShortTermMemory(window=self.config.window)
        if self.workflow is None and self.recorder is None:
            raise ValueError("DeploymentHook needs a workflow or an ActivationRecorder on a model")
        if self.workflow is not None:
            check_compatible(self.workflow, self.cluster)

    @classmethod
    def from_config(
        cls, cfg: Any, model: nn.Module | None = None, memory: Any = None, **kwargs: Any
    ) -> DeploymentHook:
        """Build from the Hydra ``deploy`` group (DictConfig or dict); see :class:`DeployConfig`."""
        config = cfg if isinstance(cfg, DeployConfig) else DeployConfig.from_mapping(cfg)
        workflow: Workflow | None
        if config.description is not None:
            workflow, cluster = load_deploy_yaml(config.description)
        else:
            cluster = Cluster.from_dict(config.cluster or {})
            workflow = Workflow.from_dict(config.workflow) if config.workflow else None
        recorder = None
        if workflow is None:
            if model is None:
                raise ValueError(
                    "deploy has no workflow: give deploy.workflow / deploy.description or a model"
                )
            recorder = ActivationRecorder(model, config.agents)
        return cls(config, cluster, workflow, recorder, memory, **kwargs)

    @property
    def pattern(self) -> str:
        if self.workflow is None:
            raise RuntimeError("the workflow is not known yet (no forward pass recorded)")
        return deployment_pattern(self.workflow, self.cluster)

    def on_step(self, *, step: int, samples: int | float, seconds: float) -> DeploymentEvent | None:
        """Account one training step of ``samples`` samples taking ``seconds`` s."""
        if self._closed:
            raise RuntimeError("DeploymentHook.on_step called after close()")
        if isinstance(samples, bool) or not isinstance(samples, int | float) or samples < 0:
            raise ValueError(f"samples must be a number >= 0, got {samples!r}")
        if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
        if self.workflow is None:
            assert self.recorder is not None
            if not self.recorder.recorded:
                raise RuntimeError(
                    "DeploymentHook.on_step before any forward pass of the watched model: "
                    "call it after the training step, and if training runs a different "
                    "model than the one given to from_config, call hook.watch(model) first"
                )
            self.workflow = self.recorder.workflow(cpu_total=self.config.cpu_total)
            self.recorder.remove()
            self.recorder = None
            check_compatible(self.workflow, self.cluster)
        assert self.stm is not None
        self.stm.update("throughput", float(samples) / float(seconds))
        cpu, mem = self.utilisation_fn()
        self.stm.update("cpu_util", cpu)
        self.stm.update("mem_util", mem)
        resource_util = min(1.0, max(0.0, cpu, mem))
        if self.placement is None:
            return self._deploy(step, "initial", None, mem)
        self._steps_since_deploy += 1
        if self._steps_since_deploy == self.config.warmup_steps:
            self._record_outcome()
        if self._steps_since_deploy < max(self.config.warmup_steps, self.config.cooldown_steps):
            return None
        expected = expected_performance(
            self.memory.deployment_history(self.pattern, limit=self.config.history_k),
            k=self.config.history_k,
        )
        decision = should_recompile(
            self.current_performance,
            expected,
            resource_util,
            theta=self.config.theta,
            rho=self.config.rho,
        )
        if not decision:
            return None
        return self._deploy(step, "+".join(decision.reasons), decision, mem)

    def watch(self, model: nn.Module) -> None:
        """Build the workflow from ``model``'s next forward pass instead (e.g. after the
        training loop swapped in a converted copy). Only before the workflow is known."""
        if self.workflow is not None:
            raise RuntimeError("the workflow is already known; watch() only works before that")
        if self.recorder is not None:
            self.recorder.remove()
        self.recorder = ActivationRecorder(model, self.config.agents)

    @property
    def out_dir(self) -> Path:
        """Folder of the manifests (``v<n>/``) and ``decisions.jsonl``."""
        return Path(self.config.out_dir) if self.config.out_dir else Path("deploy")

    def summary(self) -> str:
        """A few lines for the run's output: the decisions taken and where they went."""
        if not self.events:
            return (
                "deploy: no deployment decided (the hook saw no training step); nothing "
                f"written to {self.out_dir}"
            )
        taken = ", ".join(f"{e.reason} at step {e.step}" for e in self.events)
        last = self.events[-1]
        nodes = sorted(set(last.placement.assignment.values()))
        applied = " (applied to the cluster)" if last.applied else ""
        return (
            f"deploy: {len(self.events)} decision(s): {taken}; last placement on "
            f"{', '.join(map(str, nodes))}{applied}\n"
            f"deploy: manifests in {self.out_dir}/v000..v{len(self.events) - 1:03d}, "
            f"decisions in {self.out_dir / 'decisions.jsonl'}"
        )

    @property
    def current_performance(self) -> float:
        """Mean throughput over the short-term window, samples/s."""
        assert self.stm is not None
        if not self.stm.count("throughput"):
            raise RuntimeError("no step recorded since the last deployment")
        return self.stm.mean("throughput")

    def fail_node(self, node: str, *, step: int = -1) -> DeploymentEvent:
        """Node ``node`` is gone: re-place its agents on the rest and re-emit manifests."""
        if self.placement is None or self.workflow is None:
            raise RuntimeError("nothing is deployed yet")
        start = time.perf_counter()
        self.cluster, placement = replace_after_failure(
            self.workflow,
            self.cluster,
            self.placement,
            node,
            time_limit_s=self.config.time_limit_s,
        )
        return self._emit(step, f"node_failure:{node}", placement, None, start)

    def close(self) -> None:
        """Record the last deployment's outcome (if it ran long enough) and detach hooks."""
        if self._closed:
            return
        if self.recorder is not None:
            self.recorder.remove()
        if (
            self.placement is not None
            and not self._outcome_recorded
            and self._steps_since_deploy >= self.config.window
        ):
            self._record_outcome()
        self._closed = True

    def _deploy(
        self, step: int, reason: str, decision: RecompileDecision | None, mem_pressure: float
    ) -> DeploymentEvent:
        assert self.workflow is not None
        start = time.perf_counter()
        lam = adaptive_lambda_mem(self.config.lambda_mem_base, min(1.0, max(0.0, mem_pressure)))
        placement = optimize_placement(
            self.workflow, self.cluster, lam, time_limit_s=self.config.time_limit_s
        )
        return self._emit(step, reason, placement, decision, start)

    def _emit(
        self,
        step: int,
        reason: str,
        placement: Placement,
        decision: RecompileDecision | None,
        start: float,
    ) -> DeploymentEvent:
        assert self.workflow is not None
        cfg = self.config
        manifests = render_manifests(
            self.workflow,
            self.cluster,
            placement,
            image=cfg.image,
            namespace=cfg.namespace,
            port=cfg.port,
        )
        validate_manifests(manifests, k8s_version=cfg.k8s_version)
        out = self.out_dir / f"v{len(self.events):03d}"
        paths = write_manifests(manifests, out)
        applied = False
        if cfg.kubeconfig:
            apply_manifests(manifests, cfg.kubeconfig, dry_run=cfg.dry_run)
            applied = True
        event = DeploymentEvent(
            step, reason, placement, paths, time.perf_counter() - start, decision, applied
        )
        self.events.append(event)
        previous = self.placement
        self.placement = placement
        self._steps_since_deploy = 0
        self._outcome_recorded = False
        assert self.stm is not None
        self.stm.clear("throughput")
        created_at = time.time()
        record = {
            "key": f"{self.pattern}@{created_at:.6f}",
            "step": step,
            "reason": reason,
            "pattern": self.pattern,
            "assignment": placement.assignment,
            "previous_assignment": previous.assignment if previous else None,
            "objective_ms": placement.objective,
            "lambda_mem": placement.lambda_mem,
            "solver_status": placement.status,
            "performance_ratio": decision.performance_ratio if decision else None,
            "resource_util": decision.resource_util if decision else None,
            "seconds": event.seconds,
            "manifests": str(out),
            "applied": applied,
            "created_at": created_at,
        }
        if callable(getattr(self.memory, "put", None)):
            self.memory.put("deploy_decision", record["key"], record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "decisions.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return event

    def _record_outcome(self) -> None:
        assert self.placement is not None
        self.memory.record_deployment(
            self.pattern, dict(self.placement.assignment), self.current_performance
        )
        self._outcome_recorded = True


__all__ = ["DeployConfig", "DeploymentEvent", "DeploymentHook", "system_utilisation"]
