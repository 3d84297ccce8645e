"""Weight fingerprints (sedma_torch.rram.fingerprint): the C and PyTorch implementations
against a NumPy transcription of the documented formula, and the detection guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sedma_torch.rram import fingerprint as fp
from sedma_torch.rram import native_rng


def numpy_bytes_fingerprint(t: torch.Tensor) -> int:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: the same bytes as int16
        t = t.view(torch.int16)
    raw = np.frombuffer(t.numpy().tobytes(), dtype=np.uint8)
    raw = np.concatenate([raw, np.zeros((-raw.size) % 4, dtype=np.uint8)])
    w = raw.view("<u4").astype(np.uint64)
    i = np.arange(1, w.size + 1, dtype=np.uint64)
    m = np.uint64(0xFFFFFFFF)
    a = ((w ^ ((i * np.uint64(0x9E3779B9)) & m)) * np.uint64(0x7FEB352D)) & m
    a ^= a >> np.uint64(15)
    b = ((a ^ (a >> np.uint64(13))) * np.uint64(0x846CA68B)) & m
    lo = int(a.sum(dtype=np.uint64)) & 0xFFFFFFFF
    hi = int(b.sum(dtype=np.uint64)) & 0xFFFFFFFF
    return (hi << 32) | lo


BACKENDS = [
    "torch",
    pytest.param("c", marks=pytest.mark.skipif(not native_rng.available(), reason="no C compiler")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, n",
    [
        (torch.float32, 1),
        (torch.float32, 1000),
        (torch.float32, (1 << 18) + 3),
        (torch.float16, 7),
        (torch.bfloat16, 10),
        (torch.float64, 33),
        (torch.int8, 5),
    ],
)
def test_fingerprint_equals_the_numpy_formula(backend, dtype, n):
    g = torch.Generator().manual_seed(n)
    t = (torch.randn(n, generator=g) * 50).to(dtype)
    assert fp.bytes_fingerprint(t, backend) == numpy_bytes_fingerprint(t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_starting_mid_word_and_non_contiguous_tensors(backend):
    t = torch.randn(9, 5, generator=torch.Generator().manual_seed(1)).half()
    for view in (t[1:], t.t(), t[:, 1:]):
        assert fp.bytes_fingerprint(view, backend) == numpy_bytes_fingerprint(view.contiguous())


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_single_element_change_changes_the_fingerprint(backend):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(257, generator=g)
    base = fp.fingerprint(w, backend)
    for i in range(w.numel()):
        for new in (w[i].item() * (1 + 2**-23), 0.0, -w[i].item()):
            if new == w[i].item():
                continue
            v = w.clone()
            v[i] = new
            assert fp.fingerprint(v, backend) != base, (i, new)


def test_swaps_permutations_dtype_and_shape_change_the_fingerprint():
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    seen = {fp.fingerprint(w)}
    for other in (
        w.flip(0),
        w[[1, 0, 2, 3, 4, 5]],
        w.reshape(4, 6),
        w.double(),
        w.t().contiguous(),
    ):
        value = fp.fingerprint(other)
        assert value not in seen
        seen.add(value)
    assert fp.fingerprint(w.clone()) == fp.fingerprint(w)
    assert -(1 << 63) <= fp.fingerprint(w) < (1 << 63)  # fits an int64 buffer


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        fp.bytes_fingerprint([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        fp.bytes_fingerprint(torch.ones(2), "gpu")
