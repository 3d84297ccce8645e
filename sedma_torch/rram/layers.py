"""`RRAMLinear`, `RRAMConv2d` and `RRAMConv1d`: drop-in layers whose forward pass runs on
simulated crossbars.

* The digital weight stays in ``.weight`` (a normal ``nn.Parameter``): it is what the
  optimiser updates and what ``to_digital`` gives back.
* The forward pass reads the *programmed* crossbar (see :mod:`sedma_torch.rram.crossbar`);
  gradients flow to the digital weight as if the layer were digital (straight-through,
  hardware-aware training).
* **Never stale.** A layer keeps the content fingerprint
  (:mod:`sedma_torch.rram.fingerprint`) of the weight it programmed and compares it with
  its weight's at every forward pass: after any change by any means (any optimiser,
  plain, ``foreach`` or ``fused``; ``load_state_dict``; ``weight.data`` / ``copy_`` /
  ``no_grad`` edits; parametrizations; ``to_empty``) the next forward pass re-programs
  first. Write-and-verify starts from the current conductances and touches only cells
  whose target moved out of tolerance. The check costs one pass over the weight's bytes
  (BENCHMARKS.md, ``scripts/bench_layers.py``).
* **State dicts** carry the conductances, the fingerprint of the weight they were
  programmed from, the layer seed and the RNG counters (``torch.load(weights_only=True)``
  works). Loading restores the programmed chip bit-exactly when the loaded weight is the
  one its conductances were programmed from, and re-programs (from the loaded
  conductances) when it is not, or when the checkpoint has no conductances (a digital
  checkpoint loaded with ``strict=False``).
* **Compute dtype.** The simulation runs in float32 for float16 / bfloat16 layers (and
  under autocast) and in the weight's dtype otherwise; the output has the input's dtype,
  or autocast's lower-precision dtype inside an autocast region, as the digital layer's.
* Randomness is reproducible: programming noise and chip properties derive from
  ``(config.seed, layer seed, event)``, read noise from ``(seed, call counter)``. Which
  streams are used depends on the backend (compiled C kernels or PyTorch): see
  :class:`~sedma_torch.rram.config.RRAMConfig`.
* ``torch.compile``: the crossbar read is the custom operator ``sedma::crossbar_read``
  (opaque to the compiler, with a meta function and a straight-through backward), so a
  converted model compiles without graph breaks in the layers.

Where the code lives (this module is the public entry point and re-exports all of it, so
``from sedma_torch.rram.layers import ...`` and pickles naming
``sedma_torch.rram.layers.RRAMLinear`` keep working):

* :mod:`.linear`: :class:`RRAMLinear`.
* :mod:`.conv`: :class:`RRAMConv2d` and :class:`RRAMConv1d`.
* :mod:`.state`: ``_CrossbarMixin``, the state every RRAM layer shares: configuration,
  programming and the never-stale check, read state and caches, counters, state-dict
  hooks, pickling, device moves, the compiled-read helpers, ``digital_twin``.
* :mod:`.lambda_control`: ``_LambdaController``, the adaptive-lambda mixin of
  ``_CrossbarMixin``, and the ``LAMBDA_*`` / ``CONVERGED_*`` constants.
* :mod:`.read_op`: the ``sedma::crossbar_read`` operator (and its eager twin), the layer
  registry and the small shared helpers (``compute_dtype``, input checks, ...).
* here: :func:`to_digital`.
"""

from __future__ import annotations

from torch import nn

from .conv import RRAMConv1d as RRAMConv1d
from .conv import RRAMConv2d as RRAMConv2d
from .fingerprint import fingerprint as fingerprint
from .lambda_control import CONVERGED_INTERVAL_FACTOR as CONVERGED_INTERVAL_FACTOR
from .lambda_control import LAMBDA_DRIFT_TOLERANCE as LAMBDA_DRIFT_TOLERANCE
from .lambda_control import LAMBDA_MEMORY_TOLERANCE as LAMBDA_MEMORY_TOLERANCE
from .lambda_control import LAMBDA_STABLE_CALIBRATIONS as LAMBDA_STABLE_CALIBRATIONS
from .lambda_control import LAMBDA_STABLE_TOLERANCE as LAMBDA_STABLE_TOLERANCE
from .lambda_control import _LambdaController as _LambdaController
from .linear import RRAMLinear as RRAMLinear
from .read_op import _LAYERS as _LAYERS
from .read_op import _add_bias as _add_bias
from .read_op import _check_config as _check_config
from .read_op import _check_finite as _check_finite
from .read_op import _check_input as _check_input
from .read_op import _copied_from as _copied_from
from .read_op import _crossbar as _crossbar
from .read_op import _crossbar_read_backward as _crossbar_read_backward
from .read_op import _crossbar_read_fake as _crossbar_read_fake
from .read_op import _crossbar_read_setup as _crossbar_read_setup
from .read_op import _CrossbarFn as _CrossbarFn
from .read_op import _handles as _handles
from .read_op import _keep_fused_fast_paths_off as _keep_fused_fast_paths_off
from .read_op import _layer_of as _layer_of
from .read_op import _output_dtype as _output_dtype
from .read_op import _register_layer as _register_layer
from .read_op import _same_values as _same_values
from .read_op import compute_dtype as compute_dtype
from .read_op import crossbar_read as crossbar_read
from .state import _COUNTER_KEYS as _COUNTER_KEYS
from .state import _MEMORY_ATTRS as _MEMORY_ATTRS
from .state import _NO_CONTEXT as _NO_CONTEXT
from .state import _READ_KEYS as _READ_KEYS
from .state import _STATE_KEYS as _STATE_KEYS
from .state import _construction_counter as _construction_counter
from .state import _CrossbarMixin as _CrossbarMixin


def to_digital(model: nn.Module) -> nn.Module:
    """Replace every RRAM layer by its digital twin (same weight and bias Parameters), in
    place; returns the model (or the twin when ``model`` itself is an RRAM layer)."""
    from .attention import RRAMMultiheadAttention
    from .convert import _swap_modules

    if not isinstance(model, nn.Module):
        raise TypeError(f"to_digital expects an nn.Module, got {type(model).__name__}")
    kinds = (_CrossbarMixin, RRAMMultiheadAttention)
    if isinstance(model, kinds):
        return model.digital_twin()
    _swap_modules(model, lambda m, fqn: m.digital_twin() if isinstance(m, kinds) else None)
    return model


__all__ = ["RRAMConv1d", "RRAMConv2d", "RRAMLinear", "compute_dtype", "to_digital"]
