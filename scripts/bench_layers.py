"""Speed, programming time and memory of the RRAM layers against their digital twins.

Run from the repository root::

    python scripts/bench_layers.py            # full run (a few minutes on 2 CPU cores)
    python scripts/bench_layers.py --quick    # smoke run: small programming size, few repeats
    python scripts/bench_layers.py --device cuda
    python scripts/bench_layers.py --only first-forward   # the ResNet-18 first forward alone

The first-forward section times what a user meets first: ``convert_`` of a torchvision
ResNet-18 (random init) with ``st.preset("corrected")`` and its first ``model(x)`` on one
224x224 image, split into programming (``convert_``), lambda calibration, ADC calibration
with the first-order input writes, and the read; each in a fresh process, once with the
caches as they are (warm) and once with empty compiler caches (``SEDMA_CACHE_DIR`` and
``TMPDIR``, so the C kernels and torch.compile build again: a first run after install).

Every ratio is ``rram / digital`` from the same run, both sides timed alternately (so a
change of machine load hits both) and reported as the median after warm-up. Prints one
table and writes ``results/bench_layers_<device>[_quick].json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from benchmark_utils import (
    cpu_model,
    git_revision,
    synchronize,
    time_median_ms,
    time_pair_ms,
)
from torch import nn
from torch.profiler import ProfilerActivity, profile

import sedma_torch as st

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024.0 * 1024.0


@dataclass
class Row:
    """One line of the result table."""

    name: str
    unit: str
    """``ms``, ``s`` or ``MiB``: the unit of ``rram`` and ``digital``."""
    rram: float
    digital: float | None
    target: float | None
    """Upper bound on ``ratio`` (or on ``rram`` when ``target_is_absolute``); None = info."""
    target_is_absolute: bool = False
    note: str = ""
    rram_min: float | None = None
    digital_min: float | None = None
    """Fastest call of each side: their ratio is a cross-check that is less sensitive to
    other processes competing for the CPU than the ratio of medians."""

    @property
    def ratio(self) -> float | None:
        if self.digital is None or self.digital == 0:
            return None
        return self.rram / self.digital

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        value = self.rram if self.target_is_absolute else self.ratio
        if value is None:
            return "info"
        return "PASS" if value <= self.target else "FAIL"

    @property
    def ratio_of_min(self) -> float | None:
        if self.rram_min is None or not self.digital_min:
            return None
        return self.rram_min / self.digital_min

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["ratio_of_min"] = self.ratio_of_min
        out["verdict"] = self.verdict
        return out


# ----- timing ---------------------------------------------------------------------------


def timed_row(name: str, times: tuple[float, float, float, float], target: float | None) -> Row:
    rram_ms, digital_ms, rram_min, digital_min = times
    return Row(name, "ms", rram_ms, digital_ms, target, rram_min=rram_min, digital_min=digital_min)


def forward_backward(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(grad_out)


# ----- memory ---------------------------------------------------------------------------


def forward_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Largest amount of memory allocated above the starting level during ``fn()``
    (its output included; the output is freed afterwards).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: replay of the
    allocation and free events recorded by ``torch.profiler(profile_memory=True)``.
    """
    with torch.no_grad():
        fn()  # warm-up: lazily built caches are not part of the forward's transient memory
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            del out
            return int(peak)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def state_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes held between calls: parameters, buffers and cached derived tensors. Tensors
    sharing one storage (``g_pos`` and ``g_neg`` are halves of one) are counted once,
    under their joined names."""
    names: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}

    def add(name: str, tensor: torch.Tensor) -> None:
        if tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        names.setdefault(storage.data_ptr(), []).append(name)
        sizes[storage.data_ptr()] = storage.nbytes()

    for name, tensor in module.named_parameters():
        add(name, tensor)
    for name, tensor in module.named_buffers():
        add(name, tensor)
    for name, value in vars(module).items():  # fast-path layouts cached by the RRAM layers
        if isinstance(value, torch.Tensor):
            add(name, value)
        elif name == "_packed_cache":  # weights packed for the compiled CPU read
            for key, (_, tensor) in value.items():
                add(f"packed {key}", tensor)
    return {"+".join(names[ptr]): sizes[ptr] for ptr in names}


# ----- benchmarks -----------------------------------------------------------------------


@contextlib.contextmanager
def without_weight_check(layer: nn.Module):
    """The layer's reads skip the per-read weight fingerprint that keeps them from going
    stale (benchmark only: the A/B of what that check costs; nothing changes the weight
    while it is off)."""
    # the layers' fingerprint calls live in these modules (once all in ``layers``)
    from sedma_torch.rram import lambda_control, state

    modules = (state, lambda_control)
    real = [m.fingerprint for m in modules]
    for m in modules:
        m.fingerprint = lambda w, backend="auto": layer._programmed_fp  # type: ignore[assignment]
    try:
        yield
    finally:
        for m, fn in zip(modules, real, strict=True):
            m.fingerprint = fn  # type: ignore[assignment]


def weight_check_rows(
    name: str, layer: nn.Module, call: Callable[[], object], device, warmup: int, repeats: int
) -> list[Row]:
    """The per-read weight check: the read with it against the read without it
    (interleaved), and the fingerprint alone."""
    from sedma_torch.rram.fingerprint import fingerprint

    def unchecked() -> object:
        with without_weight_check(layer):
            return call()

    with torch.no_grad():
        times = time_pair_ms(call, unchecked, device, warmup, repeats)
        alone = time_median_ms(lambda: fingerprint(layer.weight), device, warmup, repeats)
    return [
        Row(
            f"{name}: with / without weight check",
            "ms",
            times[0],
            times[1],
            None,
            note=f"the fingerprint alone: {alone:.3f} ms ({layer.weight.numel()} weights)",
            rram_min=times[2],
            digital_min=times[3],
        )
    ]


def layer_config(**changes) -> st.RRAMConfig:
    """The benchmark's crossbar: taox_hfox, 256x256 tiles, 8-bit DAC and ADC, read noise."""
    base = st.RRAMConfig(
        material="taox_hfox", tile_rows=256, tile_cols=256, dac_bits=8, adc_bits=8, read_noise=True
    )
    return base.replace(**changes) if changes else base


