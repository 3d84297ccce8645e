"""Device (material) records and their registry.

A :class:`Material` holds the physical parameters of one RRAM device technology:
its conductance window, the number of programmable levels and the nonlinearity
of its potentiation (LTP) and depression (LTD) curves, cycle-to-cycle and
device-to-device variation, read noise and conductance drift.

The four published materials are the NeuroSim-style parameter sets used by
MELISO+ (``../shared/SPEC.md``, device table). Fields that the table does not
give (device-to-device spread, read noise, drift exponent) carry documented
defaults that are *assumptions* of this simulator; register a variant to use
other values::

    import dataclasses, sedma_torch as st
    hot = dataclasses.replace(st.rram.get_material("taox_hfox"), name="taox_hot", drift_nu=0.05)
    st.rram.register_material(hot)

Pulse curves follow NeuroSim: for pulse number ``p`` in ``[0, levels]``::

    G(p) = B * (1 - exp(-p / A)) + Gmin,   B = (Gmax - Gmin) / (1 - exp(-levels / A))

with ``A = a(NL) * levels``. ``a(NL)`` is the normalised curvature that makes the
largest gap between the normalised curve and the straight line equal
``NL / NL_SCALE`` (``NL_SCALE = 8 * 1.26269``); this reproduces NeuroSim's tabulated
``getParamA`` (label 0.01 ... 9). A negative NL gives a negative A (a convex curve),
the NeuroSim convention for depression. Potentiation moves a cell up its LTP
curve, depression down its LTD curve, both parametrised from Gmin (p = 0) to
Gmax (p = levels).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

NL_SCALE = 8.0 * 1.26269
"""Ratio between a NeuroSim nonlinearity label and the largest deviation of the
normalised pulse curve from linear (fits NeuroSim's ``getParamA`` table)."""


@dataclass(frozen=True)
class Material:
    """Physical parameters of one RRAM device technology."""

    name: str
    """Registry key, lower-case (e.g. ``"taox_hfox"``)."""
    g_max: float
    """Maximum conductance Gmax in siemens (S); > g_min."""
    g_min: float
    """Minimum conductance Gmin in siemens (S); >= 0."""
    levels_ltp: int | None
    """Number of potentiation pulses from Gmin to Gmax (programmable levels);
    ``None`` means a continuous, exactly programmable device (the ideal device)."""
    levels_ltd: int | None
    """Number of depression pulses from Gmax to Gmin; ``None`` as above."""
    nl_ltp: float = 0.0
    """NeuroSim nonlinearity label of the LTP curve, |NL| in [0, 9]; 0 is linear."""
    nl_ltd: float = 0.0
    """NeuroSim nonlinearity label of the LTD curve, |NL| in [0, 9]; 0 is linear."""
    sigma_c2c: float = 0.0
    """Cycle-to-cycle noise: standard deviation of the conductance change per
    pulse, as a fraction of (Gmax - Gmin); >= 0."""
    sigma_d2d: float = 0.0
    """Device-to-device variation: relative standard deviation of each cell's
    Gmax and of its curvature A (drawn once per cell); >= 0. Assumed default."""
    read_noise: float = 0.0
    """Read-noise magnitude ``r`` (>= 0): the scale of the Gaussian noise on a cell's
    conductance at each read, independent per cell and read; how it depends on the cell's
    state is ``read_noise_model``. Assumed default for the published materials."""
    read_noise_model: str = "independent"
    """How a cell's read-noise standard deviation depends on its conductance G (one of
    :data:`READ_NOISE_MODELS`; :func:`read_noise_variance` has the formulas and sources)."""
    drift_nu: float = 0.0
    """Drift exponent nu: G(t) = G(t0) * (t / t0)^-nu with t0 = 1 s; >= 0. Assumed default."""
    drift_nu_std: float = 0.0
    """Cell-to-cell standard deviation of the drift exponent; >= 0. Assumed default."""
    source: str = ""
    """Where the parameters come from."""

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower():
            raise ValueError(f"material name must be non-empty lower case, got {self.name!r}")
        if not (self.g_min >= 0 and self.g_max > self.g_min):
            raise ValueError(
                f"material {self.name!r}: need 0 <= g_min < g_max, got g_min={self.g_min}, "
                f"g_max={self.g_max}"
            )
        for field in ("levels_ltp", "levels_ltd"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"material {self.name!r}: {field} must be a positive int or None, got {value!r}"
                )
        for field in ("nl_ltp", "nl_ltd"):
            value = getattr(self, field)
            if not math.isfinite(value) or abs(value) > 9:
                raise ValueError(
                    f"material {self.name!r}: {field} must satisfy |NL| <= 9, got {value!r}"
                )
        if self.read_noise_model not in READ_NOISE_MODELS:
            raise ValueError(
                f"material {self.name!r}: read_noise_model must be one of {READ_NOISE_MODELS}, "
                f"got {self.read_noise_model!r}"
            )
        if self.read_noise_model == "cmo_1f" and self.read_noise > 0:
            check_cmo_window(self)
        for field in ("sigma_c2c", "sigma_d2d", "read_noise", "drift_nu", "drift_nu_std"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"material {self.name!r}: {field} must be >= 0, got {value!r}")

    @property
    def g_range(self) -> float:
        """Gmax - Gmin in siemens."""
        return self.g_max - self.g_min

    @property
    def is_exact(self) -> bool:
        """True for a device that programs and reads without error."""
        return (
            self.levels_ltp is None
            and self.levels_ltd is None
            and self.sigma_c2c == 0
            and self.sigma_d2d == 0
            and self.read_noise == 0
            and self.drift_nu == 0
            and self.drift_nu_std == 0
        )

    def curve_a(self, which: str) -> float:
        """Curvature A (in pulses) of the ``"ltp"`` or ``"ltd"`` curve; ``inf`` if linear."""
        levels, nl = (
            (self.levels_ltp, self.nl_ltp) if which == "ltp" else (self.levels_ltd, self.nl_ltd)
        )
        if levels is None:
            return math.inf
        return normalised_curvature(nl) * levels


READ_NOISE_MODELS = ("independent", "proportional", "shot", "cmo_1f")
"""Read-noise models (per cell and read; see :func:`read_noise_variance`)."""

CMO_READ_K_US = 0.0277316483
"""``cmo_1f``: K in sigma = K log10(G / 1 uS) sqrt(ln((t + t_read) / (2 t_read))) (uS)."""
CMO_T_READ_S = 1e-6
"""``cmo_1f``: read duration t_read in seconds."""
CMO_WINDOW_S = (8e-6, 90e-6)
"""``cmo_1f``: the conductance range (S) the fit was made on."""


def check_cmo_window(material: Material) -> None:
    """The ``cmo_1f`` fit holds for 8-90 uS only: a material outside it is refused."""
    lo, hi = CMO_WINDOW_S
    if material.g_min < lo or material.g_max > hi:
        raise ValueError(
            f"material {material.name!r}: read_noise_model 'cmo_1f' is a fit for "
            f"{lo * 1e6:g}-{hi * 1e6:g} uS, but the window is "
            f"{material.g_min * 1e6:.3g}-{material.g_max * 1e6:.3g} uS"
        )


def read_noise_variance(
    g: torch.Tensor, material: Material, model: str | None = None, t_s: float = 1.0
) -> torch.Tensor:
    """Read-noise variance of cells of conductance ``g`` (S), in units of (Gmax - Gmin)^2:
    the variance of a normalised weight's cell at one read. ``model`` overrides the
    material's ``read_noise_model``; ``r`` is ``material.read_noise``.

    * ``independent``: sigma = r (Gmax - Gmin), whatever the state. CrossSim's
      ``NormalIndependentDevice`` (sigma normalised to the conductance range), and the
      output-referred ``ADDITIVE_CONSTANT`` weight noise of aihwkit (``forward.w_noise``).
    * ``proportional``: sigma = r G. CrossSim's ``NormalProportionalDevice``
      (``G (1 + N(0, r))``): a cell at Gmin storing a zero has Gmin-level noise only.
    * ``shot``: sigma^2 = r^2 (Gmax - Gmin) G, variance proportional to the conductance,
      as aihwkit's ``PCM_READ`` output noise (variance ``w_noise^2 sum_j |w_ij| x_j^2``)
      and shot noise of the cell current.
    * ``cmo_1f``: the measured 1/f read noise of IBM's CMO/HfOx ReRAM (Lombardo et al.,
      DRC 2024; aihwkit ``ReRamCMONoiseModel``): sigma = K log10(G / 1 uS)
      sqrt(ln((t + t_read) / (2 t_read))) uS, K = 0.0277316483, t_read = 1 us, ``t_s`` the
      time since programming (>= 1 s here), scaled by r (1 = the measured size). Valid
      for 8-90 uS only.
    """
    model = material.read_noise_model if model is None else model
    r = material.read_noise
    rng = material.g_range
    if model == "independent":
        return torch.full_like(g, r * r)
    if model == "proportional":
        return (g * (r / rng)).square_()
    if model == "shot":
        return g * (r * r / rng)
    if model == "cmo_1f":
        check_cmo_window(material)
        t = max(t_s, 1.0)
        factor = CMO_READ_K_US * math.sqrt(math.log((t + CMO_T_READ_S) / (2 * CMO_T_READ_S)))
        sigma_us = torch.log10(g.clamp_min(1e-12) * 1e6).mul_(factor * r)
        return sigma_us.mul_(1e-6 / rng).square_()
    raise ValueError(f"read_noise_model must be one of {READ_NOISE_MODELS}, got {model!r}")


@functools.lru_cache(maxsize=256)
def normalised_curvature(nl: float) -> float:
    """NeuroSim's normalised curvature a(NL) = A / levels for a nonlinearity label.

    Solves ``max_u (g(u) - u) = |NL| / NL_SCALE`` for ``g(u) = (1 - e^{-u/a}) / (1 - e^{-1/a})``
    by bisection on log a; returns ``inf`` for NL = 0 and carries the sign of NL.
    """
    if nl == 0:
        return math.inf
    target = min(abs(nl), 9.0) / NL_SCALE

    def deviation(a: float) -> float:
        # g'(u) = 1 at u* = -a ln(a (1 - e^{-1/a})): the largest gap to the diagonal.
        denom = -math.expm1(-1.0 / a)
        u_star = -a * math.log(a * denom)
        return -math.expm1(-u_star / a) / denom - u_star

    lo, hi = math.log(1e-3), math.log(1e6)  # deviation decreases with a
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if deviation(math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.copysign(math.exp(0.5 * (lo + hi)), nl)


def pulse_curve(
    p: torch.Tensor,
    a: torch.Tensor | float,
    levels: int,
    g_min: torch.Tensor | float,
    g_max: torch.Tensor | float,
) -> torch.Tensor:
    """Conductance after ``p`` pulses from Gmin on a NeuroSim curve (``a`` in pulses)."""
    p = p.clamp(0, levels)
    if isinstance(a, float) and math.isinf(a):
        return g_min + (g_max - g_min) * (p / levels)
    a_t = torch.as_tensor(a, dtype=p.dtype, device=p.device)
    b = (g_max - g_min) / (-torch.expm1(-levels / a_t))
    return b * (-torch.expm1(-p / a_t)) + g_min


def inverse_pulse_curve(
    g: torch.Tensor,
    a: torch.Tensor | float,
    levels: int,
    g_min: torch.Tensor | float,
    g_max: torch.Tensor | float,
) -> torch.Tensor:
    """Pulse position (real-valued) at which the curve reaches conductance ``g``."""
    frac = ((g - g_min) / (g_max - g_min)).clamp(0.0, 1.0)
    if isinstance(a, float) and math.isinf(a):
        return frac * levels
    a_t = torch.as_tensor(a, dtype=g.dtype, device=g.device)
    # frac = (1 - e^{-p/a}) / (1 - e^{-L/a})  =>  p = -a log1p(-frac (1 - e^{-L/a}))
    scale = -torch.expm1(-levels / a_t)
    return (-a_t * torch.log1p(-frac * scale)).clamp(0, levels)


_REGISTRY: dict[str, Material] = {}


def register_material(material: Material, *, overwrite: bool = False) -> Material:
    """Add a material to the registry so configs can name it. Returns it."""
    if not isinstance(material, Material):
        raise TypeError(f"register_material expects a Material, got {type(material).__name__}")
    if material.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"material {material.name!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[material.name] = material
    return material


def get_material(name: str | Material) -> Material:
    """Look a material up by name (case-insensitive); a Material passes through."""
    if isinstance(name, Material):
        return name
    if not isinstance(name, str):
        raise TypeError(f"material must be a name (str) or Material, got {type(name).__name__}")
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown material {name!r}; known materials: {', '.join(list_materials())} "
            "(add one with sedma_torch.rram.register_material)"
        )
    return _REGISTRY[key]


def list_materials() -> list[str]:
    """Names of all registered materials."""
    return sorted(_REGISTRY)


_MELISO = (
    "NeuroSim device table as used by MELISO+ (SPEC.md); d2d, drift and read noise are "
    "assumptions of this simulator: no source measures read noise for these devices. Read "
    "noise is state-dependent (proportional: sigma = read_noise * G, the form of CrossSim's "
    "NormalProportionalDevice), so a zero weight (both cells at Gmin) has Gmin-level noise"
)

IDEAL = register_material(
    Material(
        name="ideal",
        g_max=1e-5,
        g_min=1e-7,
        levels_ltp=None,
        levels_ltd=None,
        source="exact device: continuous levels, no noise",
    )
)
EPIRAM = register_material(
    Material(
        name="epiram",
        g_max=1.2346e-5,
        g_min=2.4593e-7,
        levels_ltp=256,
        levels_ltd=256,
        nl_ltp=0.5,
        nl_ltd=-0.5,
        sigma_c2c=0.02,
        sigma_d2d=0.02,
        read_noise=0.005,
        drift_nu=0.005,
        drift_nu_std=0.002,
        read_noise_model="proportional",
        source="EpiRAM (Ag:SiGe); " + _MELISO,
    )
)
AG_ASI = register_material(
    Material(
        name="ag_asi",
        g_max=3.846e-8,
        g_min=3.077e-9,
        levels_ltp=97,
        levels_ltd=100,
        nl_ltp=2.4,
        nl_ltd=-4.88,
        sigma_c2c=0.035,
        sigma_d2d=0.03,
        read_noise=0.01,
        drift_nu=0.01,
        drift_nu_std=0.004,
        read_noise_model="proportional",
        source="Ag-aSi; " + _MELISO,
    )
)
ALOX_HFO2 = register_material(
    Material(
        name="alox_hfo2",
        g_max=5.9172e-5,
        g_min=1.3357e-5,
        levels_ltp=40,
        levels_ltd=40,
        nl_ltp=1.94,
        nl_ltd=-0.61,
        sigma_c2c=0.05,
        sigma_d2d=0.03,
        read_noise=0.01,
        drift_nu=0.01,
        drift_nu_std=0.004,
        read_noise_model="proportional",
        source="AlOx/HfO2; " + _MELISO,
    )
)
TAOX_HFOX = register_material(
    Material(
        name="taox_hfox",
        g_max=1e-5,
        g_min=1e-6,
        levels_ltp=128,
        levels_ltd=128,
        nl_ltp=0.04,
        nl_ltd=-0.63,
        sigma_c2c=0.037,
        sigma_d2d=0.03,
        read_noise=0.01,
        drift_nu=0.005,
        drift_nu_std=0.002,
        read_noise_model="proportional",
        source="TaOx/HfOx; " + _MELISO,
    )
)

__all__ = [
    "NL_SCALE",
    "READ_NOISE_MODELS",
    "Material",
    "get_material",
    "inverse_pulse_curve",
    "list_materials",
    "normalised_curvature",
    "pulse_curve",
    "read_noise_variance",
    "register_material",
]
