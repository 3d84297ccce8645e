"""Kubernetes manifests for a placement: render, validate offline, write, apply.

One ``apps/v1`` Deployment per agent, pinned to its node with a required
``nodeAffinity`` on ``kubernetes.io/hostname`` and with CPU/memory requests and
limits from the agent's needs; one ``v1`` Service per agent that sends or receives
data (so its peers reach it by DNS name). Names are DNS-1123 labels (which also
satisfy the stricter DNS-1035 rule Services need). Validation uses the official
OpenAPI schemas shipped with ``kubernetes-validate`` (strict: unknown fields are
errors) plus the name rules the schema does not encode. Applying uses the official
``kubernetes`` client with server-side apply (``dry_run="All"`` asks the API server
to validate and admit without persisting).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .placement import Placement
from .workflow import Cluster, Workflow

DEFAULT_K8S_VERSION = "1.30"
"""Kubernetes version whose schemas validate the manifests."""
HOSTNAME_LABEL = "kubernetes.io/hostname"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class ManifestError(ValueError):
    """A manifest is invalid (the message names the object and the failing field)."""


class KubernetesApplyError(RuntimeError):
    """Applying manifests failed: missing/invalid kubeconfig, unreachable or refusing server."""


def dns1123_label(text: str, *, max_length: int = 63) -> str:
    """``text`` as a DNS-1123 (and DNS-1035) label: ``[a-z]([-a-z0-9]*[a-z0-9])?``.

    Lower-cases, maps every other character to ``-``, collapses runs of ``-``,
    prefixes ``a-`` when the first character is not a letter, and shortens long
    names to ``max_length`` with an 8-hex-digit hash of the original to keep them unique.
    """
    if not isinstance(text, str) or not text.strip():
        raise ManifestError(f"cannot make a DNS-1123 name from {text!r}")
    if not 1 <= max_length <= 63:
        raise ValueError(f"max_length must be in [1, 63], got {max_length}")
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    name = re.sub(r"-+", "-", name).strip("-")
    if not name:
        name = "x"
    if not name[0].isalpha():
        name = f"a-{name}"
    if len(name) > max_length:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        name = f"{name[: max_length - 9].rstrip('-')}-{digest}"
    return name


def _quantity_cpu(cores: float) -> str:
    return f"{max(1, math.ceil(cores * 1000 - 1e-9))}m"


def _quantity_memory(mib: float) -> str:
    return f"{max(1, math.ceil(mib - 1e-9))}Mi"


def render_manifests(
    workflow: Workflow,
    cluster: Cluster,
    placement: Placement,
    *,
    image: str = "python:3.11-slim",
    namespace: str = "default",
    command: Sequence[str] | None = None,
    port: int = 29500,
    limit_factor: float = 1.0,
) -> list[dict[str, Any]]:
    """Deployments (one per agent) and Services (one per communicating agent).

    Requests are the agent's needs (CPU in millicores rounded up, memory in Mi rounded
    up); limits are ``limit_factor`` times the requests (1.0: Guaranteed QoS). Each
    container gets ``SEDMA_WORKFLOW``, ``SEDMA_AGENT``, ``SEDMA_NODE`` and
    ``SEDMA_PEERS`` (comma-separated ``service:port`` of the agents it sends to).
    """
    if not isinstance(image, str) or not image:
        raise ManifestError(f"image must be a non-empty string, got {image!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ManifestError(f"port must be an integer in [1, 65535], got {port!r}")
    if not math.isfinite(limit_factor) or limit_factor < 1.0:
        raise ManifestError(f"limit_factor must be >= 1, got {limit_factor}")
    if dns1123_label(namespace) != namespace:
        raise ManifestError(f"namespace {namespace!r} is not a DNS-1123 label")
    missing = [a for a in workflow.agent_names if a not in placement.assignment]
    if missing:
        raise ManifestError(f"placement has no node for agents {missing}")
    workflow_label = dns1123_label(workflow.name)
    names: dict[str, str] = {}
    for agent_name in workflow.agent_names:
        name = dns1123_label(f"{workflow.name}-{agent_name}")
        clash = [a for a, n in names.items() if n == name]
        if clash:
            raise ManifestError(
                f"agents {clash[0]!r} and {agent_name!r} map to the same Kubernetes name {name!r}"
            )
        names[agent_name] = name
    talking = {d.src for d in workflow.dependencies} | {d.dst for d in workflow.dependencies}
    peers: dict[str, list[str]] = {a: [] for a in workflow.agent_names}
    for dep in workflow.dependencies:
        peers[dep.src].append(f"{names[dep.dst]}:{port}")

    manifests: list[dict[str, Any]] = []
    for agent in workflow.agents:
        node = cluster.nodes[cluster.index(placement.assignment[agent.name])]
        labels = {
            "app.kubernetes.io/name": workflow_label,
            "app.kubernetes.io/component": names[agent.name],
            "app.kubernetes.io/managed-by": "sedma-torch",
        }
        requests = {"cpu": _quantity_cpu(agent.cpu), "memory": _quantity_memory(agent.memory_mib)}
        limits = {
            "cpu": _quantity_cpu(agent.cpu * limit_factor),
            "memory": _quantity_memory(agent.memory_mib * limit_factor),
        }
        container: dict[str, Any] = {
            "name": "agent",
            "image": image,
            "env": [
                {"name": "SEDMA_WORKFLOW", "value": workflow.name},
                {"name": "SEDMA_AGENT", "value": agent.name},
                {"name": "SEDMA_NODE", "value": node.name},
                {"name": "SEDMA_PEERS", "value": ",".join(peers[agent.name])},
            ],
            "resources": {"requests": requests, "limits": limits},
        }
        if command:
            container["command"] = [str(c) for c in command]
        if agent.name in talking:
            container["ports"] = [{"name": "comm", "containerPort": int(port), "protocol": "TCP"}]
        manifests.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {
                    "name": names[agent.name],
                    "namespace": namespace,
                    "labels": labels,
                    "annotations": {
                        "sedma.io/agent": agent.name,
                        "sedma.io/node": node.name,
                        "sedma.io/objective-ms": f"{placement.objective:.6g}",
                    },
                },
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": dict(labels)},
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {
                            "affinity": {
                                "nodeAffinity": {
                                    "requiredDuringSchedulingIgnoredDuringExecution": {
                                        "nodeSelectorTerms": [
                                            {
                                                "matchExpressions": [
                                                    {
                                                        "key": HOSTNAME_LABEL,
                                                        "operator": "In",
                                                        "values": [node.host_label],
                                                    }
                                                ]
                                            }
                                        ]
                                    }
                                }
                            },
                            "containers": [container],
                        },
                    },
                },
            }
        )
        if agent.name in talking:
            manifests.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": names[agent.name],
                        "namespace": namespace,
                        "labels": labels,
                    },
                    "spec": {
                        "selector": dict(labels),
                        "ports": [
                            {
                                "name": "comm",
                                "port": int(port),
                                "targetPort": "comm",
                                "protocol": "TCP",
                            }
                        ],
                    },
                }
            )
    return manifests


def validate_manifests(
    manifests: Iterable[Mapping[str, Any]], *, k8s_version: str = DEFAULT_K8S_VERSION
) -> int:
    """Validate every manifest against the Kubernetes schema (strict) and name rules.

    The schemas are those shipped with ``kubernetes-validate`` (the same files and
    lookup as ``kubernetes_validate.validate(..., strict=True)``); the compiled
    validator is cached per (version, apiVersion, kind), since loading the schema
    definitions dominates a call. Returns the number validated; raises
    :class:`ManifestError` naming the object, the field path and the schema's message
    on the first failure.
    """
    import jsonschema

    count = 0
    for i, manifest in enumerate(manifests):
        manifest = dict(manifest)
        kind = manifest.get("kind", "?")
        name = (manifest.get("metadata") or {}).get("name", "?")
        where = f"manifest {i} ({kind} {name!r})"
        if not isinstance(manifest.get("apiVersion"), str) or not isinstance(kind, str):
            raise ManifestError(f"{where}: apiVersion and kind must be strings")
        try:
            validator = _validator(k8s_version, manifest["apiVersion"], kind)
        except FileNotFoundError:
            raise ManifestError(
                f"{where}: no Kubernetes {k8s_version} schema for apiVersion "
                f"{manifest['apiVersion']!r} kind {kind!r}"
            ) from None
        error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path)
            raise ManifestError(
                f"{where} fails the Kubernetes {k8s_version} schema at '{path}': "
                f"{error.message.splitlines()[0]}"
            )
        _check_names(manifest, where)
        count += 1
    return count


@functools.lru_cache(maxsize=32)
def _validator(k8s_version: str, api_version: str, kind: str) -> Any:
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    wanted = utils.major_minor(k8s_version.lstrip("v"))
    if wanted > utils.latest_version():
        raise ManifestError(
            f"k8s_version {k8s_version!r} is newer than the schemas installed "
            f"(latest {utils.latest_version()})"
        )
    version = [v for v in utils.all_versions() if utils.major_minor(v) <= wanted][-1]
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_dir = f"v{version}-local-strict"
    schema = utils.schema_contents(
        f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group}.json", k8s_version
    )
    definitions = utils.schema_contents(
        f"kubernetes-json-schema/{schema_dir}/_definitions.json", k8s_version
    )
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _check_names(manifest: Mapping[str, Any], where: str) -> None:
    meta = manifest.get("metadata") or {}
    name = meta.get("name", "")
    if not isinstance(name, str) or len(name) > 63 or not _DNS1035.match(name):
        raise ManifestError(
            f"{where}: metadata.name {name!r} is not a DNS-1123 label "
            "(lower-case alphanumerics and '-', starting with a letter, at most 63 characters)"
        )
    namespace = meta.get("namespace", "default")
    if len(namespace) > 63 or not _DNS1035.match(namespace):
        raise ManifestError(f"{where}: metadata.namespace {namespace!r} is not a DNS-1123 label")
    for key, value in (meta.get("labels") or {}).items():
        if not is_label_value(value):
            raise ManifestError(f"{where}: label {key}={value!r} is not a valid label value")
    # node-affinity values are label values too (kubernetes.io/hostname): the JSON schema
    # types them as strings only, and the API server would reject the Deployment
    for term in _affinity_terms(manifest):
        for expr in term.get("matchExpressions") or []:
            for value in expr.get("values") or []:
                if not is_label_value(value):
                    raise ManifestError(
                        f"{where}: node affinity {expr.get('key')}={value!r} is not a valid "
                        "label value (at most 63 characters: alphanumerics, '-', '_', '.', "
                        "starting and ending alphanumeric)"
                    )


def is_label_value(value: Any) -> bool:
    """True when ``value`` is a valid Kubernetes label value (also what a node's
    ``kubernetes.io/hostname`` label and a node-affinity match value must be)."""
    return isinstance(value, str) and len(value) <= 63 and bool(_LABEL_VALUE.match(value))


def _affinity_terms(manifest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    pod = ((manifest.get("spec") or {}).get("template") or {}).get("spec") or {}
    node = (pod.get("affinity") or {}).get("nodeAffinity") or {}
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    terms = list(required.get("nodeSelectorTerms") or [])
    for pref in node.get("preferredDuringSchedulingIgnoredDuringExecution") or []:
        terms.append(pref.get("preference") or {})
    return terms


def write_manifests(manifests: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """One YAML file per Deployment (with its Service, ``---``-separated) under ``out_dir``.

    Files of agents no longer in ``manifests`` are not touched; each written file is
    replaced atomically (write to a temporary name, then rename).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for manifest in manifests:
        groups.setdefault(manifest["metadata"]["name"], []).append(manifest)
    paths = []
    for name, docs in groups.items():
        path = out / f"{name}.yaml"
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False))
        tmp.replace(path)
        paths.append(path)
    return paths