def bench_programming(device: torch.device, size: int, full: bool) -> list[Row]:
    """Construct RRAMLinear(size, size) and time ``program_()`` twice (first call may compile)."""
    layer = st.RRAMLinear(size, size, device=device, config=layer_config(write_verify_iters=20))
    rows = []
    for label, kwargs in (("1st call", {}), ("2nd call, from_scratch", {"from_scratch": True})):
        synchronize(device)
        begin = time.perf_counter()
        layer.program_(**kwargs)
        synchronize(device)
        seconds = time.perf_counter() - begin
        stats = layer.rram_stats.last_programming
        note = (
            f"{stats.iterations} iters, {100 * stats.fraction_within_tolerance:.1f}% in tol"
            if stats is not None
            else ""
        )
        if label == "1st call":
            note += "; may include the one-time build of the C kernel (CPU) or compile (GPU)"
        rows.append(
            Row(
                f"program {size}x{size} wv=20 ({label})",
                "s",
                seconds,
                None,
                5.0 if full else None,
                target_is_absolute=True,
                note=note,
            )
        )
    return rows


def bench_linear(device: torch.device, warmup: int, repeats: int) -> tuple[list[Row], dict]:
    torch.manual_seed(0)
    digital = nn.Linear(1024, 1024, device=device)
    x = torch.randn(64, 1024, device=device)
    rows = []
    variants = (
        ("fwd", layer_config(), 2.0),
        ("fwd first_order", layer_config(correction="first_order"), 5.0),
        ("fwd adc_bits=None (GEMM path)", layer_config(adc_bits=None), None),
        # the state-independent read noise needs no variance product (one GEMM per read)
        ("fwd read_noise_model=independent", layer_config(read_noise_model="independent"), None),
    )
    layers = {}
    with torch.no_grad():
        for label, cfg, target in variants:
            layer = st.RRAMLinear.from_linear(digital, config=cfg)
            layers[label] = layer
            times = time_pair_ms(
                lambda layer=layer: layer(x), lambda: digital(x), device, warmup, repeats
            )
            rows.append(timed_row(f"Linear 1024->1024 b64 {label}", times, target))
    rows += weight_check_rows(
        "Linear 1024->1024 b64 fwd",
        layers["fwd"],
        lambda: layers["fwd"](x),
        device,
        warmup,
        repeats,
    )

    xg = x.clone().requires_grad_(True)
    grad_out = torch.randn(64, 1024, device=device)
    layer = layers["fwd"]
    times = time_pair_ms(
        lambda: forward_backward(layer, xg, grad_out),
        lambda: forward_backward(digital, xg, grad_out),
        device,
        warmup,
        repeats,
    )
    rows.append(timed_row("Linear 1024->1024 b64 fwd+bwd", times, 4.0))

    rram_peak = forward_peak_bytes(lambda: layer(x), device)
    digital_peak = forward_peak_bytes(lambda: digital(x), device)
    rows.append(
        Row(
            "Linear fwd transient peak mem",
            "MiB",
            rram_peak / MIB,
            digital_peak / MIB,
            3.0,
            note="allocated above start during forward, output included",
        )
    )
    rram_state, digital_state = state_bytes(layer), state_bytes(digital)
    rows.append(
        Row(
            "Linear persistent state",
            "MiB",
            sum(rram_state.values()) / MIB,
            sum(digital_state.values()) / MIB,
            None,
            note="params + buffers + caches",
        )
    )
    rows.append(
        Row(
            "Linear state + fwd transient",
            "MiB",
            (sum(rram_state.values()) + rram_peak) / MIB,
            (sum(digital_state.values()) + digital_peak) / MIB,
            None,
        )
    )
    breakdown = {"rram_linear": rram_state, "digital_linear": digital_state}
    return rows, breakdown


