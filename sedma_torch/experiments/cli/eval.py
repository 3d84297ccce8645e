"""``sedma eval``: the Hydra app of eval.py (see the repository's eval.py)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from . import config_dir, run_job


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job("eval", cfg)
