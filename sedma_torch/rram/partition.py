"""Tilings, workload classes and memory-guided partitioning (SPEC.md Eq. 4).

Crossbar utilisation ("memory utilisation efficiency" of layer 1) is
used cells / allocated cells, counting each weight once (a differential pair
allocates two cells per weight and uses two, so the ratio is the same).

Memory-guided partitioning chooses, for every layer of a model, the crossbar size
its tiles use, from a pool of square crossbars of several sizes with a count each
(:class:`CrossbarPool`). For one layer and one size ``s`` (tiles of ``s x s``, laid
out exactly as :class:`~sedma_torch.rram.RRAMLinear` / ``RRAMConv2d`` lay them out)

    cost(s) = compute_cost(s) + lambda_mem * memory_overhead(s)

with the terms of :class:`PartitionCostModel` (each documented with its unit). Over a
model the per-size counts couple the layers: :func:`plan_partition` solves the
assignment exactly as a small integer program (SciPy HiGHS), looking up the best size
per workload type in long-term memory first and storing what it chose.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Tiling:
    """A regular tiling of an (rows x cols) matrix onto (tile_rows x tile_cols) crossbars."""

    rows: int
    """Matrix rows mapped to word lines (inputs)."""
    cols: int
    """Matrix columns mapped to bit lines (outputs)."""
    tile_rows: int
    tile_cols: int

    @property
    def row_tiles(self) -> int:
        return math.ceil(self.rows / self.tile_rows)

    @property
    def col_tiles(self) -> int:
        return math.ceil(self.cols / self.tile_cols)

    @property
    def tiles(self) -> int:
        return self.row_tiles * self.col_tiles

    @property
    def allocated_cells(self) -> int:
        return self.tiles * self.tile_rows * self.tile_cols

    @property
    def utilisation(self) -> float:
        return crossbar_utilisation(
            self.rows * self.cols, self.tiles, self.tile_rows, self.tile_cols
        )


def crossbar_utilisation(used_cells: int, tiles: int, tile_rows: int, tile_cols: int) -> float:
    """used cells / (tiles * tile_rows * tile_cols), in [0, 1]."""
    if tiles <= 0 or tile_rows <= 0 or tile_cols <= 0:
        raise ValueError(
            f"tiles, tile_rows, tile_cols must be positive, got {tiles}, {tile_rows}, {tile_cols}"
        )
    allocated = tiles * tile_rows * tile_cols
    if not 0 <= used_cells <= allocated:
        raise ValueError(f"used_cells={used_cells} must be in [0, allocated={allocated}]")
    return used_cells / allocated


# ------------------------------------------------------------------------------------------
# workload classes
# ------------------------------------------------------------------------------------------
SPARSE_ZERO_FRACTION = 0.1
"""A matrix with at least this fraction of (near-)zero entries is ``sparse``."""
VERY_SPARSE_ZERO_FRACTION = 0.9
"""... and with at least this fraction ``very_sparse``."""
ZERO_TOLERANCE = 1e-6
"""|w| <= ZERO_TOLERANCE * max|w| counts as zero."""
HEAVY_TAIL_KURTOSIS = 1.0
"""Excess kurtosis above which the value distribution is ``heavy`` tailed (Gaussian: 0,
Laplace: 3, uniform: -1.2)."""
SMOOTH_CORRELATION = 0.5
"""Mean cosine similarity of adjacent output rows above which the outputs are ``smooth``.

