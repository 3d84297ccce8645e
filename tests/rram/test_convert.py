"""convert_ on real architectures: torchvision ResNet-18, transformers BERT and GPT-2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sedma_torch as st
from sedma_torch.rram import RRAMConv1D

FAST = st.RRAMConfig(material="taox_hfox", write_verify_iters=3)
IDEAL = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)


def _count(model, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def test_resnet18_converts_and_runs_forward_backward():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    n_conv, n_linear = _count(model, nn.Conv2d), _count(model, nn.Linear)
    reference = {k: v.detach().clone() for k, v in model.named_parameters()}
    st.convert_(model, FAST, progress=False)
    assert _count(model, st.RRAMConv2d) == n_conv == 20
    assert _count(model, st.RRAMLinear) == n_linear == 1
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # digital weights are untouched by conversion and come back with to_digital
    st.to_digital(model)
    assert _count(model, st.RRAMConv2d) == 0
    params = dict(model.named_parameters())
    assert params.keys() == reference.keys()
    assert all(torch.equal(params[k], v) for k, v in reference.items())


def test_bert_converts_and_runs_forward_backward():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(cfg)
    n_linear = _count(model, nn.Linear)
    st.convert_(model, FAST, progress=False)
    assert _count(model, st.RRAMLinear) == n_linear
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(
        input_ids=ids, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "query" in n and n.endswith("weight")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gpt2_conv1d_layers_convert_and_keep_their_layout():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(
        vocab_size=100,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()  # no dropout: outputs must match
    n_conv1d = _count(model, Conv1D)
    ideal = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        digital = model(input_ids=ids).logits
    st.convert_(model, ideal, progress=False)
    assert _count(model, RRAMConv1D) == n_conv1d == 8
    with torch.no_grad():
        converted = model(input_ids=ids).logits
    # an exact device reproduces the digital model: Conv1D's (in, out) layout is honoured
    torch.testing.assert_close(converted, digital, rtol=1e-4, atol=1e-4)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, RRAMConv1D))


def test_filter_fn_selects_modules_by_name():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    st.convert_(model, FAST, filter_fn=lambda module, fqn: fqn == "2", progress=False)
    assert type(model[0]) is nn.Linear and isinstance(model[2], st.RRAMLinear)


@pytest.mark.parametrize("grad", [True, False])
def test_transformer_encoder_layer_runs_every_projection_on_crossbars(grad):
    # eval + no_grad is where nn.TransformerEncoderLayer takes its fused fast path, which
    # reads linear1.weight, in_proj_weight, ... digitally: a converted layer must not
    torch.manual_seed(5)
    digital = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(6))
    ideal, noisy = copy.deepcopy(digital), copy.deepcopy(digital)
    st.convert_(ideal, IDEAL, progress=False)
    st.convert_(noisy, st.RRAMConfig(material="epiram", seed=0), progress=False)
    attn = ideal.self_attn
    assert isinstance(attn, st.RRAMMultiheadAttention)
    assert isinstance(attn.in_proj, st.RRAMLinear) and isinstance(attn.out_proj, st.RRAMLinear)
    assert isinstance(ideal.linear1, st.RRAMLinear) and isinstance(ideal.linear2, st.RRAMLinear)
    with torch.set_grad_enabled(grad):
        want = digital(x)
        torch.testing.assert_close(ideal(x), want, rtol=1e-5, atol=1e-5)
        calls = int(noisy.linear1.read_calls) + int(noisy.self_attn.in_proj.read_calls)
        err = float((noisy(x) - want).norm() / want.norm())
    assert 1e-4 < err < 0.5  # the crossbars were read: device error, not the digital path
    after = int(noisy.linear1.read_calls) + int(noisy.self_attn.in_proj.read_calls)
    assert after == calls + 2


def test_summary_counts_tiles_and_utilisation():
    cfg = FAST.replace(tile_rows=64, tile_cols=32)
    model = nn.Sequential(nn.Conv2d(3, 20, 3), nn.Flatten(), nn.Linear(100, 70))
    st.convert_(model, cfg, progress=False)
    report = st.summary(model)
    conv_row, lin_row = report.rows
    # conv: 3 channels x 9 taps = 27 rows fit one 64-row tile; 20 outputs in one 32-col tile
    assert (conv_row["input_tiles"], conv_row["column_tiles"]) == (1, 1)
    # linear: 100 inputs -> 2 tiles of 64 rows; 70 outputs -> 3 tiles of 32 columns
    assert (lin_row["input_tiles"], lin_row["column_tiles"]) == (2, 3)
    used = 20 * 27 + 70 * 100
    allocated = (1 * 1 + 2 * 3) * 64 * 32
    assert math.isclose(report.utilisation, used / allocated)
    assert math.isclose(lin_row["utilisation"], 7000 / (6 * 64 * 32))
    assert "utilisation" in str(report)


def test_convert_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        st.convert_("not a model", FAST)
    with pytest.raises(TypeError, match="RRAMConfig"):
        st.convert_(nn.Sequential(nn.Linear(2, 2)), {"material": "epiram"})
    with pytest.raises(ValueError, match="from_linear"):
        st.convert_(nn.Linear(2, 2), FAST)
    with pytest.raises(TypeError, match=r"to_digital expects an nn\.Module, got str"):
        st.to_digital("not a model")


def test_gpt2_round_trip_restores_conv1d_and_gradients_match_the_digital_model():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    cfg = transformers.GPT2Config(
        vocab_size=100,
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    digital_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p for n, p in model.named_parameters()}
    model.zero_grad()
    ideal = st.RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
    st.convert_(model, ideal, progress=False)
    model(input_ids=ids, labels=ids).loss.backward()
    # straight-through gradients of an exact device equal the digital ones, (in, out) layout
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, digital_grads[name], rtol=1e-4, atol=1e-5)
    st.to_digital(model)
    assert _count(model, RRAMConv1D) == 0 and _count(model, Conv1D) == 4
    assert all(p is params[n] for n, p in model.named_parameters())
