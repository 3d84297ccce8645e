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

from ..progress import progress as _progress
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
    for setting in _progress(settings, desc="RRAM settings", disable=not progress, leave=False):
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


def plot_group(row: dict[str, Any]) -> str:
    """The x-axis label of a row in :func:`plot_metric`: its table label without the
    ``/<correction mode>`` suffix that the bar colour shows (``taox_hfox/none`` ->
    ``taox_hfox``, ``hwa:taox_hfox/none`` -> ``hwa:taox_hfox``, ``open_loop`` stays)."""
    label, mode = str(row["label"]), f"/{row.get('correction')}"
    return label[: -len(mode)] if label.endswith(mode) and len(label) > len(mode) else label


def sample_text(n_samples: int | None, total: int | None = None, noun: str = "samples") -> str:
    """``20 of 1,300 images`` (a subset) or ``360 images`` (all of them)."""
    if n_samples is None:
        return ""
    if total is not None and total > n_samples:
        return f"{n_samples:,} of {total:,} {noun}"
    return f"{n_samples:,} {noun}"


def metric_figure(
    rows: Sequence[dict[str, Any]],
    metric: str,
    *,
    title: str = "",
    samples: str | None = None,
) -> Any:
    """The figure of :func:`plot_metric` (a matplotlib ``Figure``; the caller closes it):
    bar chart of ``metric`` per setting (x) and correction mode (bars), digital as a
    dashed line.

    The x labels are the table's row labels (:func:`plot_group`: the label without its
    ``/<mode>`` suffix, so a setting labelled ``open_loop`` is ``open_loop`` here too);
    every bar carries its value, a bar of height 0 gets a marker at 0 so it stays visible,
    the legend sits outside the axes (it covers no bar), and the title ends with the
    sample count (``samples``, e.g. ``sample_text(20, 1300, "images")``; default: the
    ``n_samples`` of the rows).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    digital = [r for r in rows if r["material"] == "digital" and ":" not in r["label"]]
    rram = [r for r in rows if r["material"] != "digital" and r.get(metric) is not None]
    groups = list(dict.fromkeys(plot_group(r) for r in rram))
    modes = list(dict.fromkeys(r["correction"] for r in rram))
    width = 0.8 / max(len(modes), 1)
    values = [r[metric] for r in (*rram, *digital) if r.get(metric) is not None]
    fractions = bool(values) and all(0 <= v <= 1 for v in values)
    fmt = "{:.3f}" if fractions else "{:.3g}"
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 3.5), 4.0))
    for k, mode in enumerate(modes):
        picked = [r for r in rram if r["correction"] == mode]
        xs = [groups.index(plot_group(r)) + (k - (len(modes) - 1) / 2) * width for r in picked]
        heights = [r[metric] for r in picked]
        bars = ax.bar(xs, heights, width=width, label=f"correction: {mode}")
        ax.bar_label(
            bars,
            labels=[fmt.format(h) for h in heights],
            fontsize=7,
            padding=2,
            rotation=90 if len(modes) >= 3 else 0,  # narrow bars: labels side by side
        )
        zero = [(x, h) for x, h in zip(xs, heights, strict=True) if h == 0]
        if zero:  # a bar of height 0 has no area: mark where it is
            ax.plot(
                [x for x, _ in zero],
                [0.0] * len(zero),
                ls="none",
                marker="o",
                ms=6,
                color=bars.patches[0].get_facecolor(),
                markeredgecolor="k",
                clip_on=False,
                zorder=3,
            )
    for r in digital:
        if r.get(metric) is not None:
            ax.axhline(
                r[metric], color="k", ls="--", lw=1, label=f"digital ({fmt.format(r[metric])})"
            )
    ax.set_xticks(range(len(groups)), groups, rotation=15)
    ax.set_ylabel(metric)
    if fractions:  # fractions: zoom in on the bars' range, room above for the value labels
        low = max(0.0, math.floor((min(values) - 0.05) * 10) / 10)
        ax.set_ylim(low, 1.0 + 0.15 * (1.0 - low))
        ax.set_yticks([t for t in ax.get_yticks() if low <= t <= 1.0 + 1e-9])
    if samples is None:
        counts = [r.get("n_samples") for r in (*digital, *rram) if r.get("n_samples")]
        samples = sample_text(counts[0]) if counts else ""
    head = title or metric
    ax.set_title(f"{head} ({samples})" if samples else head, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_metric(
    rows: Sequence[dict[str, Any]],
    metric: str,
    path: str | Path,
    *,
    title: str = "",
    samples: str | None = None,
) -> Path:
    """Save :func:`metric_figure` of ``rows`` as a PNG at ``path``; returns the path."""
    fig = metric_figure(rows, metric, title=title, samples=samples)  # selects Agg
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "compare_settings",
    "crossbar_products",
    "format_table",
    "metric_figure",
    "plot_group",
    "plot_metric",
    "result_row",
    "sample_text",
    "write_json",
]
