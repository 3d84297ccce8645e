"""What ``eval.py`` runs: one task, digital vs each requested RRAM setting, table + JSON + plot."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .builders import (
    apply_threads,
    build_eval_dataset,
    build_model,
    check_task,
    resolve_device,
    resolve_eval_weights,
    seed_everything,
)
from .compare import compare_settings, format_table, plot_metric, sample_text, write_json
from .logger import make_logger
from .memory_setup import open_memory
from .results import EvalResult
from .settings import resolve_settings

PRIMARY_METRIC = {"classification": "top1", "detection": "map", "qa": "f1"}


def task_evaluator(
    task: str, model: Any, data: Any, cfg: Mapping[str, Any], device: torch.device
) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], EvalResult]]:
    """(the ``nn.Module`` to convert, ``evaluate(module) -> EvalResult``) for a task."""
    ev = cfg["eval"]
    common = {
        "device": device,
        "batch_size": int(ev["batch_size"]),
        "limit": ev.get("limit"),
        "progress": bool(ev.get("progress", True)),
    }
    if task == "classification":
        from .classification import evaluate_classification

        workers = int(cfg["dataset"].get("num_workers", 0))
        return model, lambda m: evaluate_classification(m, data, num_workers=workers, **common)
    if task == "detection":
        from .detection import evaluate_detection

        return model, lambda m: evaluate_detection(m, data, **common)
    if task == "qa":
        from .qa import evaluate_qa

        module, tokenizer = model
        ds = cfg["dataset"]
        return module, lambda m: evaluate_qa(
            m,
            tokenizer,
            data,
            max_length=int(ds.get("max_length", 384)),
            stride=int(ds.get("stride", 128)),
            **common,
        )
    raise ValueError(f"dataset.task must be classification, detection or qa, got {task!r}")


def collapse_hints(rows: list[dict[str, Any]], num_classes: int) -> list[str]:
    """Hints for uncorrected RRAM rows whose top-1 collapsed while digital's is fine.

    Digital is "fine" at top-1 >= max(0.2, 5/num_classes); a row has "collapsed" below
    max(3/num_classes, a tenth of digital's top-1) (near chance, 1/num_classes).
    """
    digital = next((r for r in rows if r.get("material") == "digital"), None)
    if digital is None or digital.get("top1") is None or num_classes < 2:
        return []
    chance = 1.0 / num_classes
    top1 = float(digital["top1"])
    if top1 < max(0.2, 5 * chance):
        return []
    hints = []
    for row in rows:
        value = row.get("top1")
        if row.get("material") == "digital" or row.get("correction") != "none" or value is None:
            continue
        if value < max(3 * chance, 0.1 * top1):
            material = row["material"]
            hints.append(
                f"hint: {row['label']} top-1 {value:.4f} is near chance (1/{num_classes} = "
                f"{chance:.4f}) while digital gets {top1:.4f}: uncorrected read errors compound "
                f"through the layers on {material}. Turn on first-order correction: "
                f"eval.corrections=[none,first_order] (every setting both ways), "
                f"'eval.rram_settings=[{material}/first_order]', or rram.correction=first_order"
            )
    return hints


def run_eval(
    cfg: Mapping[str, Any],
    run_dir: str | Path,
    *,
    rram_label: str = "rram",
    outputs_dir: str | Path = "outputs",
) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.dataset`` digitally and on each RRAM setting.

    ``cfg`` is the composed Hydra config as plain data; ``rram_label`` the ``rram`` group
    choice (the label of the default setting). ``model=small_cnn`` on digits without
    ``model.weights`` uses the newest ``train.py`` run's ``model_digital.pt`` under
    ``outputs_dir`` (:func:`~.builders.resolve_eval_weights`). Prints the table (and
    :func:`collapse_hints`), writes ``<run_dir>/results.json`` and ``<run_dir>/results.png``;
    returns the JSON payload.
    """
    run_dir = Path(run_dir)
    task = check_task(cfg["dataset"], cfg["model"])
    limit = cfg["eval"].get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"eval.limit must be a positive int or null, got {limit!r}")
    settings = resolve_settings(
        cfg["eval"].get("rram_settings"),
        cfg["rram"],
        base_label=rram_label,
        corrections=cfg["eval"].get("corrections"),
    )
    apply_threads(cfg.get("threads"))
    device = resolve_device(cfg.get("device", "auto"))
    seed_everything(int(cfg.get("seed", 0)))
    model_cfg = resolve_eval_weights(cfg["model"], cfg["dataset"], outputs_dir)
    data = build_eval_dataset(cfg["dataset"], model_cfg)
    model = build_model(model_cfg)
    module, evaluate = task_evaluator(task, model, data, cfg, device)
    logger = make_logger(cfg["logger"], run_dir, dict(cfg))
    memory = open_memory(cfg.get("memory"))
    start = time.perf_counter()
    try:
        rows, digital = compare_settings(
            module,
            settings,
            evaluate,
            progress=bool(cfg["eval"].get("progress", True)),
            memory=memory,
        )
    finally:
        elapsed = time.perf_counter() - start
        memory.close()
    metric_keys = list(digital.metrics)
    payload = {
        "task": task,
        "dataset": cfg["dataset"].get("name"),
        "model": cfg["model"].get("name"),
        "model_weights": model_cfg.get("weights"),
        "dataset_size": len(data),
        "n_samples": digital.n_samples,
        "limit": limit,
        "device": str(device),
        "seconds_total": elapsed,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    subset = (
        f"{digital.n_samples} of {len(data)} samples (eval.limit={limit})"
        if digital.n_samples < len(data)
        else f"all {digital.n_samples} samples"
    )
    print(
        f"\n{task}: model={payload['model']} dataset={payload['dataset']} ({subset}), "
        f"device={device}"
    )
    print(format_table(rows, metric_keys))
    if task == "classification":
        for hint in collapse_hints(rows, int(model_cfg.get("num_classes", 1000))):
            print(hint)
    print(memory.describe())
    payload["memory"] = memory.info()
    json_path = write_json(run_dir / "results.json", payload)
    primary = PRIMARY_METRIC[task] if PRIMARY_METRIC[task] in metric_keys else metric_keys[0]
    plot_path = plot_metric(
        rows,
        primary,
        run_dir / "results.png",
        title=f"{payload['model']} on {payload['dataset']}",
        samples=sample_text(
            digital.n_samples, len(data), "questions" if task == "qa" else "images"
        ),
    )
    print(f"results: {json_path}\nplot: {plot_path}")
    for r in rows:
        logger.summary({f"{r['label']}/{k}": r[k] for k in metric_keys if r.get(k) is not None})
    logger.finish()
    return payload


__all__ = ["PRIMARY_METRIC", "collapse_hints", "run_eval", "task_evaluator"]
