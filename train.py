"""Train, then train hardware-aware, then compare digital with RRAM (a thin Hydra app).

    python train.py                      # digits + small CNN on the open-loop TaOx-HfOx chip
    python train.py rram=ag_asi train.hwa_epochs=3 logger=none
    python train.py hydra.run.dir=outputs/my_run   # run again to resume from its checkpoint

Config: configs/config.yaml; loops: sedma_torch.experiments.training.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sedma_torch.experiments import run_train


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_train(
        OmegaConf.to_container(cfg, resolve=True),
        hydra_cfg.runtime.output_dir,
        rram_label=hydra_cfg.runtime.choices.get("rram", "rram"),
    )


if __name__ == "__main__":
    main()
