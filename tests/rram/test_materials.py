"""Material records, the registry and NeuroSim pulse curves against independent references."""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import pytest
import torch

from sedma_torch.rram import materials
from sedma_torch.rram.materials import (
    Material,
    get_material,
    inverse_pulse_curve,
    list_materials,
    normalised_curvature,
    pulse_curve,
    register_material,
)

# SPEC.md device table: Gmax, Gmin, levels LTP/LTD, NL LTP/LTD, sigma_c2c.
SPEC_DEVICE_TABLE = {
    "epiram": (1.2346e-5, 2.4593e-7, 256, 256, 0.5, -0.5, 0.02),
    "ag_asi": (3.846e-8, 3.077e-9, 97, 100, 2.4, -4.88, 0.035),
    "alox_hfo2": (5.9172e-5, 1.3357e-5, 40, 40, 1.94, -0.61, 0.05),
    "taox_hfox": (1e-5, 1e-6, 128, 128, 0.04, -0.63, 0.037),
}

# NeuroSim's getParamA table: normalised curvature a = A / levels per NL label.
NEUROSIM_PARAM_A = {0.01: 126.268958, 0.5: 2.519877, 1.0: 1.251653, 9.0: 0.022810}

# NeuroSim label -> largest gap between normalised curve and diagonal (published constant).
REFERENCE_NL_SCALE = 8.0 * 1.26269


def _np_pulse_curve(p, big_a, levels, g_min, g_max):
    """NeuroSim: G(p) = B (1 - exp(-p/A)) + Gmin, B such that G(levels) = Gmax."""
    big_b = (g_max - g_min) / (1.0 - np.exp(-levels / big_a))
    return big_b * (1.0 - np.exp(-p / big_a)) + g_min


def _np_inverse_pulse_curve(g, big_a, levels, g_min, g_max):
    """Solve G(p) = g for p on the NeuroSim curve (pulse position, real-valued)."""
    big_b = (g_max - g_min) / (1.0 - np.exp(-levels / big_a))
    return -big_a * np.log(1.0 - (g - g_min) / big_b)


@pytest.fixture
def isolated_registry(monkeypatch):
    """A private copy of the registry so registrations do not leak between tests."""
    monkeypatch.setattr(materials, "_REGISTRY", dict(materials._REGISTRY))


def _custom(name: str = "custom_test_device", **overrides) -> Material:
    fields = dict(name=name, g_max=2e-5, g_min=1e-6, levels_ltp=64, levels_ltd=32)
    fields.update(overrides)
    return Material(**fields)


@pytest.mark.parametrize("name", sorted(SPEC_DEVICE_TABLE))
def test_spec_material_has_device_table_values(name):
    g_max, g_min, levels_ltp, levels_ltd, nl_ltp, nl_ltd, sigma_c2c = SPEC_DEVICE_TABLE[name]
    material = get_material(name)
    assert material.name == name
    assert material.g_max == g_max
    assert material.g_min == g_min
    assert material.levels_ltp == levels_ltp
    assert material.levels_ltd == levels_ltd
    assert material.nl_ltp == nl_ltp
    assert material.nl_ltd == nl_ltd
    assert material.sigma_c2c == sigma_c2c
    assert material.g_range == pytest.approx(g_max - g_min, rel=1e-15)
    assert not material.is_exact


def test_get_material_is_case_insensitive_and_passes_material_through():
    assert get_material("EpiRAM") is get_material("epiram")
    custom = _custom()
    assert get_material(custom) is custom


def test_ideal_material_is_exact():
    assert get_material("ideal").is_exact
    assert get_material("ideal").curve_a("ltp") == math.inf


def test_unknown_material_error_lists_known_names():
    with pytest.raises(ValueError, match="unknown material") as info:
        get_material("unobtainium")
    for name in ["ideal", *SPEC_DEVICE_TABLE]:
        assert name in str(info.value)
    assert set(SPEC_DEVICE_TABLE) | {"ideal"} <= set(list_materials())


def test_get_material_rejects_non_string():
    with pytest.raises(TypeError):
        get_material(3)


