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

import hydra
from omegaconf import DictConfig

from sedma_torch.experiments.cli import run_job


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job("train", cfg)  # redact, check the config, run; table and errors also in train.log


if __name__ == "__main__":
    main()
