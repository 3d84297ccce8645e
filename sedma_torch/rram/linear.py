"""`RRAMLinear`: ``nn.Linear`` on simulated crossbars.

Part of the split of :mod:`sedma_torch.rram.layers` (which re-exports it); the state
and programming it shares with the conv layers are :mod:`.state`'s ``_CrossbarMixin``.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import native_rng
from .config import RRAMConfig
from .correction import denoise
from .crossbar import (
    NoiseSource,
    ReadBlocks,
    absmax,
    adc_dequantise_,
    dac,
    fused_read_enabled,
    noisy_read_,
    positive_or_one,
    read_blocks,
)
from .read_op import RRAMValueError, _add_bias, _check_input, _copied_from, _crossbar, _output_dtype
from .state import _CrossbarMixin


def _positive_int(name: str, value: object) -> int:
    """``value`` as a Python int >= 1 (numpy and 0-d integer tensors too): TypeError for a
    bool or a non-integer, :class:`RRAMValueError` below 1 (``nn.Linear`` builds a layer
    without weights for 0, which no crossbar holds, and raises RuntimeError below 0)."""
    if isinstance(value, bool):
        raise TypeError(f"RRAMLinear: {name} must be a positive int, got the bool {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"RRAMLinear: {name} must be a positive int, got {value!r} ({type(value).__name__})"
        ) from None
    if v < 1:
        raise RRAMValueError(f"RRAMLinear: {name} must be a positive int, got {v}")
    return v


class RRAMLinear(_CrossbarMixin, nn.Linear):
    """``nn.Linear`` computed on simulated RRAM crossbars.

    Args: as ``nn.Linear`` plus ``config`` (an :class:`RRAMConfig`) and ``seed`` (this
    layer's seed; by default derived from ``config.seed`` and the construction order).
    Input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        config: RRAMConfig | None = None,
        seed: int | None = None,
    ) -> None:
        in_features = _positive_int("in_features", in_features)
        out_features = _positive_int("out_features", out_features)
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._rram_init(config, seed)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: RRAMConfig | None = None,
        seed: int | None = None,
        program: bool = True,
    ) -> RRAMLinear:
        """A copy of ``linear`` (same weights, device, dtype) on crossbars, programmed now."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            config=config,
            seed=seed,
        )
        return _copied_from(new, linear, program)

    # layout ------------------------------------------------------------------------------
    def _geometry(self) -> tuple[int, int]:
        rows = self.rram_config.tile_rows
        tiles = math.ceil(self.in_features / rows)
        return tiles, rows

    _transposed_weight = False
    """Whether ``weight`` is stored as (in, out) instead of (out, in)."""

    def _digital_module(self) -> nn.Module:
        return nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )

    def _weight_oi(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The digital weight (``weight`` or ``self.weight``) as (out_features, in_features)."""
        w = (self.weight if weight is None else weight).detach()
        return w.t() if self._transposed_weight else w

    def weight_tiles(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Digital weights as the (T, R, out) tile stack (zero padded)."""
        t, r = self._geometry()
        w = self._weight_oi(weight)
        pad = t * r - self.in_features
        if pad:
            w = F.pad(w, (0, pad))
        return w.reshape(self.out_features, t, r).permute(1, 2, 0).contiguous()

    def _rebuild_cache(self) -> None:
        if self.rram_config.adc_bits is None and self.w_read.numel():
            t, r = self._geometry()
            fold = self.w_read * self.col_scale.unsqueeze(1).to(self.w_read.dtype)
            self._w_fold = fold.reshape(t * r, self.out_features)
        else:
            self._w_fold = None

    # forward -----------------------------------------------------------------------------
    def _check_forward_input(self, x: torch.Tensor) -> None:
        _check_input(
            type(self).__name__,
            x,
            lambda t: t.ndim >= 1 and t.shape[-1] == self.in_features,
            f"(..., {self.in_features})",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_forward_input(x)
        lead = x.shape[:-1]
        cdt = self._compute_dtype()
        x2d = x.reshape(-1, self.in_features)
        if x2d.dtype != cdt:
            x2d = x2d.to(cdt)
        y = _crossbar(self, x2d, self.weight)
        if self.bias is not None:
            y = _add_bias(y, self.bias.to(cdt))
        return y.to(_output_dtype(x)).reshape(*lead, self.out_features)

    def _nonfinite_outputs(self, bad: torch.Tensor) -> torch.Tensor:
        return bad.any(dim=-1, keepdim=True)  # every output of a row reads the whole row

    def _read_fake(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], self.out_features)

    def _read_backward(self, grad, x2d, weight, needs):
        """Straight-through: the digital layer's gradients (input in the compute dtype,
        weight in its own dtype)."""
        w_oi = weight.t() if self._transposed_weight else weight
        gx = grad @ w_oi.to(grad.dtype) if needs[0] else None
        gw = None
        if needs[1]:
            gw_oi = grad.t() @ x2d.to(grad.dtype)
            gw = (gw_oi.t() if self._transposed_weight else gw_oi).to(weight.dtype)
        return gx, gw

    def _hardware_forward(self, x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        cfg = self.rram_config
        material = cfg.device
        batch = x2d.shape[0]
        t, r = self._geometry()
        sigma = material.read_noise if cfg.read_noise else 0.0
        gen = self._next_read_noise() if sigma > 0 else None
        n_ot = math.ceil(self.out_features / cfg.tile_cols)
        stats = self.rram_stats
        reads = 3 if cfg.correction == "first_order" else 1
        stats.matrix_products += reads * batch
        stats.tile_reads += reads * batch * t * n_ot
        stats.dac_conversions += reads * batch * self.in_features
        stats.adc_conversions += reads * batch * t * self.out_features if cfg.adc_bits else 0
        if cfg.correction == "first_order":
            # A x~ reads the array holding x~ once per output and tile (A's row applied
            # through the DAC); A~ x and A~ x~ are ordinary reads (counted above: 3 -> 2)
            stats.tile_reads += batch * t * (self.out_features - n_ot)
            stats.dac_conversions += batch * self.in_features * (self.out_features - 1)

        pad = t * r - self.in_features  # the PyTorch paths read (B, T, R) input tiles
        if self._native_ok(x2d, first_order_hybrid=True):
            y = x2d.new_empty(batch, self.out_features)
            x_tilde = None
            if cfg.correction == "first_order":
                # A x~ (it programs x~ onto cells) in PyTorch, into y; A~ x and A~ x~ compiled
                xt = (F.pad(x2d, (0, pad)) if pad else x2d).view(batch, t, r)
                plan = read_blocks(batch, t * r, self.out_features, t, cfg.tile_cols, 1)
                x_tilde = torch.empty_like(xt)
                for start in range(0, batch, plan.codes_rows):
                    rows = slice(start, start + plan.codes_rows)
                    self._tiled_read(xt[rows], sigma, gen, plan, y[rows], x_tilde[rows])
                x_tilde = x_tilde.view(batch, t * r)[:, : self.in_features].contiguous()
            self._fused_reads(x2d.contiguous(), sigma, gen, y, x_tilde)
            return self._denoised(y, x2d, weight)
        xt = (F.pad(x2d, (0, pad)) if pad else x2d).view(batch, t, r)
        if cfg.adc_bits is None and cfg.correction == "none":
            codes, s_in, levels = dac(xt, cfg, -1)
            y = self._fast_read(codes, s_in, levels, sigma, gen, batch, t, r)
        else:
            # The T partial sums of a read are T times the output's size: the read runs in
            # blocks of rows x whole physical column tiles (``read_blocks``) so that a
            # forward pass needs a few times the digital layer's memory at any tile count.
            # When the DAC codes of the whole batch fit in one output, they are made once
            # and the blocks go column by column, so each block of weight columns is
            # streamed from memory once and reused from cache by the row chunks; otherwise
            # rows go outside and each row chunk has its own codes.
            y = x2d.new_empty(batch, self.out_features)
            stacks = 2 if cfg.correction == "first_order" else 1
            plan = read_blocks(batch, t * r, self.out_features, t, cfg.tile_cols, stacks)
            for start in range(0, batch, plan.codes_rows):
                rows = slice(start, start + plan.codes_rows)
                self._tiled_read(xt[rows], sigma, gen, plan, y[rows])
        return self._denoised(y, x2d, weight)

    def _denoised(self, y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``y`` after the configured denoiser (calibrated against exact products)."""
        lam = self._lambda(y, lambda rows: x2d[:rows] @ self._weight_oi(weight).t().to(x2d.dtype))
        return y if lam is None else denoise(y, lam)

    def _fast_read(self, codes, s_in, levels, sigma, gen, batch, t, r) -> torch.Tensor:
        """No ADC: the tile sum is linear, so one GEMM on the de-quantised input."""
        x_deq = (codes * (s_in / levels)).reshape(batch, t * r)
        y = x_deq @ self._w_fold
        if sigma > 0:
            cs2 = self.col_scale.to(y.dtype) ** 2  # (T, C)
            w_var = self._read_variance()
            if w_var is None:
                # var_o = 2 sigma^2 sum_t ||x~_t||^2 col_scale[t, o]^2  (per-tile noise, summed)
                norms = (codes * codes).sum(-1) * (s_in.squeeze(-1) / levels) ** 2  # (B, T)
                var = (2 * sigma * sigma) * (norms @ cs2)
            else:
                # var_o = sum_t col_scale[t, o]^2 sum_j x~_tj^2 w_var[t, j, o]
                x2 = (codes * (s_in / levels)).square_().transpose(0, 1)  # (T, B, R)
                var = torch.bmm(x2, w_var.to(y.dtype)).mul_(cs2.unsqueeze(1)).sum(0)
            y = y + gen.randn(y.shape, y.device, y.dtype) * var.clamp_min(0).sqrt()
        return y

    def _read_stack(
        self,
        inputs: torch.Tensor,
        weights: torch.Tensor,
        std: torch.Tensor | None,
        gen: NoiseSource | None,
        levels: int,
        s_in_t: torch.Tensor,
        full: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs (T, B, R) in DAC code units @ weights (T, R, C) with read noise of
        standard deviation ``std`` ((T, B, 1) or (T, B, C)), then ADC (calibrated full
        scales ``full`` (T, 1, groups, 1), or the config's rule) and de-quantisation:
        (T, B, C) partial sums in input units (before the column scale)."""
        numel = inputs.shape[0] * inputs.shape[1] * weights.shape[-1]
        if std is None or (full is None and fused_read_enabled(numel)):
            u = torch.bmm(inputs, weights)
            return noisy_read_(u, std, gen, self.rram_config, levels, s_in_t, full)
        # the noise is drawn into the output first and the product accumulated onto it: no
        # separate noise tensor, no extra pass
        u = gen.randn((*inputs.shape[:2], weights.shape[-1]), inputs.device, inputs.dtype)  # type: ignore[union-attr]
        u.mul_(std).baddbmm_(inputs, weights)
        return adc_dequantise_(u, self.rram_config, levels, s_in_t, col_dim=-1, full=full)

    def _tiled_read(
        self,
        xt: torch.Tensor,
        sigma: float,
        gen: NoiseSource | None,
        plan: ReadBlocks,
        out: torch.Tensor,
        x_tilde_out: torch.Tensor | None = None,
    ) -> None:
        """Rows ``xt`` (B, T, R) through DAC, tiles, noise, ADC and the digital tile sum in
        PyTorch, written to ``out`` (B, out_features) block by block (columns outside, rows
        inside); each read of a block is :meth:`_read_stack`. With first-order correction
        and ``x_tilde_out`` (B, T, R): only the ``A x~`` read, and x~ (in input units)
        written to ``x_tilde_out`` for the compiled reads of the programmed matrix."""
        cfg = self.rram_config
        codes, s_in, levels = dac(xt, cfg, -1)
        codes_t = codes.transpose(0, 1)  # (T, B, R)
        s_in_t = s_in.transpose(0, 1)  # (T, B, 1)

        w_var = self._read_variance()

        def std_of(inputs: torch.Tensor, cols: slice, rows: slice) -> torch.Tensor | None:
            """Read-noise std of each partial sum: (T, B, 1) for the state-independent
            model, (T, B, C) for a state-dependent one (``sqrt(inputs^2 @ w_var)``)."""
            if sigma <= 0:
                return None
            if w_var is None:
                return (2**0.5 * sigma) * inputs.norm(dim=-1, keepdim=True)
            return torch.bmm(inputs * inputs, w_var[..., cols]).clamp_min_(0).sqrt_()

        # (inputs, weights, sign in A x~ + A~ x - A~ x~, DAC range, read-noise std)
        reads = [(codes_t, self.w_read, 0, s_in_t, std_of)]
        if cfg.correction == "first_order":
            reads = self._first_order_reads(xt, codes_t, s_in, levels, std_of, x_tilde_out)
            if x_tilde_out is not None:
                reads = reads[:1]
        n_rows = xt.shape[0]
        col_scale = self.col_scale.unsqueeze(1).to(codes.dtype)  # (T, 1, C)
        # calibrated ADC full scales (T, column groups); the three reads of first-order
        # correction share them (their partial sums all approximate A x in code units)
        adc_full = self._adc_ranges()
        for c0 in range(0, self.out_features, plan.cols):
            cols = slice(c0, c0 + plan.cols)
            full = None
            if adc_full is not None:
                g0 = c0 // cfg.tile_cols
                g1 = math.ceil(min(c0 + plan.cols, self.out_features) / cfg.tile_cols)
                full = adc_full[:, g0:g1, None].unsqueeze(1)  # (T, 1, groups, 1)
            for r0 in range(0, n_rows, plan.rows):
                rows = slice(r0, r0 + plan.rows)
                u = None  # one read at a time: at most two partial-sum stacks alive
                for inputs, weights, sign, s_read, std_fn in reads:
                    part = self._read_stack(
                        inputs[:, rows],
                        weights[..., cols],
                        std_fn(inputs[:, rows], cols, rows),
                        gen,
                        levels,
                        s_read[:, rows],
                        full,
                    )
                    if u is None:
                        u = part
                    elif sign > 0:
                        u += part
                    else:
                        u -= part
                    del part
                # digital: per-column scale of each tile, then add the tiles
                torch.sum(u.mul_(col_scale[..., cols]), 0, out=out[rows, cols])  # type: ignore[union-attr]
                del u  # before the next block's stack is allocated

    def _calibration_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check_forward_input(x)
        return x.detach().reshape(-1, self.in_features).to(self._compute_dtype())

    def _calibration_partial_sums(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-free partial sums (T, N, C) of rows ``x`` (N, in_features) in DAC code
        units: the DAC codes of each input tile on the programmed weights."""
        t, r = self._geometry()
        pad = t * r - self.in_features
        xt = (F.pad(x, (0, pad)) if pad else x).view(x.shape[0], t, r)
        codes, _, _ = dac(xt.to(self.w_read.dtype), self.rram_config, -1)
        return torch.bmm(codes.transpose(0, 1), self.w_read)

    def _first_order_reads(self, xt, codes_t, s_in, levels, std_of, x_tilde_out=None) -> list:
        """The three reads of first-order correction, ``p = A x~ + A~ x - A~ x~``, every one
        a simulated crossbar read (MELISO+'s mapping, one x~ array per input vector):

        * x~: each input vector (per input tile, over its DAC range) is written onto cells
          of the configured material by write-and-verify and read back
          (:meth:`_program_inputs`), so it carries that material's programming error;
        * ``A x~``: A's rows, through the DAC (``w_exact``: the codes of each tile column
          over its column scale), applied as inputs to the array holding x~; its read noise
          is that of the x~ cells, its ADC the configured one;
        * ``A~ x``: the ordinary read (DAC codes of x on the programmed weights);
        * ``A~ x~``: the read-back x~ through the DAC on the programmed weights.

        Returns (inputs (T, B, R), weights, sign, DAC range (T, B, 1), read-noise std);
        writes x~ in input units to ``x_tilde_out`` (B, T, R) when given."""
        cfg = self.rram_config
        s_in_t = s_in.transpose(0, 1)
        # the range x is written over: the DAC's (or, without a DAC, each tile's |max|)
        rng = s_in if cfg.dac_bits is not None else positive_or_one(absmax(xt, -1))
        prog = self._program_inputs(xt / rng)
        x_tilde = prog.x_read.transpose(0, 1)  # (T, B, R), normalised over rng
        if x_tilde_out is not None:
            torch.mul(prog.x_read, rng, out=x_tilde_out)
        var_x = prog.var.transpose(0, 1)
        if cfg.dac_bits is not None:  # the read-back x~ through the same DAC
            codes_tilde = (x_tilde * levels).round_().clamp_(-levels, levels)
        else:
            codes_tilde = x_tilde * rng.transpose(0, 1)
        w_a = self.w_exact  # type: ignore[attr-defined]

        noisy = bool(var_x.any())
        w_a2 = self._exact_squared() if noisy else None

        def std_a(inputs: torch.Tensor, cols: slice, rows: slice) -> torch.Tensor | None:
            # the read noise of the x~ cells, weighted by A's codes applied to them
            if w_a2 is None:
                return None
            return torch.bmm(var_x[:, rows], w_a2[..., cols]).clamp_min_(0).sqrt_()

        return [
            (x_tilde, w_a, 0, rng.transpose(0, 1), std_a),
            (codes_t, self.w_read, 1, s_in_t, std_of),
            (codes_tilde, self.w_read, -1, s_in_t, std_of),
        ]

    def _exact_squared(self) -> torch.Tensor:
        """``w_exact ** 2`` (the squared codes of A applied to the x~ cells in first-order
        correction's ``A x~`` read), cached until ``w_exact`` changes."""
        return self._derived("w_exact^2", "w_exact", None, torch.square)  # type: ignore[attr-defined]

    def _fused_reads(
        self,
        x2d: torch.Tensor,
        sigma: float,
        gen: NoiseSource | None,
        out: torch.Tensor,
        x_tilde: torch.Tensor | None = None,
    ) -> None:
        """The read of :meth:`_tiled_read` with the compiled kernel (``native_rng.fused_read_``):
        per read, one pass that runs the DAC on the rows ``x2d`` (B, in_features) as it
        packs them, multiplies each input tile with its packed crossbar weights and sends
        the partial sums -- a few rows x one ADC group at a time, in cache -- through read
        noise, ADC, de-quantisation, column scale and the tile sum into ``out``. Neither DAC
        codes nor a partial-sum stack are ever stored: a forward pass needs little more than
        its output. The weights are packed once per programming. Noise is keyed per read and element (:meth:`_epilogue_keys`).

        With first-order correction ``out`` already holds ``A x~`` and ``x_tilde`` (B,
        in_features) is the input as read back from its cells: the two reads of the
        programmed matrix add ``A~ x`` and subtract ``A~ x~`` (same DAC ranges as x)."""
        t, r = self._geometry()
        s_in = self._dac_ranges(x2d, r, t)  # (T, B)
        inputs = (x2d, x_tilde)
        self._run_fused_reads(
            sigma,
            gen,
            lambda i, spec, packed, packed_var: native_rng.fused_read_(
                inputs[i],
                s_in,
                packed,
                self.col_scale,  # type: ignore[arg-type]
                out,
                spec,
                tile_rows=r,
                packed_var=packed_var,
            ),
        )

    def extra_repr(self) -> str:
        cfg = self.rram_config
        return (
            f"{nn.Linear.extra_repr(self)}, material={cfg.device.name}, "
            f"tiles={cfg.tile_rows}x{cfg.tile_cols}, dac={cfg.dac_bits}, adc={cfg.adc_bits}, "
            f"correction={cfg.correction}, denoise={cfg.denoise}"
        )
