"""Closed-loop write-and-verify programming of conductances, vectorised over all cells.

Each cell sits somewhere on its own pulse curves (see :mod:`sedma_torch.rram.materials`).
One iteration of the loop, for every cell whose read-back error exceeds the tolerance:

1. the controller computes the number of pulses ``n`` from the *nominal* curve:
   ``n = round(p_nom(target) - p_nom(G))`` potentiation pulses when ``G < target``, or
   ``round(q_nom(G) - q_nom(target))`` depression pulses otherwise (at least one);
2. the cell moves ``n`` pulses along its *own* curve (device-to-device spread of Gmax
   and curvature makes that differ from the nominal one);
3. cycle-to-cycle noise adds ``sigma_c2c * (Gmax - Gmin) * sqrt(n)`` Gaussian noise (the sum
   of ``n`` independent per-pulse draws; a counter-based stream keyed by the cell index
   and the iteration's seed pair, all ``max_iters`` pairs drawn from the generator up
   front) and the result is clipped to the cell's window;
4. the cell is read back (verify) and the loop repeats for the cells still out of
   tolerance, at most ``max_iters`` times.

The array starts erased at Gmin unless an initial state is given (re-programming after a
weight update starts from the current state and touches only the cells whose target
moved out of tolerance).

Two implementations of the same loop: on CPU in float32 the compiled kernel of
:mod:`.native_program` runs it block by block (each cell to convergence while its block
stays in cache; several times faster). Otherwise (CUDA, float64, no C compiler,
``SEDMA_NATIVE_RNG=0``) a PyTorch loop runs it over all cells at once: cells that converge
are frozen and dropped from the working set once enough of them have accumulated, so the
work shrinks as cells converge. Both give the same per-cell trajectories up to float32
rounding of the transcendental functions, and consume the generator identically.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from .materials import Material
from .rng import hash_normal_at, randn_split, seed_words


@dataclass
class ProgrammingStats:
    """What one programming event cost and achieved."""

    cells: int
    """Number of cells addressed."""
    iterations: int
    """Program-verify iterations that were run (the loop stops early when all cells converge)."""
    pulses: int
    """Total programming pulses applied."""
    fraction_within_tolerance: float
    """Fraction of cells whose final |G - target| <= tolerance * (Gmax - Gmin)."""
    mean_abs_error: float
    """Mean |G - target| as a fraction of (Gmax - Gmin)."""
    max_abs_error: float
    """Largest |G - target| as a fraction of (Gmax - Gmin)."""

    def merge(self, other: ProgrammingStats) -> ProgrammingStats:
        """Combine two events (cell-weighted means)."""
        cells = self.cells + other.cells
        if cells == 0:
            return ProgrammingStats(0, 0, 0, 1.0, 0.0, 0.0)
        w1, w2 = self.cells / cells, other.cells / cells
        return ProgrammingStats(
            cells=cells,
            iterations=max(self.iterations, other.iterations),
            pulses=self.pulses + other.pulses,
            fraction_within_tolerance=w1 * self.fraction_within_tolerance
            + w2 * other.fraction_within_tolerance,
            mean_abs_error=w1 * self.mean_abs_error + w2 * other.mean_abs_error,
            max_abs_error=max(self.max_abs_error, other.max_abs_error),
        )


@dataclass
class DeviceVariation:
    """Per-cell physical spread, drawn once per chip (device-to-device variation).

    Each cell has its own Gmax and one curvature factor that scales both its LTP and
    LTD curves (tensors shaped like the array)."""

    g_max: torch.Tensor
    """Each cell's own Gmax in siemens."""
    a_scale: torch.Tensor
    """Each cell's curvature relative to nominal (> 0)."""

    def at(self, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(Gmax, curvature factor) of the cells with flat indices ``index`` (int64)."""
        return (
            self.g_max.reshape(-1).index_select(0, index).to(dtype),
            self.a_scale.reshape(-1).index_select(0, index).to(dtype),
        )


@dataclass(frozen=True)
class SeededDeviceVariation:
    """Device-to-device variation as a pure function of (chip seed, flat cell index).

    The same distribution as :func:`draw_device_variation` (Gmax and curvature with
    relative sigma ``sigma``, floored at 5 % of nominal), drawn from the counter-based
    :func:`~sedma_torch.rram.rng.hash_normal_at` stream keyed by each cell's index. So a
    cell's properties never change between programming events, and they are computed only
    for the cells a programming event addresses (about half of a differential array sits
    at Gmin and is never pulsed) instead of being stored for the whole chip.
    """

    seed: int
    """Chip seed (63 bits); two 31-bit words key each of the two properties."""
    sigma: float
    """Relative standard deviation of Gmax and of the curvature."""
    g_min: float
    """Gmin in siemens."""
    g_range: float
    """Nominal Gmax - Gmin in siemens."""

    def at(self, index: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(Gmax in S, curvature factor) of the cells with flat indices ``index``."""
        if index.numel() >= 2**30:  # two draws per cell key the stream as int32
            raise ValueError(f"SeededDeviceVariation: {index.numel()} cells exceed 2^30")
        words = seed_words(self.seed, index.device)
        params = torch.tensor([self.sigma, self.g_min, self.g_range], dtype=dtype)
        return _run_fused(
            _variation_at,
            index.numel() >= _COMPILE_MIN_CELLS,
            index.to(torch.int32),
            words,
            params.to(index.device),
        )

    def materialise(self, shape: tuple[int, ...], device, dtype) -> DeviceVariation:
        """The full per-cell tensors for an array of ``shape`` (for inspection and tests)."""
        index = torch.arange(math.prod(shape), device=device)
        g_max, a_scale = self.at(index, dtype)
        return DeviceVariation(g_max=g_max.view(shape), a_scale=a_scale.view(shape))


def _variation_at(index: torch.Tensor, words: torch.Tensor, params: torch.Tensor):
    """Gmax and curvature of cells ``index`` (int32) from two normals per cell."""
    sigma, g_min, g_range = params.unbind(0)
    z = hash_normal_at(index * 2, words, params.dtype)
    z2 = hash_normal_at(index * 2 + 1, words, params.dtype)
    g_max = g_min + g_range * (1 + sigma * z).clamp_min(0.05)
    return g_max, (1 + sigma * z2).clamp_min(0.05)


def draw_device_variation(
    shape: torch.Size | tuple[int, ...],
    material: Material,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DeviceVariation:
    """Draw per-cell Gmax and curvature spreads (relative sigma ``material.sigma_d2d``)."""
    sigma = material.sigma_d2d
    z = randn_split((2, *shape), generator, torch.device(device), dtype)
    g_max = material.g_min + material.g_range * (1 + sigma * z[0]).clamp_min(0.05)
    return DeviceVariation(g_max=g_max, a_scale=(1 + sigma * z[1]).clamp_min(0.05))


def program_conductances(
    target: torch.Tensor,
    material: Material,
    *,
    generator: torch.Generator,
    tolerance: float = 0.01,
    max_iters: int = 20,
    initial: torch.Tensor | None = None,
    programming_noise: bool = True,
    variation: DeviceVariation | SeededDeviceVariation | None = None,
) -> tuple[torch.Tensor, ProgrammingStats]:
    """Program ``target`` conductances (siemens, any shape) with write-and-verify.

    Args:
        target: desired conductances in S, clipped to [Gmin, Gmax].
        material: the device record.
        generator: source of the cycle-to-cycle noise (on ``target.device``).
        tolerance: verify tolerance as a fraction of (Gmax - Gmin).
        max_iters: maximum program-verify iterations (>= 1).
        initial: current conductances (S) to start from; ``None`` = erased at Gmin.
        programming_noise: apply cycle-to-cycle noise.
        variation: per-cell spread (shape of ``target``); ``None`` = nominal devices.

    Returns:
        ``(conductances, stats)`` with conductances shaped like ``target``.
    """
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if target.numel() >= 2**31:  # cell indices key the noise stream as int32
        raise ValueError(f"program_conductances: {target.numel()} cells exceed the 2^31 limit")
    g_min, g_max, g_range = material.g_min, material.g_max, material.g_range
    tol_abs = tolerance * g_range

    if material.levels_ltp is None or material.levels_ltd is None:
        # a continuous device is set exactly, one (analog) pulse per cell that changes
        t_flat = target.clamp(g_min, g_max).reshape(-1)
        start = torch.full_like(t_flat, g_min) if initial is None else initial.reshape(-1)
        pulses = int((start != t_flat).sum())
        return t_flat.view(target.shape), _stats(t_flat, t_flat, tol_abs, g_range, 1, pulses)

    levels_ltp, levels_ltd = float(material.levels_ltp), float(material.levels_ltd)
    a_ltp, a_ltd = material.curve_a("ltp"), material.curve_a("ltd")
    noise_scale = material.sigma_c2c * g_range if programming_noise else 0.0
    # Nominal curves (what the controller assumes): G = Gmin + range * (1 - e^{-p/A}) / S,
    # S = 1 - e^{-L/A}; a linear curve is the limit A -> inf (handled with a huge A).
    a_ltp_f, a_ltd_f = _finite_a(a_ltp, levels_ltp), _finite_a(a_ltd, levels_ltd)
    s_ltp, s_ltd = -math.expm1(-levels_ltp / a_ltp_f), -math.expm1(-levels_ltd / a_ltd_f)
    params = torch.tensor(
        [
            a_ltp_f,
            a_ltd_f,
            s_ltp,
            s_ltd,
            levels_ltp,
            levels_ltd,
            g_min,
            g_range,
            noise_scale,
            tol_abs,
        ],
        dtype=target.dtype,
    )
    # the noise keys of all iterations, drawn up front (both paths consume the generator
    # identically, whether or not the loop stops early)
    seeds = torch.randint(
        0,
        2**31 - 1,
        (max_iters, 2),
        generator=generator,
        device=generator.device,
        dtype=torch.int32,
    )
    if _native_eligible(target, initial, variation, max(levels_ltp, levels_ltd)):
        return _program_native(target, initial, material, seeds, params, tol_abs, variation)

    target = target.clamp(g_min, g_max)
    shape = target.shape
    t_flat = target.reshape(-1)
    g_flat = torch.full_like(t_flat, g_min) if initial is None else initial.reshape(-1).clone()
    params = params.to(target.device)
    seeds = seeds.to(target.device)
    # Working set: conductances g and, row-wise, per-cell constants (so that compaction is
    # one row gather). Only cells out of tolerance are carried along.
    if initial is None:  # erased: only targets above Gmin + tolerance need pulses
        active = torch.nonzero(t_flat > params[6] + params[9]).squeeze(1)
    else:
        active = torch.nonzero((g_flat - t_flat).abs() > tol_abs).squeeze(1)
    g = g_flat[active]
    consts = torch.empty((3, active.numel()), dtype=g.dtype, device=g.device)
    torch.index_select(t_flat, 0, active, out=consts[0])
    if variation is not None:
        consts[1], consts[2] = variation.at(active, g.dtype)
    else:
        consts[1], consts[2] = g_max, 1.0
    index = active.to(torch.int32)
    fused = g.numel() >= _COMPILE_MIN_CELLS
    # a fused step is cheap per cell, so compact (gather) only when few cells are left
    compact_below = (
        _COMPACT_FUSED if fused and _compiled(_write_verify_step) is not _write_verify_step else 0.6
    )
    pulses = 0
    iterations = 0
    # Cells that converge are frozen (live = 0) and dropped from the working set only when
    # enough of them have accumulated: compaction (a gather) costs more than computing a
    # frozen cell for a few more iterations. Frozen cells keep their conductance in g.
    live = torch.ones_like(g)
    n_live = g.numel()
    for seed in seeds:
        if n_live == 0:
            break
        iterations += 1
        # cycle-to-cycle noise: a counter-based stream keyed by this iteration's seed pair
        # and by each cell's index (generated inside the fused step)
        counts = _run_fused(_write_verify_step, fused, g, consts, live, index, seed, params)
        n_sum, n_live = (int(c) for c in counts.tolist())
        pulses += n_sum
        if 0 < n_live < compact_below * live.numel():
            g_flat.index_copy_(0, active, g)
            keep = torch.nonzero(live).squeeze(1)
            active, g, consts = active[keep], g[keep], consts.index_select(1, keep)
            index = active.to(torch.int32)
            live = torch.ones_like(g)
    g_flat.index_copy_(0, active, g)
    return g_flat.view(shape), _stats(g_flat, t_flat, tol_abs, g_range, iterations, pulses)


def _native_eligible(
    target: torch.Tensor,
    initial: torch.Tensor | None,
    variation: DeviceVariation | SeededDeviceVariation | None,
    max_levels: float,
) -> bool:
    """Whether the compiled kernel of :mod:`.native_program` runs this programming event:
    CPU float32 arrays, seeded or stored (float32) device spread, and the kernel builds
    (``SEDMA_NATIVE_RNG=0`` or a failed build, which warns once, select the PyTorch loop)."""
    from . import native_program

    if target.device.type != "cpu" or target.dtype != torch.float32 or target.numel() == 0:
        return False
    if target.numel() > native_program.MAX_CELLS:
        return False
    if native_program.BLOCK * (max_levels + 2) >= 2**31:  # per-block pulse counts are int32
        return False
    if initial is not None and (initial.device.type != "cpu" or initial.dtype != torch.float32):
        return False
    if isinstance(variation, DeviceVariation) and any(
        t.device.type != "cpu" for t in (variation.g_max, variation.a_scale)
    ):
        return False
    return native_program.available()


def _program_native(
    target: torch.Tensor,
    initial: torch.Tensor | None,
    material: Material,
    seeds: torch.Tensor,
    params: torch.Tensor,
    tol_abs: float,
    variation: DeviceVariation | SeededDeviceVariation | None,
) -> tuple[torch.Tensor, ProgrammingStats]:
    """The write-verify loop and its statistics in one compiled pass over the cells (the
    same per-cell trajectories as the PyTorch loop below)."""
    from .native_program import write_verify_

    t_flat = target.reshape(-1).contiguous()
    out = torch.empty_like(t_flat)
    result = write_verify_(
        out,
        t_flat,
        seeds.cpu(),
        params,
        g_max=material.g_max,
        initial=None if initial is None else initial.reshape(-1).contiguous(),
        stats_tolerance=tol_abs * _STATS_SLACK,
        variation=variation,
    )
    cells = t_flat.numel()
    stats = ProgrammingStats(
        cells=cells,
        iterations=result.iterations,
        pulses=result.pulses,
        fraction_within_tolerance=result.within / cells,
        mean_abs_error=result.abs_error_sum / cells / material.g_range,
        max_abs_error=result.abs_error_max / material.g_range,
    )
    return out.view(target.shape), stats


def _write_verify_step(
    g: torch.Tensor,
    consts: torch.Tensor,
    live: torch.Tensor,
    index: torch.Tensor,
    seed: torch.Tensor,
    params: torch.Tensor,
):
    """One program-and-verify iteration for a working set, in place on ``g`` and ``live``.

    ``g``: conductances; ``consts`` rows: target, cell Gmax, cell curvature factor;
    ``index``: each cell's flat index (int32), which keys its cycle-to-cycle noise with
    ``seed`` (see ``rng.hash_normal_at``); ``params`` (a tensor, so a compiled step never
    bakes material constants in): nominal A and S for LTP and LTD, levels LTP and LTD,
    Gmin, Gmax - Gmin, noise scale, tolerance. Everything else is recomputed per cell
    (cheaper than reading it: the step is memory-bound).

    Updates ``g`` (conductances) and ``live`` (1 = still out of tolerance) in place --
    reusing the working set's memory instead of allocating two new arrays per iteration,
    which on CPU costs page faults on every iteration -- and returns (pulses applied,
    cells still live) as a float64 pair.
    Frozen cells (live = 0) get no pulse and keep their conductance.
    """
    t, top, a_scale = consts.unbind(0)
    (a_ltp, a_ltd, s_ltp, s_ltd, levels_ltp, levels_ltd, g_min, g_range, noise_scale, tol_abs) = (
        params.unbind(0)
    )
    upf = (t > g).to(g.dtype)  # float masks: torch.where on bool masks is slow on CPU
    sgn = upf * 2.0 - 1.0
    a_nom = upf * (a_ltp - a_ltd) + a_ltd
    s_nom = upf * (s_ltp - s_ltd) + s_ltd
    p_g = -a_nom * torch.log1p(-s_nom * ((g - g_min) / g_range).clamp(0.0, 1.0))
    p_t = -a_nom * torch.log1p(-s_nom * ((t - g_min) / g_range).clamp(0.0, 1.0))
    n = (p_t - p_g).abs().round().clamp_min(1.0) * live
    levels = upf * (levels_ltp - levels_ltd) + levels_ltd
    a_cell = a_scale * a_nom
    s_cell = -torch.expm1(-levels / a_cell)
    span = top - g_min
    p_cell = -a_cell * torch.log1p(-((g - g_min) / span).clamp(0.0, 1.0) * s_cell)
    p_next = torch.minimum((p_cell + n * sgn).clamp(min=0.0), levels)
    g_next = -torch.expm1(-p_next / a_cell) / s_cell * span + g_min
    g_next = g_next + hash_normal_at(index, seed, g.dtype) * n.sqrt() * noise_scale
    g_next = torch.minimum(g_next.clamp(min=g_min), top)
    live_next = live * ((g_next - t).abs() > tol_abs).to(g.dtype)
    live.copy_(live_next)
    g.copy_(g_next)
    return torch.stack([n.sum(dtype=torch.float64), live_next.sum(dtype=torch.float64)])


_COMPILE_MIN_CELLS = 1 << 20
_STATS_SLACK = 1 + 1e-6
"""A cell counts as within tolerance up to this factor on the tolerance (float rounding
of |G - target|), in both implementations' statistics."""
_COMPACT_FUSED = 0.5
_COMPILED: dict = {}


def _compiled(fn):
    """``fn`` fused by torch.compile with dynamic shapes (one loop instead of tens of
    eager passes; the write-verify step runs about 6x faster on CPU). ``fn`` itself when
    compilation is disabled with SEDMA_COMPILE=0 or failed before in this process."""
    if os.environ.get("SEDMA_COMPILE", "1") == "0":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _run_fused(fn, fused: bool, *args):
    """``fn(*args)``, through its compiled form when ``fused``. If compilation fails (no
    C++ compiler, no Triton for this GPU, ...) this warns once and runs -- from now on --
    the eager ``fn``, which computes the same."""
    impl = _compiled(fn) if fused else fn
    try:
        return impl(*args)
    except Exception as exc:
        if impl is fn:
            raise
        _COMPILED[fn] = fn
        warnings.warn(
            f"torch.compile failed for {fn.__name__} ({exc}); using eager",
            RuntimeWarning,
            stacklevel=3,
        )
        return fn(*args)


def _finite_a(a: float, levels: float) -> float:
    """A curvature usable in closed form; a linear curve becomes A = 1e6 * levels
    (deviation from linear < 1e-7 of the range)."""
    return a if math.isfinite(a) else math.copysign(1e6 * levels, a)


def _stats(
    g: torch.Tensor, t: torch.Tensor, tol_abs: float, g_range: float, iterations: int, pulses: int
) -> ProgrammingStats:
    if g.numel() == 0:
        return ProgrammingStats(0, iterations, pulses, 1.0, 0.0, 0.0)
    tol = torch.tensor(tol_abs * _STATS_SLACK, dtype=g.dtype, device=g.device)
    sums = _run_fused(_error_sums, g.numel() >= _COMPILE_MIN_CELLS, g, t, tol)
    within, total, largest = sums.tolist()
    return ProgrammingStats(
        cells=g.numel(),
        iterations=iterations,
        pulses=pulses,
        fraction_within_tolerance=within / g.numel(),
        mean_abs_error=total / g.numel() / g_range,
        max_abs_error=largest / g_range,
    )


def _error_sums(g: torch.Tensor, t: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """(cells with |g - t| <= tol, sum of |g - t|, max |g - t|) in float64, one pass."""
    err = (g - t).abs()
    return torch.stack(
        [
            (err <= tol).sum(dtype=torch.float64),
            err.sum(dtype=torch.float64),
            err.max().to(torch.float64),
        ]
    )


__all__ = [
    "DeviceVariation",
    "ProgrammingStats",
    "SeededDeviceVariation",
    "draw_device_variation",
    "program_conductances",
]
