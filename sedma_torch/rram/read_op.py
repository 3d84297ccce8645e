"""The crossbar read as an operator, and the small helpers every RRAM layer shares.

* ``sedma::crossbar_read``: the custom operator ``torch.compile`` sees of an RRAM layer
  (opaque to the compiler, with a meta function and a straight-through backward),
  registered once, when this module is imported; :class:`_CrossbarFn` is its eager twin
  and :func:`_crossbar` picks one of them (or a plain read when nothing needs a gradient).
* The layer registry (``_LAYERS``): the operator names a layer by an integer handle.
* Input, config and dtype helpers (``compute_dtype``, ``_output_dtype``, ...), and
  ``_copied_from``, the end of every ``from_*`` constructor; :class:`RRAMValueError`,
  the layers' error for bad argument values and input shapes.

Part of the split of :mod:`sedma_torch.rram.layers` (which re-exports all of it).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import nn

from .config import RRAMConfig


class RRAMValueError(ValueError, RuntimeError):
    """A layer argument or input shape an RRAM layer rejects (a zero stride, an input
    smaller than the kernel, the wrong number of features, ...).

    It is a ``ValueError`` (this project's class for bad values) and a ``RuntimeError``,
    the class ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv1d`` raise for the same mistakes
    (mostly at their first call), so code written for either layer catches it."""


def _add_bias(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y + bias``, in place when ``y`` (a fresh hardware output) is not a view: autograd
    forbids in-place changes to views made inside a custom Function (the denoised path)."""
    return y.add_(bias) if y._base is None else y + bias


def _check_config(config: Any) -> RRAMConfig:
    if config is None:
        return RRAMConfig()
    if not isinstance(config, RRAMConfig):
        raise TypeError(f"config must be an RRAMConfig, got {type(config).__name__}")
    return config


def _check_input(name: str, x: torch.Tensor, dim_ok, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: input must have a floating dtype, got {x.dtype}")
    if not dim_ok(x):
        raise RRAMValueError(f"{name}: input shape {tuple(x.shape)} is not {what}")


def _check_finite(name: str, x: torch.Tensor) -> None:
    # one read-only reduction; the exact elementwise test only when the sum is not finite
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name}: input contains NaN or Inf (disable with RRAMConfig(check_finite=False))"
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a layer with ``dtype`` weights simulates in: float32 for float16 and
    bfloat16 (their range and precision cannot hold a crossbar read), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the digital layer returns for input ``x``: autocast's lower-precision
    dtype inside an autocast region (for float32 / float16 / bfloat16 inputs), else the
    input's."""
    dev = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _same_values(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether ``new`` holds ``old``'s values (after a device / dtype move)."""
    if old.shape != new.shape:
        return False
    return bool(torch.equal(old.to(device=new.device, dtype=new.dtype), new))


# ----- the crossbar read as an operator ----------------------------------------------------
_LAYERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_handles = itertools.count(1)


def _register_layer(layer: Any) -> int:
    handle = next(_handles)
    _LAYERS[handle] = layer
    return handle


def _layer_of(handle: int) -> Any:
    layer = _LAYERS.get(handle)
    if layer is None:
        raise RuntimeError(f"sedma::crossbar_read: RRAM layer #{handle} no longer exists")
    return layer


@torch.library.custom_op("sedma::crossbar_read", mutates_args=())
def crossbar_read(x: torch.Tensor, weight: torch.Tensor, handle: int) -> torch.Tensor:
    """One forward read of RRAM layer ``handle`` (re-programming it first when ``weight``
    changed): what ``torch.compile`` sees of an RRAM layer. The layer's counters and
    conductances are its own state, outside the graph. Returns a contiguous tensor."""
    return _layer_of(handle)._read(x, weight).contiguous()


@crossbar_read.register_fake
def _crossbar_read_fake(x: torch.Tensor, weight: torch.Tensor, handle: int) -> torch.Tensor:
    return _layer_of(handle)._read_fake(x)


def _crossbar_read_setup(ctx, inputs, output) -> None:
    x, weight, handle = inputs
    ctx.save_for_backward(x, weight)
    ctx.handle = handle


def _crossbar_read_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    gx, gw = _layer_of(ctx.handle)._read_backward(grad, x, weight, needs)
    return gx, gw, None


crossbar_read.register_autograd(_crossbar_read_backward, setup_context=_crossbar_read_setup)


class _CrossbarFn(torch.autograd.Function):
    """Eager twin of ``sedma::crossbar_read`` (no operator dispatch overhead): hardware
    forward, straight-through backward with the digital weight."""

    @staticmethod
    def forward(ctx, x, weight, layer):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return layer._read(x.detach(), weight.detach())

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx, gw = ctx.layer._read_backward(grad, x, weight, ctx.needs_input_grad[:2])
        return gx, gw, None


def _crossbar(layer: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return crossbar_read(x, weight, layer._handle)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _CrossbarFn.apply(x, weight, layer)
    return layer._read(x.detach(), weight.detach())  # nothing to differentiate


def _keep_fused_fast_paths_off(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook every RRAM layer carries. It does nothing, but its presence is
    one of the conditions under which ``nn.TransformerEncoderLayer`` (eval, no grad) leaves
    its fused fast path, which would read ``linear1.weight`` etc. digitally and bypass the
    crossbars."""


def _copied_from(new: Any, digital: nn.Module, program: bool) -> Any:
    """``new`` with ``digital``'s weight and bias values (and its weight's requires_grad),
    programmed now when ``program``: the end of every ``from_*`` constructor."""
    with torch.no_grad():
        new.weight.copy_(digital.weight)
        if digital.bias is not None:
            new.bias.copy_(digital.bias)
    new.weight.requires_grad_(digital.weight.requires_grad)
    if program:
        new.program_()
    return new
