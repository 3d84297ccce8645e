"""Training and evaluation loops behind train.py and eval.py.

``run_train(cfg, run_dir)`` and ``run_eval(cfg, run_dir)`` take the composed Hydra config as
plain data; the pieces (``evaluate_classification``, ``compare_settings``, ``train_epoch``,
``resolve_settings``, checkpoints, loggers) are usable on their own.
"""

from .builders import build_eval_dataset, build_model, resolve_device, seed_everything
from .checkpoint import load_checkpoint, save_checkpoint
from .classification import evaluate_classification
from .compare import compare_settings, format_table, plot_metric
from .detection import evaluate_detection
from .evaluation import run_eval
from .logger import NullLogger, WandbLogger, make_logger
from .qa import evaluate_qa
from .results import EvalResult, mean_output_error
from .settings import (
    CORRECTION_MODES,
    RRAMSetting,
    resolve_settings,
    rram_config_from_mapping,
)
from .training import run_train, train_epoch

__all__ = [
    "CORRECTION_MODES",
    "EvalResult",
    "NullLogger",
    "RRAMSetting",
    "WandbLogger",
    "build_eval_dataset",
    "build_model",
    "compare_settings",
    "evaluate_classification",
    "evaluate_detection",
    "evaluate_qa",
    "format_table",
    "load_checkpoint",
    "make_logger",
    "mean_output_error",
    "plot_metric",
    "resolve_device",
    "resolve_settings",
    "rram_config_from_mapping",
    "run_eval",
    "run_train",
    "save_checkpoint",
    "seed_everything",
    "train_epoch",
]
