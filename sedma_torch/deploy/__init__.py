"""Layer 3: dynamic deployment optimisation (SPEC.md Eq. 11-14).

- :mod:`.workflow`: workflow (agents, dependencies) and cluster (nodes, links)
  descriptions, YAML round trip, :func:`workflow_from_model` (forward hooks).
- :mod:`.placement`: exact placement MILP (HiGHS), greedy and Kubernetes-style
  baselines, adaptive lambda_mem, node-failure re-placement.
- :mod:`.trigger`: the recompile rule (Eq. 14) and in-process deployment history.
- :mod:`.kubernetes`: Deployment/Service manifests, offline schema validation, apply.
- :mod:`.hook`: :class:`DeploymentHook`, the training-loop hook that ties them together.
- :mod:`.simulate`: random instances and the pipeline throughput model of the benchmarks.
"""

from .hook import DeployConfig, DeploymentEvent, DeploymentHook, system_utilisation
from .kubernetes import (
    KubernetesApplyError,
    ManifestError,
    apply_manifests,
    dns1123_label,
    load_manifests,
    render_manifests,
    validate_manifests,
    write_manifests,
)
from .placement import (
    InfeasiblePlacementError,
    Placement,
    adaptive_lambda_mem,
    check_capacity,
    first_fit_placement,
    least_allocated_placement,
    local_search,
    node_usage,
    optimize_placement,
    placement_cost,
    replace_after_failure,
)
from .simulate import pipeline_throughput, random_instance
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
    Agent,
    Cluster,
    Dependency,
    Link,
    Node,
    Workflow,
    WorkflowError,
    deployment_pattern,
    dump_deploy_yaml,
    load_deploy_yaml,
    workflow_from_model,
)

__all__ = [
    "RHO",
    "THETA",
    "ActivationRecorder",
    "Agent",
    "Cluster",
    "Dependency",
    "DeployConfig",
    "DeploymentEvent",
    "DeploymentHook",
    "InProcessDeploymentMemory",
    "InfeasiblePlacementError",
    "KubernetesApplyError",
    "Link",
    "ManifestError",
    "Node",
    "Placement",
    "RecompileDecision",
    "Workflow",
    "WorkflowError",
    "adaptive_lambda_mem",
    "apply_manifests",
    "check_capacity",
    "deployment_pattern",
    "dns1123_label",
    "dump_deploy_yaml",
    "expected_performance",
    "first_fit_placement",
    "least_allocated_placement",
    "load_deploy_yaml",
    "load_manifests",
    "local_search",
    "node_usage",
    "optimize_placement",
    "pipeline_throughput",
    "placement_cost",
    "random_instance",
    "render_manifests",
    "replace_after_failure",
    "should_recompile",
    "system_utilisation",
    "validate_manifests",
    "workflow_from_model",
    "write_manifests",
]