def test_register_custom_material_then_lookup_and_duplicate_rejected(isolated_registry):
    custom = _custom(nl_ltp=1.5, sigma_c2c=0.01)
    assert register_material(custom) is custom
    assert get_material("custom_test_device") is custom
    assert "custom_test_device" in list_materials()
    with pytest.raises(ValueError, match="already registered"):
        register_material(_custom())
    assert get_material("custom_test_device") is custom
    replacement = dataclasses.replace(custom, g_max=3e-5)
    register_material(replacement, overwrite=True)
    assert get_material("custom_test_device").g_max == 3e-5


def test_register_material_rejects_non_material(isolated_registry):
    with pytest.raises(TypeError):
        register_material({"name": "dict_device"})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"g_min": 2e-5, "g_max": 2e-5}, "g_min"),
        ({"g_min": 3e-5, "g_max": 2e-5}, "g_min"),
        ({"g_min": -1e-9}, "g_min"),
        ({"sigma_c2c": -0.01}, "sigma_c2c"),
        ({"sigma_d2d": -1e-3}, "sigma_d2d"),
        ({"read_noise": -0.1}, "read_noise"),
        ({"drift_nu": float("nan")}, "drift_nu"),
        ({"nl_ltp": 9.5}, "nl_ltp"),
        ({"nl_ltd": -9.01}, "nl_ltd"),
        ({"nl_ltp": float("nan")}, "nl_ltp"),
        ({"levels_ltp": 0}, "levels_ltp"),
        ({"levels_ltd": 2.5}, "levels_ltd"),
        ({"name": "UpperCase"}, "name"),
    ],
)
def test_material_validation_rejects_bad_parameters(overrides, field):
    with pytest.raises(ValueError, match=field):
        _custom(**overrides)


def test_material_accepts_nl_at_limits():
    material = _custom(nl_ltp=9.0, nl_ltd=-9.0)
    assert material.curve_a("ltp") > 0 > material.curve_a("ltd")


def test_nl_scale_is_published_constant():
    assert pytest.approx(REFERENCE_NL_SCALE, rel=1e-15) == materials.NL_SCALE


@pytest.mark.parametrize(
    "nl", [0.01, 0.04, 0.5, 1.0, 1.94, 2.4, 5.0, 9.0, -0.5, -0.63, -4.88, -9.0]
)
def test_normalised_curvature_gives_max_gap_nl_over_scale_on_dense_grid(nl):
    a = normalised_curvature(nl)
    assert math.copysign(1.0, a) == math.copysign(1.0, nl)
    u = np.linspace(0.0, 1.0, 400_001)
    g = (1.0 - np.exp(-u / a)) / (1.0 - np.exp(-1.0 / a))
    gap = g - u
    target = abs(nl) / REFERENCE_NL_SCALE
    # positive NL: concave curve above the diagonal; negative NL: convex, below it
    signed_max = gap.max() if nl > 0 else (-gap).max()
    assert signed_max == pytest.approx(target, rel=1e-6, abs=1e-9)
    assert (np.sign(nl) * gap >= -1e-12).all()


@pytest.mark.parametrize(("nl", "expected"), sorted(NEUROSIM_PARAM_A.items()))
def test_normalised_curvature_matches_neurosim_param_a_table(nl, expected):
    assert normalised_curvature(nl) == pytest.approx(expected, rel=1e-4)
    assert normalised_curvature(-nl) == pytest.approx(-expected, rel=1e-4)


def test_normalised_curvature_of_linear_curve_is_infinite():
    assert normalised_curvature(0.0) == math.inf


def _curves():
    for name in sorted(SPEC_DEVICE_TABLE):
        for which in ("ltp", "ltd"):
            yield pytest.param(name, which, id=f"{name}-{which}")


