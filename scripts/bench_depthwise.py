"""Depthwise RRAM convolutions on CPU: the compiled read against the PyTorch path and the
digital layer, in one process.

Run from the repository root::

    python scripts/bench_depthwise.py                 # 2 threads, full repeats
    python scripts/bench_depthwise.py --quick         # smoke run

Rows: ``RRAMConv2d`` 96->96 3x3 ``groups=96`` on 16x96x56x56 (epiram, 256x256 tiles, 8-bit
DAC/ADC, read noise), without and with first-order correction, and a converted
EfficientNet-Lite0 (random weights, batch 16 at 224x224). "PyTorch path" is the same layer
with the compiled depthwise read switched off for that layer only (the other compiled
kernels stay on). Medians after warm-up; the three variants of a row alternate call by
call, so a change of machine load hits all of them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from benchmark_utils import cpu_model, git_revision
from torch import nn

import sedma_torch as st
from sedma_torch.models import efficientnet_lite0
from sedma_torch.rram import RRAMConv2d

CONFIG = st.RRAMConfig(
    material="epiram", tile_rows=256, tile_cols=256, dac_bits=8, adc_bits=8, read_noise=True
)


def compiled_depthwise(model: nn.Module, on: bool) -> None:
    """Switch the compiled depthwise read of every RRAMConv2d in ``model`` on or off."""
    for module in model.modules():
        if isinstance(module, RRAMConv2d):
            if on:
                module.__dict__.pop("_depthwise_native_ok", None)
            else:
                module._depthwise_native_ok = lambda xp, **_: False  # type: ignore[method-assign]


def interleaved_ms(
    fns: list[Callable[[torch.Tensor], object]], x: torch.Tensor, warmup: int, repeats: int
) -> list[float]:
    """Median ms of each ``fn(x)``, calls interleaved after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn(x)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            begin = time.perf_counter()
            fn(x)
            times[k].append(1e3 * (time.perf_counter() - begin))
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps, model_reps = (3, 1) if args.quick else (15, 5)
    print(f"torch {torch.__version__}, sedma_torch ({git_revision()}); CPU: {cpu_model()}")
    print(f"torch.set_num_threads({args.threads}); medians of {reps} (model: {model_reps})")
    header = (
        f"{'case':<44} {'digital':>9} {'PyTorch':>9} {'compiled':>9} {'PyT/dig':>8} {'comp/dig':>8}"
    )
    print(header)
    print("-" * len(header))

    def row(name: str, digital: float, torch_path: float, compiled: float) -> None:
        print(
            f"{name:<44} {digital:>7.1f}ms {torch_path:>7.1f}ms {compiled:>7.1f}ms "
            f"{torch_path / digital:>7.2f}x {compiled / digital:>7.2f}x"
        )

    torch.manual_seed(0)
    x = torch.randn(16, 96, 56, 56)
    for correction in ("none", "first_order"):
        conv = nn.Conv2d(96, 96, 3, padding=1, groups=96)
        layer = RRAMConv2d.from_conv(conv, CONFIG.replace(correction=correction))
        slow = RRAMConv2d.from_conv(conv, CONFIG.replace(correction=correction))
        compiled_depthwise(slow, False)
        with torch.no_grad():
            digital, torch_path, compiled = interleaved_ms([conv, slow, layer], x, 2, reps)
        row(f"dw 3x3 16x96x56x56 correction={correction}", digital, torch_path, compiled)

    model = efficientnet_lite0().eval()
    images = torch.randn(16, 3, 224, 224)
    with torch.no_grad():
        digital = interleaved_ms([model], images, 1, model_reps)[0]
        st.convert_(model, CONFIG)
        compiled_depthwise(model, False)
        torch_path = interleaved_ms([model], images, 1, model_reps)[0]
        compiled_depthwise(model, True)
        compiled = interleaved_ms([model], images, 1, model_reps)[0]
    row("EfficientNet-Lite0, batch 16, 224x224", digital, torch_path, compiled)


if __name__ == "__main__":
    main()
