"""A/B of the PyTorch read epilogue: eager passes + MT19937 noise vs the opt-in fused kernel.

Interleaves calls of both variants on the same layers in one process (robust to the
machine's drift) and prints medians and ratios to the digital layers. Both variants are
PyTorch paths: the compiled C read (``rram/native_rng.py``) is switched off here with
``SEDMA_NATIVE_RNG=0``, otherwise it would take the "eager" side's place on CPU.

    python scripts/bench_fused_read.py [--calls 40]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SEDMA_FUSED_READ", "1")
os.environ["SEDMA_NATIVE_RNG"] = "0"

import torch
from torch import nn

import sedma_torch as st
import sedma_torch.rram.crossbar as crossbar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    lin, x_lin = nn.Linear(1024, 1024), torch.randn(64, 1024)
    conv, x_conv = nn.Conv2d(64, 64, 3, padding=1), torch.randn(8, 64, 32, 32)
    cases = {
        "Linear 1024 b64": (st.RRAMLinear.from_linear(lin, st.RRAMConfig()), lin, x_lin),
        "Linear first_order": (
            st.RRAMLinear.from_linear(lin, st.RRAMConfig(correction="first_order")),
            lin,
            x_lin,
        ),
        "Conv 64->64 3x3": (st.RRAMConv2d.from_conv(conv, st.RRAMConfig()), conv, x_conv),
    }
    fused = crossbar._fused_read()
    if fused is None:
        raise SystemExit("SEDMA_FUSED_READ must be 1 for this benchmark")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.calls}")
    print(
        f"{'case':22s} {'eager ms':>9s} {'fused ms':>9s} {'digital':>8s} {'eager x':>8s} {'fused x':>8s}"
    )
    with torch.no_grad():
        for name, (rram, digital, x) in cases.items():
            times: dict[str, list[float]] = {"eager": [], "fused": [], "digital": []}
            variants = {"eager": False, "fused": fused}
            for _ in range(3):  # warm-up, including the one-time compilation
                for kernel in variants.values():
                    crossbar._FUSED = kernel
                    rram(x)
            for _ in range(args.calls):
                for mode, kernel in variants.items():
                    crossbar._FUSED = kernel
                    start = time.perf_counter()
                    rram(x)
                    times[mode].append(time.perf_counter() - start)
                start = time.perf_counter()
                digital(x)
                times["digital"].append(time.perf_counter() - start)
            med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
            print(
                f"{name:22s} {med['eager']:9.2f} {med['fused']:9.2f} {med['digital']:8.2f} "
                f"{med['eager'] / med['digital']:7.2f}x {med['fused'] / med['digital']:7.2f}x"
            )


if __name__ == "__main__":
    main()
