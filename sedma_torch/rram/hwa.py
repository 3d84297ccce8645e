"""Hardware-aware training by noise injection (the aihwkit / aihwkit-lightning recipe).

While :func:`hwa_noise_` is on for a model, every read of an RRAM layer runs on a *freshly
sampled chip* instead of the programmed crossbar: the layer's digital weights are mapped
to differential conductance pairs exactly as :func:`~.crossbar.program_tiles` maps them
(per tile column ``|max|`` scale, so the conductance window clips them), each cell gets a
programming error drawn from :class:`ProgrammingErrorModel` (the error distribution of
the real write-and-verify model, :func:`~.programming.program_conductances`, for the
configured material, iterations, tolerance and device spread), stuck cells, drift and IR
drop are applied by the same code as a programmed chip, and the read itself (DAC, read
noise, ADC with its calibrated ranges, correction) is the inference read. No crossbar is
programmed (``rram_stats.programming_events`` stays unchanged) and the backward pass is
the layer's straight-through one, so the gradients reach the digital weights. Switched
off, the layer programs its current weights once on the next read, as any RRAM layer.

    model = st.convert_(digital_model, cfg, program=False)
    with st.rram.hwa_noise(model):
        train(model)                      # each step sees a new chip draw
    # outside: the weights are programmed once and read from the programmed crossbar
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import RRAMConfig
from .crossbar import chip_properties, column_scale, read_back, read_variance
from .programming import SeededDeviceVariation, program_conductances
from .read_op import compute_dtype
from .rng import derive_seed, make_generator

HWA_MODES = ("noise", "reprogram", "none")
"""``train.hwa``: noise injection (no programming per step), write-and-verify
re-programming after every optimiser step (the old mode), or no hardware-aware phase."""

_FIT_CACHE: dict[tuple, ProgrammingErrorModel] = {}


@dataclass(frozen=True)
class ProgrammingErrorModel:
    """Empirical programming error of one material setting, per target level.

    ``samples[0]`` are the errors of cells whose target is Gmin exactly (the idle cell of
    every pair); ``samples[k]`` (k = 1..bins) those of targets drawn uniformly in
    ``((k-1)/bins, k/bins]`` of the window. Errors are normalised conductance units
    (fractions of Gmax - Gmin), each row sorted (its empirical quantiles).
    """

    samples: torch.Tensor
    """(bins + 1, cells) sorted errors, float32."""
    bins: int
    """Number of level bins above Gmin."""

    @classmethod
    def fit(
        cls, cfg: RRAMConfig, *, bins: int = 64, cells: int = 2048, seed: int = 12345
    ) -> ProgrammingErrorModel:
        """Program ``(bins + 1) * cells`` cells with the configured material, write-verify
        iterations, tolerance, programming noise and device spread (from erased cells, as
        a fresh chip) and keep the sorted errors per level bin. Cached per setting."""
        m = cfg.device
        key = (m, cfg.write_verify_iters, cfg.write_verify_tolerance, cfg.programming_noise)
        key += (cfg.device_variation, bins, cells, seed)
        if key in _FIT_CACHE:
            return _FIT_CACHE[key]
        gen = torch.Generator().manual_seed(seed)
        low = torch.arange(bins, dtype=torch.float64).div_(bins).unsqueeze(1)
        u = low + torch.rand(bins, cells, generator=gen, dtype=torch.float64) / bins
        u = u.clamp_(min=1e-9)  # (bins, cells) in (0, 1]
        t = torch.cat([torch.zeros(1, cells, dtype=torch.float64), u]).float()
        target = t * m.g_range + m.g_min
        variation = None
        if cfg.device_variation and m.sigma_d2d > 0 and m.levels_ltp is not None:
            variation = SeededDeviceVariation(
                derive_seed(seed, "hwa-fit-d2d"), m.sigma_d2d, m.g_min, m.g_range
            )
        g, _ = program_conductances(
            target,
            m,
            generator=torch.Generator().manual_seed(seed + 1),
            tolerance=cfg.write_verify_tolerance,
            max_iters=cfg.write_verify_iters,
            programming_noise=cfg.programming_noise,
            variation=variation,
        )
        err = (g - target) / m.g_range
        model = cls(samples=err.sort(dim=1).values.float().contiguous(), bins=bins)
        _FIT_CACHE[key] = model
        return model

    def sample(self, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Programmed normalised conductances for normalised targets ``t`` in [0, 1] (any
        shape): ``clamp(t + e, 0, 1)`` with ``e`` drawn from the level bin of ``t``."""
        samples = self.samples.to(t.device)
        k = torch.ceil(t * self.bins).clamp_(0, self.bins).long()
        q = torch.randint(
            0, samples.shape[1], t.shape, generator=generator, device=generator.device
        ).to(t.device)
        e = samples[k, q].to(t.dtype)
        return (t + e).clamp_(0, 1)


def _rram_layers(model: nn.Module) -> Iterator[nn.Module]:
    from .state import _CrossbarMixin

    for module in model.modules():
        if isinstance(module, _CrossbarMixin):
            yield module


