"""Digital vs RRAM comparison: evaluate a model digitally and on each RRAM setting, tabulate.

Each RRAM row converts a fresh copy of the digital model (``sedma_torch.convert_``, which
programs the crossbars), evaluates it on the same inputs, and reports the task metrics,
throughput, crossbar utilisation and crossbar products (``sedma_torch.summary`` and the
layers' operation counters), and the mean relative output error against the digital run
(:func:`~sedma_torch.experiments.results.mean_output_error`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..rram import summary
from .memory_setup import ExperimentMemory
from .results import EvalResult, mean_output_error
from .settings import RRAMSetting

Evaluate = Callable[[nn.Module], EvalResult]


def crossbar_products(model: nn.Module) -> int:
    """Matrix products all RRAM layers of ``model`` have computed (x3 with first-order
    correction), from their ``rram_stats`` counters."""
    return sum(m.rram_stats.matrix_products for m in model.modules() if hasattr(m, "rram_stats"))


def result_row(
    label: str,
    result: EvalResult,
    *,
    setting: RRAMSetting | None = None,
    model: nn.Module | None = None,
    reference: EvalResult | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One table/JSON row: metrics, throughput, crossbar use and output error vs reference."""
    row: dict[str, Any] = {
        "label": label,
        "material": setting.material if setting else "digital",
        "correction": setting.correction_mode if setting else "-",
        **result.metrics,
        "n_samples": result.n_samples,
        "seconds": result.seconds,
        "samples_per_s": result.samples_per_s,
        "utilisation": None,
        "crossbars": 0,
        "crossbar_products": 0,
        "mean_output_error": 0.0 if setting is None else None,
        "rram_config": setting.config.to_dict() if setting else None,
        **extra,
    }
    if model is not None and setting is not None:
        info = summary(model)
        row["utilisation"] = info.utilisation
        row["crossbars"] = info.crossbars
        row["crossbar_products"] = crossbar_products(model)
    if reference is not None and setting is not None and reference.outputs and result.outputs:
        row["mean_output_error"] = mean_output_error(reference.outputs, result.outputs)
    return row


def compare_settings(
    model: nn.Module,
    settings: Sequence[RRAMSetting],
    evaluate: Evaluate,
    *,
    digital: EvalResult | None = None,
    label_prefix: str = "",
    include_digital: bool = True,
    progress: bool = True,
    memory: ExperimentMemory | None = None,
) -> tuple[list[dict[str, Any]], EvalResult]:
    """Rows for the digital model (unless ``include_digital`` is False) and each setting.

    ``evaluate(model) -> EvalResult`` runs the task on a fixed set of inputs; ``digital`` is
    a digital result already computed for the same inputs (else computed here). ``memory``:
    the run's dual memory and partition rule (``memory_setup``). Returns the rows and the
    digital result.
    """
    memory = memory or ExperimentMemory()
    if digital is None:
        digital = evaluate(model)
    rows = [result_row(f"{label_prefix}digital", digital)] if include_digital else []
    for setting in tqdm(settings, desc="RRAM settings", disable=not progress, leave=False):
        rram_model = memory.convert(copy.deepcopy(model), setting.config, progress=False)
        result = evaluate(rram_model)
        rows.append(
            result_row(
                f"{label_prefix}{setting.label}",
                result,
                setting=setting,
                model=rram_model,
                reference=digital,
            )
        )
        del rram_model
    return rows, digital


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "int":
        return f"{value:,d}"
    if kind == "rate":
        return f"{value:,.1f}"
    if kind == "err":
        return f"{value:.3g}"
    return f"{value:.4f}"


def format_table(rows: Sequence[dict[str, Any]], metric_keys: Sequence[str]) -> str:
    """A fixed-width text table of ``rows`` with the given metric columns."""
    columns = [
        ("setting", "label", "str"),
        *((key, key, "metric") for key in metric_keys),
        ("samples/s", "samples_per_s", "rate"),
        ("xbar util", "utilisation", "pct"),
        ("crossbars", "crossbars", "int"),
        ("xbar products", "crossbar_products", "int"),
        ("out err", "mean_output_error", "err"),
    ]
    cells = [
        [r[key] if kind == "str" else _fmt(r.get(key), kind) for _, key, kind in columns]
        for r in rows
    ]
    widths = [
        max(len(head), *(len(c[i]) for c in cells)) if cells else len(head)
        for i, (head, _, _) in enumerate(columns)
    ]
    lines = [
        "  ".join(
            head.ljust(w) if i == 0 else head.rjust(w)
            for i, ((head, _, _), w) in enumerate(zip(columns, widths, strict=True))
        )
    ]
    lines.append("-" * len(lines[0]))
    for c in cells:
        lines.append(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(c, widths, strict=True))
            )
        )
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN as null); returns the path."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2))
    return path


def plot_metric(
    rows: Sequence[dict[str, Any]], metric: str, path: str | Path, *, title: str = ""
) -> Path:
    """Bar chart of ``metric`` per material (x) and correction mode (bars), digital as a
    dashed line; rows whose label has a group prefix ``<group>:`` get their own x group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group_of(r: dict[str, Any]) -> str:
        prefix = r["label"].split(":")[0]
        return f"{prefix}: {r['material']}" if ":" in r["label"] else r["material"]

    digital = [r for r in rows if r["material"] == "digital" and ":" not in r["label"]]
    rram = [r for r in rows if r["material"] != "digital" and r.get(metric) is not None]
    groups = list(dict.fromkeys(group_of(r) for r in rram))
    modes = list(dict.fromkeys(r["correction"] for r in rram))
    width = 0.8 / max(len(modes), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 3.8))
    for k, mode in enumerate(modes):
        picked = [r for r in rram if r["correction"] == mode]
        xs = [groups.index(group_of(r)) + (k - (len(modes) - 1) / 2) * width for r in picked]
        ax.bar(xs, [r[metric] for r in picked], width=width, label=f"correction: {mode}")
    for r in digital:
        ax.axhline(r[metric], color="k", ls="--", lw=1, label=f"digital ({r[metric]:.3f})")
    ax.set_xticks(range(len(groups)), groups, rotation=15)
    ax.set_ylabel(metric)
    values = [r[metric] for r in (*rram, *digital)]
    if values and all(0 <= v <= 1 for v in values):  # fractions: zoom in on the bars' range
        ax.set_ylim(max(0.0, math.floor((min(values) - 0.05) * 10) / 10), 1.0)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "compare_settings",
    "crossbar_products",
    "format_table",
    "plot_metric",
    "result_row",
    "write_json",
]
