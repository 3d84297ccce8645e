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
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native_depthwise, native_rng
from .config import RRAMConfig
from .correction import denoise, lambda_errors
from .crossbar import (
    CrossbarStats,
    NoiseSource,
    ReadBlocks,
    absmax,
    adc_dequantise_,
    chunk_rows,
    dac,
    derive_seed,
    fused_read_enabled,
    fused_read_on,
    noisy_read_,
    positive_or_one,
    program_tiles,
    quant_levels,
    read_blocks,
)
from .fingerprint import fingerprint
from .rng import seed_pair

_construction_counter = itertools.count()
_NO_CONTEXT = contextlib.nullcontext()
_STATE_KEYS = ("g_pos", "g_neg", "col_scale")
_READ_KEYS = ("w_read", "w_exact")
_COUNTER_KEYS = ("rram_seed_", "read_calls", "program_events", "programmed_fp")
_MEMORY_ATTRS = ("long_term_memory", "short_term_memory")

LAMBDA_MEMORY_TOLERANCE = 0.05
"""Adaptive lambda: a remembered lambda whose calibration error is within this fraction of
the best error on the grid is accepted at once (converged in one calibration)."""
LAMBDA_STABLE_CALIBRATIONS = 3
"""... otherwise lambda is converged once each of the last this-many lam_recent values is
within ``LAMBDA_STABLE_TOLERANCE`` of the lowest error on the current windowed curve
(an error criterion, so a flat curve near lam = 0 counts as converged)."""
LAMBDA_STABLE_TOLERANCE = 0.02
CONVERGED_INTERVAL_FACTOR = 10
"""Once converged, calibrate ``CONVERGED_INTERVAL_FACTOR`` times less often; a calibration
whose error at the current lambda exceeds the best by more than ``LAMBDA_DRIFT_TOLERANCE``
re-opens the search."""
LAMBDA_DRIFT_TOLERANCE = 0.2


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
        raise ValueError(f"{name}: input shape {tuple(x.shape)} is not {what}")


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


