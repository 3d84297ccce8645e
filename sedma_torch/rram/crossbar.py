"""Tiled crossbar simulation: programming a matrix onto tiles and reading products from it.

Layout
------
A weight matrix W (out x in) is cut along the input dimension into a *tile stack* of
shape (T, R, C): T input tiles of R rows (word lines, inputs) each, C columns (bit lines,
outputs). Columns are grouped into physical tiles of ``tile_cols``; a layer with more
outputs uses several physical tiles side by side that share the same input tile.
Partial sums of the T input tiles are added digitally; everything else is analog.

Signed weights use a differential pair: each weight has a G+ and a G- cell, and its
normalised value is ``(G+ - G-) / (Gmax - Gmin)`` in [-1, 1]. Each tile column has its
own digital scale (``col_scale``, the column's largest |w|) applied after the ADC.

Read path for one input vector (all tiles at once, one batched matmul):

1. DAC: ``codes = round(x / s_in * L)``, ``L = 2^(dac_bits-1) - 1`` (at least 1) and
   ``s_in`` = the vector's |max| within each input tile (or ``dac_range``).
2. Array: column currents ``u = codes @ W_read`` where W_read is the read-back matrix
   (programming error, stuck cells, drift and IR drop folded in when programmed).
3. Read noise: Gaussian noise on every cell at every read, of variance s(G) per cell
   (``materials.read_noise_variance``: independent of the state, proportional to G, ...),
   is exactly Gaussian at the output with variance ``sum_j (s(G+_jc) + s(G-_jc))
   codes_j^2`` per column (``codes^2 @ w_var``; ``2 sigma^2 ||codes||^2`` for the
   state-independent model): drawn there (one draw per output).
4. ADC per column: ``round(u / r * L_adc) * r / L_adc``, clipped to +-L_adc, with ``r``
   the full scale of the physical tile: calibrated once per programming (the default,
   ``adc_ranging="calibrated"``: the largest noise-free |u| of the tile over the first
   batch read, then frozen), or ``adc_range * L``; ``adc_ranging="per_read"`` instead
   auto-ranges each read to the tile's largest |u| for this vector (an idealisation).
5. Digital: scale by ``s_in / L * col_scale`` and add the T partial sums.

The read noise is drawn into the output buffer first and the batched product is
accumulated onto it (``baddbmm``), so noise costs no tensor of its own. The T partial sums
of a read are T times the size of the output, so a linear read runs in blocks of rows x
whole physical column tiles (``read_blocks``) and a convolution in chunks of images
(``chunk_rows``): a block's partial sums stay within about the output's size and a
forward pass within a few times the digital layer's memory, whatever the number of input
tiles (``scripts/bench_layers.py`` measures it).

Without an ADC, step 5 is linear, so the tile loop collapses to a single GEMM on the
de-quantised input, and the per-tile read noise (independent Gaussians) is added once
with the summed variance -- the same distribution, much cheaper.

IR drop (first-order model)
---------------------------
Wires have resistance ``r`` (``wire_resistance_ohm``) per segment between neighbouring
cells. Word lines are driven from column 0; bit lines are sensed (virtual ground) past
the last row. To first order in ``r`` (currents from the ideal solution), the voltage
across cell (i, k) is reduced by the word-line drop ``r * x_i * (G Kc)_ik`` with
``Kc[k, k'] = min(k, k') + 1`` and the bit-line rise ``r * sum_j (R - max(i, j)) G_jk x_j``.
Both are linear in x, so the output equals ``x @ G_eff`` with::

    G_eff = G * (1 - r (K G) - r (G Kc)),   (K G)_ik = sum_j (R - max(i, j)) G_jk

computed once at programming time with cumulative sums (O(R C) per tile). The error of
the approximation is O((r G R C)^2); it is checked against a full nodal solve in the tests.
A warning is raised when ``r * Gmax * R * C / 2 > 0.1`` (outside its range of validity).

Drift: ``G(t) = G * (t / t0)^-nu`` with t0 = 1 s and nu drawn per cell
(``drift_nu`` +- ``drift_nu_std``). Stuck cells are drawn once per chip and hold Gmin or
Gmax whatever is programmed.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch

from .config import RRAMConfig
from .materials import Material, read_noise_variance
from .programming import ProgrammingStats, SeededDeviceVariation, program_conductances
from .rng import NoiseSource, derive_seed, hash_normal, make_generator, seed_words

DRIFT_T0_S = 1.0


def quant_levels(bits: int) -> int:
    """Positive levels of a signed symmetric converter with ``bits`` bits."""
    return max(2 ** (bits - 1) - 1, 1)


@dataclass
class CrossbarStats:
    """Operation counts of a crossbar (accumulated over its life)."""

    matrix_products: int = 0
    """Full matrix-vector products (one per input vector; x3 with first-order correction)."""
    tile_reads: int = 0
    """Activations of one physical tile by one input vector."""
    dac_conversions: int = 0
    """Input values converted by DACs."""
    adc_conversions: int = 0
    """Column outputs converted by ADCs."""
    programming_pulses: int = 0
    """Pulses spent programming the weights (all programming events)."""
    programming_events: int = 0
    """Times the weights were (re)programmed."""
    input_programming_pulses: int = 0
    """Pulses spent writing the inputs x~ onto cells by write-and-verify (first-order
    correction)."""
    input_cells_programmed: int = 0
    """Cells written with inputs x~ (two per input value; first-order correction)."""
    adc_calibration_reads: int = 0
    """Input vectors (rows; output pixels of images) read to calibrate the ADC full scales
    (``adc_ranging="calibrated"``: once per programming, noise-free full-precision
    readout of each tile's column outputs)."""
    reference_products: int = 0
    """Output vectors computed digitally (exact products of the digital weights) to
    calibrate the adaptive lambda against (``denoise="adaptive"``)."""
    last_programming: ProgrammingStats | None = None
    """Statistics of the most recent programming event."""

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            k: getattr(self, k)
            for k in (
                "matrix_products",
                "tile_reads",
                "dac_conversions",
                "adc_conversions",
                "programming_pulses",
                "programming_events",
                "input_programming_pulses",
                "input_cells_programmed",
                "adc_calibration_reads",
                "reference_products",
            )
        }
        if self.last_programming is not None:
            out["write_verify_iterations"] = self.last_programming.iterations
            out["fraction_within_tolerance"] = self.last_programming.fraction_within_tolerance
            out["programming_mean_abs_error"] = self.last_programming.mean_abs_error
        return out