For inputs with independent zero-mean entries, corr(y_i, y_{i+1}) equals the cosine of
rows i and i+1 of W, so this is the smoothness the denoiser can exploit."""


@dataclass(frozen=True)
class WorkloadType:
    """The class of a weight matrix: what partitions and lambdas are remembered by.

    Sizes are rounded up to powers of two, so matrices of similar shape share a class.
    ``"unknown"`` statistics mean the class came from a shape alone (no weight values).
    """

    rows: int
    """Inputs (word lines: in_features, or in_channels/groups * kh * kw), rounded up to 2^k."""
    cols: int
    """Outputs (bit lines: out_features or out_channels), rounded up to 2^k."""
    kind: str
    """``"linear"`` or ``"conv<kh>x<kw>"``."""
    sparsity: str
    """``"dense"``, ``"sparse"``, ``"very_sparse"`` or ``"unknown"``."""
    tails: str
    """``"light"``, ``"heavy"`` or ``"unknown"``."""
    smoothness: str
    """``"smooth"``, ``"rough"`` or ``"unknown"``."""

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.rows}x{self.cols}/{self.sparsity}/{self.tails}/{self.smoothness}"


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def classify_workload(weight: torch.Tensor, kind: str = "linear") -> WorkloadType:
    """Classify a weight matrix, deterministically, from its shape and values.

    Args:
        weight: ``(out, in)`` (``nn.Linear``) or ``(out, in/groups, kh, kw)`` (``nn.Conv2d``);
            a conv weight is read as the ``(out, in/groups*kh*kw)`` matrix it programs.
        kind: ``"linear"`` or ``"conv<kh>x<kw>"`` (set from the weight's shape when 4-D).

    Rules (constants above): zero fraction -> sparsity; excess kurtosis of the non-zero
    values -> tails; mean cosine similarity of adjacent output rows -> smoothness. A meta
    tensor (shape only) gives ``"unknown"`` statistics.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"classify_workload: weight must be a tensor, got {type(weight).__name__}")
    if weight.ndim == 4:
        kind = f"conv{weight.shape[2]}x{weight.shape[3]}"
        w = weight.reshape(weight.shape[0], -1)
    elif weight.ndim == 2:
        w = weight
    else:
        raise ValueError(
            f"classify_workload: weight must be 2-D (out, in) or 4-D (out, in, kh, kw), "
            f"got shape {tuple(weight.shape)}"
        )
    if w.numel() == 0:
        raise ValueError(f"classify_workload: empty weight of shape {tuple(weight.shape)}")
    rows, cols = _pow2(w.shape[1]), _pow2(w.shape[0])
    if w.is_meta:
        return WorkloadType(rows, cols, kind, "unknown", "unknown", "unknown")
    w = w.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("classify_workload: weight contains NaN or Inf")
    scale = float(w.abs().max())
    nonzero = w.abs() > ZERO_TOLERANCE * scale if scale > 0 else torch.zeros_like(w, dtype=bool)
    zero_fraction = 1.0 - float(nonzero.double().mean())
    if zero_fraction >= VERY_SPARSE_ZERO_FRACTION:
        sparsity = "very_sparse"
    elif zero_fraction >= SPARSE_ZERO_FRACTION:
        sparsity = "sparse"
    else:
        sparsity = "dense"
    values = w[nonzero]
    if values.numel() >= 4:
        centred = values - values.mean()
        m2 = float((centred**2).mean())
        kurt = float((centred**4).mean()) / (m2 * m2) - 3.0 if m2 > 0 else 0.0
    else:
        kurt = 0.0
    tails = "heavy" if kurt > HEAVY_TAIL_KURTOSIS else "light"
    if w.shape[0] >= 2:
        norms = w.norm(dim=1)
        ok = (norms[:-1] > 0) & (norms[1:] > 0)
        cos = (w[:-1] * w[1:]).sum(1) / (norms[:-1] * norms[1:]).clamp_min(1e-300)
        smooth = float(cos[ok].mean()) if bool(ok.any()) else 0.0
    else:
        smooth = 0.0
    smoothness = "smooth" if smooth > SMOOTH_CORRELATION else "rough"
    return WorkloadType(rows, cols, kind, sparsity, tails, smoothness)


