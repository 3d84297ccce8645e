"""`sedma_torch.rram.layers` after its split into read_op / state / lambda_control / linear /
conv: the old module re-exports everything, and old pickles (class path
``sedma_torch.rram.layers.RRAMLinear``) still load."""

from __future__ import annotations

import pickle

import pytest
import torch

from sedma_torch.rram import RRAMConfig, conv, lambda_control, layers, linear, read_op, state

# names other code imports from (or reads off) ``layers``, and where they live now
MOVED = {
    linear: ["RRAMLinear"],
    conv: ["RRAMConv1d", "RRAMConv2d"],
    state: [
        "_CrossbarMixin",
        "_STATE_KEYS",
        "_READ_KEYS",
        "_COUNTER_KEYS",
        "_MEMORY_ATTRS",
        "_NO_CONTEXT",
        "_construction_counter",
        "fingerprint",
    ],
    lambda_control: [
        "_LambdaController",
        "LAMBDA_MEMORY_TOLERANCE",
        "LAMBDA_STABLE_CALIBRATIONS",
        "LAMBDA_STABLE_TOLERANCE",
        "CONVERGED_INTERVAL_FACTOR",
        "LAMBDA_DRIFT_TOLERANCE",
    ],
    read_op: [
        "_add_bias",
        "_check_config",
        "_check_input",
        "_check_finite",
        "compute_dtype",
        "_output_dtype",
        "_same_values",
        "_LAYERS",
        "_handles",
        "_register_layer",
        "_layer_of",
        "crossbar_read",
        "_crossbar_read_fake",
        "_crossbar_read_setup",
        "_crossbar_read_backward",
        "_CrossbarFn",
        "_crossbar",
        "_keep_fused_fast_paths_off",
        "_copied_from",
    ],
}


@pytest.mark.parametrize(
    "module, name", [(m, n) for m, names in MOVED.items() for n in names], ids=str
)
def test_layers_reexports(module, name):
    assert getattr(layers, name) is getattr(module, name)


def test_public_names_and_mro():
    assert layers.__all__ == [
        "RRAMConv1d",
        "RRAMConv2d",
        "RRAMLinear",
        "compute_dtype",
        "to_digital",
    ]
    assert layers.RRAMLinear.__mro__[1:3] == (
        state._CrossbarMixin,
        lambda_control._LambdaController,
    )
    assert issubclass(layers.RRAMConv1d, conv.RRAMConv2d)
    for name in ("attach_memory", "workload_type", "_lambda", "_lambda_t", "_calibrate"):
        assert name in vars(lambda_control._LambdaController)
        assert name not in vars(state._CrossbarMixin)
    # the custom operator is registered once, by read_op
    assert torch.ops.sedma.crossbar_read.default is not None
    assert layers.crossbar_read is read_op.crossbar_read


def test_pickle_round_trip():
    layer = layers.RRAMLinear(8, 4, config=RRAMConfig(seed=3), seed=1)
    x = torch.randn(5, 8)
    copy = pickle.loads(pickle.dumps(layer))
    assert type(copy) is linear.RRAMLinear
    torch.testing.assert_close(copy(x), layer(x), rtol=0, atol=0)


def test_old_pickle_class_path_loads(monkeypatch):
    """A pickle made before the split names ``sedma_torch.rram.layers.RRAMLinear``."""
    layer = linear.RRAMLinear(8, 4, config=RRAMConfig(seed=3), seed=1)
    layer.program_()
    with monkeypatch.context() as m:
        m.setattr(linear.RRAMLinear, "__module__", "sedma_torch.rram.layers")
        data = pickle.dumps(layer)
    assert b"sedma_torch.rram.layers" in data and b"sedma_torch.rram.linear" not in data
    old = pickle.loads(data)
    assert type(old) is linear.RRAMLinear and old.is_programmed
    x = torch.randn(5, 8)
    torch.testing.assert_close(old(x), layer(x), rtol=0, atol=0)
