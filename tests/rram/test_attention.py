"""RRAMMultiheadAttention against nn.MultiheadAttention (the independent reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sedma_torch as st
from sedma_torch.rram import RRAMLinear
from sedma_torch.rram.attention import RRAMMultiheadAttention

# tiles smaller than the layers: several input and column tiles per crossbar
IDEAL = st.RRAMConfig(
    material="ideal", dac_bits=None, adc_bits=None, read_noise=False, tile_rows=8, tile_cols=8
)
NOISY = st.RRAMConfig(material="epiram", write_verify_iters=5, tile_rows=8, tile_cols=8)
E, HEADS, N, L, S = 16, 4, 3, 5, 6


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _digital(seed: int = 0, dtype=torch.float64, **kwargs) -> nn.MultiheadAttention:
    """A digital MHA with random (non-zero) biases, in eval mode."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, HEADS, dtype=dtype, **kwargs)
    with torch.no_grad():
        for p in (mha.in_proj_bias, mha.out_proj.bias):
            if p is not None:
                p.normal_(0, 0.5)
    return mha.eval()


def _seq(gen, length: int, dim: int, batched: bool, batch_first: bool, dtype) -> torch.Tensor:
    if not batched:
        shape: tuple[int, ...] = (length, dim)
    else:
        shape = (N, length, dim) if batch_first else (length, N, dim)
    return torch.randn(shape, generator=gen, dtype=dtype)


def _bool_mask(gen, shape) -> torch.Tensor:
    mask = torch.rand(shape, generator=gen) < 0.4
    mask[..., 0] = False  # never a fully masked row (NaN in both)
    return mask


def _call_args(mha: nn.MultiheadAttention, case: dict, seed: int) -> tuple[tuple, dict]:
    """(query, key, value) and keyword arguments for ``case``, fresh random values."""
    gen = _gen(seed)
    dtype = mha.out_proj.weight.dtype
    batched = not case.get("unbatched", False)
    bf = mha.batch_first
    attention = case.get("attention", "self")
    query = _seq(gen, L, E, batched, bf, dtype)
    if attention == "self":
        key = value = query
        src = L
    elif attention == "encdec":  # key is value
        key = value = _seq(gen, S, mha.kdim, batched, bf, dtype)
        src = S
    else:  # three distinct tensors
        key = _seq(gen, S, mha.kdim, batched, bf, dtype)
        value = _seq(gen, S, mha.vdim, batched, bf, dtype)
        src = S
    kwargs: dict = {
        k: case[k] for k in ("need_weights", "average_attn_weights", "is_causal") if k in case
    }
    mask = case.get("attn_mask")
    if mask is not None:
        kind, dims = mask
        if kind == "causal":
            shape = (L, src)
            m = nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
        else:
            shape = (L, src) if dims == 2 else ((N if batched else 1) * HEADS, L, src)
            m = _bool_mask(gen, shape)
            if kind == "float":
                m = torch.randn(shape, generator=gen, dtype=dtype).masked_fill(m, float("-inf"))
        kwargs["attn_mask"] = m
    kpm = case.get("key_padding_mask")
    if kpm is not None:
        m = _bool_mask(gen, (N, src) if batched else (src,))
        if kpm == "float":
            m = torch.zeros(m.shape, dtype=dtype).masked_fill(m, -1e4)
        kwargs["key_padding_mask"] = m
    return (query, key, value), kwargs


