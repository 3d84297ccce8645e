"""`RRAMConv2d` and `RRAMConv1d`: ``nn.Conv2d`` / ``nn.Conv1d`` on simulated crossbars.

Part of the split of :mod:`sedma_torch.rram.layers` (which re-exports them); the state
and programming they share with the linear layer are :mod:`.state`'s ``_CrossbarMixin``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native_depthwise, native_rng
from .config import RRAMConfig
from .correction import denoise
from .crossbar import (
    NoiseSource,
    absmax,
    chunk_rows,
    dac,
    noisy_read_,
    positive_or_one,
)
from .read_op import (
    RRAMValueError,
    _add_bias,
    _check_config,
    _check_input,
    _copied_from,
    _crossbar,
    _output_dtype,
)
from .state import _CrossbarMixin


def _conv_int(layer: str, what: str, value: Any, low: int) -> int:
    """``value`` as a Python int >= ``low`` (numpy and 0-d integer tensors too; never a
    bool): TypeError for another type, :class:`RRAMValueError` below ``low``."""
    if isinstance(value, bool):
        raise TypeError(f"{layer}: {what} must be an int, got the bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{layer}: {what} must be an int, got {value!r} ({type(value).__name__})"
        ) from None
    if v < low:
        raise RRAMValueError(f"{layer}: {what} must be an int >= {low}, got {v}")
    return v


def _conv_ints(layer: str, what: str, value: Any, dims: int, low: int) -> tuple[int, ...]:
    """An int or a sequence of ``dims`` ints, each >= ``low``, as a ``dims``-tuple."""
    shape = "an int or a 1-tuple" if dims == 1 else f"an int or a tuple of {dims} ints"
    if not isinstance(value, tuple | list):
        return (_conv_int(layer, what, value, low),) * dims
    if len(value) != dims:
        raise RRAMValueError(f"{layer}: {what} must be {shape} >= {low}, got {value!r}")
    try:
        return tuple(_conv_int(layer, what, v, low) for v in value)
    except RRAMValueError:
        raise RRAMValueError(f"{layer}: {what} must be {shape} >= {low}, got {value!r}") from None


def _check_conv_args(
    layer: str,
    dims: int,
    in_channels: Any,
    out_channels: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: Any,
) -> tuple[int, int, tuple, tuple, Any, tuple, int]:
    """The constructor arguments of a ``dims``-D RRAM convolution, checked and as Python
    ints: ``(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)``
    (tuples of ``dims`` ints; padding may stay ``"same"``/``"valid"``). Wrong types raise
    TypeError, wrong values :class:`RRAMValueError` naming the argument and the value
    (``nn.Conv2d`` accepts most of them and fails at its first call, a negative kernel
    size with "negative dimension -1"; zero channels made the crossbar mapping divide by
    zero)."""
    cin = _conv_int(layer, "in_channels", in_channels, 1)
    cout = _conv_int(layer, "out_channels", out_channels, 1)
    g = _conv_int(layer, "groups", groups, 1)
    for what, value in (("in_channels", cin), ("out_channels", cout)):
        if value % g:
            raise RRAMValueError(f"{layer}: {what}={value} must be divisible by groups={g}")
    kernel = _conv_ints(layer, "kernel_size", kernel_size, dims, 1)
    strides = _conv_ints(layer, "stride", stride, dims, 1)
    dil = _conv_ints(layer, "dilation", dilation, dims, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise RRAMValueError(
                f"{layer}: padding must be 'same', 'valid' or ints >= 0, got {padding!r}"
            )
        if padding == "same" and any(s != 1 for s in strides):
            raise RRAMValueError(
                f"{layer}: padding='same' needs stride 1 (as nn.Conv{dims}d), got stride="
                f"{strides if dims > 1 else strides[0]}"
            )
        pad: Any = padding
    else:
        pad = _conv_ints(layer, "padding", padding, dims, 0)
    return cin, cout, kernel, strides, pad, dil, g


class RRAMConv2d(_CrossbarMixin, nn.Conv2d):
    """``nn.Conv2d`` computed on simulated RRAM crossbars.

    Kernels are mapped whole: each input tile holds ``tile_rows // (kh * kw)`` input
    channels (all their kernel taps) of one group, so a tile's partial sum is a grouped
    convolution; the T partial sums are added digitally. Supports stride, padding
    (numbers, tuples, ``"same"``/``"valid"``; zero padding mode), dilation, groups, bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        config: RRAMConfig | None = None,
        seed: int | None = None,
    ) -> None:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups = (
            _check_conv_args(
                type(self).__name__,
                2,
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                groups,
            )
        )
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        cfg = _check_config(config)
        self._check_read_args()
        self._check_config_fits(cfg)
        self._rram_init(cfg, seed)

    def _check_config_fits(self, config: RRAMConfig) -> None:
        kh, kw = self.kernel_size
        if kh * kw > config.tile_rows:
            raise ValueError(
                f"{type(self).__name__}: kernel {kh}x{kw} = {kh * kw} taps does not fit "
                f"tile_rows={config.tile_rows}; use tile_rows >= {kh * kw}"
            )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        config: RRAMConfig | None = None,
        seed: int | None = None,
        program: bool = True,
    ) -> RRAMConv2d:
        """A copy of ``conv`` on crossbars (same weights, device, dtype), programmed now."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects nn.Conv2d, got {type(conv).__name__}")
        return cls._from_conv_module(conv, config, seed, program)

    @classmethod
    def _from_conv_module(cls, conv, config, seed, program):
        """A layer with ``conv``'s arguments, weights, device and dtype (``nn.Conv2d`` for
        this class, ``nn.Conv1d`` for :class:`RRAMConv1d`)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            config=config,
            seed=seed,
        )
        return _copied_from(new, conv, program)

    def _digital_module(self) -> nn.Module:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )

    def _geometry(self) -> tuple[int, int, int]:
        """(channels per tile, input tiles per group, rows used per tile).

        As few input tiles as fit, with the channels spread evenly over them (64 channels
        of 3x3 kernels on 256-row tiles: 3 tiles of 22 channels, not 28 + 28 + 8)."""
        kh, kw = self.kernel_size
        c_g = self.in_channels // self.groups
        n_it = math.ceil(c_g / min(c_g, self.rram_config.tile_rows // (kh * kw)))
        cpt = math.ceil(c_g / n_it)
        return cpt, n_it, cpt * kh * kw

    def _check_read_args(self) -> None:
        """Stride and dilation >= 1, padding >= 0 (as ``nn.Conv2d`` requires at its first
        call; the compiled reads index the input with them)."""
        name = type(self).__name__
        for what, values, low in (
            ("kernel_size", self.kernel_size, 1),
            ("stride", self.stride, 1),
            ("dilation", self.dilation, 1),
            ("padding", self.padding, 0),
        ):
            if what == "padding" and isinstance(values, str):
                continue
            if (
                not isinstance(values, tuple | list)
                or len(values) != 2
                or any(not isinstance(v, int) or isinstance(v, bool) or v < low for v in values)
            ):
                raise RRAMValueError(f"{name}: {what} must be two ints >= {low}, got {values}")

    def _conv_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as a 2-D convolution's (out, in / groups, kh, kw)."""
        return weight

    def weight_tiles(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Digital weights as the (groups * tiles, cpt*kh*kw, out/groups) stack."""
        cpt, n_it, rows = self._geometry()
        g = self.groups
        out_g = self.out_channels // g
        kh, kw = self.kernel_size
        c_g = self.in_channels // g
        w = (self.weight if weight is None else weight).detach().reshape(g, out_g, c_g, kh, kw)
        pad = n_it * cpt - c_g
        if pad:
            w = F.pad(w, (0, 0, 0, 0, 0, pad))
        w = w.reshape(g, out_g, n_it, cpt, kh, kw).permute(0, 2, 3, 4, 5, 1)
        return w.reshape(g * n_it, rows, out_g).contiguous()

    def _stack_to_conv(self, stack: torch.Tensor) -> torch.Tensor:
        """(T, R, out_g) -> grouped-conv weight (T*out_g, cpt, kh, kw)."""
        cpt, _, _ = self._geometry()
        kh, kw = self.kernel_size
        t, _, out_g = stack.shape
        return (
            stack.reshape(t, cpt, kh, kw, out_g)
            .permute(0, 4, 1, 2, 3)
            .reshape(t * out_g, cpt, kh, kw)
        )

    def _rebuild_cache(self) -> None:
        if not self.w_read.numel():
            return
        cs = self.col_scale.unsqueeze(1).to(self.w_read.dtype)
        if self.rram_config.adc_bits is None and self.rram_config.correction == "none":
            # tile sum collapses: one grouped conv with the original groups
            cpt, n_it, _ = self._geometry()
            kh, kw = self.kernel_size
            g, out_g = self.groups, self.out_channels // self.groups
            self._w_conv = (
                self._stack_to_conv(self.w_read * cs)
                .reshape(g, n_it, out_g, cpt, kh, kw)
                .permute(0, 2, 1, 3, 4, 5)
                .reshape(g * out_g, n_it * cpt, kh, kw)
                .contiguous(memory_format=torch.channels_last)
            )
        else:
            self._w_conv = self._stack_to_conv(self.w_read).contiguous(
                memory_format=torch.channels_last
            )
        self._w_conv_exact = (
            self._stack_to_conv(self.w_exact).contiguous(memory_format=torch.channels_last)
            if self.w_exact.numel()
            else None
        )
        w_var = self._read_variance()
        # the read-noise variance per weight as a grouped conv over the tiles (T*out_g, ...)
        self._w_conv_var = (
            None
            if w_var is None
            else self._stack_to_conv(w_var).contiguous(memory_format=torch.channels_last)
        )

    def _spatial_pad(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer's spatial padding, so tile convolutions run with padding 0."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        if isinstance(self.padding, str):
            return self._same_pad(x) if self.padding == "same" else x
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x

    def _channel_pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T*cpt, H, W): each group's channels padded to whole tiles."""
        cpt, n_it, _ = self._geometry()
        g = self.groups
        c_g = self.in_channels // g
        pad = n_it * cpt - c_g
        if not pad:
            return x
        b, _, h, w = x.shape
        return F.pad(x.reshape(b, g, c_g, h, w), (0, 0, 0, 0, 0, pad)).reshape(
            b, g * n_it * cpt, h, w
        )

    def _same_pad(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        dh, dw = self.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))

    def _check_image_input(self, x: torch.Tensor) -> None:
        _check_input(
            type(self).__name__,
            x,
            lambda t: t.ndim in (3, 4) and t.shape[-3] == self.in_channels,
            f"(N, {self.in_channels}, H, W) or ({self.in_channels}, H, W)",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_image_input(x)
        unbatched = x.ndim == 3
        cdt = self._compute_dtype()
        xin = x.unsqueeze(0) if unbatched else x
        if xin.dtype != cdt:
            xin = xin.to(cdt)
        self._check_read_args()
        xp = self._spatial_pad(xin)
        self._output_size(xp)  # every read path (and nn.Conv2d) needs an image >= the kernel
        y = _crossbar(self, xp, self.weight)
        if self.bias is not None:
            y = _add_bias(y, self.bias.to(cdt).view(1, -1, 1, 1))
        y = y.to(_output_dtype(x))
        return y.squeeze(0) if unbatched else y

    def _output_size(self, xp: torch.Tensor) -> tuple[int, int]:
        """Output height and width for spatially padded input ``xp``."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        h, w = xp.shape[-2:]
        hh, ww = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if hh < 1 or ww < 1:
            show = self._shown
            span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
            raise RRAMValueError(
                f"{type(self).__name__}: input of spatial size {show((h, w))} (after padding "
                f"{show(self.padding) if not isinstance(self.padding, str) else self.padding!r})"
                f" is smaller than the dilated kernel {show(span)} (kernel_size="
                f"{show(self.kernel_size)}, dilation={show(self.dilation)})"
            )
        return hh, ww

    def _shown(self, pair: Any) -> tuple:
        """A (height, width) pair as error messages show it (RRAMConv1d: the length)."""
        return tuple(int(v) for v in pair)

    def _nonfinite_outputs(self, bad: torch.Tensor) -> torch.Tensor:
        # an output depends on its receptive field in the input channels of its group
        ones = bad.new_ones((self.out_channels, self.in_channels // self.groups, *self.kernel_size))
        hits = F.conv2d(
            bad.to(torch.float32),
            ones.to(torch.float32),
            stride=self.stride,
            dilation=self.dilation,
            groups=self.groups,
        )
        return hits > 0

    def _read_fake(self, xp: torch.Tensor) -> torch.Tensor:
        return xp.new_empty((xp.shape[0], self.out_channels, *self._output_size(xp)))

    def _read_backward(self, grad, xp, weight, needs):
        """Straight-through: the digital convolution's gradients (input in the compute
        dtype, weight in its own dtype)."""
        dt = grad.dtype
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad,
            xp.to(dt),
            self._conv_weight(weight).to(dt),
            None,
            self.stride,
            (0, 0),
            self.dilation,
            False,
            [0, 0],
            self.groups,
            [needs[0], needs[1], False],
        )
        gx = gx.to(xp.dtype) if gx is not None else None
        gw = gw.reshape(weight.shape).to(weight.dtype) if gw is not None else None
        return gx, gw

    def _hardware_forward(self, xp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        cfg = self.rram_config
        material = cfg.device
        _, n_it, _ = self._geometry()
        g = self.groups
        t_tiles = g * n_it
        x_spatial = xp
        b = xp.shape[0]
        sigma = material.read_noise if cfg.read_noise else 0.0
        gen = self._next_read_noise() if sigma > 0 else None
        out_g = self.out_channels // g
        kh, kw = self.kernel_size
        n_ot = math.ceil(out_g / cfg.tile_cols)
        reads = 3 if cfg.correction == "first_order" else 1
        stats = self.rram_stats
        if cfg.adc_bits is None and cfg.correction == "none":
            y = self._single_read(xp, sigma, gen)
        elif cfg.correction == "first_order" and self._first_order_hybrid_ok(xp):
            y = self._first_order_hybrid(xp, sigma, gen)
        else:
            hh, ww = self._output_size(xp)  # spatially padded already
            if self._depthwise_native_ok(xp):
                # the compiled depthwise read writes whole NCHW planes
                y = xp.new_empty((b, self.out_channels, hh, ww))
                self._depthwise_reads(xp, sigma, gen, y)
            else:
                # NCHW in channels-last memory: image chunks are NHWC slices of it
                y = torch.empty(
                    (b, self.out_channels, hh, ww),
                    dtype=xp.dtype,
                    device=xp.device,
                    memory_format=torch.channels_last,
                )
                if self.groups == 1 and self._native_ok(xp):  # other groups: PyTorch
                    self._fused_reads(xp, sigma, gen, y)
                else:
                    # images in chunks: a chunk's partial sums of the T input tiles take
                    # about one output (the PyTorch path holds their read noise too, and
                    # first-order correction one more stack)
                    step = chunk_rows(b, t_tiles)
                    for start in range(0, b, step):
                        part = self._tiled_read(xp[start : start + step], sigma, gen)  # NHWC
                        y.permute(0, 2, 3, 1)[start : start + step] = part
                        del part
        hh, ww = y.shape[-2:]
        stats.matrix_products += reads * b * hh * ww
        stats.tile_reads += reads * b * hh * ww * t_tiles * n_ot
        stats.dac_conversions += reads * b * hh * ww * self.in_channels * kh * kw
        if cfg.adc_bits:
            stats.adc_conversions += reads * b * hh * ww * t_tiles * out_g
        # first-order correction's writes of x~ are counted by _program_inputs
        lam = self._lambda(
            y.movedim(1, -1),
            lambda rows: F.conv2d(
                x_spatial[:rows],
                self._conv_weight(weight).to(x_spatial.dtype),
                stride=self.stride,
                dilation=self.dilation,
                groups=self.groups,
            ).movedim(1, -1),
        )
        if lam is not None:
            y = denoise(y.movedim(1, -1), lam).movedim(-1, 1)
        return y

    def _conv_args(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=0, dilation=self.dilation)

    def _patch_norm2(self, inp: torch.Tensor) -> torch.Tensor:
        """Sum of squares of each tile's input patch, (B, T, H', W'): channels first summed
        per tile (a norm reduction, no squared copy), then a kh x kw box filter."""
        cpt, n_it, _ = self._geometry()
        t_tiles = self.groups * n_it
        b, _, h, w = inp.shape
        per_tile = torch.linalg.vector_norm(inp.view(b, t_tiles, cpt, h, w), dim=2).square_()
        ones = torch.ones(t_tiles, 1, *self.kernel_size, dtype=inp.dtype, device=inp.device)
        return F.conv2d(per_tile, ones, groups=t_tiles, **self._conv_args()).clamp_min_(0)

    def _single_read(self, xp: torch.Tensor, sigma: float, gen: NoiseSource | None) -> torch.Tensor:
        """No ADC: the tile sum is linear, so one convolution on the de-quantised input,
        with the summed per-tile read noise added once per output."""
        cfg = self.rram_config
        cpt, n_it, _ = self._geometry()
        g = self.groups
        t_tiles = g * n_it
        out_g = self.out_channels // g
        xp = self._channel_pad(xp)
        b, _, h, w = xp.shape
        codes, s_in, levels = dac(xp.view(b, t_tiles, cpt, h, w), cfg, (2, 3, 4))
        x_deq = (codes * (s_in / levels)).reshape(b, t_tiles * cpt, h, w)
        cl = torch.channels_last  # oneDNN runs grouped convolutions far faster in NHWC
        y = F.conv2d(
            x_deq.contiguous(memory_format=cl), self._w_conv, groups=g, **self._conv_args()
        )
        if sigma > 0:
            cs2 = (self.col_scale.to(y.dtype) ** 2).reshape(g, n_it, out_g)
            if self._w_conv_var is None:
                n2 = self._patch_norm2(x_deq)  # (B, T, H', W')
                var = torch.einsum("bgthw,gto->bgohw", n2.reshape(b, g, n_it, *n2.shape[-2:]), cs2)
                var = var.reshape(b, g * out_g, *n2.shape[-2:]) * (2 * sigma * sigma)
            else:  # state-dependent: sum_t col_scale^2 conv(x~^2, w_var) per tile
                v = self._tile_variance(x_deq.square())  # (B, T*out_g, H', W')
                hh, ww = v.shape[-2:]
                v = v.view(b, g, n_it, out_g, hh, ww) * cs2.view(1, g, n_it, out_g, 1, 1)
                var = v.sum(2).reshape(b, g * out_g, hh, ww)
            y = y + gen.randn(y.shape, y.device, y.dtype) * var.clamp_min(0).sqrt()  # type: ignore[union-attr]
        return y

    def _tile_variance(self, inp2: torch.Tensor) -> torch.Tensor:
        """State-dependent read-noise variance of every tile's partial sums, (B, T*out_g,
        H', W'): the squared inputs ``inp2`` (B, T*cpt, H, W) convolved with the variance
        per weight, tile by tile."""
        _, n_it, _ = self._geometry()
        return F.conv2d(
            inp2.contiguous(memory_format=torch.channels_last),
            self._w_conv_var,
            groups=self.groups * n_it,
            **self._conv_args(),
        ).clamp_min_(0)

    def _dac_images(
        self, xp: torch.Tensor, program_inputs: bool = True
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, Any] | None, torch.Tensor, int]:
        """One channels-last copy of the images ``xp`` (spatially padded), each group's
        channels padded to whole tiles and converted in place by the DACs (one range per
        image and input tile; oneDNN runs grouped convolutions far faster in NHWC).

        Returns (codes (B, T*cpt, H, W), when first-order correction writes the input onto
        cells (else None) the input over its range, (B, T, cpt, H, W) in [-1, 1], with that
        range (B, T, 1, 1, 1), DAC full scales (B, T, 1, 1, 1), DAC levels)."""
        cfg = self.rram_config
        cpt, n_it, _ = self._geometry()
        g = self.groups
        t_tiles = g * n_it
        b, _, h, w = xp.shape
        c_g = self.in_channels // g
        buf = xp.new_zeros((b, t_tiles * cpt, h, w)).contiguous(memory_format=torch.channels_last)
        buf.view(b, g, n_it * cpt, h, w)[:, :, :c_g] = xp.view(b, g, c_g, h, w)
        xt = buf.view(b, t_tiles, cpt, h, w)
        normalised = None
        if cfg.correction == "first_order" and program_inputs:
            # the input over the range it is written onto cells with (x~ of first-order
            # correction): the DAC's (fixed or auto), or each tile's |max| without a DAC
            if cfg.dac_bits is not None and cfg.dac_range is not None:
                scale: torch.Tensor | float = cfg.dac_range
            else:
                scale = positive_or_one(absmax(xt, (2, 3, 4)))
            normalised = ((xt / scale).clamp_(-1, 1), scale)
        _, s_in, levels = dac(xt, cfg, (2, 3, 4), out=xt)
        return buf, normalised, s_in, levels

    def _calibration_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check_image_input(x)
        x = x.detach().to(self._compute_dtype())
        return self._spatial_pad(x.unsqueeze(0) if x.ndim == 3 else x)

    def _calibration_partial_sums(self, xp: torch.Tensor) -> torch.Tensor:
        """Noise-free partial sums (T, N H' W', out_g) of images ``xp`` (spatially padded)
        in DAC code units: each input tile's codes convolved with its programmed weights."""
        self._output_size(xp)  # an image smaller than the kernel: the read's own error
        _, n_it, _ = self._geometry()
        t_tiles = self.groups * n_it
        out_g = self.out_channels // self.groups
        codes, _, _, _ = self._dac_images(xp.to(self.w_read.dtype), program_inputs=False)
        u = F.conv2d(codes, self._w_conv, groups=t_tiles, **self._conv_args())
        b, _, hh, ww = u.shape
        return u.view(b, t_tiles, out_g, hh, ww).permute(1, 0, 3, 4, 2).reshape(t_tiles, -1, out_g)

    def _fused_reads(
        self,
        xp: torch.Tensor,
        sigma: float,
        gen: NoiseSource | None,
        y: torch.Tensor,
        x_tilde: torch.Tensor | None = None,
    ) -> None:
        """The read of :meth:`_tiled_read` with the compiled kernel
        (``native_rng.fused_conv_read_``), written to ``y`` (NCHW in channels-last memory):
        per read, one pass that gathers each output pixel's kernel window per input tile
        straight from the (spatially padded) NCHW images -- implicit im2col, channels past
        the input's zero --, runs the DAC on it, multiplies it with the tile's packed
        weights and sends the partial sums through read noise, ADC, de-quantisation, column
        scale and the tile sum. No copy of the images, patch matrix, codes or partial sums
        is stored. With first-order correction ``y`` already holds ``A x~`` and ``x_tilde``
        (images like ``xp``) is the read-back x~: ``A~ x`` is added, ``A~ x~`` subtracted."""
        cpt, t_tiles, _ = self._geometry()
        xp = xp.contiguous()
        b = xp.shape[0]
        hh, ww = y.shape[-2:]
        s_in = self._dac_ranges(xp, cpt, t_tiles)  # one range per image and input tile
        out = y.permute(0, 2, 3, 1).view(b * hh * ww, self.out_channels)
        self._run_fused_reads(
            sigma,
            gen,
            lambda i, spec, packed, packed_var: native_rng.fused_conv_read_(
                (xp, x_tilde)[i],
                s_in,
                packed,
                self.col_scale,  # type: ignore[arg-type]
                out,
                spec,
                cpt=cpt,
                kernel_size=self.kernel_size,  # type: ignore[arg-type]
                stride=self.stride,  # type: ignore[arg-type]
                dilation=self.dilation,  # type: ignore[arg-type]
                packed_var=packed_var,
            ),
        )

    def _first_order_hybrid_ok(self, xp: torch.Tensor) -> bool:
        """True when first-order correction's two reads of the programmed matrix can run
        compiled (a 2-D convolution with groups 1, or a depthwise one, float32 on CPU)."""
        if self.groups == 1:
            return self._native_ok(xp, first_order_hybrid=True)
        return self._depthwise_native_ok(xp, first_order_hybrid=True)

    def _first_order_hybrid(
        self, xp: torch.Tensor, sigma: float, gen: NoiseSource | None
    ) -> torch.Tensor:
        """First-order correction with the compiled reads: ``A x~`` (it writes the images
        onto cells) in PyTorch, image chunk by chunk, then ``A~ x`` added and ``A~ x~``
        subtracted by the compiled fused (groups 1) or depthwise read, with the images and
        their read-back x~ as inputs and the DAC ranges of x for both."""
        _, n_it, _ = self._geometry()
        b = xp.shape[0]
        hh, ww = self._output_size(xp)
        depthwise = self.groups > 1
        y = torch.empty(
            (b, self.out_channels, hh, ww),
            dtype=xp.dtype,
            device=xp.device,
            memory_format=torch.contiguous_format if depthwise else torch.channels_last,
        )
        x_tilde = torch.empty(xp.shape, dtype=xp.dtype, device=xp.device)
        step = chunk_rows(b, self.groups * n_it)
        for start in range(0, b, step):
            chunk = slice(start, start + step)
            part, x_read = self._tiled_read(xp[chunk], sigma, gen, a_x_tilde_only=True)
            y.permute(0, 2, 3, 1)[chunk] = part
            x_tilde[chunk] = x_read[:, : self.in_channels]
            del part, x_read
        xp = xp.contiguous()
        if depthwise:
            self._depthwise_reads(xp, sigma, gen, y, x_tilde)
        else:
            self._fused_reads(xp, sigma, gen, y, x_tilde)
        return y

    def _depthwise_native_ok(self, xp: torch.Tensor, first_order_hybrid: bool = False) -> bool:
        """True when the compiled depthwise read (:mod:`.native_depthwise`) applies: a
        depthwise convolution (one input channel per group, hence one channel per input
        tile) under the conditions of the compiled fused read (:meth:`_native_ok`)."""
        return (
            self.groups > 1
            and self.groups == self.in_channels
            and self._native_ok(xp, first_order_hybrid)
            and self.w_read.dtype == torch.float32  # type: ignore[attr-defined]
            and native_depthwise.available()
        )

    def _depthwise_reads(
        self,
        xp: torch.Tensor,
        sigma: float,
        gen: NoiseSource | None,
        y: torch.Tensor,
        x_tilde: torch.Tensor | None = None,
    ) -> None:
        """The read of :meth:`_tiled_read` for a depthwise convolution with the compiled
        kernel (``native_depthwise.depthwise_read_``), into ``y`` (NCHW, contiguous): per
        image and channel, one pass over the (spatially padded) plane for DAC, window
        products and norms, read noise, ADC, de-quantisation and column scale. Images in
        channels-last memory (the output of the compiled 1x1 reads) are read as they are.
        The reads are :meth:`_read_specs`'; with first-order correction ``y`` already
        holds ``A x~`` and ``x_tilde`` (images like ``xp``) is the read-back x~: ``A~ x`` is
        added, ``A~ x~`` subtracted, both with x's DAC ranges."""
        cfg = self.rram_config
        if not xp.is_contiguous(memory_format=torch.channels_last):
            xp = xp.contiguous()  # the kernel reads NCHW or channels-last images
        channels = self.groups
        m = self.out_channels // channels
        # one DAC range per image and channel; auto-ranging happens in the kernel's pass
        # (first-order correction: x's ranges for x~ too, so they are computed here)
        auto = cfg.dac_bits is not None and cfg.dac_range is None and x_tilde is None
        s_in = None if auto else self._dac_ranges(xp.contiguous(), 1, channels)
        w_var = self._read_variance() if sigma > 0 else None
        inputs = (xp, x_tilde)
        for i, (weights, spec) in enumerate(self._read_specs(sigma, gen, m)):
            native_depthwise.depthwise_read_(
                inputs[i],
                s_in,
                getattr(self, weights).contiguous(),
                self.col_scale,  # type: ignore[arg-type]
                y,
                spec,
                kernel_size=self.kernel_size,  # type: ignore[arg-type]
                stride=self.stride,  # type: ignore[arg-type]
                dilation=self.dilation,  # type: ignore[arg-type]
                variances=None if w_var is None else w_var.contiguous(),
            )

    def _tiled_read(
        self,
        xp: torch.Tensor,
        sigma: float,
        gen: NoiseSource | None,
        a_x_tilde_only: bool = False,
    ) -> Any:
        """Images ``xp`` (spatially padded) through DAC, tile convolutions, read noise, ADC
        and the digital tile sum: (B, H', W', out_channels), channels last. With
        first-order correction and ``a_x_tilde_only``: only the ``A x~`` read, returned
        with x~ in input units ((B, T*cpt, H, W), each group's channels padded to whole
        tiles) for the compiled reads of the programmed matrix."""
        cfg = self.rram_config
        _, n_it, _ = self._geometry()
        g = self.groups
        t_tiles = g * n_it
        out_g = self.out_channels // g
        cl = torch.channels_last
        b = xp.shape[0]
        codes_flat, normalised, s_in, levels = self._dac_images(xp)
        s_in_nhwc = s_in.view(b, 1, 1, t_tiles, 1)
        # calibrated ADC full scales (T, column groups, 1), shared by first-order
        # correction's three reads (their partial sums all approximate A x in code units)
        adc_full = self._adc_ranges()
        if adc_full is not None:
            adc_full = adc_full.unsqueeze(-1)

        def read(
            inp: torch.Tensor,
            weight: torch.Tensor,
            var_in: torch.Tensor | None = None,
            s_read: torch.Tensor = s_in_nhwc,
        ) -> torch.Tensor:
            """(B, T*cpt, H, W) codes -> (B, H', W', T, out_g) partial sums after read
            noise, ADC and de-quantisation (input units, before the column scale).
            ``var_in``: the read noise comes from the input cells (first-order
            correction's x~ array, read with A's codes), variance per input value."""
            u = F.conv2d(
                inp.contiguous(memory_format=cl), weight, groups=t_tiles, **self._conv_args()
            )
            hh, ww = u.shape[-2:]
            u = u.permute(0, 2, 3, 1).reshape(b, hh, ww, t_tiles, out_g)  # NHWC: no copy
            std = None
            if var_in is not None:
                std = (
                    F.conv2d(
                        var_in.contiguous(memory_format=cl),
                        weight.square(),
                        groups=t_tiles,
                        **self._conv_args(),
                    )
                    .clamp_min_(0)
                    .sqrt_()
                )
                std = std.permute(0, 2, 3, 1).reshape(b, hh, ww, t_tiles, out_g)
            elif sigma > 0 and self._w_conv_var is None:
                std = self._patch_norm2(inp).sqrt_().mul_(2**0.5 * sigma)
                std = std.permute(0, 2, 3, 1).unsqueeze(-1)
            elif sigma > 0:  # state-dependent: one std per partial sum
                std = self._tile_variance(inp * inp).sqrt_()
                std = std.permute(0, 2, 3, 1).reshape(b, hh, ww, t_tiles, out_g)
            return noisy_read_(u, std, gen, cfg, levels, s_read, adc_full)

        if normalised is not None:
            # first-order correction, p = A x~ + A~ x - A~ x~ (RRAMLinear._first_order_reads):
            # x~ is the images written onto cells by write-and-verify and read back; A x~
            # applies A's codes to the x~ array, A~ x and A~ x~ are ordinary reads
            u_in, write_scale = normalised
            prog = self._program_inputs(u_in)
            x_tilde = prog.x_read.reshape(codes_flat.shape)
            var_x = prog.var.reshape(codes_flat.shape) if bool(prog.var.any()) else None
            if cfg.dac_bits is not None:  # the read-back x~ through the same DAC
                codes_tilde = (x_tilde * levels).round_().clamp_(-levels, levels)
            else:  # no DAC: x~ at full precision
                codes_tilde = (prog.x_read * write_scale).reshape(codes_flat.shape)
            s_a = torch.as_tensor(write_scale, dtype=xp.dtype, device=xp.device)
            s_a = s_a.reshape(b, 1, 1, t_tiles, 1) if s_a.ndim else s_a.reshape(1, 1, 1, 1, 1)
            u = read(x_tilde, self._w_conv_exact, var_x, s_a)
            if a_x_tilde_only:
                x_tilde_in = (prog.x_read * write_scale).reshape(codes_flat.shape)
                return self._tile_sum(u), x_tilde_in
            u += read(codes_flat, self._w_conv)
            u -= read(codes_tilde, self._w_conv)
        else:
            u = read(codes_flat, self._w_conv)
        return self._tile_sum(u)

    def _tile_sum(self, u: torch.Tensor) -> torch.Tensor:
        """Digital: per-column scale of each tile's partial sums ``u`` (B, H', W', T,
        out_g), then the sum of the tiles of each group: (B, H', W', out_channels)."""
        _, n_it, _ = self._geometry()
        g = self.groups
        out_g = self.out_channels // g
        u.mul_(self.col_scale.to(u.dtype).view(1, 1, 1, g * n_it, out_g))
        b, hh, ww = u.shape[:3]
        return u.view(b, hh, ww, g, n_it, out_g).sum(4).reshape(b, hh, ww, g * out_g)

    def extra_repr(self) -> str:
        cfg = self.rram_config
        return (
            f"{nn.Conv2d.extra_repr(self)}, material={cfg.device.name}, "
            f"tiles={cfg.tile_rows}x{cfg.tile_cols}, dac={cfg.dac_bits}, adc={cfg.adc_bits}, "
            f"correction={cfg.correction}, denoise={cfg.denoise}"
        )


class RRAMConv1d(RRAMConv2d):
    """``nn.Conv1d`` computed on simulated RRAM crossbars (timm's ECA, audio models).

    A 1-D convolution is the 2-D one of ``(N, C, 1, L)`` with a ``1 x k`` kernel, so it
    runs on :class:`RRAMConv2d`'s crossbar mapping and reads. ``weight`` keeps
    ``nn.Conv1d``'s shape ``(out, in / groups, k)`` (state dicts and optimisers see the
    digital layer's tensors); ``kernel_size``, ``stride``, ``padding`` and ``dilation``
    are the 2-D ``(1, ...)`` tuples the crossbar uses. Input ``(N, C, L)`` or ``(C, L)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        config: RRAMConfig | None = None,
        seed: int | None = None,
    ) -> None:
        # checked as 1-D arguments (the messages name what the caller passed)
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups = (
            _check_conv_args(
                type(self).__name__,
                1,
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                groups,
            )
        )
        super().__init__(
            in_channels,
            out_channels,
            (1, *kernel_size),
            stride=(1, *stride),
            padding=padding if isinstance(padding, str) else (0, *padding),
            dilation=(1, *dilation),
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
            config=config,
            seed=seed,
        )
        # nn.Conv2d's initialisation has nn.Conv1d's fan-in (in / groups x k): keep it
        self.weight = nn.Parameter(self.weight.detach().squeeze(2))

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Conv1d,
        config: RRAMConfig | None = None,
        seed: int | None = None,
        program: bool = True,
    ) -> RRAMConv1d:
        """A copy of ``conv`` on crossbars (same weights, device, dtype), programmed now."""
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"from_conv1d expects nn.Conv1d, got {type(conv).__name__}")
        return cls._from_conv_module(conv, config, seed, program)

    def _conv_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.unsqueeze(2) if weight.ndim == 3 else weight

    def _shown(self, pair: Any) -> tuple:
        return (int(pair[1]),)

    def _digital_module(self) -> nn.Module:
        return nn.Conv1d(
            self.in_channels,
            self.out_channels,
            self.kernel_size[1],
            stride=self.stride[1],
            padding=self.padding if isinstance(self.padding, str) else self.padding[1],
            dilation=self.dilation[1],
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )

    def _check_signal_input(self, x: torch.Tensor) -> None:
        _check_input(
            type(self).__name__,
            x,
            lambda t: t.ndim in (2, 3) and t.shape[-2] == self.in_channels,
            f"(N, {self.in_channels}, L) or ({self.in_channels}, L)",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_signal_input(x)
        return super().forward(x.unsqueeze(-2)).squeeze(-2)

    def _calibration_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check_signal_input(x)
        return super()._calibration_input(x.unsqueeze(-2))

    def extra_repr(self) -> str:
        cfg = self.rram_config
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size[1]}, "
            f"stride={self.stride[1]}, material={cfg.device.name}, "
            f"tiles={cfg.tile_rows}x{cfg.tile_cols}, dac={cfg.dac_bits}, adc={cfg.adc_bits}, "
            f"correction={cfg.correction}, denoise={cfg.denoise}"
        )
