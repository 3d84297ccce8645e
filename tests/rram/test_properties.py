"""Property-based tests (Hypothesis): in exact mode the RRAM layers are the PyTorch layers.

Each example draws layer arguments (shapes, kernel sizes, strides, dilations, paddings
as numbers, tuples, ``"same"``/``"valid"``, padding modes, groups, bias, dtype, tile
sizes), sometimes a wrong one, and an input (empty batch, unbatched, one element, tiny
and huge magnitudes, NaN/Inf), builds ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv1d`` and
its RRAM twin (``from_linear`` / ``from_conv`` / ``from_conv1d``, or the constructor when
PyTorch's rejects the arguments) on ``RRAMConfig(material="ideal", dac_bits=None,
adc_bits=None)``, and applies the rule:

1. PyTorch raises (constructor or first call) an exception whose class is, of TypeError,
   ValueError and RuntimeError, E (the first that matches: NotImplementedError counts as
   RuntimeError) -> building or calling the RRAM layer raises an instance of E. It may
   raise earlier: bad arguments are rejected by the RRAM constructor, where
   ``nn.Conv2d(stride=0)`` fails only at its first call. Value and shape errors of the
   RRAM layers are ``RRAMValueError``, a ValueError and a RuntimeError, so they are of
   PyTorch's class for every value or shape mistake. Never a ZeroDivisionError,
   IndexError, AttributeError, ...
2. PyTorch succeeds on a finite input -> the RRAM layer succeeds with the same shape and
   dtype, and elementwise ``|y - y_nn| <= (fan_in + 4) eps (|W| |x| + |b|) + (fan_in + 4)
   tiny`` (``|W| |x|`` the layer applied to absolute values in float64; eps and tiny
   (the smallest normal number) of the dtype): the rounding of both computations, plus
   subnormal-level differences (oneDNN may flush denormals).
3. Input with NaN or Inf, PyTorch succeeding: with the default ``check_finite=True`` a
   ValueError saying "NaN or Inf"; with ``check_finite=False`` the output is finite
   exactly where PyTorch's is, and the finite outputs obey rule 2.

Not drawn, on purpose: arguments PyTorch takes and the RRAM layers reject by design
(zero channels or features, bool sizes: ``test_api_inputs.py``; a kernel with more taps
than ``tile_rows``; a negative padding with a padding mode other than zeros, which
``nn.Conv1d``/``nn.Conv2d`` apply as ``F.pad`` with a negative width, cropping the input,
where in zeros mode they raise "negative padding is not supported" -- the RRAM layers
reject negative paddings in every mode), inputs of another dtype than the layer's (the
RRAM layers convert, ``nn`` raises), and magnitudes at which ``|W| |x|`` overflows the
dtype.

The last property draws ``RRAMConfig`` fields with arbitrary values: either a config
whose fields have their documented types and which round-trips through ``to_dict``, or
a TypeError/ValueError naming a drawn field. The four switches ``programming_noise``,
``device_variation``, ``read_noise`` and ``check_finite`` are not type-checked by
``RRAMConfig`` (anything truthy is on), so the type check skips them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from functools import partial

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from sedma_torch.rram import RRAMConfig, RRAMConv1d, RRAMConv2d, RRAMLinear
from sedma_torch.rram.config import ADC_RANGINGS, CORRECTIONS, DENOISERS
from sedma_torch.rram.materials import READ_NOISE_MODELS, list_materials

SETTINGS = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run (reproducible CI)
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# input and weight magnitudes per dtype: subnormal to huge, as far as |W| |x| stays finite
X_SCALES = {
    torch.float32: [1e-40, 1e-30, 1e-3, 1.0, 1e3, 1e30],
    torch.float64: [1e-310, 1e-300, 1e-3, 1.0, 1e3, 1e300],
    torch.bfloat16: [1e-30, 1e-3, 1.0, 1e3, 1e30],
    torch.float16: [1e-3, 1.0, 30.0],
}
W_SCALES = {
    torch.float32: [1e-3, 1.0, 1e3],
    torch.float64: [1e-3, 1.0, 1e3],
    torch.bfloat16: [1e-3, 1.0, 1e3],
    torch.float16: [1e-2, 1.0, 3.0],
}
SPECIALS = [None] * 5 + ["nan", "inf", "-inf"]
BASE_CLASSES = (TypeError, ValueError, RuntimeError)


def _outcome(fn):
    """(result, None) or (None, the exception ``fn()`` raised)."""
    try:
        return fn(), None
    except Exception as exc:  # every exception is compared by the rule
        return None, exc


def _base_class(exc: BaseException) -> type:
    for cls in BASE_CLASSES:
        if isinstance(exc, cls):
            return cls
    raise AssertionError(f"PyTorch raised {type(exc).__name__}: {exc}")


def _assert_same_failure(rram_exc, nn_exc) -> None:
    """Rule 1."""
    cls = _base_class(nn_exc)
    assert rram_exc is not None, f"PyTorch raised {nn_exc!r}, the RRAM layer did not"
    assert isinstance(rram_exc, cls), (
        f"PyTorch raised {type(nn_exc).__name__}({nn_exc}); the RRAM layer "
        f"{type(rram_exc).__name__}({rram_exc})"
    )


@st.composite
def values(draw, shape: tuple, dtype: torch.dtype, scales: list, special: bool):
    """A tensor of ``shape``: a seeded pattern at a drawn magnitude, maybe with NaN/Inf."""
    seed = draw(st.integers(0, 2**16))
    pattern = draw(st.sampled_from(["randn", "randn", "uniform", "zeros", "ones", "spike"]))
    scale = draw(st.sampled_from(scales))
    gen = torch.Generator().manual_seed(seed)
    if pattern == "randn":
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif pattern == "uniform":
        t = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    elif pattern == "zeros":
        t = torch.zeros(shape, dtype=torch.float64)
    elif pattern == "ones":
        t = torch.ones(shape, dtype=torch.float64)
    else:  # one large element among small ones
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-3
        if t.numel():
            t.view(-1)[seed % t.numel()] = 1.0
    t = (t * scale).to(dtype)
    kind = draw(st.sampled_from(SPECIALS)) if special else None
    if kind is not None and t.numel():
        where = draw(st.integers(0, t.numel() - 1))
        t.view(-1)[where] = float(kind)
    return t


def _bound(digital: nn.Module, x: torch.Tensor, fan_in: int, dtype: torch.dtype):
    """Rule 2's elementwise error bound (float64)."""
    absolute = copy.deepcopy(digital).double()
    with torch.no_grad():
        absolute.weight.abs_()
        if absolute.bias is not None:
            absolute.bias.abs_()
        xa = x.double().abs().nan_to_num(0.0, 0.0, 0.0)
        magnitude = absolute(xa)
    info = torch.finfo(dtype)
    return (fan_in + 4) * (info.eps * magnitude + info.tiny)


