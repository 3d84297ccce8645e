"""`_CrossbarMixin`: the state and programming every RRAM layer shares.

Configuration (``rram_config`` / ``reconfigure_``), programming (``program_`` and the
never-stale check against the weight's fingerprint), the read state and its caches, the
read itself (``_read``: the body of the ``sedma::crossbar_read`` operator), the read
counters, state-dict hooks, pickling and device moves (``_apply``), the helpers of the
compiled reads (``_native_ok``, ``_read_specs``, ``_packed``, ...), ``crossbar_summary``
and ``digital_twin``. The adaptive lambda is the :class:`~.lambda_control._LambdaController`
mixin it inherits.

Part of the split of :mod:`sedma_torch.rram.layers` (which re-exports all of it).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import native_rng
from .config import RRAMConfig
from .crossbar import (
    CrossbarStats,
    NoiseSource,
    ProgrammedInputs,
    derive_seed,
    fused_read_on,
    program_inputs,
    program_tiles,
    quant_levels,
)
from .fingerprint import fingerprint
from .lambda_control import _LambdaController
from .read_op import (
    _check_config,
    _check_finite,
    _keep_fused_fast_paths_off,
    _register_layer,
    _same_values,
    compute_dtype,
)
from .rng import seed_pair

_construction_counter = itertools.count()
_NO_CONTEXT = contextlib.nullcontext()
_STATE_KEYS = ("g_pos", "g_neg", "col_scale", "adc_full")
_READ_KEYS = ("w_read", "w_exact", "w_var")
_COUNTER_KEYS = ("rram_seed_", "read_calls", "program_events", "programmed_fp")
_MEMORY_ATTRS = ("long_term_memory", "short_term_memory")


class _CrossbarMixin(_LambdaController):
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
        # read-noise variance per weight (state-dependent models; empty when independent)
        self.register_buffer("w_var", torch.empty(0), persistent=False)  # type: ignore[attr-defined]
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
        self._w_fold = self._w_conv = self._w_conv_exact = self._w_conv_var = None
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
            # a new chip state: the ADC ranges are calibrated again at the next read
            self.adc_full = torch.empty(0, device=tiles.device, dtype=tiles.dtype)
            self.program_events = self.program_events + 1  # type: ignore[attr-defined]
            self._set_read_state(prog.w_read, tiles, prog.w_var)
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

    def _set_read_state(
        self, w_read: torch.Tensor, tiles: torch.Tensor, w_var: torch.Tensor | None = None
    ) -> None:
        dtype = tiles.dtype
        self.w_read = w_read.to(dtype)
        self.w_var = (
            torch.empty(0, device=tiles.device, dtype=dtype) if w_var is None else w_var.to(dtype)
        )
        if self.rram_config.correction == "first_order":
            # A's rows through the DAC (first-order correction's A x~ applies them as inputs
            # to the array that holds x~): each tile column over its largest |w| (the column
            # scale), rounded to the DAC's codes
            exact = tiles / self.col_scale.unsqueeze(1)  # type: ignore[attr-defined]
            bits = self.rram_config.dac_bits
            if bits is not None:
                exact = exact.mul_(quant_levels(bits)).round_()
            self.w_exact = exact.to(dtype)
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
        from .crossbar import chip_properties, read_back, read_variance

        with torch.inference_mode(False), torch.no_grad():
            cfg = self.rram_config
            g = torch.stack([self.g_pos, self.g_neg])  # type: ignore[attr-defined]
            _, stuck, nu = chip_properties(
                tuple(g.shape), cfg, cfg.device, self.rram_seed, g.device, g.dtype
            )
            del stuck  # stuck cells are already in the stored conductances
            tiles = self.weight_tiles(w).to(g.dtype)
            self._set_read_state(
                read_back(g, cfg, cfg.device, nu), tiles, read_variance(g, cfg, cfg.device, nu)
            )

    def _program_inputs(self, u: torch.Tensor) -> ProgrammedInputs:
        """Write normalised inputs ``u`` (values in [-1, 1]) onto cells for first-order
        correction (:func:`~sedma_torch.rram.crossbar.program_inputs`), counting the cells
        and pulses in the layer's statistics. Each call is a new write event."""
        event = getattr(self, "_input_writes", 0)
        self._input_writes = event + 1
        with torch.inference_mode(False), torch.no_grad():
            prog = program_inputs(u.detach(), self.rram_config, self.rram_seed, event)
        self.rram_stats.input_programming_pulses += prog.stats.pulses
        self.rram_stats.input_cells_programmed += prog.stats.cells
        return prog

    def _read_variance(self) -> torch.Tensor | None:
        """The read-noise variance per weight (T, R, C) of a state-dependent noise model, in
        normalised weight units squared; None for the state-independent model (whose
        variance is ``2 read_noise^2`` per weight)."""
        var = self.w_var  # type: ignore[attr-defined]
        return var if var.numel() else None

    def _ensure_programmed(self, weight: torch.Tensor) -> None:
        w = weight.detach()
        if self.__dict__.get("_hwa_error_model") is not None:  # noise injection (hwa.py)
            from .hwa import sample_chip_

            sample_chip_(self, w)
            return
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
            x, nonfinite, exponent = self._guard_input(x)
            if self.rram_config.adc_calibrated and not self.adc_full.numel():  # type: ignore[attr-defined]
                self._calibrate_adc(x)
            y = self._hardware_forward(x, weight.detach())
            if exponent is not None:  # undo the input's power-of-two scaling, per sample
                y = torch.ldexp(y, exponent.view(-1, *([1] * (y.ndim - 1))).to(y.dtype))
            if nonfinite is not None:
                y = y.masked_fill(nonfinite, float("nan"))
            return y

    def _guard_input(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What the read does with inputs a converter cannot digitise, so that it agrees
        with the digital layer in kind: ``(x', nonfinite, exponent)``.

        * NaN/Inf (only reachable with ``check_finite=False``): they are read as 0 and every
          output that depends on one is NaN (``nonfinite``, a mask broadcastable to the
          output), as in ``nn.Linear``/``nn.Conv2d`` -- a converter given NaN would otherwise
          clamp it to a finite code, or its range to NaN for the whole batch.
        * Huge magnitudes (a sample's max |x| beyond 2^32 in float32, 2^256 in float64):
          the sample is scaled by a power of two before the read and its output scaled
          back (``exponent``), which is exact in floating point and changes nothing of the
          simulated chip when the read is scale-equivariant (no fixed DAC range, no ADC
          range in input units). Without it squared inputs (the read-noise variance) or
          intermediate products overflow to inf where the digital layer is finite. Ranges
          fixed in input units saturate such inputs instead, as a chip does.
        """
        nonfinite = None
        if not self.rram_config.check_finite:
            finite = torch.isfinite(x)
            if not bool(finite.all()):
                nonfinite = self._nonfinite_outputs(~finite)
                x = x.masked_fill(~finite, 0.0)
        exponent = None
        if self._scale_equivariant():
            limit = (
                2.0**32 if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else 2.0**256
            )
            amax = x.detach().abs().amax(dim=tuple(range(1, x.ndim)))
            if bool((amax > limit).any()):
                _, e = torch.frexp(amax)
                exponent = torch.where(amax > limit, e, torch.zeros_like(e))
                x = torch.ldexp(x, (-exponent).view(-1, *([1] * (x.ndim - 1))).to(x.dtype))
        return x, nonfinite, exponent

    def _scale_equivariant(self) -> bool:
        """True when reading ``2^k x`` gives ``2^k`` times the read of ``x`` (same noise
        draws): the DAC (if any) ranges each vector itself and the ADC's range (if any) is
        per read or calibrated in DAC code units."""
        cfg = self.rram_config
        if cfg.dac_bits is not None and cfg.dac_range is not None:
            return False
        if cfg.adc_bits is None:
            return True
        if cfg.adc_range is not None:
            return False
        return not cfg.adc_calibrated or cfg.dac_bits is not None

    def _nonfinite_outputs(self, bad: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Mask of the outputs that depend on the inputs marked in ``bad`` (subclasses)."""
        raise NotImplementedError

    def calibrate_adc_(self, x: torch.Tensor) -> _CrossbarMixin:
        """Calibrate the ADC full scales now on calibration inputs ``x`` (a batch of what
        ``forward`` takes; its first ``calibration_rows`` rows or images are used) instead
        of the first batch read after programming. No effect unless the config's ADC is
        calibrated (``adc_bits`` set, ``adc_range=None``, ``adc_ranging="calibrated"``).
        The ranges stay until the layer is programmed again. Returns the layer."""
        if not self.rram_config.adc_calibrated:
            return self
        xin = self._calibration_input(x)
        if self.rram_config.check_finite:
            _check_finite(type(self).__name__, xin)
        with torch.no_grad():
            self._ensure_programmed(self.weight)
        if xin.shape[0]:
            self._calibrate_adc(xin)
        return self

    def _calibration_input(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``forward``'s input as the read takes it (subclasses)."""
        raise NotImplementedError

    def _calibrate_adc(self, x: torch.Tensor) -> None:
        """Set the ADC full scale of every physical tile (input tile t x column group g)
        once: the largest |partial sum| (DAC code units, no read noise) of the first
        ``calibration_rows`` rows (images) of ``x`` read through the programmed weights.
        Frozen until the layer is programmed again; later reads saturate beyond it."""
        cfg = self.rram_config
        with torch.inference_mode(False), torch.no_grad():
            u = self._calibration_partial_sums(x[: cfg.calibration_rows].detach())  # (T, N, C)
            t, n, c = u.shape
            n_ot = math.ceil(c / cfg.tile_cols)
            width = cfg.tile_cols if n_ot > 1 else c
            u = F.pad(u, (0, n_ot * width - c)).view(t, n, n_ot, width)
            full = u.abs().amax(dim=(1, 3))
            self.adc_full = torch.where(full > 0, full, torch.ones_like(full))
        self.rram_stats.adc_calibration_reads += n

    def _calibration_partial_sums(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """(T, N, C) partial sums of the rows of ``x`` in DAC code units (subclasses)."""
        raise NotImplementedError

    def _adc_ranges(self) -> torch.Tensor | None:
        """The calibrated ADC full scales (T, column groups) in DAC code units, or None when
        the ADC is per-read auto-ranged, has a fixed ``adc_range`` or is absent."""
        if not self.rram_config.adc_calibrated:
            return None
        full = self.adc_full  # type: ignore[attr-defined]
        return full if full.numel() else None

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
        if prefix + "g_pos" in state_dict and prefix + "adc_full" not in state_dict:
            # a checkpoint from before calibrated ADCs: calibrated at the next read
            state_dict[prefix + "adc_full"] = torch.empty(0)

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
        state.pop("_calibration_progress", None)  # the progress bar of one convert_
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
    def _native_ok(self, x: torch.Tensor, first_order_hybrid: bool = False) -> bool:
        """True when the compiled fused read (``native_rng.fused_read_``) applies:
        float32 on CPU, with an ADC, outside the opt-in fused read. First-order
        correction only with ``first_order_hybrid`` (a caller that runs its ``A x~`` read,
        which programs the inputs, in PyTorch and the two reads of the programmed matrix
        compiled)."""
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and self.rram_config.adc_bits is not None
            and not fused_read_on()
            and self.col_scale.dtype == torch.float32  # type: ignore[attr-defined]
            # first-order correction writes x~ onto cells and reads A through them: the
            # compiled reads do not program inputs
            and (first_order_hybrid or self.rram_config.correction != "first_order")
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
        buffer, what the read does): one read of the programmed matrix, or with
        first-order correction its two reads of the programmed matrix (``A~ x`` added to
        the ``A x~`` already in the output, ``A~ x~`` subtracted; the caller supplies x and
        x~ as their inputs). ``out_cols`` columns per tile share ADC groups of
        ``tile_cols``."""
        cfg = self.rram_config
        quantise = cfg.dac_bits is not None
        dac_levels = 1 if cfg.dac_bits is None else quant_levels(cfg.dac_bits)
        reads = [("w_read", quantise, 0)]
        if cfg.correction == "first_order":
            reads = [("w_read", quantise, 1), ("w_read", quantise, -1)]
        keys = self._epilogue_keys(sigma, gen, len(reads))
        adc_full = self._adc_ranges()  # calibrated full scales (T, groups) or None
        if adc_full is not None:
            adc_full = adc_full.to(torch.float32).contiguous()
        return [
            (
                weights,
                native_rng.ReadSpec(
                    group=cfg.tile_cols if out_cols > cfg.tile_cols else out_cols,
                    quantise=rounding,
                    # a state-dependent model's variance comes from w_var instead
                    noise_std=2**0.5 * sigma if self._read_variance() is None else 0.0,
                    levels=quant_levels(cfg.adc_bits),  # type: ignore[arg-type]
                    dac_levels=dac_levels,
                    fixed_full=None if cfg.adc_range is None else cfg.adc_range * dac_levels,
                    key=key,
                    mode=mode,
                    adc_full=adc_full,
                ),
            )
            for (weights, rounding, mode), key in zip(reads, keys, strict=True)
        ]

    def _run_fused_reads(self, sigma: float, gen: NoiseSource | None, read) -> None:
        """The reads of :meth:`_read_specs` with the compiled fused read:
        ``read(i, spec, packed weights, packed read-noise variances or None)`` for read
        ``i`` (the variances of a state-dependent noise model: both reads of the
        programmed matrix see its cells' noise)."""
        out_c = self.col_scale.shape[-1]  # type: ignore[attr-defined]
        noisy = sigma > 0 and self._read_variance() is not None
        for i, (weights, spec) in enumerate(self._read_specs(sigma, gen, out_c)):
            var = self._packed("w_var", spec.group) if noisy else None
            read(i, spec, self._packed(weights, spec.group), var)

    def _packed(self, name: str, group: int) -> torch.Tensor:
        """Buffer ``name`` (``w_read``, ``w_exact`` or ``w_var``) packed for the compiled read, cached
        until it changes (re-programming, loading, a device or dtype move)."""
        # read-noise variances pack for the bfloat16 variance product where it exists
        pack = native_rng.pack_variances if name == "w_var" else native_rng.pack_weights
        return self._derived(name, name, group, lambda weights: pack(weights, group))

    def _derived(self, slot: str, name: str, tag: Any, make) -> torch.Tensor:
        """``make(buffer name)``, kept under ``slot`` of the layer's derived-tensor cache
        until the buffer or ``tag`` changes; every re-programming, load and device or dtype
        move drops the whole cache (``_packed_cache``)."""
        weights = getattr(self, name)
        key = (weights.data_ptr(), weights._version, tuple(weights.shape), weights.dtype, tag)
        cache = self.__dict__.setdefault("_packed_cache", {})
        if cache.get(slot, (None,))[0] != key:
            cache.pop(slot, None)  # free the old copy first
            cache[slot] = (key, make(weights))
        return cache[slot][1]

    def _epilogue_keys(
        self, sigma: float, gen: NoiseSource | None, n_reads: int
    ) -> list[tuple[int, int]]:
        """Noise keys (two 31-bit words) of the ``n_reads`` compiled reads of one call."""
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
