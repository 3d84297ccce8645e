"""Evaluate a model digitally and on RRAM settings, print one table (a thin Hydra app).

    python eval.py dataset=imagenet dataset.root=/data/imagenet model=efficientnet_lite0 \
        eval.rram_settings=[epiram,ag_asi,alox_hfo2,taox_hfox] eval.limit=200
    python eval.py -m dataset=imagenet dataset.root=... model=resnet18 rram=epiram,taox_hfox
    python eval.py model.weights=outputs/<run>/model_digital.pt      # digits, after train.py

Config: configs/config.yaml; dispatch by dataset.task (classification, detection, qa) in
sedma_torch.experiments.evaluation.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sedma_torch.experiments import run_eval
from sedma_torch.experiments.config_check import check_app_config
from sedma_torch.redact import redact_run

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    redact_run(hydra_cfg.runtime.output_dir)  # no password in argv, .hydra/*.yaml, logs
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_app_config(plain, hydra_cfg.runtime.choices, CONFIG_DIR)  # unknown keys, types
    run_eval(
        plain,
        hydra_cfg.runtime.output_dir,
        rram_label=hydra_cfg.runtime.choices.get("rram", "rram"),
    )


if __name__ == "__main__":
    main()