# ------------------------------------------------------------------------------------------
# layer geometry: the tiles RRAMLinear / RRAMConv2d allocate for a given crossbar size
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """A layer's weight geometry (no values needed)."""

    name: str
    kind: str
    """``"linear"`` or ``"conv"``."""
    in_features: int
    """in_features (linear) or in_channels (conv)."""
    out_features: int
    """out_features (linear) or out_channels (conv)."""
    kernel: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv"):
            raise ValueError(f"LayerShape.kind must be 'linear' or 'conv', got {self.kind!r}")
        for label, v in (
            ("in_features", self.in_features),
            ("out_features", self.out_features),
            ("groups", self.groups),
            ("kernel height", self.kernel[0]),
            ("kernel width", self.kernel[1]),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LayerShape {self.name!r}: {label} must be >= 1, got {v!r}")
        if self.in_features % self.groups or self.out_features % self.groups:
            raise ValueError(
                f"LayerShape {self.name!r}: groups={self.groups} must divide "
                f"in={self.in_features} and out={self.out_features}"
            )

    @property
    def cells(self) -> int:
        """Weights (= used cells per polarity)."""
        kh, kw = self.kernel
        return self.in_features // self.groups * kh * kw * self.out_features

    @property
    def workload_kind(self) -> str:
        return "linear" if self.kind == "linear" else f"conv{self.kernel[0]}x{self.kernel[1]}"


@dataclass(frozen=True)
class LayerTiling:
    """How a layer's weights occupy ``tile_rows x tile_cols`` crossbars."""

    tile_rows: int
    tile_cols: int
    input_tiles: int
    """Tiles along the input dimension, all groups together."""
    input_tiles_per_group: int
    column_tiles: int
    """Tiles along the output dimension (per group)."""
    rows_per_tile: int
    """Word lines used in each tile."""
    used_cells: int
    out_per_group: int

    @property
    def tiles(self) -> int:
        return self.input_tiles * self.column_tiles

    @property
    def crossbars(self) -> int:
        """Physical crossbars: two per tile (differential pair)."""
        return 2 * self.tiles

    @property
    def allocated_cells(self) -> int:
        return self.tiles * self.tile_rows * self.tile_cols

    @property
    def utilisation(self) -> float:
        return crossbar_utilisation(self.used_cells, self.tiles, self.tile_rows, self.tile_cols)


def layer_tiling(shape: LayerShape, tile_rows: int, tile_cols: int) -> LayerTiling:
    """The tiles the RRAM layer for ``shape`` allocates on ``tile_rows x tile_cols`` crossbars.

    Same arithmetic as the layers: linear inputs are cut every ``tile_rows`` rows; conv
    kernels are mapped whole, channels spread evenly over as few input tiles as fit.
    Raises ``ValueError`` when a kernel does not fit ``tile_rows``.
    """
    if tile_rows < 1 or tile_cols < 1:
        raise ValueError(f"tile sizes must be >= 1, got {tile_rows}x{tile_cols}")
    out_g = shape.out_features // shape.groups
    n_ot = math.ceil(out_g / tile_cols)
    if shape.kind == "linear":
        n_it = math.ceil(shape.in_features / tile_rows)
        return LayerTiling(
            tile_rows, tile_cols, n_it, n_it, n_ot, tile_rows, shape.cells, shape.out_features
        )
    kh, kw = shape.kernel
    if kh * kw > tile_rows:
        raise ValueError(
            f"layer {shape.name!r}: kernel {kh}x{kw} = {kh * kw} taps does not fit "
            f"tile_rows={tile_rows}"
        )
    c_g = shape.in_features // shape.groups
    n_it = math.ceil(c_g / min(c_g, tile_rows // (kh * kw)))
    cpt = math.ceil(c_g / n_it)
    return LayerTiling(
        tile_rows,
        tile_cols,
        shape.groups * n_it,
        n_it,
        n_ot,
        cpt * kh * kw,
        shape.cells,
        out_g,
    )


def layer_shapes(model: nn.Module) -> list[tuple[LayerShape, torch.Tensor]]:
    """The convertible layers of ``model`` (what ``convert_`` would convert) with their
    shapes and weights in ``(out, in[, kh, kw])`` layout (meta tensors when built on the
    meta device). ``nn.MultiheadAttention`` projections are skipped, as ``convert_`` does.
    """
    from .convert import _mha_children, _transformers_conv1d

    conv1d = _transformers_conv1d()
    mha_children = _mha_children(model)
    out: list[tuple[LayerShape, torch.Tensor]] = []
    for name, m in model.named_modules():
        if id(m) in mha_children:
            continue
        if conv1d is not None and isinstance(m, conv1d):
            w = m.weight.t()
            out.append((LayerShape(name, "linear", w.shape[1], w.shape[0]), w))
        elif isinstance(m, nn.Linear):
            out.append((LayerShape(name, "linear", m.in_features, m.out_features), m.weight))
        elif isinstance(m, nn.Conv2d):  # RRAMConv1d too: a (1, k) kernel, 3-D weight
            ks = (int(m.kernel_size[0]), int(m.kernel_size[1]))
            shape = LayerShape(name, "conv", m.in_channels, m.out_channels, ks, m.groups)
            w = m.weight
            out.append((shape, w.unsqueeze(2) if w.ndim == 3 else w))
        elif isinstance(m, nn.Conv1d):  # as convert_ maps it: a 2-D conv with a 1 x k kernel
            ks = (1, int(m.kernel_size[0]))
            shape = LayerShape(name, "conv", m.in_channels, m.out_channels, ks, m.groups)
            out.append((shape, m.weight.unsqueeze(2)))
    return out


# ------------------------------------------------------------------------------------------
# the crossbar pool and the cost of Eq. 4
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossbarPool:
    """Square crossbars available to a model: sizes, a count per size, and the IR-drop limit.

    A material's largest usable size is the largest ``s`` whose worst first-order IR-drop
    attenuation with every cell at mid-range conductance, ``r * G_mid * s (s + 1)``
    (``crossbar.ir_drop_factor`` at the far corner of an s x s tile), stays within
    ``ir_drop_tolerance``; an ideal device has no limit.
    """

    sizes: tuple[int, ...] = (64, 128, 256, 512)
    """Crossbar sizes (rows = columns), ascending, each >= 1."""
    counts: tuple[int, ...] | None = (16384, 4096, 1024, 256)
    """Physical crossbars of each size (a tile takes two: differential pair); ``None``:
    unlimited."""
    wire_resistance_ohm: float = 0.1
    """Wire resistance per cell segment (ohm) used for the IR-drop limit."""
    ir_drop_tolerance: float = 0.1
    """Largest allowed worst-case IR-drop attenuation (fraction of the ideal current)."""

    def __post_init__(self) -> None:
        if not self.sizes or any((not isinstance(s, int)) or s < 1 for s in self.sizes):
            raise ValueError(f"CrossbarPool.sizes must be positive ints, got {self.sizes!r}")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"CrossbarPool.sizes must be strictly ascending, got {self.sizes!r}")
        if self.counts is not None and (
            len(self.counts) != len(self.sizes) or any(c < 0 for c in self.counts)
        ):
            raise ValueError(
                f"CrossbarPool.counts must be None or one count >= 0 per size "
                f"({len(self.sizes)}), got {self.counts!r}"
            )
        if self.wire_resistance_ohm < 0 or not 0 < self.ir_drop_tolerance < 1:
            raise ValueError(
                "CrossbarPool: wire_resistance_ohm must be >= 0 and ir_drop_tolerance in (0, 1), "
                f"got {self.wire_resistance_ohm!r}, {self.ir_drop_tolerance!r}"
            )

    def max_size(self, material: Any) -> int:
        """Largest allowed crossbar size for ``material`` (a name or Material)."""
        from .materials import get_material

        mat = get_material(material) if isinstance(material, str) else material
        if mat.levels_ltp is None or self.wire_resistance_ohm == 0:
            return max(self.sizes)
        g_mid = 0.5 * (mat.g_max + mat.g_min)
        limit = self.ir_drop_tolerance / (self.wire_resistance_ohm * g_mid)
        fitting = [s for s in self.sizes if s * (s + 1) <= limit]
        if not fitting:
            smallest = self.sizes[0]
            raise ValueError(
                f"CrossbarPool: no crossbar size fits material {mat.name!r}: the smallest, "
                f"{smallest}, has IR-drop attenuation {self.wire_resistance_ohm * g_mid * smallest * (smallest + 1):.3f} "
                f"> ir_drop_tolerance={self.ir_drop_tolerance}"
            )
        return max(fitting)

    def available(self, material: Any) -> list[int]:
        top = self.max_size(material)
        return [s for s in self.sizes if s <= top]

    def count(self, size: int) -> float:
        if self.counts is None:
            return math.inf
        return self.counts[self.sizes.index(size)]

    @property
    def signature(self) -> str:
        counts = "inf" if self.counts is None else ",".join(map(str, self.counts))
        return (
            f"sizes={','.join(map(str, self.sizes))};counts={counts};"
            f"r={self.wire_resistance_ohm:g};tol={self.ir_drop_tolerance:g}"
        )


@dataclass(frozen=True)
class PartitionCostModel:
    """The terms of Eq. 4 for one layer on ``s x s`` tiles (units in each field).

    compute_cost (s) = programming + inferences * per-MVM time, where
      programming = iterations * rows_per_tile * t_pulse   (rows programmed one at a time,
                    all columns of a row and all tiles in parallel; ``iterations`` is the
                    write-and-verify iteration count measured by programming a random
                    s x s tile of the material with the simulator)
      per-MVM     = t_read + ceil(s / columns_per_adc) * t_adc
                    + (input tiles per group - 1) * outputs / digital_adders * t_add
    memory_overhead (MB) = metadata (a float per tile column + a 16-byte tile record)
                    + intermediates (batch x input tiles x outputs partial sums)
                    + unused cells (2 per unused weight slot, log2(levels) bits each)
    lambda_mem (s/MB) = lambda_base / (1 - memory_pressure), pressure in [0, 0.99].
    """

    t_pulse_s: float = 1e-7
    """One program-and-verify step of one crossbar row (s)."""
    t_read_s: float = 1e-8
    """One analog crossbar read (s)."""
    t_adc_s: float = 1e-9
    """One ADC conversion (s)."""
    columns_per_adc: int = 8
    """Columns sharing one ADC."""
    t_add_s: float = 1e-9
    """One digital partial-sum addition (s)."""
    digital_adders: int = 64
    """Digital adders working in parallel."""
    inferences: int = 10_000
    """Matrix-vector products that amortise one programming."""
    batch: int = 64
    """Vectors in flight (sizes the intermediate buffers)."""
    bytes_per_value: int = 4
    """Bytes of one digital value (scales, partial sums)."""
    lambda_base: float = 1e-3
    """lambda_mem at zero memory pressure (s per MB)."""

    @property
    def signature(self) -> str:
        return ";".join(f"{k}={v:g}" for k, v in asdict(self).items())

    def lambda_mem(self, memory_pressure: float) -> float:
        """lambda_mem rising with memory pressure (fraction of memory in use)."""
        if not (isinstance(memory_pressure, int | float) and 0 <= memory_pressure <= 1):
            raise ValueError(f"memory_pressure must be in [0, 1], got {memory_pressure!r}")
        return self.lambda_base / (1.0 - min(memory_pressure, 0.99))

    def terms(
        self, tiling: LayerTiling, iterations: int, bits_per_cell: float
    ) -> tuple[float, float]:
        """(compute_cost in s, memory_overhead in MB) of one layer tiling."""
        s_cols = tiling.tile_cols
        programming = iterations * tiling.rows_per_tile * self.t_pulse_s
        adds = (
            (tiling.input_tiles_per_group - 1)
            * tiling.out_per_group
            * (tiling.input_tiles // tiling.input_tiles_per_group)
        )
        per_mvm = (
            self.t_read_s
            + math.ceil(s_cols / self.columns_per_adc) * self.t_adc_s
            + adds / self.digital_adders * self.t_add_s
        )
        compute = programming + self.inferences * per_mvm
        metadata = tiling.tiles * (s_cols * self.bytes_per_value + 16)
        intermediates = (
            self.batch * tiling.input_tiles * tiling.out_per_group * self.bytes_per_value
        )
        unused = 2 * (tiling.allocated_cells - tiling.used_cells) * bits_per_cell / 8
        return compute, (metadata + intermediates + unused) / 1e6


def _bits_per_cell(material: Any) -> float:
    return math.log2(material.levels_ltp) if material.levels_ltp else 8.0


@functools.lru_cache(maxsize=256)
def _measured_iterations(config: Any, size: int) -> int:
    from .crossbar import program_tiles

    cfg = replace(config, tile_rows=size, tile_cols=size)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    w = torch.randn(1, size, size, generator=gen, dtype=torch.float32)
    return int(program_tiles(w, cfg, seed=int(cfg.seed), event=0).stats.iterations)


def programming_iterations(config: Any, size: int, memory: Any = None) -> int:
    """Write-and-verify iterations the simulator needs for a random ``size x size`` tile of
    ``config``'s material: measured once per configuration and size, then cached in the
    process and, when ``memory`` (long-term memory: ``get``/``put``) is given, stored there
    under kind ``"programming_iterations"`` so later runs skip the measurement."""
    if memory is None:
        return _measured_iterations(config, size)
    key = (
        f"{config.device.name}|{size}|iters={config.write_verify_iters}|"
        f"tol={config.write_verify_tolerance:g}|noise={int(config.programming_noise)}|"
        f"d2d={int(config.device_variation)}"
    )
    rec = memory.get("programming_iterations", key)
    if rec is not None:
        return int(rec["iterations"])
    iterations = _measured_iterations(config, size)
    memory.put("programming_iterations", key, {"iterations": iterations})
    return iterations


# ------------------------------------------------------------------------------------------
# the choice (Eq. 4), exact over the pool, remembered per workload type
# ------------------------------------------------------------------------------------------
@dataclass
class LayerPartition:
    """One layer's chosen crossbar size and its cost terms."""

    name: str
    workload: str
    tile_size: int
    tiling: LayerTiling
    compute_cost_s: float
    memory_overhead_mb: float
    cost: float
    source: str
    """``"solver"`` (enumerated and solved now) or ``"memory"`` (looked up)."""


@dataclass
class PartitionPlan:
    """What :func:`plan_partition` chose, per layer and in total."""

    layers: list[LayerPartition]
    lambda_mem: float
    memory_pressure: float
    candidates_evaluated: int
    memory_hits: int
    seconds: float
    pool: CrossbarPool = field(default_factory=CrossbarPool)

    @property
    def tile_sizes(self) -> dict[str, int]:
        return {lp.name: lp.tile_size for lp in self.layers}

    @property
    def cost(self) -> float:
        return sum(lp.cost for lp in self.layers)

    @property
    def utilisation(self) -> float:
        used = sum(lp.tiling.used_cells for lp in self.layers)
        alloc = sum(lp.tiling.allocated_cells for lp in self.layers)
        return used / alloc if alloc else 0.0

    def crossbars(self) -> dict[int, int]:
        """Physical crossbars used per size."""
        out: dict[int, int] = {}
        for lp in self.layers:
            out[lp.tile_size] = out.get(lp.tile_size, 0) + lp.tiling.crossbars
        return out

    def __str__(self) -> str:
        head = (
            f"{'layer':36s} {'workload':34s} {'size':>5s} {'tiles':>6s} {'util':>6s} {'from':>6s}"
        )
        lines = [head, "-" * len(head)]
        for lp in self.layers:
            lines.append(
                f"{lp.name[:36]:36s} {lp.workload[:34]:34s} {lp.tile_size:>5d} "
                f"{lp.tiling.tiles:>6d} {lp.tiling.utilisation:6.1%} {lp.source:>6s}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{len(self.layers)} layers, crossbars {self.crossbars()}, utilisation "
            f"{self.utilisation:.1%}, cost {self.cost:.4g}, lambda_mem {self.lambda_mem:.3g} s/MB "
            f"(pressure {self.memory_pressure:.2f}), {self.candidates_evaluated} candidates, "
            f"{self.memory_hits} from memory, {self.seconds * 1e3:.1f} ms"
        )
        return "\n".join(lines)


def _memory_pressure() -> float:
    import psutil

    return float(psutil.virtual_memory().percent) / 100.0


def _assign_exactly(cost: np.ndarray, use: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """argmin_x sum cost[l, s] x[l, s]: one size per layer, sum_l use[l, s] x[l, s] <= capacity[s].

    Infinite costs mark infeasible pairs. Exact (HiGHS branch and bound); without binding
    capacities it is the per-layer argmin. Returns the chosen column per layer.
    """
    n_layers, n_sizes = cost.shape
    pick = np.argmin(cost, axis=1)
    load = np.zeros(n_sizes)
    for i, j in enumerate(pick):
        load[j] += use[i, j]
    if np.all(load <= capacity):
        return pick
    from scipy.optimize import Bounds, LinearConstraint, milp

    finite = np.isfinite(cost)
    big = np.where(finite, cost, 0.0)
    c = big.ravel()
    upper = finite.ravel().astype(float)
    one_each = np.zeros((n_layers, n_layers * n_sizes))
    for i in range(n_layers):
        one_each[i, i * n_sizes : (i + 1) * n_sizes] = 1.0
    cap_rows, cap_vals = [], []
    for j in range(n_sizes):
        if np.isfinite(capacity[j]):
            row = np.zeros(n_layers * n_sizes)
            row[j::n_sizes] = use[:, j]
            cap_rows.append(row)
            cap_vals.append(capacity[j])
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    if cap_rows:
        constraints.append(LinearConstraint(np.array(cap_rows), -np.inf, np.array(cap_vals)))
    res = milp(
        c,
        constraints=constraints,
        integrality=np.ones_like(c),
        bounds=Bounds(np.zeros_like(c), upper),
    )
    if res.status != 0 or res.x is None:
        need = {int(j): float(use[:, j].min()) for j in range(n_sizes)}
        raise ValueError(
            f"plan_partition: the layers do not fit the crossbar pool (capacities "
            f"{capacity.tolist()}, smallest need per size {need}); add crossbars or sizes"
        )
    return np.argmax(res.x.reshape(n_layers, n_sizes), axis=1)


def _fits(shape: LayerShape, size: int) -> bool:
    try:
        layer_tiling(shape, size, size)
    except ValueError:
        return False
    return True


def _memory_key(material: str, pool: CrossbarPool, workload: WorkloadType) -> str:
    return f"{material}|{pool.signature}|{workload.key}"


def plan_partition(
    model: nn.Module | Sequence[tuple[LayerShape, torch.Tensor]],
    config: Any,
    *,
    pool: CrossbarPool | None = None,
    cost_model: PartitionCostModel | None = None,
    memory: Any = None,
    memory_pressure: float | None = None,
    use_memory: bool = True,
) -> PartitionPlan:
    """Choose a crossbar size for every convertible layer (SPEC.md Eq. 4).

    Args:
        model: a model (its ``nn.Linear``/``nn.Conv2d``/``Conv1D`` layers; weights may be
            on the meta device) or the output of :func:`layer_shapes`.
        config: the :class:`RRAMConfig` the layers will use (material, programming).
        pool: available crossbars (default :class:`CrossbarPool`).
        cost_model: the terms of Eq. 4 (default :class:`PartitionCostModel`).
        memory: long-term memory (``best_partition`` / ``record_partition``), optional.
            A layer whose workload type has a remembered size that is allowed in this
            pool takes it without enumerating candidates; the solver's choices are stored.
        memory_pressure: fraction of memory in use, in [0, 1] (default: measured, psutil).
        use_memory: look up remembered partitions (``False`` still records them).
    """
    from .materials import get_material

    start = time.perf_counter()
    pool = pool or CrossbarPool()
    cost_model = cost_model or PartitionCostModel()
    pressure = _memory_pressure() if memory_pressure is None else float(memory_pressure)
    lam = cost_model.lambda_mem(pressure)
    material = config.device if hasattr(config, "device") else get_material(config.material)
    sizes = pool.available(material)
    bits = _bits_per_cell(material)
    layers = list(layer_shapes(model) if isinstance(model, nn.Module) else model)
    if not layers:
        raise ValueError("plan_partition: the model has no Linear/Conv2d/Conv1D layer to place")
    workloads = [classify_workload(w, shape.workload_kind) for shape, w in layers]

    n, m = len(layers), len(sizes)
    cost = np.full((n, m), np.inf)
    use = np.zeros((n, m))
    terms: dict[tuple[int, int], tuple[float, float, LayerTiling]] = {}
    remembered: dict[int, int] = {}
    evaluated = 0
    for i, ((shape, _), wl) in enumerate(zip(layers, workloads, strict=True)):
        candidates = list(enumerate(sizes))
        if memory is not None and use_memory:
            rec = memory.best_partition(_memory_key(material.name, pool, wl))
            size = None if rec is None else rec.get("tile_size")
            if size in sizes and _fits(shape, size):
                remembered[i] = sizes.index(size)
                candidates = [(remembered[i], size)]
        for j, size in candidates:
            try:
                tiling = layer_tiling(shape, size, size)
            except ValueError:
                continue
            comp, mem = cost_model.terms(tiling, programming_iterations(config, size, memory), bits)
            cost[i, j] = comp + lam * mem
            use[i, j] = tiling.crossbars
            terms[i, j] = (comp, mem, tiling)
            evaluated += i not in remembered
        if not np.isfinite(cost[i]).any():
            raise ValueError(
                f"plan_partition: layer {shape.name!r} fits no crossbar size in {sizes} "
                f"(material {material.name!r})"
            )
    capacity = np.array([pool.count(s) for s in sizes], dtype=float)
    try:
        pick = _assign_exactly(cost, use, capacity)
    except ValueError:
        if not remembered:
            raise
        # remembered sizes no longer fit together in this pool: solve from scratch
        return plan_partition(
            layers,
            config,
            pool=pool,
            cost_model=cost_model,
            memory=memory,
            memory_pressure=pressure,
            use_memory=False,
        )
    chosen = []
    for i, ((shape, _), wl) in enumerate(zip(layers, workloads, strict=True)):
        j = int(pick[i])
        comp, mem, tiling = terms[i, j]
        source = "memory" if remembered.get(i) == j else "solver"
        chosen.append(
            LayerPartition(
                shape.name, wl.key, sizes[j], tiling, comp, mem, comp + lam * mem, source
            )
        )
        if memory is not None and source == "solver":
            memory.record_partition(
                _memory_key(material.name, pool, wl),
                {"tile_size": sizes[j], "layer": shape.name},
                comp + lam * mem,
            )
    return PartitionPlan(
        chosen,
        lam,
        pressure,
        evaluated,
        len([i for i, lp in enumerate(chosen) if lp.source == "memory"]),
        time.perf_counter() - start,
        pool,
    )


def fixed_partition(
    model: nn.Module | Iterable[tuple[LayerShape, torch.Tensor]], size: int = 256
) -> list[LayerTiling]:
    """Tilings of every convertible layer on fixed ``size x size`` crossbars (the baseline)."""
    layers = layer_shapes(model) if isinstance(model, nn.Module) else model
    return [layer_tiling(shape, size, size) for shape, _ in layers]


def tile_sizes_of(plan: PartitionPlan | Mapping[str, int]) -> dict[str, int]:
    """``{layer name: crossbar size}`` from a plan or a mapping."""
    return plan.tile_sizes if isinstance(plan, PartitionPlan) else dict(plan)


__all__ = [
    "CrossbarPool",
    "LayerPartition",
    "LayerShape",
    "LayerTiling",
    "PartitionCostModel",
    "PartitionPlan",
    "Tiling",
    "WorkloadType",
    "classify_workload",
    "crossbar_utilisation",
    "fixed_partition",
    "layer_shapes",
    "layer_tiling",
    "plan_partition",
    "programming_iterations",
    "tile_sizes_of",
]
