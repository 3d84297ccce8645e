"""Content fingerprints of weights: how an RRAM layer knows its crossbar is current.

A layer records the fingerprint of the weight it programmed and compares it with the
fingerprint of its weight at every forward pass (and after ``load_state_dict``, device
moves, ...). A fingerprint reads the weight's bytes, so it sees every way a weight can
change, including those that bypass PyTorch's version counter (``weight.data`` edits,
fused optimizers, parametrizations, ``to_empty``).

The function (written out in ``kernels/fingerprint.c``): the bytes as little-endian
32-bit words ``w_i`` (the last zero padded); in 32-bit arithmetic
``a_i = xs15((w_i ^ K (i + 1)) M1)`` and ``b_i = (a_i ^ (a_i >> 13)) M2``
(``xs15(a) = a ^ (a >> 15)``); the fingerprint is ``(sum b_i) * 2^32 + (sum a_i)``
(sums mod 2^32), mixed with the dtype and shape. ``w_i -> a_i`` is a bijection, so a change
of any single word is always detected; other changes collide with probability about 2^-64.

CPU tensors use the compiled C function (one pass at memory speed, about 0.25 ms per
million float32 weights on two cores); CUDA tensors, or CPU without a C compiler /
with ``SEDMA_NATIVE_RNG=0``, use the same function in PyTorch integer arithmetic (same
value on every device, so a fingerprint stored in a state dict is valid anywhere).
"""

from __future__ import annotations

import ctypes
import hashlib
from importlib import resources

import torch

from . import native_rng

_MASK = 0xFFFFFFFF
_K, _M1, _M2 = 0x9E3779B9, 0x7FEB352D, 0x846CA68B


def _source() -> str:
    return resources.files("sedma_torch.rram").joinpath("kernels/fingerprint.c").read_text()


def _declare(lib: ctypes.CDLL) -> None:
    lib.sedma_fingerprint.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.sedma_fingerprint.restype = ctypes.c_uint64


_LIB = native_rng.LazyLibrary("fingerprint", _source(), _declare, "compiled fingerprint")


def _words(t: torch.Tensor) -> torch.Tensor:
    """The bytes of contiguous ``t`` as uint32 values in an int64 tensor."""
    raw = t.reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    elif raw.storage_offset() % 4:  # a view that starts mid-word: realign
        raw = raw.clone()
    return raw.view(torch.int32).to(torch.int64) & _MASK


def _torch_bytes_fingerprint(t: torch.Tensor) -> int:
    words = _words(t)
    idx = torch.arange(1, words.numel() + 1, device=words.device, dtype=torch.int64)
    a = ((words ^ ((idx * _K) & _MASK)) * _M1) & _MASK  # int64 products wrap: low bits exact
    a ^= a >> 15
    b = ((a ^ (a >> 13)) * _M2) & _MASK
    lo = int(a.sum()) & _MASK  # < n 2^32: fits int64 for n < 2^31 words
    hi = int(b.sum()) & _MASK
    return (hi << 32) | lo


def bytes_fingerprint(t: torch.Tensor, backend: str = "auto") -> int:
    """The 64-bit fingerprint of the bytes of ``t`` (in its logical, row-major order).

    ``backend``: ``"auto"`` (C on CPU when available), ``"c"`` or ``"torch"``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"bytes_fingerprint: expected a torch.Tensor, got {type(t).__name__}")
    if backend not in ("auto", "c", "torch"):
        raise ValueError(f"bytes_fingerprint: backend must be auto, c or torch, got {backend!r}")
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return 0
    lib = _LIB.get() if backend != "torch" and t.device.type == "cpu" else None
    if backend == "c" and lib is None:
        raise RuntimeError("bytes_fingerprint: the compiled fingerprint is unavailable here")
    if lib is None:
        return _torch_bytes_fingerprint(t)
    return int(lib.sedma_fingerprint(ctypes.c_void_p(t.data_ptr()), t.numel() * t.element_size()))


def fingerprint(t: torch.Tensor, backend: str = "auto") -> int:
    """Fingerprint of ``t``'s content, dtype and shape, as a signed 64-bit integer (so that
    it fits an int64 buffer of a state dict)."""
    head = hashlib.blake2b(f"{t.dtype}|{tuple(t.shape)}".encode(), digest_size=8).digest()
    value = bytes_fingerprint(t, backend) ^ int.from_bytes(head, "little")
    return value - (1 << 64) if value >= (1 << 63) else value


__all__ = ["bytes_fingerprint", "fingerprint"]
