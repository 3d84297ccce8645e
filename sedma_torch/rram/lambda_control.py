"""The adaptive-lambda controller of the RRAM layers (``denoise="adaptive"``).

:class:`_LambdaController` is a mixin of :class:`~sedma_torch.rram.state._CrossbarMixin`
(so of every RRAM layer): it picks the lambda of each denoised forward call, calibrating
it against exact products from time to time, and connects it to the dual memory
(:meth:`~_LambdaController.attach_memory`). The ``LAMBDA_*`` / ``CONVERGED_*`` constants
set when it counts as converged.

Part of the split of :mod:`sedma_torch.rram.layers` (which re-exports all of it).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .correction import LambdaErrorStats, default_lambda_grid
from .fingerprint import fingerprint

if TYPE_CHECKING:
    from torch import nn

    from .config import RRAMConfig

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
LAMBDA_LOG_FLOOR = float(default_lambda_grid()[1])
"""Smallest positive point of ``default_lambda_grid()`` (1e-4): in the log-scale mix of
lam_memory and lam_recent a lambda below it (the grid's 0) counts as this value."""


CALIBRATION_MAX_VECTORS = 4096
"""A calibration scores the lambda grid on at most this many output vectors (rows of a
linear layer, pixels of a convolution: its last dimension is the one denoised). A conv
layer's ``calibration_rows`` images hold H*W vectors each (12,544 per image in a
ResNet-18 stem at 224x224), far more than the error estimate needs; above the cap a
uniform sample without replacement is taken, drawn from a generator seeded by the layer
seed and the calibration step (no global RNG state is touched, so reruns repeat it).
4096 vectors of n >= 2 outputs give a relative error whose sampling error is ~1/sqrt(4096)
= 1.6% per grid point, smaller than the curve's differences that decide lambda; the exact
products are still computed for all the rows, so the denoised outputs and
``reference_products`` do not change."""
CALIBRATION_PROGRESS_DELAY_S = 1.0
"""The first calibrations of a converted model's layers (during its first forward pass)
show one tqdm bar, ``calibrating lambda``, once they have taken this long (on a terminal
only: tqdm's ``disable=None``)."""


class CalibrationProgress:
    """The progress bar of the first calibrations of the layers that one ``convert_``
    converted (``convert_`` sets it as each layer's ``_calibration_progress``).

    The bar opens at the first layer's first calibration with one step per layer still
    uncalibrated, appears after :data:`CALIBRATION_PROGRESS_DELAY_S`, and closes when the
    last of them has calibrated. Copies (deepcopy, pickling) carry none.
    """

    def __init__(self, layers: Any = ()) -> None:
        import weakref

        self._layers = [weakref.ref(layer) for layer in layers]
        self._bar: Any = None

    def __getstate__(self) -> dict:
        return {"_layers": [], "_bar": None}

    def _pending(self) -> int:
        return sum(
            1
            for ref in self._layers
            if (layer := ref()) is not None
            and layer.rram_config.denoise == "adaptive"
            and layer._lambda_recent is None
        )

    def start(self) -> None:
        """Before a layer's first calibration: open the bar when none is open."""
        if self._bar is None:
            total = self._pending()
            if total <= 1:
                return
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                desc="calibrating lambda",
                unit="layer",
                leave=False,
                delay=CALIBRATION_PROGRESS_DELAY_S,
                disable=None,
            )

    def done(self) -> None:
        """After a layer's first calibration."""
        bar = self._bar
        if bar is None:
            return
        bar.update(1)
        if bar.n >= bar.total:
            bar.close()
            self._bar = None


def mix_lambda(lam_memory: float, lam_recent: float, alpha: float) -> float:
    """lam_t = exp(alpha log lam_memory + (1 - alpha) log lam_recent): the weighted geometric
    mean, i.e. the linear mix on the log scale of the lambda grid.

    A lambda below :data:`LAMBDA_LOG_FLOOR` (0 on the grid) enters as the floor, so
    0 mixed with 1 at alpha = 0.5 gives 1e-2, not 0. Exact cases: alpha = 1 gives
    lam_memory, alpha = 0 gives lam_recent, equal inputs give that value (0 stays 0).
    """
    if alpha >= 1 or lam_memory == lam_recent:
        return lam_memory
    if alpha <= 0:
        return lam_recent
    lm = math.log(max(lam_memory, LAMBDA_LOG_FLOOR))
    lr = math.log(max(lam_recent, LAMBDA_LOG_FLOOR))
    return math.exp(alpha * lm + (1 - alpha) * lr)


