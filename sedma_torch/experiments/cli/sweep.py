"""Hydra callback: one table over a multirun's jobs (``<sweep dir>/summary.md``).

Registered in ``configs/config.yaml`` (``hydra.callbacks.sweep_summary``). At the end of
``python train.py -m ...`` / ``eval.py -m`` it reads every job's ``results.json`` (jobs are
``<sweep dir>/<job number>/``, their overrides in ``<job>/.hydra/overrides.yaml``), writes
one Markdown table (job, overrides, setting, the task's main metric and the mean output
error) and prints it. A job that failed has no results.json and is listed as failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from ...redact import redact

METRICS = {"classification": "top1", "detection": "map", "qa": "f1"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return ["?"]
    return [redact(str(i)) for i in items if not str(i).startswith("hydra.")]


def sweep_summary(sweep_dir: str | Path) -> str:
    """The Markdown summary of the jobs under ``sweep_dir`` (also written to summary.md)."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
        key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
    )
    per_job = {job: _overrides(job) for job in jobs}
    common = [
        o for o in (per_job[jobs[0]] if jobs else []) if all(o in v for v in per_job.values())
    ]
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"{len(jobs)} job(s); overrides of every job: {' '.join(common) or '(none)'}",
        "",
        "| job | overrides | setting | metric | value | out err |",
        "|---|---|---|---|---|---|",
    ]
    for job in jobs:
        own = [o for o in per_job[job] if o not in common]
        overrides = " ".join(own).replace("|", "\\|") or "(none)"
        try:
            payload = json.loads((job / "results.json").read_text())
        except (OSError, ValueError):
            lines.append(f"| {job.name} | {overrides} | failed (no results.json) | - | - | - |")
            continue
        metric = METRICS.get(payload.get("task"), "top1")
        for row in payload.get("rows", []):
            lines.append(
                f"| {job.name} | {overrides} | {row.get('label')} | {metric} | "
                f"{_fmt(row.get(metric))} | {_fmt(row.get('mean_output_error'))} |"
            )
    text = "\n".join(lines) + "\n"
    (sweep_dir / "summary.md").write_text(text)
    return text


class SweepSummary(Callback):
    """Writes and prints :func:`sweep_summary` when a multirun ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        text = sweep_summary(sweep_dir)
        print(f"\n{text}summary: {sweep_dir / 'summary.md'}", flush=True)


__all__ = ["SweepSummary", "sweep_summary"]
