"""RRAM API inputs at the edges (issue 16 item 10): conv inputs smaller than the kernel,
conv constructor arguments, empty and mapping arguments of ``mvm``, and ``denoise``'s
lambda.

References: ``nn.Conv2d`` / ``nn.Conv1d`` / ``nn.Linear`` (which exception class they
raise for the same mistake, and their outputs), NumPy (``A @ x`` of empty matrices, the
dense Tikhonov solve) and the closed-form limit of the denoiser.
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from sedma_torch.rram import (
    RRAMConfig,
    RRAMConv1d,
    RRAMConv2d,
    RRAMLinear,
    convert_,
    denoise,
    mvm,
)

EXACT = RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
# one config per read path of a float32 CPU conv: the no-converter convolution (exact),
# the compiled fused read (converters), first-order correction, no ADC with read noise
CONFIGS = {
    "exact": EXACT,
    "converters": RRAMConfig(material="ideal"),
    "first_order": RRAMConfig(material="taox_hfox", correction="first_order"),
    "noisy_no_adc": RRAMConfig(material="taox_hfox", adc_bits=None),
    "unchecked": RRAMConfig(material="ideal", dac_bits=None, adc_bits=None, check_finite=False),
}


def _raised(fn):
    """The exception ``fn()`` raises (fails the test when it raises none)."""
    with pytest.raises(Exception) as info:
        fn()
    return info.value


# ----- conv input smaller than the (dilated) kernel -------------------------------------
SMALL_INPUTS = [
    # (dims, conv kwargs, input shape, shown input size, shown dilated kernel)
    (2, dict(kernel_size=3), (1, 2, 2, 2), "(2, 2)", "(3, 3)"),
    (2, dict(kernel_size=3), (2, 2, 2), "(2, 2)", "(3, 3)"),  # unbatched
    (2, dict(kernel_size=3), (0, 2, 2, 2), "(2, 2)", "(3, 3)"),  # empty batch
    (2, dict(kernel_size=(1, 3)), (1, 2, 5, 2), "(5, 2)", "(1, 3)"),  # width only
    (2, dict(kernel_size=5, padding=1), (1, 2, 2, 2), "(4, 4)", "(5, 5)"),
    (2, dict(kernel_size=3, dilation=2), (1, 2, 4, 4), "(4, 4)", "(5, 5)"),
    (2, dict(kernel_size=5, stride=2, padding=1), (1, 2, 5, 1), "(7, 3)", "(5, 5)"),
    (1, dict(kernel_size=3), (1, 2, 2), "(2,)", "(3,)"),
    (1, dict(kernel_size=3, padding=1, dilation=3), (2, 1), "(3,)", "(7,)"),
]


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize(("dims", "kwargs", "shape", "size", "span"), SMALL_INPUTS)
def test_conv_input_smaller_than_the_kernel_raises_nn_conv_class_naming_the_sizes(
    config_name, dims, kwargs, shape, size, span
):
    digital_cls, rram = (nn.Conv2d, RRAMConv2d.from_conv) if dims == 2 else (nn.Conv1d, None)
    digital = digital_cls(2, 3, **kwargs)
    layer = (
        RRAMConv2d.from_conv(digital, CONFIGS[config_name])
        if rram
        else RRAMConv1d.from_conv1d(digital, CONFIGS[config_name])
    )
    x = torch.randn(shape)
    if config_name == "unchecked" and x.numel():
        x.view(-1)[0] = float("nan")  # the NaN-mask path convolved the input first
    reference = _raised(lambda: digital(x))
    assert type(reference) is RuntimeError  # what nn.Conv2d / nn.Conv1d raise
    err = _raised(lambda: layer(x))
    # before: RuntimeError from F.conv2d on some read paths, ValueError on the others
    assert isinstance(err, RuntimeError) and isinstance(err, ValueError)
    msg = str(err)
    name = type(layer).__name__
    assert msg.startswith(f"{name}: input of spatial size {size}"), msg
    assert f"smaller than the dilated kernel {span}" in msg


@pytest.mark.parametrize("config_name", ["exact", "converters"])
def test_conv_input_smaller_than_the_kernel_through_convert(config_name):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv1d(3, 2, 2))
    convert_(model, CONFIGS[config_name])
    conv2d = model[0]
    assert isinstance(conv2d, RRAMConv2d)
    x = torch.randn(1, 2, 2, 2)
    with pytest.raises(RuntimeError, match=r"RRAMConv2d: input of spatial size \(2, 2\)"):
        model(x)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        conv2d(x)


# ----- conv constructor arguments -------------------------------------------------------
# kwargs over in_channels=4, out_channels=4, kernel_size=3 for the 2-D and the 1-D layer,
# and what the message says after "<layer>: " (the argument, what is allowed, the value)
BAD_CONV_ARGS = [
    (dict(stride=0), dict(stride=0), r"stride must be an int >= 1, got 0"),
    (dict(stride=-1), dict(stride=-1), r"stride must be an int >= 1, got -1"),
    (
        dict(stride=(1, 0)),
        dict(stride=(0,)),
        r"stride must be an int or a (tuple of 2 ints|1-tuple) >= 1, got \((1, )?0,?\)",
    ),
    (dict(kernel_size=0), dict(kernel_size=0), r"kernel_size must be an int >= 1, got 0"),
    # nn: "negative dimension -1" from its constructor
    (dict(kernel_size=-1), dict(kernel_size=-1), r"kernel_size must be an int >= 1, got -1"),
    (
        dict(kernel_size=(3, 3, 3)),
        dict(kernel_size=(3, 3)),
        r"kernel_size must be an int or a (tuple of 2 ints|1-tuple) >= 1, got \(3, 3",
    ),
    (dict(padding=-1), dict(padding=-1), r"padding must be an int >= 0, got -1"),
    (
        dict(padding=(1, 2, 3)),
        dict(padding=(1, 2)),
        r"padding must be an int or a (tuple of 2 ints|1-tuple) >= 0, got \(1, 2",
    ),
    (dict(dilation=0), dict(dilation=0), r"dilation must be an int >= 1, got 0"),
    (dict(in_channels=3, groups=2),) * 2 + (r"in_channels=3 must be divisible by groups=2",),
    (dict(out_channels=3, groups=2),) * 2 + (r"out_channels=3 must be divisible by groups=2",),
    (dict(groups=0),) * 2 + (r"groups must be an int >= 1, got 0",),
    (dict(padding="full"),) * 2 + (r"padding must be 'same', 'valid' or ints >= 0, got 'full'",),
    (dict(padding="same", stride=2),) * 2 + (r"padding='same' needs stride 1",),
    # nn: TypeError at the first call (stride) or from its constructor
    (dict(stride=1.5),) * 2 + (r"stride must be an int, got 1.5 \(float\)",),
    (dict(kernel_size=3.0),) * 2 + (r"kernel_size must be an int, got 3.0 \(float\)",),
    (dict(in_channels=4.0),) * 2 + (r"in_channels must be an int, got 4.0 \(float\)",),
    (dict(kernel_size=None),) * 2 + (r"kernel_size must be an int, got None \(NoneType\)",),
]


def _nn_failure(cls, kwargs, x):
    """What ``cls(**kwargs)`` raises when built, else at its first call on ``x``."""
    try:
        layer = cls(**kwargs)
    except Exception as exc:
        return exc
    return _raised(lambda: layer(x))


@pytest.mark.parametrize("dims", [2, 1])
@pytest.mark.parametrize(("change_2d", "change_1d", "match"), BAD_CONV_ARGS)
def test_conv_constructor_rejects_bad_arguments_like_nn_conv_naming_them(
    dims, change_2d, change_1d, match
):
    kwargs = dict(in_channels=4, out_channels=4, kernel_size=3)
    kwargs.update(change_2d if dims == 2 else change_1d)
    digital_cls, rram_cls = (nn.Conv2d, RRAMConv2d) if dims == 2 else (nn.Conv1d, RRAMConv1d)
    reference = _nn_failure(digital_cls, kwargs, torch.randn(1, 4, *([8] * dims)))
    with pytest.raises(Exception, match=f"^{rram_cls.__name__}: {match}") as info:
        rram_cls(**kwargs, config=EXACT)
    # the class PyTorch raises (RuntimeError, ValueError or TypeError), at construction
    # (before: ZeroDivisionError / "negative dimension -1" / a ValueError for RuntimeError)
    assert isinstance(info.value, type(reference)), (info.value, reference)


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        (dict(in_channels=0), "in_channels"),  # before: ZeroDivisionError at the first call
        (dict(out_channels=0), "out_channels"),  # before: AttributeError at the first call
        (dict(in_channels=-2), "in_channels"),
    ],
)
@pytest.mark.parametrize("rram_cls", [RRAMConv2d, RRAMConv1d])
def test_conv_without_channels_is_rejected_at_construction(rram_cls, kwargs, what):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"{rram_cls.__name__}: {what} must be an int >= 1"):
        rram_cls(**args, config=EXACT)


@pytest.mark.parametrize("rram_cls", [RRAMConv2d, RRAMConv1d])
@pytest.mark.parametrize("arg", ["in_channels", "out_channels", "kernel_size", "stride", "groups"])
def test_conv_bool_arguments_are_type_errors(rram_cls, arg):
    args = dict(in_channels=4, out_channels=4, kernel_size=3)
    args[arg] = True  # nn.Conv2d reads True as 1
    with pytest.raises(
        TypeError, match=rf"{rram_cls.__name__}: {arg} must be an int, got the bool"
    ):
        rram_cls(**args, config=EXACT)


def test_conv_takes_numpy_integers_as_nn_conv_does():
    conv = nn.Conv2d(np.int64(2), np.int64(4), (np.int32(3), np.int64(2)), stride=np.int64(2))
    layer = RRAMConv2d.from_conv(conv, EXACT)
    assert layer.kernel_size == (3, 2) and type(layer.kernel_size[0]) is int
    direct = RRAMConv2d(np.int64(2), np.int64(4), (np.int32(3), np.int64(2)), config=EXACT)
    assert direct.in_channels == 2 and type(direct.in_channels) is int
    x = torch.randn(2, 2, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)


def test_conv1d_arguments_are_named_in_one_dimension():
    with pytest.raises(ValueError, match=r"RRAMConv1d: stride must be an int >= 1, got 0$"):
        RRAMConv1d(2, 2, 3, stride=0)
    with pytest.raises(RuntimeError, match=r"RRAMConv1d: kernel_size must be an int or a 1-tuple"):
        RRAMConv1d(2, 2, (3, 3))


# ----- RRAMLinear -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((True, 3), TypeError, "in_features must be a positive int, got the bool True"),
        ((3, False), TypeError, "out_features must be a positive int, got the bool False"),
        ((2.0, 3), TypeError, r"in_features must be a positive int, got 2.0 \(float\)"),
        (("3", 3), TypeError, r"in_features must be a positive int, got '3' \(str\)"),
        ((-1, 3), RuntimeError, "in_features must be a positive int, got -1"),  # nn's class
        ((3, 0), ValueError, "out_features must be a positive int, got 0"),
    ],
)
def test_linear_rejects_non_integer_or_non_positive_features(args, error, match):
    with pytest.raises(error, match=f"RRAMLinear: {match}"):
        RRAMLinear(*args, config=EXACT)


def test_linear_takes_numpy_integers_as_nn_linear_does():
    lin = nn.Linear(np.int64(5), np.int32(3))
    layer = RRAMLinear(np.int64(5), np.int32(3), config=EXACT)
    assert (layer.in_features, layer.out_features) == (5, 3)
    assert type(layer.in_features) is int
    x = torch.randn(4, 5)
    with torch.no_grad():
        layer.load_state_dict(lin.state_dict(), strict=False)
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)


def test_input_shape_errors_are_the_class_nn_layers_raise():
    lin, conv = nn.Linear(4, 3), nn.Conv2d(2, 3, 3)
    for digital, layer, x in (
        (lin, RRAMLinear.from_linear(lin, EXACT), torch.randn(2, 5)),
        (conv, RRAMConv2d.from_conv(conv, EXACT), torch.randn(1, 3, 5, 5)),
        (conv, RRAMConv2d.from_conv(conv, EXACT), torch.randn(1, 1, 2, 5, 5)),
    ):
        assert type(_raised(partial(digital, x))) is RuntimeError
        with pytest.raises(RuntimeError, match=r"input shape .* is not"):
            layer(x)
        with pytest.raises(ValueError, match=r"input shape .* is not"):
            layer(x)


# ----- mvm ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a_shape", "x_shape"),
    [
        ((0, 5), (5,)),
        ((5, 0), (0,)),
        ((0, 0), (0,)),
        ((0, 5), (5, 2)),
        ((5, 0), (0, 3)),
        ((4, 5), (5, 0)),
    ],
)
@pytest.mark.parametrize("config", [EXACT, None], ids=["exact", "default"])
def test_mvm_of_an_empty_product_is_numpys(a_shape, x_shape, config):
    rng = np.random.default_rng(3)
    a, x = rng.normal(size=a_shape), rng.normal(size=x_shape)
    res = mvm(a, x, config, compare=True)
    expected = a @ x
    assert tuple(res.y.shape) == expected.shape
    np.testing.assert_array_equal(res.y.numpy(), expected)  # zeros when n == 0
    assert res.y.dtype == torch.float64
    assert res.stats["matrix_products"] == 0 and res.stats["crossbars"] == 0
    assert res.stats["rel_l2"] == 0.0 and res.stats["rel_linf"] == 0.0


def test_mvm_of_an_empty_product_still_checks_its_inputs():
    with pytest.raises(ValueError, match="mvm: A contains NaN"):
        mvm(np.full((3, 2), np.nan), np.ones((2, 0)))
    with pytest.raises(ValueError, match=r"x must have shape \(0,\)"):
        mvm(np.ones((3, 0)), np.ones(2))


def test_mvm_takes_a_mapping_of_config_fields():
    rng = np.random.default_rng(4)
    a, x = rng.normal(size=(12, 9)), rng.normal(size=9)
    fields = {"material": "taox_hfox", "tile_rows": 4, "tile_cols": 8, "seed": 5}
    from_mapping = mvm(a, x, fields)
    from_config = mvm(a, x, RRAMConfig(**fields))
    torch.testing.assert_close(from_mapping.y, from_config.y, rtol=0, atol=0)
    exact = mvm(a, x, {"material": "ideal", "dac_bits": None, "adc_bits": None})
    np.testing.assert_allclose(exact.y.numpy(), a @ x, rtol=1e-12, atol=1e-12)


def test_mvm_config_errors_name_the_field_or_the_argument():
    a, x = np.eye(3), np.ones(3)
    with pytest.raises(ValueError, match=r"unknown RRAMConfig field\(s\) \['materal'\]") as info:
        mvm(a, x, {"materal": "ideal"})
    assert "known fields: material, tile_rows," in str(info.value)
    with pytest.raises(ValueError, match=r"RRAMConfig\.dac_bits must be 1\.\.16"):
        mvm(a, x, {"dac_bits": 0})
    for bad in ("ideal", 3, ["material"]):
        with pytest.raises(TypeError, match=r"mvm: config must be an RRAMConfig, a mapping"):
            mvm(a, x, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32", np.float32])
def test_mvm_rejects_a_non_floating_dtype_naming_it(dtype):
    with pytest.raises(TypeError, match=r"mvm: dtype must be a floating torch\.dtype"):
        mvm(np.eye(2), np.ones(2), EXACT, dtype=dtype)  # type: ignore[arg-type]


def test_mvm_calibrates_on_one_element_and_constant_vectors():
    ideal8 = RRAMConfig(material="ideal", tile_rows=16, tile_cols=16)  # 8-bit DAC, calibrated ADC
    # one element: x's std is NaN (before: "RRAMLinear: input contains NaN or Inf")
    res = mvm(np.array([[2.0]]), np.array([3.0]), ideal8, compare=True)
    assert res.y.tolist() == [6.0]
    # a constant vector: std 0, calibration vectors scaled by 1e-300, which is 0 in float32
    # (before: every ADC range froze at its fallback and the float32 product read ~0)
    a = np.random.default_rng(5).normal(size=(24, 40))
    x = np.full(40, 3.0)
    for dtype in (torch.float64, torch.float32):
        res = mvm(a, x, ideal8, compare=True, dtype=dtype)
        assert res.stats["rel_l2"] < 0.3, (dtype, res.stats["rel_l2"])  # float64: 0.13


def test_mvm_reports_zero_error_for_a_zero_product_in_float32():
    res = mvm(np.ones((3, 4)), np.zeros(4), EXACT, compare=True, dtype=torch.float32)
    assert res.y.tolist() == [0.0, 0.0, 0.0]
    assert res.stats["rel_l2"] == 0.0 and res.stats["rel_linf"] == 0.0  # before: NaN


# ----- denoise's lambda -----------------------------------------------------------------
def _np_difference_matrix(n: int) -> np.ndarray:
    eye = np.eye(n)
    return eye[1:] - eye[:-1]


def _dense_denoise(p: np.ndarray, lam: float) -> np.ndarray:
    """(I + lam L^T L)^-1 p along the last axis, in float64 (NumPy)."""
    n = p.shape[-1]
    lmat = _np_difference_matrix(n)
    return np.linalg.solve(np.eye(n) + lam * lmat.T @ lmat, p.reshape(-1, n).T).T.reshape(p.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lam", [1e39, 1e300, sys.float_info.max])
def test_denoise_with_a_huge_lambda_gives_the_mean_the_limit_of_the_solve(dtype, lam):
    p = torch.randn(3, 17, generator=torch.Generator().manual_seed(8)).to(dtype)
    y = denoise(p, lam)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())  # before: ValueError or NaN
    # lam -> inf: (I + lam L^T L)^-1 -> the projection onto the null space of L (constants)
    mean = p.double().mean(-1, keepdim=True).expand(p.shape)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), mean, rtol=0, atol=4 * eps * float(p.abs().max()))
    # the solve's limit is approached: at lam = 1e8 the dense float64 solve is within 1e-6
    dense = _dense_denoise(p.double().numpy(), 1e8)
    np.testing.assert_allclose(dense, mean.numpy(), atol=1e-6)


def test_denoise_with_a_huge_lambda_tensor_matches_per_row():
    p = torch.randn(2, 9, generator=torch.Generator().manual_seed(9))
    lam = torch.tensor([1e300, 2.0], dtype=torch.float64)
    y = denoise(p, lam)
    torch.testing.assert_close(y[0], p[0].mean().expand(9), rtol=0, atol=1e-6)
    np.testing.assert_allclose(y[1].numpy(), _dense_denoise(p[1].double().numpy(), 2.0), atol=1e-5)


def test_denoise_lambda_accuracy_in_float32_matches_the_float64_solve():
    # the response computed in float64: float32's 2 - 2 cos(pi k / n) loses eig_1 for large n
    n = 4096
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    p = torch.sin(2 * torch.pi * 3 * t) + 0.3 * torch.cos(2 * torch.pi * 40 * t)
    lam = 1e5
    got = denoise(p.float(), lam).double()
    ref = denoise(p, lam)  # the float64 FFT solve, checked against the dense one elsewhere
    assert float((got - ref).abs().max()) < 1e-5


@pytest.mark.parametrize(("dtype", "peak"), [(torch.float32, 3e38), (torch.float64, 1.7e308)])
def test_denoise_of_a_signal_near_the_largest_float_is_finite_and_exact(dtype, peak):
    # before: NaN (the FFT's sums over the mirror extension overflowed)
    gen = torch.Generator().manual_seed(12)
    p = (torch.rand(3, 16, generator=gen, dtype=torch.float64) * 2 - 1) * peak
    p[2] /= 2.0**60  # an ordinary row next to the huge ones
    p = p.to(dtype)
    y = denoise(p, 0.7)
    assert bool(torch.isfinite(y).all())
    # NumPy's dense solve of the row scaled by 2^-k, scaled back (exact in floating point)
    rows = p.double().numpy()
    k = np.frexp(np.abs(rows).max(-1, keepdims=True))[1]
    expected = np.ldexp(_dense_denoise(np.ldexp(rows, -k), 0.7), k)
    err = np.abs(y.double().numpy() - expected).max(-1) / np.abs(expected).max(-1)
    assert (err < 50 * torch.finfo(dtype).eps).all(), err


@pytest.mark.parametrize(
    "bad", ["0.5", None, True, np.bool_(False), 1 + 2j, torch.tensor([True]), ["a"], object()]
)
def test_denoise_rejects_a_lambda_that_is_not_a_real_number_naming_it(bad):
    p = torch.randn(2, 8)
    with pytest.raises(TypeError, match="denoise: lam must be a real number >= 0"):
        denoise(p, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", [float("nan"), -1.0, float("inf"), 10**400, torch.tensor([1.0, -2.0])]
)
def test_denoise_rejects_nan_negative_or_infinite_lambda(bad):
    with pytest.raises(ValueError, match="denoise: lam must be finite"):
        denoise(torch.randn(2, 8), bad)


@pytest.mark.parametrize(
    "lam", [3, np.float32(0.5), np.array([1.0, 2.0]), [1.0, 2.0], torch.tensor(2)]
)
def test_denoise_takes_any_real_lambda_as_the_dense_solve(lam):
    p = torch.randn(2, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    lams = np.broadcast_to(np.asarray(lam, dtype=np.float64), (2,))
    expected = np.stack([_dense_denoise(p[i].numpy(), float(lams[i])) for i in range(2)])
    np.testing.assert_allclose(denoise(p, lam).numpy(), expected, atol=1e-10)