class _LambdaController:
    """The adaptive lambda of a layer: :meth:`_lambda` per call, :meth:`_calibrate` every
    ``calibration_interval`` calls, the dual memory of :meth:`attach_memory`.

    Its state (``_lambda_recent``, ``_calls_since_calibration``, ``_recent_history``,
    ``_lambda_looked_up``, ``_workload``, ``calibration_steps``, ``lambda_converged``,
    ``last_lambda``, ``last_calibration_error``, ``lambda_memory``, ``long_term_memory``,
    ``short_term_memory``) is set up by ``_CrossbarMixin._rram_init`` and reset by
    ``reconfigure_``; it also reads the layer's ``rram_config``, ``rram_seed``, ``weight``,
    ``_programmed_fp`` and ``_transposed_weight``, and counts its digital reference
    products in ``rram_stats``.
    """

    if TYPE_CHECKING:  # for type checkers only: the attributes named above
        rram_config: RRAMConfig
        rram_stats: Any
        weight: nn.Parameter
        _programmed_fp: int | None
        _lambda_recent: float | None
        _calls_since_calibration: int
        _recent_history: list[int]
        _lambda_looked_up: bool
        _workload: tuple[tuple, str] | None
        calibration_steps: int
        lambda_converged: bool
        last_lambda: float | None
        last_calibration_error: float | None
        lambda_memory: float | None
        long_term_memory: Any
        short_term_memory: Any

        @property
        def rram_seed(self) -> int: ...

    def attach_memory(self, long_term: Any = None, short_term: Any = None) -> None:
        """Connect the adaptive lambda to the dual memory.

        Args:
            long_term: a :class:`sedma_torch.memory.LongTermMemory` (or anything with
                ``best_lambda(material, workload)`` / ``record_lambda(material, workload,
                lam, error)``): the lambda that did best recently for (material, workload
                type) is read at the first calibration as ``lambda_memory``, and every
                calibration writes its lambda and error back. None: no long-term memory.
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
        exact product ``reference(rows)`` (on at most :data:`CALIBRATION_MAX_VECTORS` of
        their output vectors, a seeded sample): the relative error of ``denoise(p, lam)`` for
        every lam on ``default_lambda_grid()`` enters the short-term windows, and
        lam_recent is the grid point with the lowest windowed mean error. Then
        lam_t = exp(alpha log lam_memory + (1 - alpha) log lam_recent) (the mix on the log
        scale of the grid, :func:`mix_lambda`; lam_memory is the lambda that did best
        recently for (material, workload type) in long-term memory, read at the first
        calibration, or lam_recent alone when there is none), and (lam_t, its error) is
        written back to long-term memory.
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
        return mix_lambda(self.lambda_memory, self._lambda_recent, self.rram_config.denoise_alpha)

    def _calibrate(self, p: torch.Tensor, reference) -> None:
        """One calibration: the lambda grid scored on this call's outputs (see
        :meth:`_lambda`), on at most :data:`CALIBRATION_MAX_VECTORS` output vectors, from
        per-bin spectral statistics computed once (:class:`~.correction.LambdaErrorStats`:
        every candidate, and the error at lam_t, cost O(n) after one FFT pass)."""
        first = self._lambda_recent is None
        progress = getattr(self, "_calibration_progress", None) if first else None
        if progress is not None:
            progress.start()
        try:
            self._calibrate_lambda(p, reference)
        finally:
            if progress is not None:
                progress.done()

    def _calibrate_lambda(self, p: torch.Tensor, reference) -> None:
        cfg = self.rram_config
        rows = min(cfg.calibration_rows, p.shape[0])
        ref = reference(rows)
        # the digital products calibration costs: one per output vector (row, or pixel)
        self.rram_stats.reference_products += ref.numel() // max(ref.shape[-1], 1)
        n = max(p.shape[-1], 1)
        got, ref = p[:rows].reshape(-1, n), ref.reshape(-1, n)
        if got.shape[0] > CALIBRATION_MAX_VECTORS:
            gen = torch.Generator().manual_seed(
                (self.rram_seed * 1_000_003 + self.calibration_steps) % (2**63)
            )
            pick = torch.randperm(got.shape[0], generator=gen)[:CALIBRATION_MAX_VECTORS]
            pick = pick.to(got.device)
            got, ref = got[pick], ref[pick]
        errors = LambdaErrorStats(got, ref)
        grid, mse = errors.mse()
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
        err_t = float(errors.mse([lam_t])[1][0]) / max(power, 1e-300)
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
