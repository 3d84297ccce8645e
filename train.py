"""Train, then train hardware-aware, then compare digital with RRAM (a thin Hydra app).

    python train.py                      # digits + small CNN on the open-loop TaOx-HfOx chip
    python train.py rram=ag_asi train.hwa_epochs=3 logger=none
    python train.py hydra.run.dir=outputs/my_run   # run again to resume from its checkpoint
    python train.py distributed=memory_aware distributed.world_size=2   # 2 gloo ranks
    torchrun --nproc-per-node 2 train.py distributed=memory_aware hydra.run.dir=outputs/ddp

Config: configs/config.yaml; loops: sedma_torch.experiments.training; data-parallel runs
(the ``distributed`` group): sedma_torch.experiments.distributed_train.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sedma_torch.experiments import run_train
from sedma_torch.experiments.config_check import check_app_config
from sedma_torch.redact import redact_run

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    redact_run(hydra_cfg.runtime.output_dir)  # no password in argv, .hydra/*.yaml, logs
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_app_config(plain, hydra_cfg.runtime.choices, CONFIG_DIR)  # unknown keys, types
    label = hydra_cfg.runtime.choices.get("rram", "rram")
    if (plain.get("distributed") or {}).get("enabled"):
        from sedma_torch.experiments.distributed_train import run_train_distributed

        run_train_distributed(plain, hydra_cfg.runtime.output_dir, rram_label=label)
    else:
        run_train(plain, hydra_cfg.runtime.output_dir, rram_label=label)


if __name__ == "__main__":
    main()
