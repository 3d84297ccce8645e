"""Workload classes and memory-guided partitioning (SPEC.md Eq. 4)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import sedma_torch as st
from sedma_torch.memory import LongTermMemory
from sedma_torch.rram.partition import (
    CrossbarPool,
    LayerShape,
    PartitionCostModel,
    classify_workload,
    fixed_partition,
    layer_shapes,
    layer_tiling,
    plan_partition,
    programming_iterations,
)

IDEAL = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)


# ----- workload classifier --------------------------------------------------------------
def test_classifier_reads_shape_sparsity_tails_and_smoothness():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(100, 300, generator=g)
    wt = classify_workload(dense)
    assert (wt.rows, wt.cols, wt.kind) == (512, 128, "linear")
    assert (wt.sparsity, wt.tails, wt.smoothness) == ("dense", "light", "rough")

    sparse = dense * (torch.rand(100, 300, generator=g) < 0.5)
    assert classify_workload(sparse).sparsity == "sparse"
    very = dense * (torch.rand(100, 300, generator=g) < 0.05)
    assert classify_workload(very).sparsity == "very_sparse"

    laplace = torch.distributions.Laplace(0.0, 1.0).sample((100, 300))
    assert classify_workload(laplace).tails == "heavy"  # excess kurtosis 3 > 1

    t = torch.linspace(0, 1, 100).unsqueeze(1)
    smooth = torch.cos(math.pi * t) @ torch.randn(1, 300, generator=g) + 0.01 * dense
    assert classify_workload(smooth).smoothness == "smooth"

    conv = torch.randn(64, 32, 3, 3, generator=g)
    assert classify_workload(conv).key.startswith("conv3x3/512x64/")


def test_classifier_is_deterministic_and_shape_only_on_meta():
    w = torch.randn(40, 70, generator=torch.Generator().manual_seed(1))
    assert classify_workload(w) == classify_workload(w.clone())
    meta = classify_workload(torch.empty(40, 70, device="meta"))
    assert (meta.sparsity, meta.tails, meta.smoothness) == ("unknown",) * 3


def test_classifier_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        classify_workload(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        classify_workload(torch.zeros(3))
    with pytest.raises(TypeError, match="tensor"):
        classify_workload([[1.0]])  # type: ignore[arg-type]


# ----- geometry -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_layer_tiling_matches_the_layers_own_layout(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.choice([16, 32, 64]))
    cfg = st.RRAMConfig(
        material="ideal", dac_bits=None, adc_bits=None, tile_rows=size, tile_cols=size
    )
    fin, fout = int(rng.integers(1, 150)), int(rng.integers(1, 150))
    lin = st.RRAMLinear(fin, fout, config=cfg)
    tiling = layer_tiling(LayerShape("l", "linear", fin, fout), size, size)
    info = lin.crossbar_summary()
    assert (tiling.input_tiles, tiling.column_tiles) == (info["input_tiles"], info["column_tiles"])
    assert tiling.utilisation == pytest.approx(info["utilisation"])

    groups = int(rng.choice([1, 2]))
    cin, cout = groups * int(rng.integers(1, 20)), groups * int(rng.integers(1, 40))
    k = int(rng.choice([1, 3]))
    conv = st.RRAMConv2d(cin, cout, k, groups=groups, config=cfg)
    tiling = layer_tiling(LayerShape("c", "conv", cin, cout, (k, k), groups), size, size)
    info = conv.crossbar_summary()
    assert (tiling.input_tiles, tiling.column_tiles) == (info["input_tiles"], info["column_tiles"])
    assert tiling.utilisation == pytest.approx(info["utilisation"])


def test_layer_tiling_hand_computed_conv():
    # 64 channels of 3x3 kernels on 256-row tiles: 28 channels fit, so 3 tiles of 22 channels
    t = layer_tiling(LayerShape("c", "conv", 64, 64, (3, 3)), 256, 256)
    assert (t.input_tiles, t.rows_per_tile, t.column_tiles) == (3, 198, 1)
    assert t.utilisation == pytest.approx(64 * 9 * 64 / (3 * 256 * 256))
    with pytest.raises(ValueError, match="does not fit"):
        layer_tiling(LayerShape("c", "conv", 3, 8, (7, 7)), 32, 32)


def test_layer_shapes_follow_what_convert_converts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    shapes = [s for s, _ in layer_shapes(model)]
    assert [(s.name, s.kind) for s in shapes] == [("0", "conv"), ("3", "linear")]
    mha = nn.MultiheadAttention(8, 2)
    assert [s.name for s, _ in layer_shapes(nn.Sequential(mha))] == []


# ----- the pool and the cost of Eq. 4 -----------------------------------------------------
def test_ir_drop_limits_crossbar_size_per_material():
    pool = CrossbarPool()  # r = 0.1 ohm, tolerance 0.1: r * G_mid * s (s + 1) <= 0.1
    for name in ("epiram", "ag_asi", "alox_hfo2", "taox_hfox"):
        mat = st.rram.get_material(name)
        g_mid = (mat.g_max + mat.g_min) / 2
        expected = max(s for s in pool.sizes if 0.1 * g_mid * s * (s + 1) <= 0.1)
        assert pool.max_size(name) == expected
    assert pool.max_size("ideal") == 512
    assert pool.max_size("alox_hfo2") == 128 and pool.max_size("ag_asi") == 512
    with pytest.raises(ValueError, match="no crossbar size fits"):
        CrossbarPool(wire_resistance_ohm=100.0).max_size("alox_hfo2")


def test_bad_pools_and_pressures_are_rejected():
    with pytest.raises(ValueError, match="ascending"):
        CrossbarPool(sizes=(128, 64))
    with pytest.raises(ValueError, match="one count"):
        CrossbarPool(sizes=(64, 128), counts=(1,))
    with pytest.raises(ValueError, match="memory_pressure"):
        PartitionCostModel().lambda_mem(1.5)


def test_cost_terms_hand_computed_for_one_linear_layer():
    cm = PartitionCostModel()
    t = layer_tiling(LayerShape("l", "linear", 300, 100), 128, 128)  # 3 x 1 tiles
    compute, memory = cm.terms(t, iterations=7, bits_per_cell=8.0)
    programming = 7 * 128 * cm.t_pulse_s
    per_mvm = cm.t_read_s + (128 / 8) * cm.t_adc_s + (3 - 1) * 100 / 64 * cm.t_add_s
    assert compute == pytest.approx(programming + cm.inferences * per_mvm)
    metadata = 3 * (128 * 4 + 16)
    intermediates = 64 * 3 * 100 * 4
    unused = 2 * (3 * 128 * 128 - 300 * 100) * 8 / 8
    assert memory == pytest.approx((metadata + intermediates + unused) / 1e6)
    assert cm.lambda_mem(0.5) == pytest.approx(2 * cm.lambda_base)


# ----- the choice: exact against brute force ---------------------------------------------
def _brute_force(layers, cfg, pool, cm, pressure):
    sizes = pool.available(cfg.device)
    lam = cm.lambda_mem(pressure)
    bits = 8.0
    best = (math.inf, None)
    for combo in itertools.product(sizes, repeat=len(layers)):
        used = dict.fromkeys(sizes, 0)
        total = 0.0
        for (shape, _), s in zip(layers, combo, strict=True):
            try:
                t = layer_tiling(shape, s, s)
            except ValueError:
                total = math.inf
                break
            used[s] += t.crossbars
            c, m = cm.terms(t, programming_iterations(cfg, s), bits)
            total += c + lam * m
        if any(used[s] > pool.count(s) for s in sizes):
            continue
        if total < best[0]:
            best = (total, combo)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_plan_equals_brute_force_with_binding_counts(seed):
    rng = np.random.default_rng(100 + seed)
    layers = []
    for i in range(int(rng.integers(2, 6))):
        if rng.random() < 0.5:
            shape = LayerShape(
                f"l{i}", "linear", int(rng.integers(4, 90)), int(rng.integers(4, 90))
            )
        else:
            shape = LayerShape(
                f"c{i}", "conv", int(rng.integers(1, 12)), int(rng.integers(1, 40)), (3, 3)
            )
        layers.append((shape, torch.empty(1, device="meta").expand(2, 2)))
    pool = CrossbarPool(sizes=(16, 32, 64), counts=tuple(int(c) for c in rng.integers(4, 30, 3)))
    cm = PartitionCostModel(
        inferences=int(rng.integers(10, 10_000)), lambda_base=float(rng.uniform(1e-5, 1e-2))
    )
    pressure = float(rng.uniform(0, 0.9))
    best_cost, best_combo = _brute_force(layers, IDEAL, pool, cm, pressure)
    if best_combo is None:
        with pytest.raises(ValueError, match="do not fit"):
            plan_partition(layers, IDEAL, pool=pool, cost_model=cm, memory_pressure=pressure)
        return
    plan = plan_partition(layers, IDEAL, pool=pool, cost_model=cm, memory_pressure=pressure)
    assert plan.cost == pytest.approx(best_cost, rel=1e-9)
    for size, n in plan.crossbars().items():
        assert n <= pool.count(size)


def test_plan_is_remembered_per_workload_and_looked_up_next_time(tmp_path):
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 300), nn.Conv2d(3, 8, 3))
    cfg = st.RRAMConfig(material="epiram")
    with LongTermMemory(tmp_path / "m.db") as ltm:
        first = plan_partition(model, cfg, memory=ltm, memory_pressure=0.2)
        assert first.memory_hits == 0 and first.candidates_evaluated > 0
        second = plan_partition(model, cfg, memory=ltm, memory_pressure=0.2)
        assert second.memory_hits == 3 and second.candidates_evaluated == 0
        assert second.tile_sizes == first.tile_sizes
        assert second.cost == pytest.approx(first.cost)
        ignored = plan_partition(model, cfg, memory=ltm, memory_pressure=0.2, use_memory=False)
        assert ignored.memory_hits == 0


def test_memory_guided_utilisation_is_at_least_fixed_on_resnet18_shapes():
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18()
    fixed = fixed_partition(model, 256)
    fixed_util = sum(t.used_cells for t in fixed) / sum(t.allocated_cells for t in fixed)
    plan = plan_partition(model, IDEAL, pool=CrossbarPool(counts=None), memory_pressure=0.5)
    assert plan.utilisation > fixed_util
    assert len(plan.layers) == len(fixed) == 21


def test_convert_applies_a_partition_and_stays_exact_on_the_ideal_device():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 10))
    ref = nn.Sequential(*[m for m in model])
    x = torch.randn(5, 40)
    expected = model(x).detach()
    plan = {"0": 16, "2": 32}
    st.convert_(model, IDEAL, partition=plan, progress=False)
    assert model[0].rram_config.tile_rows == 16 and model[2].rram_config.tile_cols == 32
    assert model[0].crossbar_summary()["input_tiles"] == 3
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    del ref
    with pytest.raises(ValueError, match="not convertible"):
        st.convert_(nn.Sequential(nn.Linear(2, 2)), IDEAL, partition={"nope": 16})


def test_a_model_that_does_not_fit_the_pool_gets_a_clear_error():
    layers = [(LayerShape("big", "linear", 200, 200), torch.empty(2, 2, device="meta"))]
    pool = CrossbarPool(sizes=(16, 32, 64), counts=(2, 2, 2))
    with pytest.raises(ValueError, match="do not fit the crossbar pool"):
        plan_partition(layers, IDEAL, pool=pool, memory_pressure=0.1)


def test_remembered_sizes_that_no_longer_fit_are_re_solved(tmp_path):
    def layers(n):
        return [
            (LayerShape(f"l{i}", "linear", 60, 60), torch.empty(2, 2, device="meta"))
            for i in range(n)
        ]

    pool = CrossbarPool(sizes=(16, 32, 64), counts=(64, 64, 2))  # one 64-tile at most
    cm = PartitionCostModel(lambda_base=1.0)  # memory-dominated: one big tile is best
    kw = dict(pool=pool, cost_model=cm, memory_pressure=0.1)
    with LongTermMemory(tmp_path / "m.db") as ltm:
        kw["memory"] = ltm
        one = plan_partition(layers(1), IDEAL, **kw)
        assert one.tile_sizes == {"l0": 64}
        # three layers of the same workload type cannot all take the remembered size
        three = plan_partition(layers(3), IDEAL, **kw)
        assert three.crossbars().get(64, 0) <= 2
        assert three.memory_hits == 0 and three.candidates_evaluated == 9
