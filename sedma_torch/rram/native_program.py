"""Closed-loop write-and-verify on CPU float32 as one compiled C kernel, used through ctypes.

Why: programming a 4096 x 4096 layer (33.5 M cells of a differential pair, 20 verify
iterations) spent most of its time in the PyTorch write-verify loop -- every iteration
streams the whole working set through memory, gathers it when it shrinks and keeps cells
that have converged in flight until the next compaction. Cells are independent, so this
kernel runs the loop block by block instead: a block of ``block`` cells (a few thousand,
kept in L2) iterates until all its cells are within tolerance or ``max_iters`` is
reached, compacting its list of live cells after every iteration (8 cells per AVX2
permutation). Blocks run on
OpenMP threads (PyTorch's pool and thread count). Each cell follows exactly the same
trajectory as in the global loop of :func:`sedma_torch.rram.programming.program_conductances`
(same formulas, same counter-based noise keyed by the cell's flat index and the iteration's
seed pair, same per-cell device spread), so results agree with the PyTorch path up to the
float32 rounding of ``log1p``/``expm1``/``log``/``cos`` (inline series accurate to a few
ulp here, so that the vectorised loop makes no calls; PyTorch's vectorised library there):
a cell leaves the common trajectory only where a pulse count or a verify decision falls
within that rounding of its threshold (a few cells in 10^4, see the tests).

One call also returns what :class:`~sedma_torch.rram.programming.ProgrammingStats` needs:
total pulses, iterations used (the most iterations in which any cell was pulsed), and the
cells within tolerance, sum and maximum of ``|G - target|`` over all cells.

The library is built from ``kernels/program.c`` (package data; the shared helpers spliced
in by :func:`sedma_torch.rram.native_rng.kernel_source`, the ``%PERM%`` table by
:func:`_perm_table`) by :func:`sedma_torch.rram.native_rng.build_library` (system C
compiler, cached per machine). Without a compiler, or with ``SEDMA_NATIVE_RNG=0``, the
caller uses the PyTorch loop (same physics and statistics, about 4x slower per core on
the 4096 x 4096 layer, where it is compiled; 7x on small arrays, where it is eager).
"""

from __future__ import annotations

import ctypes
import math
import numbers
from dataclasses import dataclass

import torch

from . import native_rng


def _perm_table() -> str:
    """C rows of the compress permutations: for each 8-bit mask, its set lanes in order."""
    rows = []
    for mask in range(256):
        lanes = [j for j in range(8) if mask >> j & 1]
        rows.append("{" + ",".join(str(j) for j in lanes + [0] * (8 - len(lanes))) + "}")
    return ",\n".join(rows)


_SOURCE = native_rng.kernel_source("program.c").replace("%PERM%", _perm_table())
"""The C source of the write-verify kernel (``kernels/program.c``, its ``%PERM%`` filled)."""

BLOCK = 2048
"""Cells per block: the working arrays of a block (36 bytes a cell) stay in L2."""

MAX_CELLS = 1 << 30
"""Largest array: the device spread keys its stream with 2 x the flat cell index (int32)."""


@dataclass(frozen=True)
class WriteVerifyResult:
    """What one native write-verify run did (over all cells of the array)."""

    pulses: int
    """Total programming pulses applied."""
    iterations: int
    """Iterations used: the most iterations in which any one cell was pulsed."""
    within: int
    """Cells with final ``|G - target| <= stats_tolerance`` (in S)."""
    abs_error_sum: float
    """Sum over all cells of ``|G - target|`` in S (float64 accumulation)."""
    abs_error_max: float
    """Largest ``|G - target|`` in S."""


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.sedma_write_verify_f32
    ptr, i64, i32, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_uint32
    fn.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, i32, i32, u32, u32, ptr, ptr, i64, ptr, ptr]
    fn.restype = ctypes.c_int


_KERNEL = native_rng.LazyLibrary("native_program", _SOURCE, _declare, "native write-verify kernel")


def available() -> bool:
    """True when the compiled kernel can be used (built on the first call). False with
    ``SEDMA_NATIVE_RNG=0`` or without a C compiler; a failed build warns once."""
    return _KERNEL.get() is not None


_FUNC = "write_verify_"