@dataclass
class ProgrammedTiles:
    """The programmed state of a tile stack (T, R, C)."""

    g_pos: torch.Tensor
    """Programmed G+ conductances in S, (T, R, C) (before drift and IR drop)."""
    g_neg: torch.Tensor
    """Programmed G- conductances in S, (T, R, C)."""
    col_scale: torch.Tensor
    """Digital scale per tile column, (T, C): weight = normalised weight * col_scale."""
    w_read: torch.Tensor
    """Normalised read-back matrix, (T, R, C), everything folded in."""
    stats: ProgrammingStats
    w_var: torch.Tensor | None = None
    """Read-noise variance per weight (:func:`read_variance`), (T, R, C), or None."""


def column_scale(w_tiles: torch.Tensor) -> torch.Tensor:
    """Per tile column |max| of a (T, R, C) stack; 1 where a column is all zero."""
    return positive_or_one(absmax(w_tiles, 1, keepdim=False))


def chip_properties(
    shape: tuple[int, ...], cfg: RRAMConfig, material: Material, seed: int, device, dtype
):
    """Per-cell properties fixed for a chip: device spread, stuck cells, drift exponents.

    Drawn from streams seeded only by (seed, shape), so they are the same for every
    programming event of a layer. The device spread is a :class:`SeededDeviceVariation`,
    evaluated only for the cells a programming event pulses.
    """
    gen = make_generator(derive_seed(seed, "chip", shape), device)
    variation = None
    if cfg.device_variation and material.sigma_d2d > 0 and material.levels_ltp is not None:
        variation = SeededDeviceVariation(
            derive_seed(seed, "d2d", shape), material.sigma_d2d, material.g_min, material.g_range
        )
    stuck = None
    if cfg.stuck_at_gmin_prob > 0 or cfg.stuck_at_gmax_prob > 0:
        u = torch.rand(shape, generator=gen, device=device, dtype=dtype)
        # -1 (u < p_min), +1 (p_min <= u < p_min + p_max), else 0: two passes, no scatter
        stuck = (u < cfg.stuck_at_gmin_prob + cfg.stuck_at_gmax_prob).to(torch.int8)
        stuck.sub_((u < cfg.stuck_at_gmin_prob).to(torch.int8), alpha=2)
    nu = None
    if cfg.drift_time_s > DRIFT_T0_S and (material.drift_nu > 0 or material.drift_nu_std > 0):
        nu = (
            material.drift_nu
            + material.drift_nu_std * torch.randn(shape, generator=gen, device=device, dtype=dtype)
        ).clamp_min(0)
    return variation, stuck, nu