MODULES = {
    "default": {},
    "batch_first": {"batch_first": True},
    "no_bias": {"bias": False},
    "kdim_vdim": {"kdim": 5, "vdim": 7},
    "kdim_vdim_batch_first_no_bias": {"kdim": 5, "vdim": 7, "batch_first": True, "bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True, "batch_first": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
}

CASES = [
    ("default", {}),
    ("default", {"unbatched": True}),
    ("default", {"attention": "encdec"}),
    ("default", {"attention": "cross"}),
    ("default", {"need_weights": False}),
    ("default", {"average_attn_weights": False}),
    ("default", {"attn_mask": ("bool", 2)}),
    ("default", {"attn_mask": ("float", 2), "attention": "encdec"}),
    ("default", {"attn_mask": ("bool", 3), "need_weights": False}),
    ("default", {"attn_mask": ("float", 3), "average_attn_weights": False}),
    ("default", {"key_padding_mask": "bool"}),
    ("default", {"key_padding_mask": "float", "attn_mask": ("float", 2)}),
    ("default", {"key_padding_mask": "bool", "attn_mask": ("bool", 3), "need_weights": False}),
    ("default", {"attn_mask": ("causal", 2), "is_causal": True}),
    ("default", {"attn_mask": ("causal", 2), "is_causal": True, "need_weights": False}),
    (
        "default",
        {"attn_mask": ("causal", 2), "is_causal": True, "key_padding_mask": "float"},
    ),
    ("default", {"unbatched": True, "attn_mask": ("bool", 3), "key_padding_mask": "bool"}),
    ("batch_first", {}),
    ("batch_first", {"attention": "cross", "need_weights": False}),
    ("batch_first", {"unbatched": True, "attention": "encdec"}),
    ("batch_first", {"key_padding_mask": "bool", "attn_mask": ("bool", 2)}),
    (
        "batch_first",
        {"attn_mask": ("causal", 2), "is_causal": True, "need_weights": False},
    ),
    ("no_bias", {"attention": "cross", "average_attn_weights": False}),
    ("kdim_vdim", {"attention": "cross"}),
    ("kdim_vdim", {"attention": "cross", "unbatched": True, "need_weights": False}),
    ("kdim_vdim", {"attention": "encdec", "kdim_eq_vdim": True}),
    (
        "kdim_vdim_batch_first_no_bias",
        {"attention": "cross", "key_padding_mask": "float", "attn_mask": ("float", 3)},
    ),
    ("bias_kv", {"attn_mask": ("float", 2), "key_padding_mask": "float"}),
    ("bias_kv", {"attention": "cross", "need_weights": False, "attn_mask": ("bool", 3)}),
    ("zero_attn", {"key_padding_mask": "bool", "average_attn_weights": False}),
    ("bias_kv_zero_attn", {"attn_mask": ("bool", 2), "key_padding_mask": "bool"}),
    ("bias_kv_zero_attn", {"unbatched": True, "need_weights": False, "attention": "cross"}),
]


def _case_id(case) -> str:
    module, call = case
    return "-".join([module, *(f"{k}={v}" for k, v in call.items())]).replace(" ", "")


def _module_kwargs(module: str, call: dict) -> dict:
    kwargs = dict(MODULES[module])
    if call.get("kdim_eq_vdim"):
        kwargs["vdim"] = kwargs["kdim"]
    return kwargs


def _assert_same(got, want, rtol: float, atol: float) -> None:
    out, weights = got
    ref_out, ref_weights = want
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    if ref_weights is None:
        assert weights is None
    else:
        assert weights is not None and weights.shape == ref_weights.shape
        torch.testing.assert_close(weights, ref_weights, rtol=rtol, atol=atol)


# ----- structure -------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["default", "kdim_vdim", "bias_kv_zero_attn", "no_bias"])
def test_from_mha_shares_the_parameters_and_keeps_the_state_dict_keys(module):
    mha = _digital(**MODULES[module])
    digital_params = dict(mha.named_parameters())
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=3)
    assert isinstance(rram, nn.MultiheadAttention)
    # the same Parameter objects under the same names (named_parameters deduplicates)
    params = dict(rram.named_parameters())
    assert params.keys() == digital_params.keys()
    assert all(params[k] is p for k, p in digital_params.items())
    assert set(mha.state_dict()) <= set(rram.state_dict())
    assert not any(t.is_meta for t in [*rram.parameters(), *rram.buffers()])
    layers = rram.crossbar_layers()
    assert all(isinstance(m, RRAMLinear) for m in layers.values())
    assert rram.out_proj.weight is mha.out_proj.weight
    assert rram.out_proj.bias is mha.out_proj.bias
    if mha._qkv_same_embed_dim:
        assert list(layers) == ["in_proj", "out_proj"]
        assert rram.in_proj.weight is mha.in_proj_weight and rram.in_proj.bias is None
        assert (rram.in_proj.in_features, rram.in_proj.out_features) == (E, 3 * E)
    else:
        assert list(layers) == ["q_proj", "k_proj", "v_proj", "out_proj"]
        for name in ("q", "k", "v"):
            child = layers[f"{name}_proj"]
            assert child.weight is getattr(mha, f"{name}_proj_weight") and child.bias is None
    # distinct, reproducible seeds per crossbar
    seeds = [m.rram_seed for m in layers.values()]
    assert len(set(seeds)) == len(seeds)
    again = RRAMMultiheadAttention.from_mha(_digital(**MODULES[module]), IDEAL, seed=3)
    assert seeds == [m.rram_seed for m in again.crossbar_layers().values()]
    other = RRAMMultiheadAttention.from_mha(_digital(**MODULES[module]), IDEAL, seed=4)
    assert set(seeds).isdisjoint(m.rram_seed for m in other.crossbar_layers().values())
    assert rram.is_programmed