def bench_conv(device: torch.device, warmup: int, repeats: int) -> tuple[list[Row], dict]:
    torch.manual_seed(0)
    digital = nn.Conv2d(64, 64, 3, padding=1, device=device)
    x = torch.randn(8, 64, 32, 32, device=device)
    layer = st.RRAMConv2d.from_conv(digital, config=layer_config())
    with torch.no_grad():
        times = time_pair_ms(lambda: layer(x), lambda: digital(x), device, warmup, repeats)
    rows = [timed_row("Conv2d 64->64 3x3 8x64x32x32 fwd", times, 4.0)]
    independent = st.RRAMConv2d.from_conv(
        digital, config=layer_config(read_noise_model="independent")
    )
    with torch.no_grad():
        times = time_pair_ms(lambda: independent(x), lambda: digital(x), device, warmup, repeats)
    rows.append(timed_row("Conv2d fwd read_noise_model=independent", times, None))
    rows += weight_check_rows("Conv2d fwd", layer, lambda: layer(x), device, warmup, repeats)
    rram_peak = forward_peak_bytes(lambda: layer(x), device)
    digital_peak = forward_peak_bytes(lambda: digital(x), device)
    rows.append(
        Row("Conv2d fwd transient peak mem", "MiB", rram_peak / MIB, digital_peak / MIB, 3.0)
    )
    return rows, {"rram_conv": state_bytes(layer), "digital_conv": state_bytes(digital)}


FIRST_FORWARD_TARGET_S = 5.0
"""Issue 15: the first forward of a converted ResNet-18 (corrected preset) on 2 cores."""