def ir_drop_factor(g: torch.Tensor, r_wire: float, tile_cols: int) -> torch.Tensor:
    """First-order IR-drop factor ``1 - r (K G) - r (G Kc)`` for a (T, R, C) stack in S.

    Columns are split into physical tiles of ``tile_cols``; each has its own word lines.
    """
    t, rows, cols = g.shape
    n_ot = math.ceil(cols / tile_cols)
    pad = n_ot * tile_cols - cols
    gp = torch.nn.functional.pad(g, (0, pad)) if pad else g
    gp = gp.reshape(t, rows, n_ot, tile_cols)
    # bit line: (K G)_i = sum_{m >= i} C_m, C_m = sum_{j <= m} G_j (cumulative over rows)
    c = gp.cumsum(dim=1)
    kg = c.flip(1).cumsum(dim=1).flip(1)
    # word line: (G Kc)_k = sum_{m <= k} D_m, D_m = sum_{k' >= m} G_k' (within the physical tile)
    d = gp.flip(3).cumsum(dim=3).flip(3)
    gkc = d.cumsum(dim=3)
    factor = 1.0 - r_wire * (kg + gkc)
    factor = factor.reshape(t, rows, n_ot * tile_cols)[..., :cols]
    return factor


def program_tiles(
    w_tiles: torch.Tensor,
    cfg: RRAMConfig,
    seed: int,
    event: int,
    initial: torch.Tensor | None = None,
) -> ProgrammedTiles:
    """Program a digital (T, R, C) weight stack onto differential-pair tiles.

    ``event`` numbers the programming events of this stack (a fresh noise draw each);
    ``initial`` (stacked G+ and G-, (2, T, R, C) in S) makes it a re-programming that
    starts from the current conductances.
    """
    material = cfg.device
    dtype = torch.float32 if w_tiles.dtype != torch.float64 else torch.float64
    w_tiles = w_tiles.detach().to(dtype)
    device = w_tiles.device
    col_scale = column_scale(w_tiles)
    g_min, g_range = material.g_min, material.g_range
    # targets[0] = Gmin + range * max(w, 0), targets[1] = Gmin + range * max(-w, 0) for the
    # normalised w = w_tiles / col_scale, written in place (these arrays are the largest
    # temporaries of a programming event)
    targets = torch.empty((2, *w_tiles.shape), dtype=dtype, device=device)
    torch.div(w_tiles, col_scale.unsqueeze(1), out=targets[0])
    torch.clamp(targets[0], max=0, out=targets[1]).neg_()
    targets[0].clamp_(min=0)
    targets.mul_(g_range).add_(g_min)
    variation, stuck, nu = chip_properties(tuple(targets.shape), cfg, material, seed, device, dtype)
    gen = make_generator(derive_seed(seed, "program", event), device)
    g, stats = program_conductances(
        targets,
        material,
        generator=gen,
        tolerance=cfg.write_verify_tolerance,
        max_iters=cfg.write_verify_iters,
        initial=None if initial is None else initial.to(dtype),
        programming_noise=cfg.programming_noise,
        variation=variation,
    )
    if stuck is not None:  # g is this event's own array: overwrite in place
        g.masked_fill_(stuck == -1, g_min).masked_fill_(stuck == 1, material.g_max)
    w_read = read_back(g, cfg, material, nu)
    return ProgrammedTiles(
        g_pos=g[0],
        g_neg=g[1],
        col_scale=col_scale,
        w_read=w_read,
        stats=stats,
        w_var=read_variance(g, cfg, material, nu),
    )