def test_from_mha_program_false_programs_on_first_forward():
    mha = _digital()
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=0, program=False)
    assert not rram.is_programmed
    args, kwargs = _call_args(mha, {}, seed=1)
    _assert_same(rram(*args, **kwargs), mha(*args, **kwargs), 1e-10, 1e-12)
    assert rram.is_programmed
    stats = rram.program_()
    assert set(stats) == {"in_proj", "out_proj"}


@pytest.mark.parametrize("module", ["default", "kdim_vdim_batch_first_no_bias", "bias_kv"])
def test_direct_construction_equals_its_digital_twin(module):
    torch.manual_seed(0)
    rram = RRAMMultiheadAttention(
        E, HEADS, **MODULES[module], dtype=torch.float64, config=IDEAL, seed=0
    ).eval()
    twin = rram.digital_twin()
    assert all(p is q for p, q in zip(twin.parameters(), rram.parameters(), strict=True))
    call = {"attention": "self" if rram._qkv_same_embed_dim else "cross"}
    args, kwargs = _call_args(twin, call, seed=1)
    _assert_same(rram(*args, **kwargs), twin(*args, **kwargs), 1e-9, 1e-11)


@pytest.mark.parametrize("module", ["default", "kdim_vdim", "bias_kv_zero_attn"])
def test_digital_twin_shares_the_parameters_and_to_digital_swaps_it_back(module):
    mha = _digital(**MODULES[module])
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=0)
    twin = rram.digital_twin()
    assert type(twin) is nn.MultiheadAttention and not twin.training
    assert dict(twin.named_parameters()).keys() == dict(mha.named_parameters()).keys()
    assert all(p is q for p, q in zip(twin.parameters(), mha.parameters(), strict=True))
    assert twin.out_proj.weight is mha.out_proj.weight
    assert not any(t.is_meta for t in twin.parameters())
    for attr in ("embed_dim", "num_heads", "kdim", "vdim", "dropout", "batch_first"):
        assert getattr(twin, attr) == getattr(mha, attr)
    assert (twin.add_zero_attn, twin._qkv_same_embed_dim) == (
        mha.add_zero_attn,
        mha._qkv_same_embed_dim,
    )
    attention = "self" if mha._qkv_same_embed_dim else "cross"
    args, kwargs = _call_args(mha, {"attention": attention}, seed=2)
    _assert_same(twin(*args, **kwargs), mha(*args, **kwargs), 0, 0)


# ----- ideal crossbars compute what nn.MultiheadAttention computes -----------------------------
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_ideal_matches_nn_multihead_attention_float64(case):
    module, call = case
    mha = _digital(seed=len(_case_id(case)), **_module_kwargs(module, call))
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=1)
    for seed in (10, 11):  # fresh inputs, same crossbars
        args, kwargs = _call_args(mha, call, seed)
        _assert_same(rram(*args, **kwargs), mha(*args, **kwargs), 1e-9, 1e-11)


@pytest.mark.parametrize(
    "case",
    [
        ("default", {}),
        ("batch_first", {"key_padding_mask": "bool", "attn_mask": ("bool", 2)}),
        ("batch_first", {"attn_mask": ("causal", 2), "is_causal": True, "need_weights": False}),
        ("kdim_vdim", {"attention": "cross", "attn_mask": ("float", 3)}),
        ("bias_kv_zero_attn", {"attention": "encdec", "need_weights": False}),
    ],
    ids=_case_id,
)
def test_ideal_matches_nn_multihead_attention_float32(case):
    module, call = case
    mha = _digital(seed=5, dtype=torch.float32, **_module_kwargs(module, call))
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=1)
    args, kwargs = _call_args(mha, call, seed=12)
    _assert_same(rram(*args, **kwargs), mha(*args, **kwargs), 1e-5, 1e-5)
    with torch.no_grad():  # the digital module may take its fused fast path here
        _assert_same(rram(*args, **kwargs), mha(*args, **kwargs), 1e-5, 1e-5)


