"""What the adaptive-lambda calibration costs (issue 15 item 3): it scores the lambda grid
on a bounded, seeded sample of output vectors from per-bin spectral statistics, still
picks the lambda the full data would, and shows one progress bar per converted model."""

from __future__ import annotations

import copy
import pickle
from typing import ClassVar

import torch
from torch import nn

import sedma_torch as st
from sedma_torch.rram import lambda_control
from sedma_torch.rram.correction import LambdaErrorStats, default_lambda_grid, denoise
from sedma_torch.rram.lambda_control import CALIBRATION_MAX_VECTORS


def _smooth_pair(batch: int, n: int, noise: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(batch, n, generator=gen, dtype=torch.float64).cumsum(-1)
    return ref + noise * torch.randn(batch, n, generator=gen, dtype=torch.float64), ref


def test_lambda_error_statistics_equal_the_brute_force_errors():
    p, ref = _smooth_pair(40, 33, 0.3)
    grid, mse = LambdaErrorStats(p.view(8, 5, 33), ref.view(8, 5, 33)).mse()
    brute = torch.stack([((denoise(p, float(lam)) - ref) ** 2).mean() for lam in grid])
    torch.testing.assert_close(mse, brute, rtol=1e-10, atol=1e-12)
    # lam = 0 of identical inputs is exactly 0 (no cancellation in the E = S - R form)
    assert float(LambdaErrorStats(ref, ref).mse([0.0])[1][0]) == 0.0
    assert torch.equal(grid, default_lambda_grid())


def _conv(cfg: st.RRAMConfig) -> st.RRAMConv2d:
    torch.manual_seed(0)
    return st.RRAMConv2d.from_conv(nn.Conv2d(4, 32, 3, padding=1), config=cfg, seed=5)


def test_conv_calibration_scores_a_bounded_seeded_sample(monkeypatch):
    cfg = st.RRAMConfig(
        material="taox_hfox", dac_bits=None, adc_bits=None, denoise="adaptive", seed=1
    )
    seen: list[int] = []
    real_init = LambdaErrorStats.__init__

    def spy(self, p, reference):
        seen.append(p.reshape(-1, p.shape[-1]).shape[0])
        real_init(self, p, reference)

    monkeypatch.setattr(LambdaErrorStats, "__init__", spy)
    x = torch.randn(2, 4, 64, 64)  # 2 * 64 * 64 = 8192 output pixels > the cap
    lams = []
    for _ in range(2):
        layer = _conv(cfg)
        with torch.no_grad():
            layer(x)
        lams.append(layer.last_lambda)
        # the exact products are still counted for every pixel of the calibration images
        assert layer.rram_stats.reference_products == 2 * 64 * 64
    assert seen == [CALIBRATION_MAX_VECTORS, CALIBRATION_MAX_VECTORS]
    assert lams[0] == lams[1]  # the sample is seeded: a rerun picks the same lambda


def test_sampled_calibration_picks_a_lambda_as_good_as_the_full_data():
    p, ref = _smooth_pair(6 * CALIBRATION_MAX_VECTORS, 64, 2.0, seed=3)
    _, full = LambdaErrorStats(p, ref).mse()
    pick = torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(0))
    pick = pick[:CALIBRATION_MAX_VECTORS]
    _, sample = LambdaErrorStats(p[pick], ref[pick]).mse()
    chosen = int(torch.argmin(sample))
    assert full[chosen] <= 1.02 * full.min()
    assert full.max() > 2 * full.min()  # the curve does decide lambda here


class _FakeBar:
    made: ClassVar[list[_FakeBar]] = []

    def __init__(self, total, **kwargs):
        self.total, self.kwargs, self.n, self.closed = total, kwargs, 0, False
        _FakeBar.made.append(self)

    def update(self, k=1):
        self.n += k

    def close(self):
        self.closed = True


def test_first_calibrations_of_a_converted_model_share_one_delayed_bar(monkeypatch):
    import tqdm.auto

    _FakeBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _FakeBar)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten())
    model.append(nn.Linear(8 * 4 * 4, 10))
    st.convert_(model, st.preset("corrected"), progress=False)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
        model(torch.randn(2, 3, 8, 8))  # later calls are no first calibrations: no new bar
    assert len(_FakeBar.made) == 1
    bar = _FakeBar.made[0]
    assert bar.total == 3 and bar.n == 3 and bar.closed
    assert bar.kwargs["delay"] == lambda_control.CALIBRATION_PROGRESS_DELAY_S == 1.0
    assert bar.kwargs["disable"] is None  # tqdm's: no bar when stderr is not a terminal
    # copies carry no bar (a tqdm bar does not pickle)
    layer = model[0]
    assert "_calibration_progress" not in pickle.loads(pickle.dumps(layer)).__dict__
    assert "_calibration_progress" not in copy.deepcopy(layer).__dict__