@dataclass
class ProgrammedInputs:
    """Input vectors written onto cells (first-order correction's x~)."""

    x_read: torch.Tensor
    """Read-back normalised inputs ``(G+ - G-) / (Gmax - Gmin)``, shaped like the input."""
    var: torch.Tensor
    """Read-noise variance of each input's cell pair (normalised units squared)."""
    stats: ProgrammingStats


def program_inputs(u: torch.Tensor, cfg: RRAMConfig, seed: int, event: int) -> ProgrammedInputs:
    """Write normalised inputs ``u`` (any shape, values in [-1, 1]: each input vector over
    its DAC range) onto differential pairs of cells of the configured material with the
    same write-and-verify model as the weights (levels, pulse nonlinearity,
    cycle-to-cycle noise, device-to-device spread, iteration limit and tolerance), from
    erased cells. This is MELISO+'s x~: the operand of ``A x~`` and ``A~ x~`` in first-order
    correction. Each input vector has its own array cells (the spread is drawn per cell of
    ``u``'s shape; ``event`` numbers the write, a fresh cycle-to-cycle draw each); the
    cells are read right after writing (no drift, no stuck cells)."""
    material = cfg.device
    g_min, g_range = material.g_min, material.g_range
    targets = torch.empty((2, *u.shape), dtype=u.dtype, device=u.device)
    torch.clamp(u, min=0, max=1, out=targets[0])
    torch.clamp(u, min=-1, max=0, out=targets[1]).neg_()
    targets.mul_(g_range).add_(g_min)
    variation = None
    if cfg.device_variation and material.sigma_d2d > 0 and material.levels_ltp is not None:
        variation = SeededDeviceVariation(
            derive_seed(seed, "input-d2d", tuple(targets.shape)),
            material.sigma_d2d,
            material.g_min,
            material.g_range,
        )
    gen = make_generator(derive_seed(seed, "input-program", event), u.device)
    g, stats = program_conductances(
        targets,
        material,
        generator=gen,
        tolerance=cfg.write_verify_tolerance,
        max_iters=cfg.write_verify_iters,
        programming_noise=cfg.programming_noise,
        variation=variation,
    )
    x_read = torch.sub(g[0], g[1]).div_(g_range)
    if cfg.read_noise and material.read_noise > 0:
        var = read_noise_variance(g[0], material, cfg.noise_model)
        var.add_(read_noise_variance(g[1], material, cfg.noise_model))
    else:
        var = torch.zeros_like(x_read)
    return ProgrammedInputs(x_read=x_read, var=var, stats=stats)


def read_back(
    g: torch.Tensor, cfg: RRAMConfig, material: Material, nu: torch.Tensor | None
) -> torch.Tensor:
    """Normalised read matrix from stacked (2, T, R, C) conductances: drift, IR drop, pair."""
    if nu is not None:
        g = g * (cfg.drift_time_s / DRIFT_T0_S) ** (-nu)
    if cfg.wire_resistance_ohm > 0:
        rows = g.shape[2]
        severity = (
            cfg.wire_resistance_ohm * material.g_max * rows * min(g.shape[3], cfg.tile_cols) / 2
        )
        if severity > 0.1:
            warnings.warn(
                f"IR drop: r*Gmax*rows*cols/2 = {severity:.3g} > 0.1; the first-order model is "
                "outside its range of validity (use smaller tiles or wire_resistance_ohm)",
                RuntimeWarning,
                stacklevel=3,
            )
        g = torch.stack(
            [
                gi * ir_drop_factor(gi, cfg.wire_resistance_ohm, cfg.tile_cols).clamp_min(0)
                for gi in g
            ]
        )
    return torch.sub(g[0], g[1]).div_(material.g_range)


