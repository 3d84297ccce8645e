"""`RRAMConfig`: every choice of the crossbar simulation, as one frozen dataclass.

Device physics (conductance window, levels, noise magnitudes) lives in the
material record (:mod:`sedma_torch.rram.materials`); the config picks a material
and sets the system around it: tiles, converters, programming, faults, wires,
time, error correction and switches for each non-ideality.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .materials import READ_NOISE_MODELS, Material, check_cmo_window, get_material

CORRECTIONS = ("none", "first_order")
ADC_RANGINGS = ("calibrated", "per_read")
DENOISERS = ("none", "fixed", "adaptive")


@dataclass(frozen=True)
class RRAMConfig:
    """Configuration of a simulated RRAM crossbar (all layers and `mvm` take one).

    ``RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)`` computes the exact
    product; every other setting adds the non-idealities named below.
    """

    material: str | Material = "taox_hfox"
    """Device technology: a registered name (``ideal``, ``epiram``, ``ag_asi``,
    ``alox_hfo2``, ``taox_hfox`` or a custom one) or a :class:`Material`."""
    tile_rows: int = 256
    """Crossbar rows (word lines = inputs) per tile; integer in 1..``MAX_TILE`` (4096)."""
    tile_cols: int = 256
    """Crossbar columns (bit lines = outputs) per tile; integer in 1..``MAX_TILE`` (4096)."""
    dac_bits: int | None = 8
    """Input DAC resolution in bits, 1..16 (signed, 2^(bits-1)-1 levels per polarity,
    at least 1); ``None`` applies inputs at full precision."""
    dac_range: float | None = None
    """DAC full scale in input units (> 0); ``None`` ranges each input vector by its
    absolute maximum per input tile (the usual "noise management")."""
    adc_bits: int | None = 8
    """Column ADC resolution in bits, 1..16 (signed, as the DAC); ``None`` reads the
    column currents at full precision."""
    adc_range: float | None = None
    """ADC full scale in normalised units (inputs in [-1, 1] times weights in [-1, 1],
    summed over a tile column), > 0, the same for every tile; ``None``: set by
    ``adc_ranging``."""
    adc_ranging: str = "calibrated"
    """How the ADC full scale is set when ``adc_range`` is None: ``"calibrated"`` (the
    default, realisable): once per programming, from the first batch the layer reads (up
    to ``calibration_rows`` rows or images), each physical tile's largest column output,
    then frozen (outputs beyond it saturate) -- like CrossSim's CALIBRATED ranges or
    aihwkit's ``out_bound``; ``"per_read"``: every read auto-ranges each tile to its own
    largest output, which a converter cannot know before it converts (an idealisation)."""
    write_verify_iters: int = 20
    """Maximum program-and-verify iterations per programming event, >= 1 (1 is a
    single open-loop write)."""
    write_verify_tolerance: float = 0.01
    """A cell is within tolerance when |G - G_target| <= this fraction of (Gmax - Gmin);
    in (0, 1)."""
    programming_noise: bool = True
    """Apply the material's cycle-to-cycle noise to every programming pulse."""
    device_variation: bool = True
    """Apply the material's device-to-device spread of Gmax and curvature."""
    read_noise: bool = True
    """Apply the material's per-cell Gaussian read noise at every read."""
    read_noise_model: str | None = None
    """How read noise depends on a cell's conductance: ``None`` (the material's
    ``read_noise_model``; state-dependent ``"proportional"`` for the published materials)
    or one of ``"independent"``, ``"proportional"``, ``"shot"``, ``"cmo_1f"``
    (:func:`sedma_torch.rram.materials.read_noise_variance`)."""
    stuck_at_gmin_prob: float = 0.0
    """Probability that a cell is stuck at Gmin (drawn once per chip), in [0, 1)."""
    stuck_at_gmax_prob: float = 0.0
    """Probability that a cell is stuck at Gmax (drawn once per chip), in [0, 1)."""
    wire_resistance_ohm: float = 0.0
    """Resistance of one wire segment between neighbouring cells, in ohm (>= 0);
    enables the first-order IR-drop model (:mod:`sedma_torch.rram.crossbar`)."""
    drift_time_s: float = 0.0
    """Time since programming at which the array is read, in seconds (>= 0); drift
    applies for t > t0 = 1 s as G(t) = G (t / t0)^-nu."""
    correction: str = "none"
    """Error correction: ``"none"`` or ``"first_order"`` (MELISO+'s
    p = A x~ + A~ x - A~ x~, three crossbar products)."""
    denoise: str = "none"
    """Output denoising (I + lam L^T L)^-1 p: ``"none"``, ``"fixed"`` (``lambda_fixed``)
    or ``"adaptive"`` (lambda estimated from recent data; see ``denoise_alpha``)."""
    lambda_fixed: float = 1e-12
    """lambda for ``denoise="fixed"``, >= 0 (MELISO+ used 1e-12)."""
    denoise_alpha: float = 0.5
    """Weight alpha of the remembered lambda in lam_t = exp(alpha log lam_memory +
    (1 - alpha) log lam_recent) (the mix on the log scale of the lambda grid;
    ``lambda_control.mix_lambda``), in [0, 1]."""
    calibration_interval: int = 100
    """``denoise="adaptive"``: re-estimate lam_recent every this many forward calls (>= 1),
    from up to ``calibration_rows`` outputs of the call against the exact product."""
    calibration_rows: int = 32
    """Input vectors (rows or images) used per calibration, >= 1."""
    check_finite: bool = True
    """Reject NaN/Inf inputs and weights with a ValueError (one reduction per call)."""
    seed: int = 0
    """Seed of every random draw (programming, faults, device spread, read noise).

    Same seed, same backend: the same numbers, bit for bit. *Which* numbers depends on the
    backend, because the compiled CPU kernels and PyTorch draw from different streams:

    * read noise: the compiled fused read (float32 on CPU, with an ADC) uses a
      counter-based stream; PyTorch paths (float64, CUDA, ``adc_bits=None``,
      ``SEDMA_NATIVE_RNG=0`` or no C compiler) use torch generators;
    * write-and-verify (float32 on CPU): the compiled kernel's counter-based
      cycle-to-cycle noise against PyTorch's generator otherwise;
    * chip properties (stuck cells, device-to-device spread, drift exponents) come
      from the same streams on every backend.

    So a seeded result reproduces on another machine only with the same backend
    (``SEDMA_NATIVE_RNG=0`` forces the PyTorch one everywhere); the distributions, and
    hence statistics such as error figures, are the same on every backend (the tests
    hold both to the same references)."""

    def __post_init__(self) -> None:
        mat = self.material
        if isinstance(mat, str):
            get_material(mat)  # raises with the known names
        elif not isinstance(mat, Material):
            raise TypeError(
                f"RRAMConfig.material must be a material name or Material, got {type(mat).__name__}"
            )
        for name in ("tile_rows", "tile_cols"):
            _check_int(
                name,
                getattr(self, name),
                1,
                MAX_TILE,
                " (a physical crossbar side: fabricated RRAM arrays are at most about 1024 "
                "cells wide; larger layers are tiled; see sedma_torch.rram.config.MAX_TILE)",
            )
        for name in (
            "write_verify_iters",
            "calibration_interval",
            "calibration_rows",
        ):
            _check_int(name, getattr(self, name), 1)
        for name in ("dac_bits", "adc_bits"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 1, 16)
        for name in ("dac_range", "adc_range"):
            value = getattr(self, name)
            if value is not None and not (_is_real(value) and value > 0 and math.isfinite(value)):
                raise ValueError(
                    f"RRAMConfig.{name} must be a positive number or None, got {value!r}"
                )
        if not (_is_real(self.write_verify_tolerance) and 0 < self.write_verify_tolerance < 1):
            raise ValueError(
                "RRAMConfig.write_verify_tolerance must be in (0, 1) (fraction of Gmax-Gmin), "
                f"got {self.write_verify_tolerance!r}"
            )
        for name in ("stuck_at_gmin_prob", "stuck_at_gmax_prob"):
            value = getattr(self, name)
            if not (_is_real(value) and 0 <= value < 1):
                raise ValueError(f"RRAMConfig.{name} must be in [0, 1), got {value!r}")
        if self.stuck_at_gmin_prob + self.stuck_at_gmax_prob >= 1:
            raise ValueError("RRAMConfig: stuck_at_gmin_prob + stuck_at_gmax_prob must be < 1")
        for name in ("wire_resistance_ohm", "drift_time_s", "lambda_fixed"):
            value = getattr(self, name)
            if not (_is_real(value) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"RRAMConfig.{name} must be a finite number >= 0, got {value!r}")
        if not (_is_real(self.denoise_alpha) and 0 <= self.denoise_alpha <= 1):
            raise ValueError(
                f"RRAMConfig.denoise_alpha must be in [0, 1], got {self.denoise_alpha!r}"
            )
        if self.read_noise_model is not None:
            if self.read_noise_model not in READ_NOISE_MODELS:
                raise ValueError(
                    f"RRAMConfig.read_noise_model must be None or one of {READ_NOISE_MODELS}, "
                    f"got {self.read_noise_model!r}"
                )
            if self.read_noise_model == "cmo_1f" and self.device.read_noise > 0:
                check_cmo_window(self.device)
        if self.adc_ranging not in ADC_RANGINGS:
            raise ValueError(
                f"RRAMConfig.adc_ranging must be one of {ADC_RANGINGS}, got {self.adc_ranging!r}"
            )
        if self.correction not in CORRECTIONS:
            raise ValueError(
                f"RRAMConfig.correction must be one of {CORRECTIONS}, got {self.correction!r}"
            )
        if self.denoise not in DENOISERS:
            raise ValueError(f"RRAMConfig.denoise must be one of {DENOISERS}, got {self.denoise!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"RRAMConfig.seed must be an int, got {self.seed!r}")

    @property
    def device(self) -> Material:
        """The resolved :class:`Material` record."""
        return get_material(self.material)

    @property
    def noise_model(self) -> str:
        """The read-noise model in force (the config's, else the material's)."""
        return self.read_noise_model or self.device.read_noise_model

    @property
    def adc_calibrated(self) -> bool:
        """True when the ADC ranges are calibrated once and frozen (an ADC, no fixed
        ``adc_range``, ``adc_ranging="calibrated"``)."""
        return (
            self.adc_bits is not None
            and self.adc_range is None
            and (self.adc_ranging == "calibrated")
        )

    @property
    def is_exact(self) -> bool:
        """True when this config reproduces the exact digital product."""
        return (
            self.device.is_exact
            and self.dac_bits is None
            and self.adc_bits is None
            and self.stuck_at_gmin_prob == 0
            and self.stuck_at_gmax_prob == 0
            and self.wire_resistance_ohm == 0
        )

    def replace(self, **changes: Any) -> RRAMConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the material by name) for logging and Hydra."""
        out = dataclasses.asdict(self)
        out["material"] = self.device.name
        return out


MAX_TILE = 4096
"""Largest crossbar side accepted (rows or columns). Fabricated RRAM arrays are 64x64 to
1024x1024 cells (NeuRRAM's cores 256x256; larger macros are built from such sub-arrays:
IR drop and sneak paths bound a single array), and the simulation holds every tile padded
to its full size, so a physical bound also bounds memory: ``tile_rows=10**9`` for a
32-cell layer would allocate gigabytes."""


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: object, lo: int, hi: int | None = None, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"RRAMConfig.{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"RRAMConfig.{name} must be {allowed}, got {value!r}{why}")


MELISO_MATERIALS = ("epiram", "ag_asi", "alox_hfo2", "taox_hfox")


def _meliso(material: str) -> RRAMConfig:
    """MELISO+'s setup on ``material`` (``disys-lab/meliso`` and its NeuroSim fork): the
    noise sources it models -- pulse nonlinearity, finite levels, cycle-to-cycle noise --
    and no read noise; device-to-device variation off (0 in its configs); write-and-verify
    up to 21 passes; 16-bit inputs; first-order correction with x written onto cells; the
    fixed lambda = 1e-12. Its 8-bit ADC converts each bit of the bit-serial input
    separately (full scale: the whole column), which is not modelled: no ADC here."""
    return RRAMConfig(
        material=material,
        dac_bits=16,
        adc_bits=None,
        write_verify_iters=21,
        device_variation=False,
        read_noise=False,
        correction="first_order",
        denoise="fixed",
        lambda_fixed=1e-12,
    )


PRESETS: dict[str, RRAMConfig] = {
    "ideal": RRAMConfig(material="ideal", dac_bits=None, adc_bits=None),
    "ideal_8bit": RRAMConfig(material="ideal", dac_bits=8, adc_bits=8),
    "epiram": RRAMConfig(material="epiram"),
    "ag_asi": RRAMConfig(material="ag_asi"),
    "alox_hfo2": RRAMConfig(material="alox_hfo2"),
    "taox_hfox": RRAMConfig(material="taox_hfox"),
    "meliso": _meliso("taox_hfox"),
    **{f"meliso_{name}": _meliso(name) for name in MELISO_MATERIALS},
    "corrected": RRAMConfig(material="taox_hfox", correction="first_order", denoise="adaptive"),
    # one open-loop write (no verify): train.py's default chip (configs/rram/open_loop.yaml)
    "open_loop": RRAMConfig(material="taox_hfox", write_verify_iters=1),
    "realistic": RRAMConfig(
        material="taox_hfox",
        stuck_at_gmin_prob=0.005,
        stuck_at_gmax_prob=0.005,
        wire_resistance_ohm=1.0,
        drift_time_s=3600.0,
    ),
}
"""Named setups; ``preset(name, **overrides)`` returns a validated copy."""


def preset(name: str, **overrides: Any) -> RRAMConfig:
    """A named preset (see ``PRESETS``) with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown RRAM preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


__all__ = ["ADC_RANGINGS", "CORRECTIONS", "DENOISERS", "PRESETS", "RRAMConfig", "preset"]
