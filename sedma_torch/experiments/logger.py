"""Run loggers: wandb (offline by default, files inside the run directory) or none."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..redact import redact_config


class RunLogger(Protocol):
    """What the training and evaluation loops log to."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def summary(self, values: Mapping[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullLogger:
    """Logs nothing (``logger=none``)."""

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Discard ``metrics``."""

    def summary(self, values: Mapping[str, Any]) -> None:
        """Discard ``values``."""

    def finish(self) -> None:
        """Nothing to close."""


class WandbLogger:
    """Weights & Biases run. ``mode`` ``offline`` (default; ``WANDB_MODE`` in the environment
    takes precedence) writes to ``<run_dir>/wandb`` without network access; sync later with
    ``wandb sync``."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        project: str = "sedma_torch",
        mode: str = "offline",
        entity: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: list[str] | None = None,
    ) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", mode)
        allowed = ("offline", "online", "disabled")
        if mode not in allowed:
            raise ValueError(f"logger.mode must be one of {allowed}, got {mode!r}")
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            mode=mode,
            dir=str(self.dir),
            config=dict(config or {}),
            tags=tags,
            reinit="finish_previous",
        )

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def summary(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def make_logger(
    logger_cfg: Mapping[str, Any], run_dir: str | Path, config: Mapping[str, Any] | None = None
) -> RunLogger:
    """The logger the ``logger`` config group asks for: ``name: wandb`` or ``name: none``."""
    name = logger_cfg.get("name")
    if name == "none":
        return NullLogger()
    if name == "wandb":
        return WandbLogger(
            run_dir,
            project=logger_cfg.get("project", "sedma_torch"),
            mode=logger_cfg.get("mode", "offline"),
            entity=logger_cfg.get("entity"),
            name=logger_cfg.get("run_name"),
            config=None if config is None else redact_config(config),
            tags=list(logger_cfg.get("tags") or []),
        )
    raise ValueError(f"logger.name must be 'wandb' or 'none', got {name!r}")


__all__ = ["NullLogger", "RunLogger", "WandbLogger", "make_logger"]