@pytest.mark.parametrize(("name", "which"), list(_curves()))
def test_pulse_curve_matches_neurosim_formula_endpoints_and_monotone(name, which):
    material = get_material(name)
    levels = material.levels_ltp if which == "ltp" else material.levels_ltd
    nl = material.nl_ltp if which == "ltp" else material.nl_ltd
    big_a = material.curve_a(which)
    assert big_a == pytest.approx(normalised_curvature(nl) * levels, rel=1e-15)

    pulses = np.arange(levels + 1, dtype=np.float64)
    g = pulse_curve(torch.from_numpy(pulses), big_a, levels, material.g_min, material.g_max)
    g = g.numpy()
    np.testing.assert_allclose(
        g, _np_pulse_curve(pulses, big_a, levels, material.g_min, material.g_max), rtol=1e-12
    )
    assert g[0] == pytest.approx(material.g_min, rel=1e-12)
    assert g[-1] == pytest.approx(material.g_max, rel=1e-12)
    steps = np.diff(g)
    assert (steps > 0).all()
    # NL > 0: concave (steps shrink); NL < 0: convex (steps grow)
    assert (np.sign(nl) * np.diff(steps) < 0).all()


def test_pulse_curve_with_per_cell_curvature_matches_numpy():
    rng = np.random.default_rng(11)
    levels, g_min, g_max = 50, 1e-6, 1e-5
    big_a = rng.uniform(5.0, 200.0, size=300) * rng.choice([-1.0, 1.0], size=300)
    p = rng.uniform(0.0, levels, size=300)
    got = pulse_curve(torch.from_numpy(p), torch.from_numpy(big_a), levels, g_min, g_max)
    np.testing.assert_allclose(
        got.numpy(), _np_pulse_curve(p, big_a, levels, g_min, g_max), rtol=1e-12
    )


def test_linear_pulse_curve_is_straight_line():
    rng = np.random.default_rng(12)
    levels, g_min, g_max = 64, 2e-7, 8e-6
    p = rng.uniform(0.0, levels, size=200)
    got = pulse_curve(torch.from_numpy(p), math.inf, levels, g_min, g_max).numpy()
    np.testing.assert_allclose(got, g_min + (g_max - g_min) * p / levels, rtol=1e-13)
    back = inverse_pulse_curve(torch.from_numpy(got), math.inf, levels, g_min, g_max).numpy()
    np.testing.assert_allclose(back, p, rtol=1e-10, atol=1e-10)


def test_pulse_curve_clamps_pulses_to_range():
    material = get_material("alox_hfo2")
    big_a = material.curve_a("ltp")
    p = torch.tensor([-5.0, 0.0, 40.0, 100.0], dtype=torch.float64)
    g = pulse_curve(p, big_a, 40, material.g_min, material.g_max).numpy()
    np.testing.assert_allclose(
        g, [material.g_min, material.g_min, material.g_max, material.g_max], rtol=1e-12
    )


@pytest.mark.parametrize(("name", "which"), list(_curves()))
def test_inverse_pulse_curve_matches_numpy_inverse_and_round_trips(name, which):
    material = get_material(name)
    levels = material.levels_ltp if which == "ltp" else material.levels_ltd
    big_a = material.curve_a(which)
    rng = np.random.default_rng(zlib.crc32(f"{name}-{which}".encode()))
    g = rng.uniform(material.g_min, material.g_max, size=500)
    p = inverse_pulse_curve(torch.from_numpy(g), big_a, levels, material.g_min, material.g_max)
    p = p.numpy()
    expected = _np_inverse_pulse_curve(g, big_a, levels, material.g_min, material.g_max)
    np.testing.assert_allclose(p, expected, rtol=1e-9, atol=1e-9 * levels)
    np.testing.assert_allclose(
        _np_pulse_curve(p, big_a, levels, material.g_min, material.g_max), g, rtol=1e-10
    )

    pulses = rng.uniform(0.0, levels, size=500)
    g_of_p = _np_pulse_curve(pulses, big_a, levels, material.g_min, material.g_max)
    back = inverse_pulse_curve(
        torch.from_numpy(g_of_p), big_a, levels, material.g_min, material.g_max
    )
    np.testing.assert_allclose(back.numpy(), pulses, rtol=1e-8, atol=1e-8 * levels)


def test_inverse_pulse_curve_clamps_outside_window():
    material = get_material("epiram")
    big_a = material.curve_a("ltp")
    g = torch.tensor([0.0, material.g_min / 2, 2 * material.g_max], dtype=torch.float64)
    p = inverse_pulse_curve(g, big_a, 256, material.g_min, material.g_max).numpy()
    np.testing.assert_allclose(p, [0.0, 0.0, 256.0], atol=1e-9)