def first_forward_child(size: int) -> None:
    """In a fresh process: time ``convert_`` and the first two forward passes of a
    ResNet-18 with the corrected preset; print one JSON line. Benchmark-only wrappers
    accumulate the time spent in the layers' lambda calibration, ADC calibration and
    first-order input writes."""
    import functools
    from collections import Counter

    import torchvision

    from sedma_torch.rram import lambda_control, state

    spent: Counter[str] = Counter()

    def timed(cls: type, name: str, key: str) -> None:
        real = getattr(cls, name)

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - begin

        setattr(cls, name, wrapper)

    timed(lambda_control._LambdaController, "_calibrate", "lambda_calibration")
    timed(state._CrossbarMixin, "_calibrate_adc", "adc_calibration")
    timed(state._CrossbarMixin, "_program_inputs", "input_writes")
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    digital = torchvision.models.resnet18().eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        begin = time.perf_counter()
        digital(x)
        out["digital_first"] = time.perf_counter() - begin
        model = torchvision.models.resnet18().eval()
        begin = time.perf_counter()
        st.convert_(model, st.preset("corrected"), progress=False)
        out["programming"] = time.perf_counter() - begin
        for label in ("first", "second"):
            spent.clear()
            begin = time.perf_counter()
            model(x)
            out[label] = time.perf_counter() - begin
            out.update({f"{label}_{key}": value for key, value in spent.items()})
    print(json.dumps(out))


