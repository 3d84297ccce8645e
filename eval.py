"""Evaluate a model digitally and on RRAM settings, print one table (a thin Hydra app).

    python eval.py dataset=imagenet dataset.root=/data/imagenet model=efficientnet_lite0 \
        eval.rram_settings=[epiram,ag_asi,alox_hfo2,taox_hfox] eval.limit=200
    python eval.py -m dataset=imagenet dataset.root=... model=resnet18 rram=epiram,taox_hfox
    python eval.py model.weights=outputs/<run>/model_digital.pt      # digits, after train.py

Config: configs/config.yaml; dispatch by dataset.task (classification, detection, qa) in
sedma_torch.experiments.evaluation.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sedma_torch.experiments.cli import run_job


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job("eval", cfg)  # redact, check the config, run; table and errors also in eval.log


if __name__ == "__main__":
    main()