class _CrossbarMixin:
    """State and programming shared by the RRAM layers."""

    rram_config: RRAMConfig
    weight: nn.Parameter

    def _rram_init(self, config: RRAMConfig | None, seed: int | None) -> None:
        self._rram_config = _check_config(config)
        # the layer seed mixes config.seed with the given seed (or the construction order)
        label = (
            int(seed) if seed is not None else (type(self).__name__, next(_construction_counter))
        )
        self._seed_label = label
        seed_value = derive_seed(self._rram_config.seed, "layer", label)
        self.rram_stats = CrossbarStats()
        self._programmed_fp: int | None = None
        """Fingerprint of the weight the crossbar holds (None: not programmed)."""
        self._read_generation = 0
        """Bumped whenever the read state (w_read, w_exact) is rebuilt: keys derived caches."""
        self._handle = _register_layer(self)
        self._lambda_recent: float | None = None
        self._calls_since_calibration = 0
        self._recent_history: list[int] = []
        self._lambda_looked_up = False
        self._workload: tuple[tuple, str] | None = None
        self.calibration_steps = 0
        """Calibrations run so far (``denoise="adaptive"``)."""
        self.lambda_converged = False
        """Whether the adaptive lambda has converged (see ``LAMBDA_*`` constants)."""
        self.last_lambda: float | None = None
        """lambda used by the most recent denoised forward call."""
        self.last_calibration_error: float | None = None
        """Relative MSE (error power / exact-output power) at the lambda in use, measured
        at the most recent calibration."""
        self.lambda_memory: float | None = None
        """Remembered lambda (from long-term memory, or set by hand); used by
        ``denoise="adaptive"``."""
        self.long_term_memory: Any = None
        """Long-term memory (``best_lambda`` / ``record_lambda``) or None; see
        :meth:`attach_memory`."""
        self.short_term_memory: Any = None
        """Short-term memory holding the calibration error windows, or None (created on the
        first calibration); ``False`` keeps only the latest calibration."""
        for key in _STATE_KEYS:
            self.register_buffer(key, torch.empty(0), persistent=True)  # type: ignore[attr-defined]
        # the layer's seed travels with the state dict, so a loaded model reads the same noise
        self.register_buffer("rram_seed_", torch.tensor(seed_value, dtype=torch.int64))  # type: ignore[attr-defined]
        self.register_buffer("read_calls", torch.zeros((), dtype=torch.int64))  # type: ignore[attr-defined]
        self.register_buffer("program_events", torch.zeros((), dtype=torch.int64))  # type: ignore[attr-defined]
        # fingerprint of the weight the stored conductances were programmed from
        self.register_buffer("programmed_fp", torch.zeros((), dtype=torch.int64))  # type: ignore[attr-defined]
        self.register_buffer("w_read", torch.empty(0), persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("w_exact", torch.empty(0), persistent=False)  # type: ignore[attr-defined]
        self._register_load_state_dict_pre_hook(self._resize_state_hook)  # type: ignore[attr-defined]
        self.register_forward_pre_hook(_keep_fused_fast_paths_off)  # type: ignore[attr-defined]
        self.register_load_state_dict_post_hook(self._after_load_hook)  # type: ignore[attr-defined]

    @property
    def rram_config(self) -> RRAMConfig:
        """The crossbar configuration; assigning one is :meth:`reconfigure_`."""
        return self._rram_config

    @rram_config.setter
    def rram_config(self, config: RRAMConfig) -> None:
        self.reconfigure_(config)

    def reconfigure_(self, config: RRAMConfig) -> _CrossbarMixin:
        """Simulate this layer on another configuration from now on (``convert_`` of an
        already converted model does this). A new configuration is a new chip: the
        conductances are dropped and the next forward pass programs from scratch; the
        layer seed is re-derived when ``config.seed`` changed, and the adaptive lambda
        starts over. The same configuration changes nothing. Returns the layer."""
        config = _check_config(config)
        self._check_config_fits(config)
        if config == self._rram_config:
            return self
        seed_changed = config.seed != self._rram_config.seed
        self._rram_config = config
        with torch.inference_mode(False), torch.no_grad():
            if seed_changed:
                self.rram_seed_.fill_(derive_seed(config.seed, "layer", self._seed_label))  # type: ignore[attr-defined]
            dev = self.weight.device
            dtype = self._compute_dtype()
            for key in (*_STATE_KEYS, *_READ_KEYS):
                setattr(self, key, torch.empty(0, device=dev, dtype=dtype))
        self._programmed_fp = None
        self.__dict__.pop("_packed_cache", None)
        self._w_fold = self._w_conv = self._w_conv_exact = None
        self._lambda_recent = None
        self._calls_since_calibration = 0
        self._recent_history = []
        self._lambda_looked_up = False
        self.calibration_steps = 0
        self.lambda_converged = False
        self.last_lambda = self.last_calibration_error = self.lambda_memory = None
        return self

    def _check_config_fits(self, config: RRAMConfig) -> None:
        """Layer-specific limits of a configuration (subclasses)."""

    @property
    def rram_seed(self) -> int:
        """This layer's seed (derived from ``config.seed`` unless given)."""
        return int(self.rram_seed_)  # type: ignore[attr-defined]

    # ----- programming -----------------------------------------------------------------
    def weight_tiles(
        self, weight: torch.Tensor | None = None
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.weight.dtype)

    def _read_state_ok(self, w: torch.Tensor) -> bool:
        """Whether the read state exists, on ``w``'s device, in its compute dtype."""
        r = self.w_read  # type: ignore[attr-defined]
        return bool(r.numel()) and r.device == w.device and r.dtype == compute_dtype(w.dtype)

    @property
    def is_programmed(self) -> bool:
        """True when the crossbar holds the current digital weights."""
        if self._programmed_fp is None:
            return False
        w = self.weight.detach()
        return self._read_state_ok(w) and fingerprint(w) == self._programmed_fp

    def program_(self, from_scratch: bool = False) -> CrossbarStats:
        """(Re-)program the crossbar from ``self.weight`` now. Returns the layer's stats."""
        w = self.weight.detach()
        return self._program(w, fingerprint(w), from_scratch)

    def _program(self, w: torch.Tensor, fp: int, from_scratch: bool = False) -> CrossbarStats:
        """Program weight ``w`` (fingerprint ``fp``). Runs outside inference mode, so the
        conductances are normal tensors that later training, loading and in-place counter
        updates can use."""
        with torch.inference_mode(False), torch.no_grad():
            cfg = self.rram_config
            if cfg.check_finite and not bool(torch.isfinite(w).all()):
                raise ValueError(
                    f"{type(self).__name__}: weight contains NaN or Inf; cannot program it"
                )
            tiles = self.weight_tiles(w).to(compute_dtype(w.dtype))
            initial = None
            if not from_scratch and self.g_pos.shape == tiles.shape:  # type: ignore[attr-defined]
                initial = torch.stack([self.g_pos, self.g_neg]).to(tiles)  # type: ignore[attr-defined]
            event = int(self.program_events)  # type: ignore[attr-defined]
            prog = program_tiles(tiles, cfg, self.rram_seed, event, initial)
            self.g_pos = prog.g_pos
            self.g_neg = prog.g_neg
            self.col_scale = prog.col_scale
            self.program_events = self.program_events + 1  # type: ignore[attr-defined]
            self._set_read_state(prog.w_read, tiles)
            self.rram_stats.programming_pulses += prog.stats.pulses
            self.rram_stats.programming_events += 1
            self.rram_stats.last_programming = prog.stats
            self._set_fingerprint(fp)
        return self.rram_stats

    def _set_fingerprint(self, fp: int | None) -> None:
        self._programmed_fp = fp
        if fp is not None:
            with torch.inference_mode(False):
                self.programmed_fp = torch.tensor(
                    fp, dtype=torch.int64, device=self.programmed_fp.device
                )  # type: ignore[attr-defined]

    def _set_read_state(self, w_read: torch.Tensor, tiles: torch.Tensor) -> None:
        dtype = tiles.dtype
        self.w_read = w_read.to(dtype)
        if self.rram_config.correction == "first_order":
            self.w_exact = (tiles / self.col_scale.unsqueeze(1)).to(dtype)  # type: ignore[attr-defined]
        else:
            self.w_exact = torch.empty(0, device=tiles.device, dtype=dtype)
        self._refresh_caches()

    def _refresh_caches(self) -> None:
        self._read_generation += 1
        self.__dict__.pop("_packed_cache", None)
        self._rebuild_cache()

    def _rebuild_cache(self) -> None:
        """Derived layouts for the fast paths (subclasses)."""

    def _recompute_read_state(self, w: torch.Tensor) -> None:
        """Rebuild w_read from the stored conductances (after loading a state dict)."""
        from .crossbar import chip_properties, read_back

        with torch.inference_mode(False), torch.no_grad():
            cfg = self.rram_config
            g = torch.stack([self.g_pos, self.g_neg])  # type: ignore[attr-defined]
            _, stuck, nu = chip_properties(
                tuple(g.shape), cfg, cfg.device, self.rram_seed, g.device, g.dtype
            )
            del stuck  # stuck cells are already in the stored conductances
            tiles = self.weight_tiles(w).to(g.dtype)
            self._set_read_state(read_back(g, cfg, cfg.device, nu), tiles)

    def _ensure_programmed(self, weight: torch.Tensor) -> None:
        w = weight.detach()
        fp = fingerprint(w)
        if fp != self._programmed_fp or not self._read_state_ok(w):
            self._program(w, fp)

    def _bump_read_calls(self) -> int:
        counter = self.read_calls  # type: ignore[attr-defined]
        call = int(counter)
        if counter.is_inference():  # made under inference_mode: replace by a normal tensor
            with torch.inference_mode(False):
                self.read_calls = counter + 1  # type: ignore[attr-defined]
        else:  # in place, as BatchNorm's num_batches_tracked (allowed in inference mode)
            with torch.no_grad():
                counter.add_(1)
        return call

    def _next_read_noise(self) -> NoiseSource:
        return NoiseSource(derive_seed(self.rram_seed, "read", self._bump_read_calls()))

    # ----- one read (the body of the sedma::crossbar_read operator) ----------------------
    def _read(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The crossbar's answer to input ``x`` (in the compute dtype): re-program when
        ``weight`` changed, then read. Autocast is off inside (the simulation picks its
        own precision)."""
        self._check_read_args()
        dev = x.device.type
        with torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else _NO_CONTEXT:
            if self.rram_config.check_finite:
                _check_finite(type(self).__name__, x)
            self._ensure_programmed(weight)
            if x.shape[0] == 0:  # an empty batch reads nothing
                return self._read_fake(x)
            return self._hardware_forward(x, weight.detach())

    def _check_read_args(self) -> None:
        """Layer attributes the read relies on (subclasses)."""

    def _read_fake(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_backward(self, grad, x, weight, needs):  # pragma: no cover - abstract
        raise NotImplementedError

    def _hardware_forward(
        self, x: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # ----- state dict / device moves ---------------------------------------------------
    def _resize_state_hook(self, state_dict, prefix, *args, **kwargs) -> None:
        for key in _STATE_KEYS:
            incoming = state_dict.get(prefix + key)
            if incoming is not None and getattr(self, key).shape != incoming.shape:
                with torch.inference_mode(False):
                    setattr(self, key, torch.empty_like(incoming, device=self.weight.device))
        if prefix + "g_pos" in state_dict and prefix + "programmed_fp" not in state_dict:
            # a checkpoint from before fingerprints: its conductances are re-programmed
            state_dict[prefix + "programmed_fp"] = torch.zeros((), dtype=torch.int64)

    @staticmethod
    def _after_load_hook(module, incompatible_keys) -> None:
        module._programmed_fp = None
        w = module.weight.detach()
        if not module.g_pos.numel() or module.g_pos.shape != module.weight_tiles(w).shape:
            return
        fp = fingerprint(w)
        if int(module.programmed_fp) == fp:
            # the conductances belong to this weight: the programmed chip, bit-exactly
            module._recompute_read_state(w)
            module._programmed_fp = fp
        # else: re-programmed (from the loaded conductances) at the next forward pass

    def __getstate__(self):
        state = super().__getstate__()  # type: ignore[misc]
        state = dict(state)
        for name in _MEMORY_ATTRS:  # databases and shared windows are not copied
            state[name] = None
        state.pop("_packed_cache", None)  # a cache of w_read; rebuilt on first use
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._handle = _register_layer(self)  # copies are layers of their own

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # The chip does not change when the digital copy moves: the conductances and read
        # state follow the weight's device, stay in the compute dtype and keep their
        # values -- unless ``fn`` replaced them (``to_empty``), which leaves an
        # unprogrammed layer. The layer stays programmed when the weight kept its values.
        own = {k: getattr(self, k) for k in (*_STATE_KEYS, *_READ_KEYS, *_COUNTER_KEYS)}
        w_old = self.weight.detach()
        was_current = self._programmed_fp is not None and self.is_programmed
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        w = self.weight.detach()
        cdt = compute_dtype(w.dtype)
        chip_kept = all(_same_values(own[k], getattr(self, k)) for k in _STATE_KEYS)
        with torch.inference_mode(False), torch.no_grad():
            for k in _COUNTER_KEYS:  # seed and counters are not the chip's state
                setattr(self, k, own[k].to(w.device))
            for k in (*_STATE_KEYS, *_READ_KEYS):
                old = own[k] if chip_kept else torch.empty(0)
                setattr(self, k, old.to(device=w.device, dtype=cdt))
        # programmed still when the move kept every weight value (float32 -> float64, a
        # device move); a lossy conversion (-> float16) changed the weight: re-program
        if was_current and chip_kept and _same_values(w, w_old):
            self._refresh_caches()
            self._set_fingerprint(fingerprint(w))
        else:
            self._programmed_fp = None
            self.__dict__.pop("_packed_cache", None)
        return out

    # ----- shared read helpers ---------------------------------------------------------
    def attach_memory(self, long_term: Any = None, short_term: Any = None) -> None:
        """Connect the adaptive lambda to the dual memory.

        Args:
            long_term: a :class:`sedma_torch.memory.LongTermMemory` (or anything with
                ``best_lambda(material, workload)`` / ``record_lambda(material, workload,
                lam, error)``): the best lambda for (material, workload type) is read at
                the first calibration as ``lambda_memory``, and every calibration writes
                its lambda and error back. None: no long-term memory.
            short_term: a :class:`sedma_torch.memory.ShortTermMemory` holding the windows
                of calibration errors (shared by layers: keys are per layer); None: a
                private one; ``False``: no window, only the latest calibration counts.

        Copies of the layer (``copy.deepcopy``, pickling) are not attached.
        """
        self.long_term_memory = long_term
        self.short_term_memory = short_term
        self._lambda_looked_up = False

    @property
    def workload_type(self) -> str:
        """The workload class of the current weights (``partition.classify_workload``)."""
        from .partition import classify_workload

        key = self._programmed_fp if self._programmed_fp is not None else fingerprint(self.weight)
        if self._workload is None or self._workload[0] != key:
            w = self.weight.detach()
            if getattr(self, "_transposed_weight", False):
                w = w.t()
            self._workload = (key, classify_workload(w).key)
        return self._workload[1]

    def _lambda(self, p: torch.Tensor, reference) -> float | None:
        """lambda for this call's denoising (None: no denoising).

        ``adaptive`` (SPEC.md Eq. 5-6): every ``calibration_interval`` calls (ten times less
        often once converged) the first ``calibration_rows`` outputs are compared with the
        exact product ``reference(rows)``: the relative error of ``denoise(p, lam)`` for
        every lam on ``default_lambda_grid()`` enters the short-term windows, and
        lam_recent is the grid point with the lowest windowed mean error. Then
        lam_t = alpha lam_memory + (1 - alpha) lam_recent (lam_memory from long-term
        memory for (material, workload type), or lam_recent alone when there is none),
        and (lam_t, its error) is written back to long-term memory.
        """
        cfg = self.rram_config
        if cfg.denoise == "none":
            return None
        if cfg.denoise == "fixed":
            self.last_lambda = cfg.lambda_fixed
            return cfg.lambda_fixed
        interval = cfg.calibration_interval * (
            CONVERGED_INTERVAL_FACTOR if self.lambda_converged else 1
        )
        if self._lambda_recent is None or self._calls_since_calibration >= interval:
            with torch.no_grad():
                self._calibrate(p, reference)
        self._calls_since_calibration += 1
        lam = self._lambda_t()
        self.last_lambda = lam
        return lam

    def _lambda_t(self) -> float:
        assert self._lambda_recent is not None
        if self.lambda_memory is None:
            return self._lambda_recent
        alpha = self.rram_config.denoise_alpha
        return alpha * self.lambda_memory + (1 - alpha) * self._lambda_recent

    def _calibrate(self, p: torch.Tensor, reference) -> None:
        cfg = self.rram_config
        rows = min(cfg.calibration_rows, p.shape[0])
        ref = reference(rows)
        grid, mse = lambda_errors(p[:rows], ref)
        power = float((ref.detach().double() ** 2).mean())
        rel = mse / max(power, 1e-300)
        ltm = self.long_term_memory
        material = cfg.device.name
        if ltm is not None and not self._lambda_looked_up:
            self._lambda_looked_up = True
            record = ltm.best_lambda(material, self.workload_type)
            if record is not None:
                self.lambda_memory = float(record[0])
        stm = self.short_term_memory
        if stm is None:
            from sedma_torch.memory import ShortTermMemory

            stm = self.short_term_memory = ShortTermMemory()
        if stm is False:
            curve = rel
        else:
            prefix = f"rram/{self.rram_seed}/lambda_error/"
            for i, e in enumerate(rel.tolist()):
                stm.update(prefix + str(i), e)
            curve = torch.tensor([stm.mean(prefix + str(i)) for i in range(len(rel))])
        best = int(torch.argmin(curve))
        self._lambda_recent = float(grid[best])
        self.calibration_steps += 1
        self._calls_since_calibration = 0
        lam_t = self._lambda_t()
        err_t = float(lambda_errors(p[:rows], ref, [lam_t])[1][0]) / max(power, 1e-300)
        self.last_calibration_error = err_t
        best_err = float(rel.min())
        if self.lambda_converged:
            if err_t > (1 + LAMBDA_DRIFT_TOLERANCE) * best_err + 1e-15:
                self.lambda_converged = False
                self._recent_history = []
        elif (
            self.lambda_memory is not None
            and self.calibration_steps == 1
            and err_t <= (1 + LAMBDA_MEMORY_TOLERANCE) * best_err + 1e-15
        ):
            self.lambda_converged = True
        else:
            self._recent_history.append(best)
            last = self._recent_history[-LAMBDA_STABLE_CALIBRATIONS:]
            if len(last) == LAMBDA_STABLE_CALIBRATIONS:
                floor = float(curve.min())
                self.lambda_converged = all(
                    float(curve[i]) <= (1 + LAMBDA_STABLE_TOLERANCE) * floor + 1e-15 for i in last
                )
        if ltm is not None and math.isfinite(lam_t) and math.isfinite(err_t):
            ltm.record_lambda(material, self.workload_type, lam_t, err_t)

    def _native_ok(self, x: torch.Tensor) -> bool:
        """True when the compiled fused read (``native_rng.fused_read_``) applies:
        float32 on CPU, with an ADC, outside the opt-in fused read."""
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and self.rram_config.adc_bits is not None
            and not fused_read_on()
            and self.col_scale.dtype == torch.float32  # type: ignore[attr-defined]
            and native_rng.available()
        )

    def _dac_ranges(self, x: torch.Tensor, cpt: int, tiles: int) -> torch.Tensor:
        """DAC full scale of each input tile of each row (linear) or image (conv), (T, N),
        for the compiled read: the configured range, or auto-ranged (``dac``'s rule); 1
        without a DAC."""
        cfg = self.rram_config
        if cfg.dac_bits is None:
            return x.new_ones(tiles, x.shape[0])
        if cfg.dac_range is not None:
            return x.new_full((tiles, x.shape[0]), cfg.dac_range)
        return native_rng.tile_absmax(x, cpt, tiles)

    def _read_specs(
        self, sigma: float, gen: NoiseSource | None, out_cols: int
    ) -> list[tuple[str, native_rng.ReadSpec]]:
        """The crossbar reads of one forward call for the compiled kernels, as (weight
        buffer, what the read does): one read, or three with first-order correction
        (``A x~ + A~ x - A~ x~``: codes on the exact weights written, the exact input on
        the programmed ones added, codes on the programmed ones subtracted). ``out_cols``
        columns per tile share ADC groups of ``tile_cols``."""
        cfg = self.rram_config
        quantise = cfg.dac_bits is not None
        dac_levels = 1 if cfg.dac_bits is None else quant_levels(cfg.dac_bits)
        reads = [("w_read", quantise, 0)]
        if cfg.correction == "first_order":
            reads = [("w_exact", quantise, 0), ("w_read", False, 1), ("w_read", quantise, -1)]
        keys = self._epilogue_keys(sigma, gen)
        return [
            (
                weights,
                native_rng.ReadSpec(
                    group=cfg.tile_cols if out_cols > cfg.tile_cols else out_cols,
                    quantise=rounding,
                    noise_std=2**0.5 * sigma,
                    levels=quant_levels(cfg.adc_bits),  # type: ignore[arg-type]
                    dac_levels=dac_levels,
                    fixed_full=None if cfg.adc_range is None else cfg.adc_range * dac_levels,
                    key=key,
                    mode=mode,
                ),
            )
            for (weights, rounding, mode), key in zip(reads, keys, strict=True)
        ]

    def _run_fused_reads(self, sigma: float, gen: NoiseSource | None, read) -> None:
        """The reads of :meth:`_read_specs` with the compiled fused read:
        ``read(spec, packed weights)`` for each."""
        out_c = self.col_scale.shape[-1]  # type: ignore[attr-defined]
        for weights, spec in self._read_specs(sigma, gen, out_c):
            read(spec, self._packed(weights, spec.group))

    def _packed(self, name: str, group: int) -> torch.Tensor:
        """Buffer ``name`` (``w_read`` or ``w_exact``) packed for the compiled read, cached
        until it changes (re-programming, loading, a device or dtype move)."""
        weights = getattr(self, name)
        key = (weights.data_ptr(), weights._version, tuple(weights.shape), group)
        cache = self.__dict__.setdefault("_packed_cache", {})
        if cache.get(name, (None,))[0] != key:
            cache.pop(name, None)  # free the old copy first
            cache[name] = (key, native_rng.pack_weights(weights, group))
        return cache[name][1]

    def _epilogue_keys(self, sigma: float, gen: NoiseSource | None) -> list[tuple[int, int]]:
        """Noise keys (two 31-bit words) of the reads of one forward call: one, or three
        with first-order correction."""
        n_reads = 3 if self.rram_config.correction == "first_order" else 1
        if sigma <= 0 or gen is None:
            return [(0, 0)] * n_reads
        seeds = [gen.next_seed() for _ in range(n_reads)]
        return [seed_pair(sd) for sd in seeds]

    def crossbar_summary(self) -> dict[str, Any]:
        """Tiles, physical crossbars and utilisation of this layer."""
        from .partition import crossbar_utilisation

        t, _r, c = self.weight_tiles().shape
        cfg = self.rram_config
        util = crossbar_utilisation(
            self._used_cells(), t * math.ceil(c / cfg.tile_cols), cfg.tile_rows, cfg.tile_cols
        )
        return {
            "input_tiles": t,
            "column_tiles": math.ceil(c / cfg.tile_cols),
            "crossbars": 2 * t * math.ceil(c / cfg.tile_cols),
            "utilisation": util,
        }

    def _used_cells(self) -> int:
        return self.weight.numel()

    def _digital_module(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def digital_twin(self) -> nn.Module:
        """The digital layer this one simulates, sharing its weight and bias Parameters."""
        from torch.nn.utils import parametrize

        from .convert import _move_parametrizations

        twin = self._digital_module()
        if parametrize.is_parametrized(self):  # type: ignore[arg-type]
            _move_parametrizations(self, twin)  # type: ignore[arg-type]
        for name in ("weight", "bias"):
            if not parametrize.is_parametrized(self, name):  # type: ignore[arg-type]
                setattr(twin, name, getattr(self, name))
        return twin.train(self.training)  # type: ignore[attr-defined]


class RRAMLinear(_CrossbarMixin, nn.Linear):
    """``nn.Linear`` computed on simulated RRAM crossbars.

    Args: as ``nn.Linear`` plus ``config`` (an :class:`RRAMConfig`) and ``seed`` (this
    layer's seed; by default derived from ``config.seed`` and the construction order).
    Input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        config: RRAMConfig | None = None,
        seed: int | None = None,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RRAMLinear: {name} must be a positive int, got {value!r}")
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._rram_init(config, seed)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: RRAMConfig | None = None,
        seed: int | None = None,
        program: bool = True,
    ) -> RRAMLinear:
        """A copy of ``linear`` (same weights, device, dtype) on crossbars, programmed now."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            config=config,
            seed=seed,
        )
        return _copied_from(new, linear, program)

    # layout ------------------------------------------------------------------------------
    def _geometry(self) -> tuple[int, int]:
        rows = self.rram_config.tile_rows
        tiles = math.ceil(self.in_features / rows)
        return tiles, rows

    _transposed_weight = False
    """Whether ``weight`` is stored as (in, out) instead of (out, in)."""

    def _digital_module(self) -> nn.Module:
        return nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )

    def _weight_oi(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The digital weight (``weight`` or ``self.weight``) as (out_features, in_features)."""
        w = (self.weight if weight is None else weight).detach()
        return w.t() if self._transposed_weight else w

    def weight_tiles(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Digital weights as the (T, R, out) tile stack (zero padded)."""
        t, r = self._geometry()
        w = self._weight_oi(weight)
        pad = t * r - self.in_features
        if pad:
            w = F.pad(w, (0, pad))
        return w.reshape(self.out_features, t, r).permute(1, 2, 0).contiguous()

    def _rebuild_cache(self) -> None:
        if self.rram_config.adc_bits is None and self.w_read.numel():
            t, r = self._geometry()
            fold = self.w_read * self.col_scale.unsqueeze(1).to(self.w_read.dtype)
            self._w_fold = fold.reshape(t * r, self.out_features)
        else:
            self._w_fold = None

    # forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(
            type(self).__name__,
            x,
            lambda t: t.ndim >= 1 and t.shape[-1] == self.in_features,
            f"(..., {self.in_features})",
        )
        lead = x.shape[:-1]
        cdt = self._compute_dtype()
        x2d = x.reshape(-1, self.in_features)
        if x2d.dtype != cdt:
            x2d = x2d.to(cdt)
        y = _crossbar(self, x2d, self.weight)
        if self.bias is not None:
            y = _add_bias(y, self.bias.to(cdt))
        return y.to(_output_dtype(x)).reshape(*lead, self.out_features)

    def _read_fake(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], self.out_features)

    def _read_backward(self, grad, x2d, weight, needs):
        """Straight-through: the digital layer's gradients (input in the compute dtype,
        weight in its own dtype)."""
        w_oi = weight.t() if self._transposed_weight else weight
        gx = grad @ w_oi.to(grad.dtype) if needs[0] else None
        gw = None
        if needs[1]:
            gw_oi = grad.t() @ x2d.to(grad.dtype)
            gw = (gw_oi.t() if self._transposed_weight else gw_oi).to(weight.dtype)
        return gx, gw

    def _hardware_forward(self, x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        cfg = self.rram_config
        material = cfg.device
        batch = x2d.shape[0]
        t, r = self._geometry()
        sigma = material.read_noise if cfg.read_noise else 0.0
        gen = self._next_read_noise() if sigma > 0 else None
        n_ot = math.ceil(self.out_features / cfg.tile_cols)
        stats = self.rram_stats
        reads = 3 if cfg.correction == "first_order" else 1
        stats.matrix_products += reads * batch
        stats.tile_reads += reads * batch * t * n_ot
        stats.dac_conversions += reads * batch * self.in_features
        stats.adc_conversions += reads * batch * t * self.out_features if cfg.adc_bits else 0
        if cfg.correction == "first_order":
            stats.input_programming_pulses += batch * self.in_features * (cfg.dac_bits or 16)

        if self._native_ok(x2d):
            y = x2d.new_empty(batch, self.out_features)
            self._fused_reads(x2d.contiguous(), sigma, gen, y)
            return self._denoised(y, x2d, weight)
        pad = t * r - self.in_features  # the PyTorch paths read (B, T, R) input tiles
        xt = (F.pad(x2d, (0, pad)) if pad else x2d).view(batch, t, r)
        if cfg.adc_bits is None and cfg.correction == "none":
            codes, s_in, levels = dac(xt, cfg, -1)
            y = self._fast_read(codes, s_in, levels, sigma, gen, batch, t, r)
        else:
            # The T partial sums of a read are T times the output's size: the read runs in
            # blocks of rows x whole physical column tiles (``read_blocks``) so that a
            # forward pass needs a few times the digital layer's memory at any tile count.
            # When the DAC codes of the whole batch fit in one output, they are made once
            # and the blocks go column by column, so each block of weight columns is
            # streamed from memory once and reused from cache by the row chunks; otherwise
            # rows go outside and each row chunk has its own codes.
            y = x2d.new_empty(batch, self.out_features)
            stacks = 2 if cfg.correction == "first_order" else 1
            plan = read_blocks(batch, t * r, self.out_features, t, cfg.tile_cols, stacks)
            for start in range(0, batch, plan.codes_rows):
                rows = slice(start, start + plan.codes_rows)
                self._tiled_read(xt[rows], sigma, gen, plan, y[rows])
        return self._denoised(y, x2d, weight)

    def _denoised(self, y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``y`` after the configured denoiser (calibrated against exact products)."""
        lam = self._lambda(y, lambda rows: x2d[:rows] @ self._weight_oi(weight).t().to(x2d.dtype))
        return y if lam is None else denoise(y, lam)

    def _fast_read(self, codes, s_in, levels, sigma, gen, batch, t, r) -> torch.Tensor:
        """No ADC: the tile sum is linear, so one GEMM on the de-quantised input."""
        x_deq = (codes * (s_in / levels)).reshape(batch, t * r)
        y = x_deq @ self._w_fold
        if sigma > 0:
            # var_o = 2 sigma^2 sum_t ||x~_t||^2 col_scale[t, o]^2  (per-tile noise, summed)
            norms = (codes * codes).sum(-1) * (s_in.squeeze(-1) / levels) ** 2  # (B, T)
            var = (2 * sigma * sigma) * (norms @ (self.col_scale.to(y.dtype) ** 2))
            y = y + gen.randn(y.shape, y.device, y.dtype) * var.clamp_min(0).sqrt()
        return y

    def _read_stack(
        self,
        inputs: torch.Tensor,
        weights: torch.Tensor,
        std: torch.Tensor | None,
        gen: NoiseSource | None,
        levels: int,
        s_in_t: torch.Tensor,
    ) -> torch.Tensor:
        """inputs (T, B, R) in DAC code units @ weights (T, R, C) with read noise of
        standard deviation ``std`` (T, B, 1), then ADC and de-quantisation: (T, B, C)
        partial sums in input units (before the column scale)."""
        if std is None or fused_read_enabled(inputs.shape[0] * inputs.shape[1] * weights.shape[-1]):
            u = torch.bmm(inputs, weights)
            return noisy_read_(u, std, gen, self.rram_config, levels, s_in_t)
        # the noise is drawn into the output first and the product accumulated onto it: no
        # separate noise tensor, no extra pass
        u = gen.randn((*inputs.shape[:2], weights.shape[-1]), inputs.device, inputs.dtype)  # type: ignore[union-attr]
        u.mul_(std).baddbmm_(inputs, weights)
        return adc_dequantise_(u, self.rram_config, levels, s_in_t, col_dim=-1)

    def _tiled_read(
        self,
        xt: torch.Tensor,
        sigma: float,
        gen: NoiseSource | None,
        plan: ReadBlocks,
        out: torch.Tensor,
    ) -> None:
        """Rows ``xt`` (B, T, R) through DAC, tiles, noise, ADC and the digital tile sum in
        PyTorch, written to ``out`` (B, out_features) block by block (columns outside, rows
        inside); each read of a block is :meth:`_read_stack`."""
        cfg = self.rram_config
        codes, s_in, levels = dac(xt, cfg, -1)
        codes_t = codes.transpose(0, 1)  # (T, B, R)
        s_in_t = s_in.transpose(0, 1)  # (T, B, 1)

        def std_of(inputs: torch.Tensor) -> torch.Tensor | None:
            return (2**0.5 * sigma) * inputs.norm(dim=-1, keepdim=True) if sigma > 0 else None

        std_codes = std_of(codes_t)
        # (inputs, weights, their read-noise std, sign in A x~ + A~ x - A~ x~)
        reads = [(codes_t, self.w_read, std_codes, 0)]
        if cfg.correction == "first_order":
            exact_in = (xt * (levels / s_in)).transpose(0, 1)  # x at full precision, code units
            reads = [
                (codes_t, self.w_exact, std_codes, 0),
                (exact_in, self.w_read, std_of(exact_in), 1),
                (codes_t, self.w_read, std_codes, -1),
            ]
        n_rows = xt.shape[0]
        col_scale = self.col_scale.unsqueeze(1).to(codes.dtype)  # (T, 1, C)
        for c0 in range(0, self.out_features, plan.cols):
            cols = slice(c0, c0 + plan.cols)
            for r0 in range(0, n_rows, plan.rows):
                rows = slice(r0, r0 + plan.rows)
                u = None  # one read at a time: at most two partial-sum stacks alive
                for inputs, weights, std, sign in reads:
                    part = self._read_stack(
                        inputs[:, rows],
                        weights[..., cols],
                        None if std is None else std[:, rows],
                        gen,
                        levels,
                        s_in_t[:, rows],
                    )
                    if u is None:
                        u = part
                    elif sign > 0:
                        u += part
                    else:
                        u -= part
                    del part
                # digital: per-column scale of each tile, then add the tiles
                torch.sum(u.mul_(col_scale[..., cols]), 0, out=out[rows, cols])  # type: ignore[union-attr]
                del u  # before the next block's stack is allocated

    def _fused_reads(
        self, x2d: torch.Tensor, sigma: float, gen: NoiseSource | None, out: torch.Tensor
    ) -> None:
        """The read of :meth:`_tiled_read` with the compiled kernel (``native_rng.fused_read_``):
        per read, one pass that runs the DAC on the rows ``x2d`` (B, in_features) as it
        packs them, multiplies each input tile with its packed crossbar weights and sends
        the partial sums -- a few rows x one ADC group at a time, in cache -- through read
        noise, ADC, de-quantisation, column scale and the tile sum into ``out``. First-order
        correction adds its second read (exact input on the programmed weights) and
        subtracts its third. Neither DAC codes nor a partial-sum stack are ever stored: a
        forward pass needs little more than its output. The weights are packed once per
        programming. Noise is keyed per read and element (:meth:`_epilogue_keys`)."""
        t, r = self._geometry()
        s_in = self._dac_ranges(x2d, r, t)  # (T, B)
        self._run_fused_reads(
            sigma,
            gen,
            lambda spec, packed: native_rng.fused_read_(
                x2d,
                s_in,
                packed,
                self.col_scale,  # type: ignore[arg-type]
                out,
                spec,
                tile_rows=r,
            ),
        )

    def extra_repr(self) -> str:
        cfg = self.rram_config
        return (
            f"{nn.Linear.extra_repr(self)}, material={cfg.device.name}, "
            f"tiles={cfg.tile_rows}x{cfg.tile_cols}, dac={cfg.dac_bits}, adc={cfg.adc_bits}, "
            f"correction={cfg.correction}, denoise={cfg.denoise}"
        )


class RRAMConv2d(_CrossbarMixin, nn.Conv2d):
    """``nn.Conv2d`` computed on simulated RRAM crossbars.

    Kernels are mapped whole: each input tile holds ``tile_rows // (kh * kw)`` input
    channels (all their kernel taps) of one group, so a tile's partial sum is a grouped
    convolution; the T partial sums are added digitally. Supports stride, padding
    (numbers, tuples, ``"same"``/``"valid"``; zero padding mode), dilation, groups, bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        config: RRAMConfig | None = None,
        seed: int | None = None,
    ) -> None:
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        cfg = _check_config(config)
        self._check_read_args()
        self._check_config_fits(cfg)
        self._rram_init(cfg, seed)

    def _check_config_fits(self, config: RRAMConfig) -> None:
        kh, kw = self.kernel_size
        if kh * kw > config.tile_rows:
            raise ValueError(
                f"{type(self).__name__}: kernel {kh}x{kw} = {kh * kw} taps does not fit "
                f"tile_rows={config.tile_rows}; use tile_rows >= {kh * kw}"
            )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        config: RRAMConfig | None = None,
        seed: int | None = None,
        program: bool = True,
    ) -> RRAMConv2d:
        """A copy of ``conv`` on crossbars (same weights, device, dtype), programmed now."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects nn.Conv2d, got {type(conv).__name__}")
        return cls._from_conv_module(conv, config, seed, program)

    @classmethod
    def _from_conv_module(cls, conv, config, seed, program):
        """A layer with ``conv``'s arguments, weights, device and dtype (``nn.Conv2d`` for
        this class, ``nn.Conv1d`` for :class:`RRAMConv1d`)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            config=config,
            seed=seed,
        )
        return _copied_from(new, conv, program)

    def _digital_module(self) -> nn.Module:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )

    def _geometry(self) -> tuple[int, int, int]:
        """(channels per tile, input tiles per group, rows used per tile).

        As few input tiles as fit, with the channels spread evenly over them (64 channels
        of 3x3 kernels on 256-row tiles: 3 tiles of 22 channels, not 28 + 28 + 8)."""
        kh, kw = self.kernel_size
        c_g = self.in_channels // self.groups
        n_it = math.ceil(c_g / min(c_g, self.rram_config.tile_rows // (kh * kw)))
        cpt = math.ceil(c_g / n_it)
        return cpt, n_it, cpt * kh * kw

    def _check_read_args(self) -> None:
        """Stride and dilation >= 1, padding >= 0 (as ``nn.Conv2d`` requires at its first
        call; the compiled reads index the input with them)."""
        name = type(self).__name__
        for what, values, low in (
            ("kernel_size", self.kernel_size, 1),
            ("stride", self.stride, 1),
            ("dilation", self.dilation, 1),
        ):
            if len(values) != 2 or any(not isinstance(v, int) or v < low for v in values):
                raise ValueError(f"{name}: {what} must be two ints >= {low}, got {values}")
        if not isinstance(self.padding, str) and any(
            not isinstance(v, int) or v < 0 for v in self.padding
        ):
            raise ValueError(f"{name}: padding must be ints >= 0, got {self.padding}")

    def _conv_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as a 2-D convolution's (out, in / groups, kh, kw)."""
        return weight

    def weight_tiles(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Digital weights as the (groups * tiles, cpt*kh*kw, out/groups) stack."""
        cpt, n_it, rows = self._geometry()
        g = self.groups
        out_g = self.out_channels // g
        kh, kw = self.kernel_size
        c_g = self.in_channels // g
        w = (self.weight if weight is None else weight).detach().reshape(g, out_g, c_g, kh, kw)
        pad = n_it * cpt - c_g
        if pad:
            w = F.pad(w, (0, 0, 0, 0, 0, pad))
        w = w.reshape(g, out_g, n_it, cpt, kh, kw).permute(0, 2, 3, 4, 5, 1)
        return w.reshape(g * n_it, rows, out_g).contiguous()

    def _stack_to_conv(self, stack: torch.Tensor) -> torch.Tensor:
        """(T, R, out_g) -> grouped-conv weight (T*out_g, cpt, kh, kw)."""
        cpt, _, _ = self._geometry()
        kh, kw = self.kernel_size
        t, _, out_g = stack.shape
        return (
            stack.reshape(t, cpt, kh, kw, out_g)
            .permute(0, 4, 1, 2, 3)
            .reshape(t * out_g, cpt, kh, kw)
        )

    def _rebuild_cache(self) -> None:
        if not self.w_read.numel():
            return
        cs = self.col_scale.unsqueeze(1).to(self.w_read.dtype)
        if self.rram_config.adc_bits is None and self.rram_config.correction == "none":
            # tile sum collapses: one grouped conv with the original groups
            cpt, n_it, _ = self._geometry()
            kh, kw = self.kernel_size
            g, out_g = self.groups, self.out_channels // self.groups
            self._w_conv = (
                self._stack_to_conv(self.w_read * cs)
                .reshape(g, n_it, out_g, cpt, kh, kw)
                .permute(0, 2, 1, 3, 4, 5)
                .reshape(g * out_g, n_it * cpt, kh, kw)
                .contiguous(memory_format=torch.channels_last)
            )
        else:
            self._w_conv = self._stack_to_conv(self.w_read).contiguous(
                memory_format=torch.channels_last
            )
        self._w_conv_exact = (
            self._stack_to_conv(self.w_exact).contiguous(memory_format=torch.channels_last)
            if self.w_exact.numel()
            else None
        )

    def _spatial_pad(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer's spatial padding, so tile convolutions run with padding 0."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        if isinstance(self.padding, str):
            return self._same_pad(x) if self.padding == "same" else x
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x

    def _channel_pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, T*cpt, H, W): each group's channels padded to whole tiles."""
        cpt, n_it, _ = self._geometry()
        g = self.groups
        c_g = self.in_channels // g
        pad = n_it * cpt - c_g
        if not pad:
            return x
        b, _, h, w = x.shape
        return F.pad(x.reshape(b, g, c_g, h, w), (0, 0, 0, 0, 0, pad)).reshape(
            b, g * n_it * cpt, h, w
        )

    def _same_pad(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        dh, dw = self.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(
            type(self).__name__,
            x,
            lambda t: t.ndim in (3, 4) and t.shape[-3] == self.in_channels,
            f"(N, {self.in_channels}, H, W) or ({self.in_channels}, H, W)",
        )
        unbatched = x.ndim == 3
        cdt = self._compute_dtype()
        xin = x.unsqueeze(0) if unbatched else x
        if xin.dtype != cdt:
            xin = xin.to(cdt)
        y = _crossbar(self, self._spatial_pad(xin), self.weight)
        if self.bias is not None:
            y = _add_bias(y, self.bias.to(cdt).view(1, -1, 1, 1))
        y = y.to(_output_dtype(x))
        return y.squeeze(0) if unbatched else y

    def _output_size(self, xp: torch.Tensor) -> tuple[int, int]:
        """Output height and width for spatially padded input ``xp``."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        h, w = xp.shape[-2:]
        hh, ww = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if hh < 1 or ww < 1:
            raise ValueError(
                f"{type(self).__name__}: input of spatial size {tuple(xp.shape[-2:])} (after "
                f"padding) is smaller than the dilated kernel {(dh * (kh - 1) + 1, dw * (kw - 1) + 1)}"
            )
        return hh, ww

    def _read_fake(self, xp: torch.Tensor) -> torch.Tensor:
        return xp.new_empty((xp.shape[0], self.out_channels, *self._output_size(xp)))

    def _read_backward(self, grad, xp, weight, needs):
        """Straight-through: the digital convolution's gradients (input in the compute
        dtype, weight in its own dtype)."""
        dt = grad.dtype
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad,
            xp.to(dt),
            self._conv_weight(weight).to(dt),
            None,
            self.stride,
            (0, 0),
            self.dilation,
            False,
            [0, 0],
            self.groups,
            [needs[0], needs[1], False],
        )
        gx = gx.to(xp.dtype) if gx is not None else None
        gw = gw.reshape(weight.shape).to(weight.dtype) if gw is not None else None
        return gx, gw

    def _hardware_forward(self, xp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        cfg = self.rram_config
        material = cfg.device
        _, n_it, rows = self._geometry()
        g = self.groups
        t_tiles = g * n_it
        x_spatial = xp
        b = xp.shape[0]
        sigma = material.read_noise if cfg.read_noise else 0.0
        gen = self._next_read_noise() if sigma > 0 else None
        out_g = self.out_channels // g
        kh, kw = self.kernel_size
        n_ot = math.ceil(out_g / cfg.tile_cols)
        reads = 3 if cfg.correction == "first_order" else 1
        stats = self.rram_stats
        if cfg.adc_bits is None and cfg.correction == "none":
            y = self._single_read(xp, sigma, gen)
        else:
            hh, ww = self._output_size(xp)  # spatially padded already
            if self._depthwise_native_ok(xp):
                # the compiled depthwise read writes whole NCHW planes
                y = xp.new_empty((b, self.out_channels, hh, ww))
                self._depthwise_reads(xp, sigma, gen, y)
            else:
                # NCHW in channels-last memory: image chunks are NHWC slices of it
                y = torch.empty(
                    (b, self.out_channels, hh, ww),
                    dtype=xp.dtype,
                    device=xp.device,
                    memory_format=torch.channels_last,
                )
                if self.groups == 1 and self._native_ok(xp):  # other groups: PyTorch
                    self._fused_reads(xp, sigma, gen, y)
                else:
                    # images in chunks: a chunk's partial sums of the T input tiles take
                    # about one output (the PyTorch path holds their read noise too, and
                    # first-order correction one more stack)
                    step = chunk_rows(b, t_tiles)
                    for start in range(0, b, step):
                        part = self._tiled_read(xp[start : start + step], sigma, gen)  # NHWC
                        y.permute(0, 2, 3, 1)[start : start + step] = part
                        del part
        hh, ww = y.shape[-2:]
        stats.matrix_products += reads * b * hh * ww
        stats.tile_reads += reads * b * hh * ww * t_tiles * n_ot
        stats.dac_conversions += reads * b * hh * ww * self.in_channels * kh * kw
        if cfg.adc_bits:
            stats.adc_conversions += reads * b * hh * ww * t_tiles * out_g
        if cfg.correction == "first_order":
            stats.input_programming_pulses += b * hh * ww * t_tiles * rows * (cfg.dac_bits or 16)
        lam = self._lambda(
            y.movedim(1, -1),
            lambda rows: F.conv2d(
                x_spatial[:rows],
                self._conv_weight(weight).to(x_spatial.dtype),
                stride=self.stride,
                dilation=self.dilation,
                groups=self.groups,
            ).movedim(1, -1),
        )
        if lam is not None:
            y = denoise(y.movedim(1, -1), lam).movedim(-1, 1)
        return y

    def _conv_args(self) -> dict[str, Any]:
        return dict(stride=self.stride, padding=0, dilation=self.dilation)

    def _patch_norm2(self, inp: torch.Tensor) -> torch.Tensor:
        """Sum of squares of each tile's input patch, (B, T, H', W'): channels first summed
        per tile (a norm reduction, no squared copy), then a kh x kw box filter."""
        cpt, n_it, _ = self._geometry()
        t_tiles = self.groups * n_it
        b, _, h, w = inp.shape
        per_tile = torch.linalg.vector_norm(inp.view(b, t_tiles, cpt, h, w), dim=2).square_()
        ones = torch.ones(t_tiles, 1, *self.kernel_size, dtype=inp.dtype, device=inp.device)
        return F.conv2d(per_tile, ones, groups=t_tiles, **self._conv_args()).clamp_min_(0)

    def _single_read(self, xp: torch.Tensor, sigma: float, gen: NoiseSource | None) -> torch.Tensor:
        """No ADC: the tile sum is linear, so one convolution on the de-quantised input,
        with the summed per-tile read noise added once per output."""
        cfg = self.rram_config
        cpt, n_it, _ = self._geometry()
        g = self.groups
        t_tiles = g * n_it
        out_g = self.out_channels // g
        xp = self._channel_pad(xp)
        b, _, h, w = xp.shape
        codes, s_in, levels = dac(xp.view(b, t_tiles, cpt, h, w), cfg, (2, 3, 4))
        x_deq = (codes * (s_in / levels)).reshape(b, t_tiles * cpt, h, w)
        cl = torch.channels_last  # oneDNN runs grouped convolutions far faster in NHWC
        y = F.conv2d(
            x_deq.contiguous(memory_format=cl), self._w_conv, groups=g, **self._conv_args()
        )
        if sigma > 0:
            n2 = self._patch_norm2(x_deq)  # (B, T, H', W')
            cs2 = (self.col_scale.to(y.dtype) ** 2).reshape(g, n_it, out_g)
            var = torch.einsum("bgthw,gto->bgohw", n2.reshape(b, g, n_it, *n2.shape[-2:]), cs2)
            var = var.reshape(b, g * out_g, *n2.shape[-2:]) * (2 * sigma * sigma)
            y = y + gen.randn(y.shape, y.device, y.dtype) * var.sqrt()  # type: ignore[union-attr]
        return y

    def _dac_images(
        self, xp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """One channels-last copy of the images ``xp`` (spatially padded), each group's
        channels padded to whole tiles and converted in place by the DACs (one range per
        image and input tile; oneDNN runs grouped convolutions far faster in NHWC).

        Returns (codes (B, T*cpt, H, W), the input at full precision in code units when
        first-order correction needs it (else None), DAC full scales (B, T, 1, 1, 1), DAC
        levels)."""
        cfg = self.rram_config
        cpt, n_it, _ = self._geometry()
        g = self.groups
        t_tiles = g * n_it
        b, _, h, w = xp.shape
        c_g = self.in_channels // g
        buf = xp.new_zeros((b, t_tiles * cpt, h, w)).contiguous(memory_format=torch.channels_last)
        buf.view(b, g, n_it * cpt, h, w)[:, :, :c_g] = xp.view(b, g, c_g, h, w)
        xt = buf.view(b, t_tiles, cpt, h, w)
        exact_in = None
        if cfg.correction == "first_order":  # the DAC's own range: fixed or auto
            if cfg.dac_range is not None:
                scale: torch.Tensor | float = cfg.dac_range
            else:
                scale = positive_or_one(absmax(xt, (2, 3, 4)))
            exact_in = (xt * (quant_levels(cfg.dac_bits) / scale) if cfg.dac_bits else xt).view(
                b, t_tiles * cpt, h, w
            )
        _, s_in, levels = dac(xt, cfg, (2, 3, 4), out=xt)
        return buf, exact_in, s_in, levels

    def _fused_reads(
        self, xp: torch.Tensor, sigma: float, gen: NoiseSource | None, y: torch.Tensor
    ) -> None:
        """The read of :meth:`_tiled_read` with the compiled kernel
        (``native_rng.fused_conv_read_``), written to ``y`` (NCHW in channels-last memory):
        per read, one pass that gathers each output pixel's kernel window per input tile
        straight from the (spatially padded) NCHW images -- implicit im2col, channels past
        the input's zero --, runs the DAC on it, multiplies it with the tile's packed
        weights and sends the partial sums through read noise, ADC, de-quantisation, column
        scale and the tile sum. First-order correction adds its second read (exact input)
        and subtracts its third. No copy of the images, patch matrix, codes or partial sums
        is stored."""
        cpt, t_tiles, _ = self._geometry()
        xp = xp.contiguous()
        b = xp.shape[0]
        hh, ww = y.shape[-2:]
        s_in = self._dac_ranges(xp, cpt, t_tiles)  # one range per image and input tile
        out = y.permute(0, 2, 3, 1).view(b * hh * ww, self.out_channels)
        self._run_fused_reads(
            sigma,
            gen,
            lambda spec, packed: native_rng.fused_conv_read_(
                xp,
                s_in,
                packed,
                self.col_scale,  # type: ignore[arg-type]
                out,
                spec,
                cpt=cpt,
                kernel_size=self.kernel_size,  # type: ignore[arg-type]
                stride=self.stride,  # type: ignore[arg-type]
                dilation=self.dilation,  # type: ignore[arg-type]
            ),
        )

    def _depthwise_native_ok(self, xp: torch.Tensor) -> bool:
        """True when the compiled depthwise read (:mod:`.native_depthwise`) applies: a
        depthwise convolution (one input channel per group, hence one channel per input
        tile) under the conditions of the compiled fused read (:meth:`_native_ok`)."""
        return (
            self.groups > 1
            and self.groups == self.in_channels
            and self._native_ok(xp)
            and self.w_read.dtype == torch.float32  # type: ignore[attr-defined]
            and native_depthwise.available()
        )

    def _depthwise_reads(
        self, xp: torch.Tensor, sigma: float, gen: NoiseSource | None, y: torch.Tensor
    ) -> None:
        """The read of :meth:`_tiled_read` for a depthwise convolution with the compiled
        kernel (``native_depthwise.depthwise_read_``), into ``y`` (NCHW, contiguous): per
        image and channel, one pass over the (spatially padded) plane for DAC, window
        products and norms, read noise, ADC, de-quantisation and column scale. Images in
        channels-last memory (the output of the compiled 1x1 reads) are read as they are.
        The reads (one, or three with first-order correction) are :meth:`_read_specs`'."""
        cfg = self.rram_config
        if not xp.is_contiguous(memory_format=torch.channels_last):
            xp = xp.contiguous()  # the kernel reads NCHW or channels-last images
        channels = self.groups
        m = self.out_channels // channels
        # one DAC range per image and channel; auto-ranging happens in the kernel's pass
        auto = cfg.dac_bits is not None and cfg.dac_range is None
        s_in = None if auto else self._dac_ranges(xp, 1, channels)
        for weights, spec in self._read_specs(sigma, gen, m):
            native_depthwise.depthwise_read_(
                xp,
                s_in,
                getattr(self, weights).contiguous(),
                self.col_scale,  # type: ignore[arg-type]
                y,
                spec,
                kernel_size=self.kernel_size,  # type: ignore[arg-type]
                stride=self.stride,  # type: ignore[arg-type]
                dilation=self.dilation,  # type: ignore[arg-type]
            )

    def _tiled_read(self, xp: torch.Tensor, sigma: float, gen: NoiseSource | None) -> torch.Tensor:
        """Images ``xp`` (spatially padded) through DAC, tile convolutions, read noise, ADC
        and the digital tile sum: (B, H', W', out_channels), channels last."""
        cfg = self.rram_config
        _, n_it, _ = self._geometry()
        g = self.groups
        t_tiles = g * n_it
        out_g = self.out_channels // g
        cl = torch.channels_last
        b = xp.shape[0]
        codes_flat, exact_in, s_in, levels = self._dac_images(xp)
        s_in_nhwc = s_in.view(b, 1, 1, t_tiles, 1)

        def read(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            """(B, T*cpt, H, W) codes -> (B, H', W', T, out_g) partial sums after read
            noise, ADC and de-quantisation (input units, before the column scale)."""
            u = F.conv2d(
                inp.contiguous(memory_format=cl), weight, groups=t_tiles, **self._conv_args()
            )
            hh, ww = u.shape[-2:]
            u = u.permute(0, 2, 3, 1).reshape(b, hh, ww, t_tiles, out_g)  # NHWC: no copy
            std = None
            if sigma > 0:
                std = self._patch_norm2(inp).sqrt_().mul_(2**0.5 * sigma)
                std = std.permute(0, 2, 3, 1).unsqueeze(-1)
            return noisy_read_(u, std, gen, cfg, levels, s_in_nhwc)

        if exact_in is not None:
            u = read(codes_flat, self._w_conv_exact)
            u += read(exact_in, self._w_conv)
            u -= read(codes_flat, self._w_conv)
        else:
            u = read(codes_flat, self._w_conv)
        # digital: per-column scale of each tile, then add the tiles of each group
        u.mul_(self.col_scale.to(u.dtype).view(1, 1, 1, t_tiles, out_g))
        hh, ww = u.shape[1:3]
        return u.view(b, hh, ww, g, n_it, out_g).sum(4).reshape(b, hh, ww, g * out_g)

    def extra_repr(self) -> str:
        cfg = self.rram_config
        return (
            f"{nn.Conv2d.extra_repr(self)}, material={cfg.device.name}, "
            f"tiles={cfg.tile_rows}x{cfg.tile_cols}, dac={cfg.dac_bits}, adc={cfg.adc_bits}, "
            f"correction={cfg.correction}, denoise={cfg.denoise}"
        )


class RRAMConv1d(RRAMConv2d):
    """``nn.Conv1d`` computed on simulated RRAM crossbars (timm's ECA, audio models).

    A 1-D convolution is the 2-D one of ``(N, C, 1, L)`` with a ``1 x k`` kernel, so it
    runs on :class:`RRAMConv2d`'s crossbar mapping and reads. ``weight`` keeps
    ``nn.Conv1d``'s shape ``(out, in / groups, k)`` (state dicts and optimisers see the
    digital layer's tensors); ``kernel_size``, ``stride``, ``padding`` and ``dilation``
    are the 2-D ``(1, ...)`` tuples the crossbar uses. Input ``(N, C, L)`` or ``(C, L)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        config: RRAMConfig | None = None,
        seed: int | None = None,
    ) -> None:
        def one(value, name: str):
            v = tuple(value) if isinstance(value, tuple | list) else (value,)
            if len(v) != 1:
                raise ValueError(f"RRAMConv1d: {name} must be an int or a 1-tuple, got {value!r}")
            return v[0]

        pad = padding if isinstance(padding, str) else (0, one(padding, "padding"))
        super().__init__(
            in_channels,
            out_channels,
            (1, one(kernel_size, "kernel_size")),
            stride=(1, one(stride, "stride")),
            padding=pad,
            dilation=(1, one(dilation, "dilation")),
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
            config=config,
            seed=seed,
        )
        # nn.Conv2d's initialisation has nn.Conv1d's fan-in (in / groups x k): keep it
        self.weight = nn.Parameter(self.weight.detach().squeeze(2))

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Conv1d,
        config: RRAMConfig | None = None,
        seed: int | None = None,
        program: bool = True,
    ) -> RRAMConv1d:
        """A copy of ``conv`` on crossbars (same weights, device, dtype), programmed now."""
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"from_conv1d expects nn.Conv1d, got {type(conv).__name__}")
        return cls._from_conv_module(conv, config, seed, program)

    def _conv_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.unsqueeze(2) if weight.ndim == 3 else weight

    def _digital_module(self) -> nn.Module:
        return nn.Conv1d(
            self.in_channels,
            self.out_channels,
            self.kernel_size[1],
            stride=self.stride[1],
            padding=self.padding if isinstance(self.padding, str) else self.padding[1],
            dilation=self.dilation[1],
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(
            type(self).__name__,
            x,
            lambda t: t.ndim in (2, 3) and t.shape[-2] == self.in_channels,
            f"(N, {self.in_channels}, L) or ({self.in_channels}, L)",
        )
        return super().forward(x.unsqueeze(-2)).squeeze(-2)

    def extra_repr(self) -> str:
        cfg = self.rram_config
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size[1]}, "
            f"stride={self.stride[1]}, material={cfg.device.name}, "
            f"tiles={cfg.tile_rows}x{cfg.tile_cols}, dac={cfg.dac_bits}, adc={cfg.adc_bits}, "
            f"correction={cfg.correction}, denoise={cfg.denoise}"
        )


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