def test_ideal_matches_on_device(device):
    mha = _digital(dtype=torch.float32, batch_first=True).to(device)
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=0)
    for call in ({}, {"attention": "cross", "need_weights": False, "key_padding_mask": "bool"}):
        args, kwargs = _call_args(mha, call, seed=3)
        moved = {id(a): a.to(device) for a in args}  # keeps "query is key is value"
        args = tuple(moved[id(a)] for a in args)
        kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        _assert_same(rram(*args, **kwargs), mha(*args, **kwargs), 1e-5, 1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("module", ["default", "kdim_vdim"])
def test_dropout_in_training_matches_and_is_off_in_eval(module, need_weights):
    mha = _digital(dropout=0.4, **MODULES[module]).train()
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=0)
    assert rram.training and all(m.training for m in rram.crossbar_layers().values())
    call = {"need_weights": need_weights, "attention": "cross", "key_padding_mask": "bool"}
    args, kwargs = _call_args(mha, call, seed=4)
    torch.manual_seed(123)
    got = rram(*args, **kwargs)
    torch.manual_seed(123)
    want = mha(*args, **kwargs)
    _assert_same(got, want, 1e-9, 1e-11)
    torch.manual_seed(124)
    assert not torch.allclose(rram(*args, **kwargs)[0], want[0])  # dropout is on
    rram.eval()
    mha.eval()
    _assert_same(rram(*args, **kwargs), mha(*args, **kwargs), 1e-9, 1e-11)
    _assert_same(rram(*args, **kwargs), mha(*args, **kwargs), 1e-9, 1e-11)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"is_causal": True}, RuntimeError),  # is_causal needs attn_mask
        ({"attn_mask": torch.zeros(L + 1, L, dtype=torch.bool)}, RuntimeError),
        ({"attn_mask": torch.zeros(2, L, L, dtype=torch.bool)}, RuntimeError),
        ({"attn_mask": torch.zeros(L, L, dtype=torch.int64)}, AssertionError),
        ({"key_padding_mask": torch.zeros(N, L + 1, dtype=torch.bool)}, AssertionError),
        ({"key_padding_mask": torch.zeros(N, 1, L, dtype=torch.bool)}, AssertionError),
    ],
)
def test_invalid_arguments_raise_as_nn_multihead_attention(kwargs, error):
    mha = _digital()
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=0)
    x = torch.randn(L, N, E, dtype=torch.float64)
    with pytest.raises(error):
        mha(x, x, x, **kwargs)
    with pytest.raises(error):
        rram(x, x, x, **kwargs)


def test_wrong_key_dim_and_rank_raise():
    mha = _digital(kdim=5, vdim=7)
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=0)
    q = torch.randn(L, N, E, dtype=torch.float64)
    k, v = torch.randn(S, N, 6, dtype=torch.float64), torch.randn(S, N, 7, dtype=torch.float64)
    for module in (mha, rram):
        with pytest.raises(AssertionError, match="key weights"):
            module(q, k, v)
        with pytest.raises(AssertionError, match="3-D"):
            module(q, k[0], v)


# ----- training ---------------------------------------------------------------------------------
def _loss_and_grads(module, params, args, kwargs, seed: int):
    out, weights = module(*args, **kwargs)
    gen = _gen(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=gen, dtype=out.dtype)).sum()
    inputs = [a for a in dict.fromkeys(args) if a.requires_grad]
    return torch.autograd.grad(loss, [*params, *inputs])