def _check_f32(name: str, tensor: torch.Tensor, numel: int | None = None) -> None:
    native_rng.check_tensor(_FUNC, name, tensor)
    if numel is not None and tensor.numel() != numel:
        raise ValueError(f"write_verify_: {name} has {tensor.numel()} elements, expected {numel}")


def _pulse_reach(a: float, s: float) -> float:
    """Most pulses between two states of a nominal curve (A, S): |A ln(1 - S)| (the pulse
    number of Gmax), inf when the curve never reaches Gmax."""
    try:
        return abs(a * math.log1p(-s))
    except (ValueError, OverflowError):
        return math.inf


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"write_verify_: {name} must be a finite real number, got {value!r}")
    return float(value)


def write_verify_(
    out: torch.Tensor,
    target: torch.Tensor,
    seeds: torch.Tensor,
    params: torch.Tensor,
    *,
    g_max: float,
    initial: torch.Tensor | None = None,
    stats_tolerance: float,
    variation=None,
    block: int = BLOCK,
) -> WriteVerifyResult:
    """Run the write-verify loop of ``program_conductances`` on all cells, into ``out``.

    Args:
        out: conductances in S (contiguous CPU float32, any shape), overwritten; may be
            ``initial`` itself.
        target: desired conductances in S, same number of elements; clipped to
            [Gmin, ``g_max``] on the fly.
        seeds: int32 ``(max_iters, 2)``, the (lo, hi) words keying iteration k's noise.
        params: float32 vector of ``_write_verify_step``'s constants: nominal A and S for
            LTP and LTD, levels LTP and LTD, Gmin, Gmax - Gmin, noise scale, tolerance (S).
        g_max: nominal Gmax in S (clip of the targets and Gmax of nominal devices).
        initial: start conductances in S, or ``None`` = erased at Gmin (then only targets
            above Gmin + tolerance are pulsed; otherwise cells out of tolerance).
        stats_tolerance: tolerance in S of the ``within`` count.
        variation: ``SeededDeviceVariation``, ``DeviceVariation`` or ``None`` (nominal).
        block: cells per block (the result does not depend on it).

    Returns:
        pulses, iterations and error sums (:class:`WriteVerifyResult`).
    """
    from .programming import DeviceVariation, SeededDeviceVariation

    n = target.numel() if isinstance(target, torch.Tensor) else 0
    _check_f32("target", target)
    _check_f32("out", out, n)
    if initial is not None:
        _check_f32("initial", initial, n)
    _check_f32("params", params, 10)
    if params.ndim != 1 or not bool(torch.isfinite(params).all()):
        raise ValueError(f"write_verify_: params must be 10 finite values, got {params.tolist()}")
    if (
        not isinstance(seeds, torch.Tensor)
        or seeds.dtype != torch.int32
        or seeds.device.type != "cpu"
        or seeds.ndim != 2
        or seeds.shape[1] != 2
        or seeds.shape[0] < 1
        or not seeds.is_contiguous()
    ):
        raise ValueError(
            "write_verify_: seeds must be a contiguous CPU int32 tensor (max_iters >= 1, 2), "
            f"got {getattr(seeds, 'dtype', type(seeds))} {tuple(getattr(seeds, 'shape', ()))}"
        )
    if seeds.shape[0] >= 2**31:
        raise ValueError(f"write_verify_: seeds has {seeds.shape[0]} rows (max_iters), >= 2^31")
    if n > MAX_CELLS:  # the noise counters are 32-bit cell indices (x 2 + 1: device spread)
        raise ValueError(f"write_verify_: {n} cells exceed {MAX_CELLS}")
    block = native_rng.check_int(_FUNC, "block", block, 1, 1 << 30)
    g_max = _check_real("g_max", g_max)
    stats_tolerance = _check_real("stats_tolerance", stats_tolerance)
    # a block's pulse count is an int32 sum over its cells of at most reach + 2 pulses each
    a_up, a_dn, s_up, s_dn, l_up, l_dn = params[:6].tolist()
    reach = max(_pulse_reach(a_up, s_up), _pulse_reach(a_dn, s_dn), abs(l_up), abs(l_dn))
    if not block * (reach + 2) < 2**31:
        raise ValueError(
            f"write_verify_: block {block} x up to {reach:.4g} pulses per cell and iteration "
            "(from params' curves) must stay below 2^31"
        )
    (a_ltp, a_ltd, s_ltp, s_ltd, levels_ltp, levels_ltd, g_min, g_range, noise, tol) = (
        params.unbind(0)
    )
    # the step selects per cell with float masks, up * (x_ltp - x_ltd) + x_ltd: the same
    # float32 values here, so that both paths use identical constants
    var_mode, var_lo, var_hi, var_g, var_a = 0, 0, 0, None, None
    var_params = [0.0, 0.0, 0.0]
    if isinstance(variation, SeededDeviceVariation):
        native_rng.check_int(_FUNC, "variation.seed", variation.seed, -(1 << 63), 1 << 63)
        for name in ("sigma", "g_min", "g_range"):
            _check_real(f"variation.{name}", getattr(variation, name))
        var_mode = 1
        var_lo, var_hi = variation.seed & 0x7FFFFFFF, (variation.seed >> 31) & 0x7FFFFFFF
        var_params = [variation.sigma, variation.g_min, variation.g_range]
    elif isinstance(variation, DeviceVariation):
        for name in ("g_max", "a_scale"):
            if not isinstance(getattr(variation, name), torch.Tensor):
                raise ValueError(f"write_verify_: variation.{name} must be a torch.Tensor")
        var_mode = 2
        var_g = variation.g_max.reshape(-1).to(torch.float32).contiguous()
        var_a = variation.a_scale.reshape(-1).to(torch.float32).contiguous()
        for name, tensor in (("variation.g_max", var_g), ("variation.a_scale", var_a)):
            _check_f32(name, tensor, n)
    elif variation is not None:
        raise ValueError(
            "write_verify_: variation must be SeededDeviceVariation, DeviceVariation or None, "
            f"got {type(variation).__name__}"
        )
    if initial is not None and initial.numel() and initial.data_ptr() == out.data_ptr():
        inputs = {}  # out may be initial itself (updated in place), but no other overlap
    else:
        inputs = {"initial": initial}
    native_rng.check_no_overlap(
        _FUNC,
        "out",
        out,
        target=target,
        seeds=seeds,
        params=params,
        **inputs,
        **{"variation.g_max": var_g, "variation.a_scale": var_a},
    )
    if not available():
        raise RuntimeError("native write-verify kernel unavailable")
    if n == 0:
        return WriteVerifyResult(
            pulses=0, iterations=0, within=0, abs_error_sum=0.0, abs_error_max=0.0
        )
    head = torch.stack(
        [
            (a_ltp - a_ltd) + a_ltd,
            a_ltd,
            (s_ltp - s_ltd) + s_ltd,
            s_ltd,
            (levels_ltp - levels_ltd) + levels_ltd,
            levels_ltd,
            g_min,
            g_range,
            noise,
            tol,
        ]
    )
    # Gmin + tolerance in float32: the erased array's threshold for a pulse
    tail = torch.stack([torch.tensor(g_max, dtype=torch.float32), g_min + tol])
    rest = torch.tensor([stats_tolerance, *var_params], dtype=torch.float32)
    consts = torch.cat([head, tail, rest]).contiguous()
    counts = (ctypes.c_int64 * 3)()
    errs = (ctypes.c_double * 2)()
    status = _KERNEL.get().sedma_write_verify_f32(  # type: ignore[union-attr]
        out.data_ptr(),
        target.data_ptr(),
        None if initial is None else initial.data_ptr(),
        n,
        consts.data_ptr(),
        seeds.data_ptr(),
        seeds.shape[0],
        var_mode,
        var_lo,
        var_hi,
        None if var_g is None else var_g.data_ptr(),
        None if var_a is None else var_a.data_ptr(),
        block,
        counts,
        errs,
    )
    if status == -2:
        raise ValueError(f"write_verify_: the kernel rejected the sizes (n={n}, block={block})")
    if status != 0:
        raise MemoryError("write_verify_: out of memory")
    return WriteVerifyResult(
        pulses=int(counts[0]),
        iterations=int(counts[1]),
        within=int(counts[2]),
        abs_error_sum=float(errs[0]),
        abs_error_max=float(errs[1]),
    )


__all__ = ["BLOCK", "MAX_CELLS", "WriteVerifyResult", "available", "write_verify_"]