def load_manifests(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read manifests back from YAML files (several documents per file allowed)."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(Path(path).read_text()))
        except yaml.YAMLError as exc:
            raise ManifestError(f"manifest file {str(path)!r} is not valid YAML: {exc}") from exc
        out.extend(d for d in docs if d)
    return out


def apply_manifests(
    manifests: Sequence[Mapping[str, Any]],
    kubeconfig: str | Path,
    *,
    context: str | None = None,
    dry_run: str | None = "All",
    field_manager: str = "sedma-torch",
    timeout_s: float = 10.0,
) -> list[dict[str, Any]]:
    """Server-side apply every manifest with the official client; returns the server's objects.

    ``dry_run="All"`` (default) makes the API server validate and admit them without
    persisting; ``None`` applies for real. Raises :class:`KubernetesApplyError` for a
    missing or invalid kubeconfig and an unreachable or refusing API server.
    """
    from kubernetes import client, config
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import DynamicApiError
    from urllib3.exceptions import HTTPError

    if dry_run not in (None, "All"):
        raise ValueError(f"dry_run must be 'All' or None, got {dry_run!r}")
    path = Path(kubeconfig).expanduser()
    if not path.is_file():
        raise KubernetesApplyError(f"kubeconfig {str(path)!r} does not exist")
    configuration = client.Configuration()
    try:
        config.load_kube_config(
            config_file=str(path), context=context, client_configuration=configuration
        )
    except (config.ConfigException, yaml.YAMLError, TypeError, KeyError, ValueError) as exc:
        raise KubernetesApplyError(f"kubeconfig {str(path)!r} is not usable: {exc}") from None
    configuration.retries = 0
    api = client.ApiClient(configuration)
    server = configuration.host
    try:
        dynamic = DynamicClient(api)
        results = []
        for manifest in manifests:
            resource = dynamic.resources.get(
                api_version=manifest["apiVersion"], kind=manifest["kind"]
            )
            kwargs: dict[str, Any] = {
                "field_manager": field_manager,
                "force_conflicts": True,
                "_request_timeout": timeout_s,
            }
            if dry_run:
                kwargs["dry_run"] = dry_run
            meta = manifest["metadata"]
            out = dynamic.server_side_apply(
                resource,
                body=dict(manifest),
                name=meta["name"],
                namespace=meta.get("namespace"),
                **kwargs,
            )
            results.append(out.to_dict())
        return results
    except (HTTPError, OSError) as exc:
        raise KubernetesApplyError(
            f"cannot reach the Kubernetes API server {server} from kubeconfig {str(path)!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    except DynamicApiError as exc:
        raise KubernetesApplyError(
            f"the Kubernetes API server {server} refused the request: {exc.status} {exc.reason}: "
            f"{exc.summary()}"
        ) from None
    finally:
        api.close()


__all__ = [
    "DEFAULT_K8S_VERSION",
    "KubernetesApplyError",
    "ManifestError",
    "apply_manifests",
    "dns1123_label",
    "load_manifests",
    "render_manifests",
    "validate_manifests",
    "write_manifests",
]