def _check(build_nn, build_rram, convert, x, fan_in, dtype, check_finite) -> None:
    """Rules 1-3 for one layer and input."""
    digital, nn_exc = _outcome(build_nn)
    if nn_exc is not None:  # PyTorch's constructor rejects the arguments
        _, exc = _outcome(build_rram)
        _assert_same_failure(exc, nn_exc)
        return
    with torch.no_grad():
        ref, nn_exc = _outcome(lambda: digital(x))
        layer, exc = _outcome(lambda: convert(digital))
        y = None
        if exc is None:
            y, exc = _outcome(lambda: layer(x))
    if nn_exc is not None:
        _assert_same_failure(exc, nn_exc)
        return
    finite_input = bool(torch.isfinite(x).all())
    if not finite_input and check_finite:  # rule 3, default
        assert isinstance(exc, ValueError) and "NaN or Inf" in str(exc), exc
        return
    assert exc is None, f"PyTorch succeeded, the RRAM layer raised {type(exc).__name__}: {exc}"
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, ref.shape, y.dtype)
    bound = _bound(digital, x, fan_in, dtype)
    assume(bool((bound < torch.finfo(dtype).max / 16).all()))  # |W| |x| representable
    ok = torch.isfinite(ref)
    if finite_input:
        assert bool(ok.all()), "a finite input overflowed the digital layer"
    assert torch.equal(torch.isfinite(y), ok), "non-finite outputs differ from PyTorch's"
    err = (y.double() - ref.double()).abs()
    bad = ok & (err > bound)
    assert not bool(bad.any()), (
        f"max error {float(err[ok].max())} over bound {float(bound[ok].min())} at "
        f"{bad.nonzero()[:3].tolist()}"
    )