@pytest.mark.parametrize(
    "case",
    [
        ("default", {"key_padding_mask": "float"}),
        ("default", {"attention": "cross", "need_weights": False}),
        ("default", {"attention": "encdec", "attn_mask": ("float", 2)}),
        ("kdim_vdim", {"attention": "cross"}),
        ("bias_kv_zero_attn", {"attn_mask": ("bool", 3)}),
        ("no_bias", {"unbatched": True}),
    ],
    ids=_case_id,
)
def test_gradients_equal_the_digital_gradients_at_ideal(case):
    module, call = case
    mha = _digital(**_module_kwargs(module, call))
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=0)
    params = list(mha.parameters())
    args, kwargs = _call_args(mha, call, seed=6)
    for a in args:  # input gradients too ("query is key" stays)
        a.requires_grad_()
    got = _loss_and_grads(rram, params, args, kwargs, seed=7)
    want = _loss_and_grads(mha, params, args, kwargs, seed=7)
    assert len(got) == len(want) > len(params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("module", ["default", "kdim_vdim", "bias_kv"])
def test_optimizer_built_before_conversion_trains_the_shared_parameters(module):
    mha = _digital(**MODULES[module]).train()
    opt = torch.optim.Adam(mha.parameters(), lr=1e-2)  # before the conversion
    rram = RRAMMultiheadAttention.from_mha(mha, IDEAL, seed=0)
    events = {k: int(m.program_events) for k, m in rram.crossbar_layers().items()}
    before = [p.detach().clone() for p in mha.parameters()]
    call = {"attention": "self" if mha._qkv_same_embed_dim else "cross"}
    for step in range(2):
        args, kwargs = _call_args(mha, call, seed=20 + step)
        out, _ = rram(*args, **kwargs)
        opt.zero_grad()
        out.square().mean().backward()
        assert all(p.grad is not None for p in mha.parameters())
        opt.step()
        args, kwargs = _call_args(mha, call, seed=30 + step)
        # the crossbars re-program after the step: the next forward is the digital one
        _assert_same(rram(*args, **kwargs), mha(*args, **kwargs), 1e-9, 1e-11)
    assert all(not torch.equal(p, b) for p, b in zip(mha.parameters(), before, strict=True))
    for name, layer in rram.crossbar_layers().items():
        assert int(layer.program_events) == events[name] + 2, name


# ----- noisy crossbars ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [
        ("batch_first", {"key_padding_mask": "bool"}),
        ("kdim_vdim", {"attention": "cross", "need_weights": False}),
    ],
    ids=_case_id,
)
def test_noisy_material_is_close_finite_and_reproducible(case):
    module, call = case

    def build(seed: int) -> tuple[nn.MultiheadAttention, RRAMMultiheadAttention]:
        mha = _digital(dtype=torch.float32, **_module_kwargs(module, call))
        return mha, RRAMMultiheadAttention.from_mha(mha, NOISY, seed=seed)

    mha, rram = build(0)
    args, kwargs = _call_args(mha, call, seed=8)
    ref, _ = mha(*args, **kwargs)
    out, weights = rram(*args, **kwargs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = float((out - ref).detach().norm() / ref.detach().norm())
    assert 0 < rel < 0.5, rel
    if weights is not None:
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    # the same seed reproduces the crossbars and their read noise; another seed does not
    _, again = build(0)
    torch.testing.assert_close(again(*args, **kwargs), (out, weights), rtol=0, atol=0)
    _, other = build(1)
    assert not torch.equal(other(*args, **kwargs)[0], out)
    # read noise: a second read differs from the first
    assert not torch.equal(rram(*args, **kwargs)[0], out)


def test_noisy_state_dict_round_trip_reproduces_the_chip():
    mha = _digital(dtype=torch.float32)
    rram = RRAMMultiheadAttention.from_mha(mha, NOISY, seed=0)
    state = copy.deepcopy(rram.state_dict())
    args, kwargs = _call_args(mha, {"attention": "encdec"}, seed=9)
    out, _ = rram(*args, **kwargs)
    fresh = RRAMMultiheadAttention.from_mha(
        _digital(seed=99, dtype=torch.float32), NOISY, seed=5, program=False
    )
    fresh.load_state_dict(state)
    assert fresh.in_proj.weight is fresh.in_proj_weight
    assert torch.equal(fresh.in_proj_weight, mha.in_proj_weight)
    assert fresh.is_programmed
    torch.testing.assert_close(fresh(*args, **kwargs)[0], out, rtol=0, atol=0)


# ----- a vit_b_16 encoder block --------------------------------------------------------------
def test_torchvision_vit_encoder_block_at_ideal():
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import EncoderBlock

    torch.manual_seed(0)
    block = EncoderBlock(
        num_heads=4, hidden_dim=64, mlp_dim=128, dropout=0.0, attention_dropout=0.0
    ).eval()
    x = torch.randn(2, 10, 64, generator=_gen(1))
    digital = block.self_attention
    ref = block(x)
    with torch.no_grad():  # the digital block takes the fused fast path here
        ref_fast = block(x)
    block.self_attention = RRAMMultiheadAttention.from_mha(digital, IDEAL, seed=0)
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref_fast, rtol=1e-5, atol=1e-5)
    # the block still trains: gradients reach the MHA's own Parameters
    block(x).sum().backward()
    assert digital.in_proj_weight.grad is not None and digital.out_proj.weight.grad is not None