def sample_chip_(layer: nn.Module, weight: torch.Tensor) -> None:
    """Give ``layer`` the read state of a freshly sampled chip holding ``weight`` (no
    programming event; see the module docstring). The next read samples again."""
    cfg: RRAMConfig = layer.rram_config  # type: ignore[assignment]
    material = cfg.device
    model = ProgrammingErrorModel.fit(cfg)  # cached; follows a reconfigure_ of the layer
    with torch.inference_mode(False), torch.no_grad():
        w = weight.detach()
        tiles = layer.weight_tiles(w).to(compute_dtype(w.dtype))  # type: ignore[operator]
        scale = column_scale(tiles)
        u = tiles / scale.unsqueeze(1)
        # keyed by the layer's read counter (a buffer: saved in state dicts, so a resumed run
        # draws the chips of an uninterrupted one)
        call = layer._bump_read_calls()  # type: ignore[attr-defined]
        seed = derive_seed(layer.rram_seed, "hwa", call)  # type: ignore[attr-defined]
        gen = make_generator(seed, "cpu")
        extra = float(getattr(layer, "_hwa_weight_noise", 0.0) or 0.0)
        if extra > 0:  # aihwkit-lightning's ADD_NORMAL_PER_CHANNEL on top of the chip's error
            noise = torch.randn(u.shape, generator=gen, dtype=u.dtype, device=gen.device)
            u = u + noise.to(u.device).mul_(extra)
        t = torch.stack([u.clamp(min=0), u.neg().clamp_(min=0)])  # (2, T, R, C) >= 0
        gn = model.sample(t.clamp_(max=1), gen)
        g = gn.mul_(material.g_range).add_(material.g_min)
        _, stuck, nu = chip_properties(
            tuple(g.shape), cfg, material, derive_seed(seed, "chip"), g.device, g.dtype
        )
        if stuck is not None:
            g.masked_fill_(stuck == -1, material.g_min).masked_fill_(stuck == 1, material.g_max)
        layer.col_scale = scale
        layer.adc_full = torch.empty(0, device=g.device, dtype=g.dtype)  # re-calibrated
        layer._set_read_state(  # type: ignore[attr-defined]
            read_back(g, cfg, material, nu), tiles, read_variance(g, cfg, material, nu)
        )
        layer._set_fingerprint(None)  # type: ignore[attr-defined]
    layer.hwa_samples += 1  # type: ignore[attr-defined]


def hwa_noise_(model: nn.Module, enabled: bool = True, *, weight_noise: float = 0.0) -> nn.Module:
    """Switch noise-injection reads on (or off) for every RRAM layer of ``model``, in
    place; returns ``model``. Switching off forgets the sampled read state, so the next
    read programs the current weights (one programming event).

    ``weight_noise`` > 0 adds, before each chip is sampled, Gaussian noise of that std to
    every weight in units of its column's |max| (the conductance window): the
    ``ADD_NORMAL_PER_CHANNEL`` weight noise of aihwkit-lightning, a regulariser on top of
    the chip's own error (``train.hwa_weight_noise``); 0 (default) samples the chip alone."""
    if not (isinstance(weight_noise, (int, float)) and weight_noise >= 0):
        raise ValueError(f"hwa_noise_: weight_noise must be a number >= 0, got {weight_noise!r}")
    for layer in _rram_layers(model):
        layer._hwa_weight_noise = float(weight_noise) if enabled else 0.0  # type: ignore[attr-defined]
        if enabled:
            layer._hwa_error_model = ProgrammingErrorModel.fit(layer.rram_config)  # type: ignore[attr-defined]
            layer.hwa_samples = getattr(layer, "hwa_samples", 0)  # type: ignore[attr-defined]
        elif getattr(layer, "_hwa_error_model", None) is not None:
            layer._hwa_error_model = None  # type: ignore[attr-defined]
            layer._set_fingerprint(None)  # type: ignore[attr-defined]
            layer.w_read = layer.w_read.new_empty(0)  # type: ignore[attr-defined]
    return model


@contextlib.contextmanager
def hwa_noise(model: nn.Module, *, weight_noise: float = 0.0) -> Iterator[nn.Module]:
    """``with hwa_noise(model): ...`` — :func:`hwa_noise_` on inside, off afterwards."""
    hwa_noise_(model, True, weight_noise=weight_noise)
    try:
        yield model
    finally:
        hwa_noise_(model, False)


def clip_weights_(model: nn.Module, sigma: float, *, per_channel: bool = False) -> None:
    """aihwkit-lightning's ``WeightClipType.LAYER_GAUSSIAN``: clamp each RRAM layer's
    digital weights to ``sigma`` standard deviations of that layer (after an optimiser
    step), so that one outlier does not set the column scale of its whole column. With
    ``per_channel``, its ``LAYER_GAUSSIAN_PER_CHANNEL``: the std of each output channel's
    weights (a row of a linear weight, one output channel of a conv), which is what a
    column scale of the crossbar maps to the conductance window."""
    with torch.no_grad():
        for layer in _rram_layers(model):
            w = layer.weight
            if per_channel:
                rows = w.detach().reshape(w.shape[0], -1)
                bound = rows.std(dim=1, keepdim=True).mul_(sigma)
                shape = (w.shape[0],) + (1,) * (w.dim() - 1)
                bound = bound.reshape(shape)
                w.copy_(torch.minimum(torch.maximum(w, -bound), bound))
                continue
            bound = float(w.detach().std()) * sigma
            if bound > 0:
                w.clamp_(-bound, bound)


__all__ = [
    "HWA_MODES",
    "ProgrammingErrorModel",
    "clip_weights_",
    "hwa_noise",
    "hwa_noise_",
    "sample_chip_",
]
