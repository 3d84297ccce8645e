"""sedma_torch RRAM layers side by side with IBM aihwkit: forward time and relative error.

aihwkit lives in its own virtual environment; run this script with its interpreter::

    /work/aihwkit-venv/bin/python scripts/bench_aihwkit.py [--threads N] [--quick]

sedma_torch is imported from this source tree (it needs only torch, numpy, scipy and
tqdm). Without aihwkit the script says so and exits with status 0.

Both simulators get the same digital weights (``nn.Linear`` / ``nn.Conv2d`` default
init, no bias), the same random input and the same thread count. aihwkit:
``InferenceRPUConfig`` with 256x256 tiles, 7-bit-signed input/output resolution
(``inp_res = out_res = 1/127``), additive constant weight noise 0.01 (in units of the
mapped weight range), the default ``PCMLikeNoiseModel`` programming noise, weights
mapped column-wise to the full range (``weight_scaling_omega = 1``, the counterpart of
sedma's per-column scale); ``program_analog_weights()`` in eval mode. sedma_torch:
taox_hfox, 256x256 tiles, 8-bit DAC and ADC, read noise on (programmed at conversion).
The relative error is ``||y - y_digital|| / ||y_digital||``, median over the timed calls'
first ``ERROR_CALLS`` outputs. Writes ``results/bench_aihwkit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmark_utils import cpu_model, git_revision, time_pair_ms  # noqa: E402

import sedma_torch as st  # noqa: E402

ERROR_CALLS = 5
SPEEDUP_TARGET = 5.0


def relative_error(fn: Callable[[], torch.Tensor], exact: torch.Tensor) -> float:
    """Median over ``ERROR_CALLS`` forwards (fresh read noise each) of ||y - y*|| / ||y*||."""
    return statistics.median(
        float((fn() - exact).norm() / exact.norm()) for _ in range(ERROR_CALLS)
    )


def aihwkit_config():
    from aihwkit.simulator.configs import InferenceRPUConfig
    from aihwkit.simulator.parameters.enums import WeightNoiseType

    config = InferenceRPUConfig()
    config.mapping.max_input_size = 256
    config.mapping.max_output_size = 256
    config.mapping.weight_scaling_omega = 1.0
    config.mapping.weight_scaling_columnwise = True
    config.forward.inp_res = 1 / 127
    config.forward.out_res = 1 / 127
    config.forward.w_noise = 0.01
    config.forward.w_noise_type = WeightNoiseType.ADDITIVE_CONSTANT
    return config


def sedma_config() -> st.RRAMConfig:
    return st.RRAMConfig(
        material="taox_hfox", tile_rows=256, tile_cols=256, dac_bits=8, adc_bits=8, read_noise=True
    )


def compare_layer(
    name: str,
    digital: nn.Module,
    x: torch.Tensor,
    exact: torch.Tensor,
    warmup: int,
    repeats: int,
) -> dict[str, object]:
    from aihwkit.nn import AnalogConv2d, AnalogLinear

    if isinstance(digital, nn.Linear):
        analog = AnalogLinear(
            digital.in_features, digital.out_features, bias=False, rpu_config=aihwkit_config()
        )
        sedma = st.RRAMLinear.from_linear(digital, config=sedma_config())
    else:
        analog = AnalogConv2d(
            digital.in_channels,
            digital.out_channels,
            digital.kernel_size,
            padding=digital.padding,
            bias=False,
            rpu_config=aihwkit_config(),
        )
        sedma = st.RRAMConv2d.from_conv(digital, config=sedma_config())
    analog.set_weights(digital.weight.detach().clone(), None)
    analog.eval()
    analog.program_analog_weights()
    tiles = len(list(analog.analog_tiles()))
    with torch.no_grad():
        sedma_ms, aihwkit_ms, sedma_min, aihwkit_min = time_pair_ms(
            lambda: sedma(x), lambda: analog(x), torch.device("cpu"), warmup, repeats
        )
        sedma_err = relative_error(lambda: sedma(x), exact)
        aihwkit_err = relative_error(lambda: analog(x), exact)
    return {
        "layer": name,
        "sedma_ms": sedma_ms,
        "aihwkit_ms": aihwkit_ms,
        "speedup": aihwkit_ms / sedma_ms,
        "speedup_of_min": aihwkit_min / sedma_min,
        "sedma_rel_err": sedma_err,
        "aihwkit_rel_err": aihwkit_err,
        "sedma_crossbar_tiles": sedma.crossbar_summary()["input_tiles"]
        * sedma.crossbar_summary()["column_tiles"],
        "aihwkit_tiles": tiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for both libraries"
    )
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "results" / "bench_aihwkit.json")
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before aihwkit's OpenMP starts
    torch.set_num_threads(args.threads)
    try:
        import aihwkit
    except ImportError as exc:
        print(f"aihwkit is not importable ({exc}); skipping the comparison.")
        print("Run with the aihwkit environment: /work/aihwkit-venv/bin/python " + __file__)
        return

    warmup, repeats = (1, 3) if args.quick else (3, 15)
    print(
        f"torch {torch.__version__}, aihwkit {aihwkit.__version__}, sedma_torch {st.__version__} "
        f"({git_revision()}, from {REPO_ROOT})"
    )
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)")
    print(
        f"torch.set_num_threads({args.threads}), OMP_NUM_THREADS={args.threads}; "
        f"median of {repeats} interleaved forwards after {warmup} warm-up, torch.no_grad"
    )
    print(
        "aihwkit: InferenceRPUConfig, 256x256 tiles, inp_res=out_res=1/127, "
        "w_noise=0.01 ADDITIVE_CONSTANT, PCMLikeNoiseModel, omega=1 columnwise, "
        f"out_noise={aihwkit_config().forward.out_noise} (default)"
    )
    print("sedma:   taox_hfox, 256x256 tiles, dac 8 bit, adc 8 bit, read noise on")
    print()

    torch.manual_seed(0)
    linear = nn.Linear(1024, 1024, bias=False)
    x_lin = torch.randn(64, 1024)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x_conv = torch.randn(8, 64, 32, 32)
    with torch.no_grad():
        exact_lin = F.linear(x_lin, linear.weight)
        exact_conv = F.conv2d(x_conv, conv.weight, padding=1)
    results = [
        compare_layer("Linear 1024->1024 b64", linear, x_lin, exact_lin, warmup, repeats),
        compare_layer("Conv2d 64->64 3x3 8x64x32x32", conv, x_conv, exact_conv, warmup, repeats),
    ]

    header = (
        f"{'layer':<30} {'sedma ms':>9} {'aihwkit ms':>10} {'speedup':>8} {'min-sp.':>8} {'target':>7} "
        f"{'result':>6} {'sedma err':>10} {'aihwkit err':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        row["target_speedup"] = SPEEDUP_TARGET
        row["verdict"] = "PASS" if row["speedup"] >= SPEEDUP_TARGET else "FAIL"
        print(
            f"{row['layer']:<30} {row['sedma_ms']:>9.2f} {row['aihwkit_ms']:>10.2f} "
            f"{row['speedup']:>7.2f}x {row['speedup_of_min']:>7.2f}x {'>=5x':>7} {row['verdict']:>6} "
            f"{row['sedma_rel_err']:>10.4f} {row['aihwkit_rel_err']:>11.4f}"
        )
    print(
        "speedup = aihwkit ms / sedma ms (medians; min-sp. from the fastest calls); "
        "err = ||y - y_digital|| / ||y_digital|| (median of 5)"
    )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "aihwkit": aihwkit.__version__,
        "sedma_torch_git": git_revision(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "warmup": warmup,
        "repeats": repeats,
        "load_average_1min": os.getloadavg()[0],
        "sedma_config": sedma_config().to_dict(),
    }
    args.output.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