def _config(draw, kernel_taps: int = 1, check_finite: bool = True) -> RRAMConfig:
    taps = max(1, kernel_taps)
    rows = draw(st.sampled_from([taps, taps + 1, 2 * taps + 3, 256]))
    cols = draw(st.sampled_from([1, 2, 3, 256]))
    return RRAMConfig(
        material="ideal",
        dac_bits=None,
        adc_bits=None,
        tile_rows=rows,
        tile_cols=cols,
        check_finite=check_finite,
    )


def _scaled_params(draw, module: nn.Module, dtype: torch.dtype) -> None:
    """Weights and bias at a drawn magnitude (maybe zero), in ``dtype``."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(draw(values(tuple(p.shape), dtype, W_SCALES[dtype], special=False)))


# ----- nn.Linear ------------------------------------------------------------------------
@settings(SETTINGS, max_examples=120)
@given(st.data())
def test_linear_in_exact_mode_is_nn_linear(data):
    draw = data.draw
    dtype = draw(st.sampled_from(DTYPES))
    in_f, out_f = draw(st.integers(1, 12)), draw(st.integers(1, 9))
    bias = draw(st.booleans())
    check_finite = draw(st.booleans())
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    x_features = in_f + draw(st.sampled_from([0] * 8 + [1, -1]))  # sometimes the wrong size
    shape = () if draw(st.integers(0, 30)) == 0 else (*lead, max(0, x_features))
    x = draw(values(shape, dtype, X_SCALES[dtype], special=True))
    cfg = _config(draw, check_finite=check_finite)

    def build_nn():
        lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
        _scaled_params(draw, lin, dtype)
        return lin

    _check(
        build_nn,
        lambda: RRAMLinear(in_f, out_f, bias=bias, dtype=dtype, config=cfg),
        lambda lin: RRAMLinear.from_linear(lin, cfg),
        x,
        in_f,
        dtype,
        check_finite,
    )


# ----- nn.Conv2d / nn.Conv1d ------------------------------------------------------------
# argument changes PyTorch rejects (at construction or its first call)
BAD_2D = [
    dict(stride=0),
    dict(stride=(1, -1)),
    dict(kernel_size=0),
    dict(kernel_size=-1),
    dict(kernel_size=(2, 2, 2)),
    dict(dilation=0),
    dict(padding=-1, padding_mode="zeros"),  # other modes: see the module docstring
    dict(padding=(1, 2, 3)),
    dict(padding="full"),
    dict(padding="same", stride=2),
    dict(stride=1.5),
    dict(groups=0),
    dict(in_channels=+1),  # no longer divisible by groups (when groups > 1)
    dict(padding_mode="mirror"),
]
BAD_1D = [
    dict(stride=0),
    dict(kernel_size=0),
    dict(kernel_size=-2),
    dict(kernel_size=(2, 2)),
    dict(dilation=-1),
    dict(padding=-1, padding_mode="zeros"),
    dict(padding="full"),
    dict(padding="same", stride=3),
    dict(stride=2.0),
    dict(groups=0),
    dict(in_channels=+1),
]


@st.composite
def conv_case(draw, dims: int, bad_argument: dict | None = None):
    """Arguments, input and config of one ``dims``-D convolution example; with
    ``bad_argument`` (an entry of ``BAD_2D``/``BAD_1D``) those arguments changed."""
    dtype = draw(st.sampled_from(DTYPES))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = draw(
        st.one_of(
            st.sampled_from(["valid", "same"]),
            st.integers(0, 2),
            st.tuples(*[st.integers(0, 2)] * dims),
        )
    )
    if padding == "same":
        stride = (1,) * dims
    args = dict(
        in_channels=cin,
        out_channels=cout,
        kernel_size=kernel if draw(st.booleans()) or dims == 1 else kernel[0],
        stride=stride if dims == 2 else stride[0],
        padding=padding,
        dilation=dilation if dims == 2 else dilation[0],
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])),
    )
    if dims == 1:
        args["kernel_size"] = kernel[0] if draw(st.booleans()) else kernel
    if bad_argument is not None:
        change = dict(bad_argument)
        if "in_channels" in change:
            change["in_channels"] = cin + 1
        if "stride" in change and "padding" not in change and args["padding"] == "same":
            change["padding"] = "valid"  # one mistake at a time ('same' needs stride 1)
        args.update(change)
    # the input: channels (sometimes wrong), spatial size (sometimes below the kernel)
    channels = cin + draw(st.sampled_from([0] * 10 + [1]))
    spatial = tuple(draw(st.integers(1, 7)) for _ in range(dims))
    # None: unbatched. An empty batch skips PyTorch's argument checks (nn.Conv2d with
    # dilation=0 returns an empty output; nn.Conv1d with kernel_size=0 an IndexError), so
    # bad arguments get a non-empty input
    batch = draw(st.sampled_from([None, 1, 2, 3] if bad_argument else [None, 0, 1, 2, 3]))
    shape = ((channels,) if batch is None else (batch, channels)) + spatial
    if draw(st.integers(0, 30)) == 0:
        shape = (1, *shape)  # one dimension too many
    check_finite = draw(st.booleans())
    x = draw(values(shape, dtype, X_SCALES[dtype], special=True))
    kernel = _kernel_of(args["kernel_size"], dims)
    cfg = _config(draw, kernel_taps=math.prod(kernel), check_finite=check_finite)
    return args, x, dtype, cfg, check_finite, kernel


def _kernel_of(kernel_size, dims: int) -> tuple:
    """The kernel as a ``dims``-tuple of ints >= 1 (1s for a bad ``kernel_size``)."""
    k = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * dims
    if len(k) != dims or not all(isinstance(v, int) and v >= 1 for v in k):
        return (1,) * dims
    return k


def _conv_property(data, dims: int, bad_argument: dict | None = None) -> None:
    args, x, dtype, cfg, check_finite, kernel = data.draw(conv_case(dims, bad_argument))
    digital_cls = nn.Conv2d if dims == 2 else nn.Conv1d
    rram_cls = RRAMConv2d if dims == 2 else RRAMConv1d

    def build_nn():
        conv = digital_cls(**args, dtype=dtype)
        _scaled_params(data.draw, conv, dtype)
        return conv

    def convert(conv):
        if dims == 2:
            return RRAMConv2d.from_conv(conv, cfg)
        return RRAMConv1d.from_conv1d(conv, cfg)

    cin = args["in_channels"]
    groups = args["groups"] if isinstance(args["groups"], int) and args["groups"] > 0 else 1
    _check(
        build_nn,
        lambda: rram_cls(**args, dtype=dtype, config=cfg),
        convert,
        x,
        max(1, cin // groups) * math.prod(kernel),
        dtype,
        check_finite,
    )


@settings(SETTINGS, max_examples=300)
@given(st.data())
def test_conv2d_in_exact_mode_is_nn_conv2d(data):
    _conv_property(data, 2)


@settings(SETTINGS, max_examples=150)
@given(st.data())
def test_conv1d_in_exact_mode_is_nn_conv1d(data):
    _conv_property(data, 1)


@pytest.mark.parametrize("change", BAD_2D, ids=str)
@settings(SETTINGS, max_examples=12)
@given(data=st.data())
def test_conv2d_bad_arguments_fail_as_nn_conv2d(change, data):
    _conv_property(data, 2, bad_argument=change)


@pytest.mark.parametrize("change", BAD_1D, ids=str)
@settings(SETTINGS, max_examples=12)
@given(data=st.data())
def test_conv1d_bad_arguments_fail_as_nn_conv1d(change, data):
    _conv_property(data, 1, bad_argument=change)


# ----- RRAMConfig -----------------------------------------------------------------------
FIELDS = {f.name: f for f in dataclasses.fields(RRAMConfig)}
SWITCHES = {"programming_noise", "device_variation", "read_noise", "check_finite"}
INT_FIELDS = {"tile_rows", "tile_cols", "write_verify_iters", "calibration_interval"}
INT_FIELDS |= {"calibration_rows", "seed"}
OPTIONAL_INTS = {"dac_bits", "adc_bits"}
OPTIONAL_FLOATS = {"dac_range", "adc_range"}
CHOICES = {
    "adc_ranging": ADC_RANGINGS,
    "correction": CORRECTIONS,
    "denoise": DENOISERS,
    "read_noise_model": (None, *READ_NOISE_MODELS),
}
FLOAT_FIELDS = set(FIELDS) - SWITCHES - INT_FIELDS - OPTIONAL_INTS - OPTIONAL_FLOATS
FLOAT_FIELDS -= set(CHOICES) | {"material"}
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 20),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
    st.floats(0, 1, allow_subnormal=False),
    st.text(max_size=8),
    st.sampled_from(["ideal", "none", "fixed", "first_order", "per_read", "shot", "cmo_1f"]),
    st.lists(st.integers(0, 3), max_size=2),
)


def _documented_type(name: str, value) -> bool:
    """Whether an accepted ``value`` of field ``name`` has the type its docstring says."""
    real = isinstance(value, int | float) and not isinstance(value, bool)
    if name == "material":
        return isinstance(value, str) and value in list_materials()
    if name in INT_FIELDS:
        return isinstance(value, int) and not isinstance(value, bool)
    if name in OPTIONAL_INTS:
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    if name in OPTIONAL_FLOATS:
        return value is None or (real and math.isfinite(value) and value > 0)
    if name in CHOICES:
        return value in CHOICES[name]
    if name in FLOAT_FIELDS:
        return real and math.isfinite(value)
    return True  # a switch: not checked by RRAMConfig (see the module docstring)


@settings(SETTINGS, max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(sorted(FIELDS)),
        st.one_of(ANY_VALUE, st.integers(1, 64), st.floats(0.001, 0.5, allow_subnormal=False)),
        min_size=1,
        max_size=3,
    )
)
def test_config_fields_are_valid_or_rejected_naming_the_field(fields):
    cfg, exc = _outcome(lambda: RRAMConfig(**fields))
    if exc is not None:
        assert isinstance(exc, TypeError | ValueError), f"{type(exc).__name__}: {exc}"
        assert any(name in str(exc) for name in fields), (fields, str(exc))
        return
    for name, value in fields.items():
        assert _documented_type(name, value), (name, value)
        assert getattr(cfg, name) == value or (name == "material" and cfg.device.name == value)
    assert RRAMConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_property_draws_reach_every_outcome(dims):
    """The conv strategy is not vacuous: with good arguments its examples include clean
    comparisons, PyTorch failures at the first call (bad inputs), non-finite inputs and
    empty batches; the bad arguments (each one tested above) make PyTorch fail at
    construction or at the first call."""
    seen = set()
    digital_cls = nn.Conv2d if dims == 2 else nn.Conv1d

    @settings(SETTINGS, max_examples=150)
    @given(conv_case(dims))
    def collect(case):
        args, x, dtype, _cfg, _check_finite, _kernel = case
        conv = digital_cls(**args, dtype=dtype)  # good arguments: PyTorch builds it
        with torch.no_grad():
            _, exc = _outcome(lambda: conv(x))
        seen.add("call" if exc is not None else "ok")
        if not bool(torch.isfinite(x).all()):
            seen.add("non-finite")
        if x.ndim == dims + 2 and x.shape[0] == 0:
            seen.add("empty batch")

    collect()
    assert seen == {"call", "ok", "non-finite", "empty batch"}, seen
    failures = set()
    x = torch.randn(1, 4, *([8] * dims))
    for change in BAD_2D if dims == 2 else BAD_1D:
        args = dict(in_channels=4, out_channels=4, kernel_size=3, groups=2)
        args.update({k: (5 if k == "in_channels" else v) for k, v in change.items()})
        try:
            conv = digital_cls(**args)
        except Exception:
            failures.add("constructor")
            continue
        _, exc = _outcome(partial(conv, x))
        failures.add("call" if exc is not None else "none")
    assert failures == {"constructor", "call"}, failures