def bench_first_forward(size: int, cold: bool) -> list[Row]:
    """The first forward of a converted ResNet-18 (see the module docstring)."""
    import subprocess
    import sys
    import tempfile

    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as empty:
        if cold:
            env["SEDMA_CACHE_DIR"] = os.path.join(empty, "sedma")
            env["TMPDIR"] = empty  # torch.compile's cache
        proc = subprocess.run(
            [sys.executable, __file__, "--first-forward-child", str(size)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    t = json.loads(proc.stdout.strip().splitlines()[-1])
    caches = "empty caches" if cold else "warm caches"  # names fit the table's 52 columns
    first = t["first"]
    lam = t.get("first_lambda_calibration", 0.0)
    adc = t.get("first_adc_calibration", 0.0) + t.get("first_input_writes", 0.0)
    name = f"ResNet-18 corrected {size}px"
    rows = [
        Row(f"{name}: programming, {caches}", "s", t["programming"], None, None),
        Row(
            f"{name}: 1st fwd, {caches}",
            "s",
            first,
            t["digital_first"],
            FIRST_FORWARD_TARGET_S,
            target_is_absolute=True,
            note=f"lambda calibration {lam:.2f} s, ADC calibration + x~ writes {adc:.2f} s, "
            f"read {first - lam - adc:.2f} s; digital = nn ResNet-18's 1st fwd",
        ),
    ]
    if not cold:
        rows.append(
            Row(
                f"{name}: 2nd fwd, {caches}",
                "s",
                t["second"],
                None,
                None,
                note=f"x~ writes {t.get('second_input_writes', 0.0):.2f} s",
            )
        )
    return rows


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def bench_cuda_large(device: torch.device, warmup: int, repeats: int) -> list[Row]:
    """4096->4096 at batch 1024 on the GPU, TF32 off and on (same setting on both sides),
    and the denoiser's cost relative to the layer forward."""
    torch.manual_seed(0)
    digital = nn.Linear(4096, 4096, device=device)
    x = torch.randn(1024, 4096, device=device)
    layer = st.RRAMLinear.from_linear(digital, config=layer_config())
    rows = []
    forward_ms = {}
    with torch.no_grad():
        for tf32 in (False, True):
            set_tf32(tf32)
            times = time_pair_ms(lambda: layer(x), lambda: digital(x), device, warmup, repeats)
            forward_ms[tf32] = times[0]
            rows.append(
                timed_row(
                    f"Linear 4096->4096 b1024 fwd TF32 {'on' if tf32 else 'off'}", times, None
                )
            )
        set_tf32(False)
        p = torch.randn(1024, 4096, device=device)
        denoise_ms = time_median_ms(lambda: st.rram.denoise(p, 1.0), device, warmup, repeats)
    rows.append(
        Row(
            "denoise (1024,4096) lam=1 vs layer fwd",
            "ms",
            denoise_ms,
            forward_ms[False],
            None,
            note=f"{100 * denoise_ms / forward_ms[False]:.1f}% of the TF32-off RRAM forward",
        )
    )
    return rows


# ----- reporting ------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def print_table(rows: list[Row]) -> None:
    header = f"{'name':<52} {'unit':>4} {'rram':>9} {'digital':>9} {'ratio':>7} {'min-ratio':>9} {'target':>8}  result"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.target is None:
            target = "-"
        elif row.target_is_absolute:
            target = f"<={row.target:g}{row.unit}"
        else:
            target = f"<={row.target:g}x"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        ratio_min = f"{row.ratio_of_min:.2f}x" if row.ratio_of_min is not None else "-"
        print(
            f"{row.name:<52} {row.unit:>4} {fmt(row.rram):>9} {fmt(row.digital):>9} "
            f"{ratio:>7} {ratio_min:>9} {target:>8}  {row.verdict}"
            + (f"  ({row.note})" if row.note else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few repeats, small sizes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/)")
    parser.add_argument(
        "--only", choices=("first-forward",), default=None, help="run one section only"
    )
    parser.add_argument("--first-forward-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_forward_child is not None:
        first_forward_child(args.first_forward_child)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    warmup, repeats = (1, 5) if args.quick else (5, 30)
    conv_warmup, conv_repeats = (1, 3) if args.quick else (3, 15)
    gpu = None
    if args.device == "cuda":
        set_tf32(False)
        gpu = torch.cuda.get_device_name(device)
    load_before = os.getloadavg()

    print(
        f"torch {torch.__version__}, sedma_torch {st.__version__} ({git_revision()}), "
        f"python {platform.python_version()}"
    )
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)")
    if args.device == "cuda":
        print(f"GPU: {gpu}; TF32 off unless stated")
    print(
        f"torch.set_num_threads({args.threads}) -> torch.get_num_threads() = {torch.get_num_threads()}"
    )
    print(f"device {device}; timing: median of {repeats} interleaved calls after {warmup} warm-up")
    print(f"load average before: {load_before[0]:.2f} (1 min)")
    print()

    rows: list[Row] = []
    linear_state: dict = {}
    conv_state: dict = {}
    if args.only is None:
        # programming first: its first call in a fresh process is the one that may compile
        program_size = 1024 if args.quick else 4096
        rows += bench_programming(device, program_size, full=not args.quick)
        linear_rows, linear_state = bench_linear(device, warmup, repeats)
        rows += linear_rows
        conv_rows, conv_state = bench_conv(device, conv_warmup, conv_repeats)
        rows += conv_rows
        if args.device == "cuda":
            rows += bench_cuda_large(device, warmup, repeats)
    if args.device == "cpu":  # the first forward a CPU user meets, in fresh processes
        size = 64 if args.quick else 224
        rows += bench_first_forward(size, cold=False)
        if not args.quick:
            rows += bench_first_forward(size, cold=True)
    load_after = os.getloadavg()

    print_table(rows)
    print()
    print("persistent state (bytes): " + json.dumps(linear_state))
    print(f"load average after: {load_after[0]:.2f} (1 min)", end="")
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1):
        print("  -- other processes competed for the CPU; timings are noisy", end="")
    print()

    suffix = ("_quick" if args.quick else "") + (f"_{args.only}" if args.only else "")
    output = args.output or REPO_ROOT / "results" / f"bench_layers_{args.device}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "sedma_torch": st.__version__,
        "git": git_revision(),
        "cpu": cpu_model(),
        "gpu": gpu,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "warmup": warmup,
        "repeats": repeats,
        "load_average_before_after": [load_before[0], load_after[0]],
        "config": layer_config().to_dict(),
    }
    payload = {
        "meta": meta,
        "rows": [row.as_dict() for row in rows],
        "state_bytes": {**linear_state, **conv_state},
    }
    output.write_text(json.dumps(payload, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