def read_variance(
    g: torch.Tensor, cfg: RRAMConfig, material: Material, nu: torch.Tensor | None
) -> torch.Tensor | None:
    """Read-noise variance of each weight from stacked (2, T, R, C) conductances, in units
    of the normalised weight squared: the sum over the pair of each cell's variance at its
    read-time conductance (after drift; IR drop, a few per cent at most in its range of
    validity, is not applied to the noise). ``None`` when read noise is off or
    independent of the state (the read then uses the input's norm alone)."""
    if not cfg.read_noise or material.read_noise == 0 or cfg.noise_model == "independent":
        return None
    if nu is not None:
        g = g * (cfg.drift_time_s / DRIFT_T0_S) ** (-nu)
    t_s = max(cfg.drift_time_s, DRIFT_T0_S)
    var = read_noise_variance(g[0], material, cfg.noise_model, t_s)
    return var.add_(read_noise_variance(g[1], material, cfg.noise_model, t_s))


def dac(
    x: torch.Tensor,
    cfg: RRAMConfig,
    dims: int | tuple[int, ...],
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Input DAC: ``(codes, full scale, levels)`` with ``codes = round(x / scale * L)``.

    ``dims`` are the dimensions one conversion range covers (an input vector within an
    input tile); the scale has size 1 there. With ``dac_bits=None`` the input passes at
    full precision (scale 1, L = 1). ``out`` (shaped like x, may be x itself) receives the
    codes instead of a new tensor.
    """
    ranged = {d % x.ndim for d in ((dims,) if isinstance(dims, int) else dims)}
    range_shape = [1 if d in ranged else n for d, n in enumerate(x.shape)]
    if cfg.dac_bits is None:
        codes = x if out is None else (out if out is x else out.copy_(x))
        return codes, torch.ones(range_shape, dtype=x.dtype, device=x.device), 1
    levels = quant_levels(cfg.dac_bits)
    if cfg.dac_range is None:
        scale = positive_or_one(absmax(x, dims))
        return torch.mul(x, levels / scale, out=out).round_(), scale, levels
    scale = torch.full(range_shape, cfg.dac_range, dtype=x.dtype, device=x.device)
    codes = torch.mul(x, levels / cfg.dac_range, out=out).round_().clamp_(-levels, levels)
    return codes, scale, levels


def absmax(x: torch.Tensor, dim, keepdim: bool = True) -> torch.Tensor:
    """max |x| over ``dim`` as two read-only reductions (no |x| temporary)."""
    return torch.maximum(x.amax(dim, keepdim=keepdim), x.amin(dim, keepdim=keepdim).neg_())


def positive_or_one(scale: torch.Tensor) -> torch.Tensor:
    """A converter range: 1 where the signal is all zero (so 0 * (L / range) stays 0, never
    0 * inf = NaN as with a tiny clamp)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def noisy_read_(
    u: torch.Tensor,
    std: torch.Tensor | None,
    noise: NoiseSource | None,
    cfg: RRAMConfig,
    dac_levels: int,
    s_in: torch.Tensor,
    full: torch.Tensor | None = None,
) -> torch.Tensor:
    """Read noise, column ADC and de-quantisation of column outputs ``u`` (columns last).

    ``full``: calibrated ADC full scales (DAC code units), broadcastable to the grouped
    view ``(..., column groups, tile_cols)`` of ``u`` (see :func:`adc_dequantise_`).

    ``std`` (broadcastable: size 1 in the last dim, one per row, or one per output) is the
    read-noise standard deviation of each output. By default noise is drawn with ``NoiseSource.randn`` and the ADC runs
    in eager passes. With SEDMA_FUSED_READ=1, large reads run as one compiled kernel whose
    Gaussian noise comes from the counter-based ``hash_normal`` (same distribution,
    different stream).
    """
    cols = u.shape[-1]
    n_ot = math.ceil(cols / cfg.tile_cols)
    width = cfg.tile_cols if n_ot > 1 else cols
    fused = (
        cfg.adc_bits is not None
        and n_ot * width == cols
        and u.device.type in ("cpu", "cuda")
        and full is None
        and fused_read_enabled(u.numel())
    )
    if not fused:
        if std is not None and noise is not None:
            u.addcmul_(noise.randn(u.shape, u.device, u.dtype), std)
        return adc_dequantise_(u, cfg, dac_levels, s_in, col_dim=-1, full=full)
    levels = quant_levels(cfg.adc_bits)  # type: ignore[arg-type]
    fixed = -1.0 if cfg.adc_range is None else cfg.adc_range * dac_levels
    params = torch.tensor([levels, dac_levels, fixed], dtype=u.dtype, device=u.device)
    has_noise = std is not None and noise is not None
    seed = seed_words(noise.next_seed() if has_noise else 0, u.device)  # type: ignore[union-attr]
    ug = u.view(*u.shape[:-1], n_ot, width)
    std_g = std if has_noise else torch.zeros((), dtype=u.dtype, device=u.device)
    if std_g.ndim and std_g.shape[-1] == cols and cols > 1:  # one std per output
        std_g = std_g.reshape(*std_g.shape[:-1], n_ot, width)
    elif std_g.ndim:  # one std per row (size 1 in the last dim)
        std_g = std_g.unsqueeze(-1)
    try:
        out = _fused_read()(ug, std_g, s_in.unsqueeze(-1), seed, params)  # type: ignore[misc]
    except Exception as exc:  # no compiler for this device: use the eager path from now on
        warnings.warn(
            f"fused read kernel failed ({exc}); using eager", RuntimeWarning, stacklevel=2
        )
        global _FUSED
        _FUSED = False
        return noisy_read_(u, std, noise, cfg, dac_levels, s_in)
    return out.view(u.shape)


def _read_epilogue(
    ug: torch.Tensor,
    std: torch.Tensor,
    s_in: torch.Tensor,
    seed: torch.Tensor,
    params: torch.Tensor,
) -> torch.Tensor:
    """Noise + ADC + de-quantisation on grouped outputs (..., n_col_tiles, tile_cols).

    ``params`` = (ADC levels, DAC levels, fixed full scale or -1 for auto-ranging)."""
    levels, dac_levels, fixed = params[0], params[1], params[2]
    v = ug + hash_normal(ug.shape, seed, ug.device, ug.dtype) * std
    full = torch.where(fixed > 0, fixed, positive_or_one(absmax(v, -1)))
    return _quantise_(v, full, levels, dac_levels, s_in, saturate=True)


def _quantise_(v, full, levels, dac_levels, s_in, saturate: bool) -> torch.Tensor:
    """In place on grouped outputs ``v``: ADC codes ``round(v / full * L)`` (clipped to
    +-L when ``saturate``), then back to input units ``* full * s_in / (L * L_dac)``."""
    v.mul_(levels / full).round_()
    if saturate:
        v.clamp_(-levels, levels)
    return v.mul_(full * (s_in / (levels * dac_levels)))


_FUSED_MIN = 1 << 16
_FUSED: object = None


def fused_read_on() -> bool:
    """True when the opt-in fused read (SEDMA_FUSED_READ=1) is on in this process."""
    return _fused_read() is not None


def fused_read_enabled(numel: int) -> bool:
    """True when a read of ``numel`` column outputs runs the fused read (it is on and the
    read is large enough)."""
    return numel >= _FUSED_MIN and fused_read_on()


@dataclass(frozen=True)
class ReadBlocks:
    """How a tiled linear read is cut to bound its memory (see :func:`read_blocks`)."""

    codes_rows: int
    """Rows converted by the DACs at once."""
    rows: int
    """Rows of one block (within ``codes_rows``)."""
    cols: int
    """Output columns of one block (whole physical column tiles)."""


def read_blocks(
    rows: int, in_rows: int, cols: int, tiles: int, tile_cols: int, stacks: int = 1
) -> ReadBlocks:
    """Blocks of a tiled linear read whose memory stays within about 2.5 outputs.

    Columns come in whole physical column tiles (each tile's ADC ranges over its own
    columns), about ``cols / tiles`` of them, so that one block's T partial sums of a row
    take about one output row. The DAC codes of all rows (``in_rows`` per row, ``stacks``
    copies with first-order correction) are made at once when they fit in one output;
    blocks then take rows in chunks whose ``stacks`` partial-sum stacks fit in half an
    output. Otherwise rows are converted in chunks whose codes and partial sums fit in
    1.5 outputs. Chunks have at least 16 rows and are spread evenly.
    """
    n_ot = math.ceil(cols / tile_cols)
    cols_step = cols if n_ot == 1 else tile_cols * max(1, n_ot // tiles)
    stack_row = stacks * tiles * min(cols_step, cols)  # partial sums of one row
    out_size = rows * cols

    def even(step: int) -> int:
        step = max(min(rows, 16), step)
        return math.ceil(rows / math.ceil(rows / step))

    if stacks * in_rows <= cols:  # the codes of every row fit in one output
        return ReadBlocks(rows, even(out_size // (2 * stack_row)), cols_step)
    step = even(int(1.5 * out_size) // (stacks * in_rows + stack_row))
    return ReadBlocks(step, step, cols_step)


def chunk_rows(rows: int, stacks: int) -> int:
    """Rows (images) per chunk of a tiled read: ``rows / stacks`` (so that ``stacks``
    per-row arrays of the chunk take no more memory than one such array of all rows), at
    least one."""
    return max(1, rows // max(stacks, 1))


def _fused_read():
    """The compiled ``_read_epilogue``; opt-in with SEDMA_FUSED_READ=1 (measured about 10 %
    faster per read on 2 CPU cores, at the price of a one-time compilation per process)."""
    global _FUSED
    if _FUSED is None:
        _FUSED = False
        if os.environ.get("SEDMA_FUSED_READ", "0") == "1":
            _FUSED = torch.compile(_read_epilogue, dynamic=True)
    return _FUSED or None


def adc_dequantise_(
    u: torch.Tensor,
    cfg: RRAMConfig,
    dac_levels: int,
    s_in: torch.Tensor,
    col_dim: int,
    full: torch.Tensor | None = None,
) -> torch.Tensor:
    """Column ADC on u, then de-quantisation to input units, in place where possible.

    ``u`` holds normalised column outputs in DAC code units with the columns along
    ``col_dim``; ``s_in`` (broadcastable to u, size 1 along ``col_dim``) is the DAC full
    scale. Columns are grouped into physical tiles of ``tile_cols``. The full scale of each
    group: ``full`` when given (calibrated ranges in DAC code units, broadcastable to the
    grouped view ``(..., groups, tile_cols, ...)`` of ``u``, saturating), else
    ``adc_range * dac_levels`` (saturating), else -- ``adc_ranging="per_read"`` -- the
    group's own largest |output| of this read. Returns
    ``q * step * s_in / dac_levels`` shaped like ``u`` (before the per-column scale).
    """
    col_dim %= u.ndim
    if cfg.adc_bits is None:
        return u.mul_(s_in / dac_levels)
    levels = quant_levels(cfg.adc_bits)
    cols = u.shape[col_dim]
    n_ot = math.ceil(cols / cfg.tile_cols)
    width = cfg.tile_cols if n_ot > 1 else cols
    pad = n_ot * width - cols
    up = torch.nn.functional.pad(u, [0, 0] * (u.ndim - 1 - col_dim) + [0, pad]) if pad else u
    ug = up.view(*up.shape[:col_dim], n_ot, width, *up.shape[col_dim + 1 :])
    saturate = full is not None or cfg.adc_range is not None
    if full is not None:
        full = full.to(u.dtype)
    elif cfg.adc_range is None:
        full = positive_or_one(absmax(ug, col_dim + 1))
    else:
        full = torch.tensor(cfg.adc_range * dac_levels, dtype=u.dtype, device=u.device)
    _quantise_(ug, full, levels, dac_levels, s_in.unsqueeze(col_dim + 1), saturate=saturate)
    return up.narrow(col_dim, 0, cols) if pad else u


__all__ = [
    "CrossbarStats",
    "NoiseSource",
    "ProgrammedTiles",
    "ReadBlocks",
    "absmax",
    "adc_dequantise_",
    "chip_properties",
    "chunk_rows",
    "column_scale",
    "dac",
    "derive_seed",
    "fused_read_enabled",
    "fused_read_on",
    "ir_drop_factor",
    "make_generator",
    "noisy_read_",
    "positive_or_one",
    "program_tiles",
    "quant_levels",
    "read_back",
    "read_blocks",
]
