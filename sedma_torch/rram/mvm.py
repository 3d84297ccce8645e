"""`mvm`: one simulated crossbar product of a general matrix and vector(s) (solver-style use)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import RRAMConfig
from .crossbar import CrossbarStats, derive_seed
from .linear import RRAMLinear


@dataclass
class MVMResult:
    """Result of :func:`mvm`."""

    y: torch.Tensor
    """The simulated product A x, shaped like A @ x."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Operation counts, programming statistics and (when asked) errors against A @ x:
    ``rel_l2`` = ||y - Ax||_2 / ||Ax||_2 and ``rel_linf`` = ||y - Ax||_inf / ||Ax||_inf."""


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if hasattr(value, "toarray"):  # scipy sparse
        value = torch.from_numpy(np.asarray(value.toarray()))
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"mvm: {name} must be a torch.Tensor or numpy array, got {type(value).__name__}"
        )
    if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"mvm: {name} must be real-valued, got dtype {value.dtype}")
    return value


def _config_of(config: Any) -> RRAMConfig:
    """``mvm``'s ``config``: an :class:`RRAMConfig`, a mapping of its fields or None."""
    if config is None:
        return RRAMConfig()
    if isinstance(config, RRAMConfig):
        return config
    if isinstance(config, Mapping):
        known = [f.name for f in dataclasses.fields(RRAMConfig)]
        unknown = sorted(str(k) for k in config if k not in known)
        if unknown:
            raise ValueError(
                f"mvm: config has unknown RRAMConfig field(s) {unknown}; known fields: "
                f"{', '.join(known)}"
            )
        return RRAMConfig(**config)  # each field validated (its errors name it)
    raise TypeError(
        "mvm: config must be an RRAMConfig, a mapping of RRAMConfig fields or None, got "
        f"{type(config).__name__}"
    )


def _empty_result(a: torch.Tensor, xv: torch.Tensor, compare: bool) -> MVMResult:
    """A product with no entries to compute (m, n or k is 0): NumPy's ``A @ x`` (shape
    (m,) or (m, k); zeros when n is 0), with nothing programmed or read."""
    y = a.new_zeros((a.shape[0], *xv.shape[1:]))
    stats: dict[str, Any] = dict(CrossbarStats().as_dict())
    stats.update({"input_tiles": 0, "column_tiles": 0, "crossbars": 0, "utilisation": 0.0})
    if compare:
        stats["rel_l2"] = stats["rel_linf"] = 0.0
    return MVMResult(y=y, stats=stats)


def _calibration_scale(xs: torch.Tensor) -> torch.Tensor | float:
    """The spread of the calibration vectors: x's std, else (one element: NaN; a constant
    vector: 0, which float32 cannot scale by 1e-300 either, so every ADC range froze at
    its fallback) x's RMS, else 1 (x is 0)."""
    for scale in (xs.std() if xs.numel() > 1 else xs.new_zeros(()), xs.square().mean().sqrt()):
        if bool(torch.isfinite(scale)) and bool(scale > 0):
            return scale
    return 1.0


def mvm(
    A: Any,
    x: Any,
    config: RRAMConfig | None = None,
    *,
    compare: bool = False,
    dtype: torch.dtype = torch.float64,
) -> MVMResult:
    """Program ``A`` (m x n) onto crossbars and compute ``A @ x`` for x of shape (n,) or (n, k).

    Args:
        A: matrix (torch, NumPy or SciPy sparse), finite.
        x: vector (n,) or block of vectors (n, k).
        config: crossbar configuration (``correction``/``denoise`` apply): an
            :class:`RRAMConfig`, a mapping of its fields (``{"material": "ideal"}``) or
            None (the defaults).
        compare: also report the relative L2 and L-infinity error against the exact product.

    An empty product (m, n or k is 0) is NumPy's: ``A`` (0, n) gives shape (0,) or (0, k),
    ``A`` (m, 0) with ``x`` (0,) gives m zeros; nothing is programmed or read (the stats
    count nothing, their errors are 0).

    With ``denoise="adaptive"``, lambda is calibrated first on ``calibration_rows`` random
    vectors (seeded, scaled like x) against their exact products, never on the query; a
    calibrated ADC (the default) takes its full scales from the same vectors.
        dtype: simulation dtype (float64 by default, so float rounding is not the limit).
    """
    config = _config_of(config)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"mvm: dtype must be a floating torch.dtype, got {dtype!r}")
    a = _as_tensor("A", A)
    xv = _as_tensor("x", x)
    if a.ndim != 2:
        raise ValueError(f"mvm: A must be a matrix (m, n), got shape {tuple(a.shape)}")
    if xv.ndim not in (1, 2) or xv.shape[0] != a.shape[1]:
        raise ValueError(
            f"mvm: x must have shape ({a.shape[1]},) or ({a.shape[1]}, k) to match A {tuple(a.shape)}, "
            f"got {tuple(xv.shape)}"
        )
    device = xv.device if xv.device.type != "cpu" else a.device
    a = a.to(device=device, dtype=dtype)
    xv = xv.to(device=device, dtype=dtype)
    if config.check_finite:
        for name, t in (("A", a), ("x", xv)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"mvm: {name} contains NaN or Inf")
    if a.numel() == 0 or xv.numel() == 0:
        return _empty_result(a, xv, compare)
    layer = RRAMLinear(
        a.shape[1],
        a.shape[0],
        bias=False,
        device=device,
        dtype=dtype,
        config=config,
        seed=derive_seed("mvm"),
    )
    with torch.no_grad():
        layer.weight.copy_(a)
        layer.program_()
        xs = xv.unsqueeze(1) if xv.ndim == 1 else xv
        if config.denoise == "adaptive" or config.adc_calibrated:
            # calibrate lambda and the ADC ranges on separate random inputs scaled like x,
            # never on the query
            gen = torch.Generator(device=device).manual_seed(
                derive_seed(config.seed, "calibration")
            )
            rows = config.calibration_rows
            calib = torch.randn(rows, a.shape[1], generator=gen, device=device, dtype=dtype)
            calib *= _calibration_scale(xs)
            layer.calibrate_adc_(calib)
            if config.denoise == "adaptive":
                layer(calib)
        y = layer(xs.T).T
    y = y.squeeze(1) if xv.ndim == 1 else y
    stats: dict[str, Any] = dict(layer.rram_stats.as_dict())
    stats.update(layer.crossbar_summary())
    if compare:
        exact = a @ xv
        err = y - exact
        # ratios of Python floats: in float32, clamp_min(1e-300) of a zero norm is 0 (0/0)
        stats["rel_l2"] = float(err.norm()) / max(float(exact.norm()), 1e-300)
        stats["rel_linf"] = float(err.abs().max()) / max(float(exact.abs().max()), 1e-300)
    return MVMResult(y=y, stats=stats)


__all__ = ["MVMResult", "mvm"]
