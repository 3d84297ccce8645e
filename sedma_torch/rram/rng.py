"""Reproducible random streams: seeds derived from labels, fast Gaussian draws on CPU."""

from __future__ import annotations

import math
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the config seed and labels (stable across runs and platforms)."""
    text = "/".join(str(p) for p in parts).encode()
    return (zlib.crc32(text) << 31 | zlib.crc32(text[::-1])) & ((1 << 63) - 1)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class NoiseSource:
    """Gaussian draws for one forward call: reproducible from a seed, fast on CPU.

    Each draw gets its own seed derived from (seed, draw number). A large float32 draw on
    CPU comes from the compiled counter-based kernel of :mod:`.native_rng` (about 3x faster
    per core than PyTorch's MT19937 generator, which otherwise costs as much as the layer's
    matmul); without it, or for other dtypes, from PyTorch generators. On CPU a large draw
    is split into two halves with their own seeds, filled concurrently by two threads
    (both release the GIL). The split does not depend on the thread count, so results are
    identical with 1 or more threads.
    """

    _pool: ThreadPoolExecutor | None = None
    SPLIT_MIN = 1 << 15

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.draws = 0

    def next_seed(self) -> int:
        """The seed of the next draw (each draw, in any form, takes one)."""
        seed = derive_seed(self.seed, self.draws)
        self.draws += 1
        return seed

    def randn(self, shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        seed = self.next_seed()
        n = math.prod(shape)
        if device.type == "cpu" and dtype == torch.float32 and n >= self.SPLIT_MIN:
            from . import native_rng

            if n <= native_rng.MAX_ELEMENTS and native_rng.available():
                return _native_randn(n, seed).view(shape)
        if device.type != "cpu" or n < self.SPLIT_MIN:
            return torch.randn(
                shape, generator=make_generator(seed, device), device=device, dtype=dtype
            )
        out = torch.empty(n, device=device, dtype=dtype)
        halves = (out[: n // 2], out[n // 2 :])
        gens = [make_generator(derive_seed(seed, k), device) for k in (0, 1)]
        if torch.get_num_threads() > 1:
            if NoiseSource._pool is None:
                NoiseSource._pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="sedma-rng"
                )
            pending = NoiseSource._pool.submit(
                _fill_normal, halves[1], gens[1], torch.is_inference_mode_enabled()
            )
            halves[0].normal_(generator=gens[0])
            pending.result()
        else:
            for half, gen in zip(halves, gens, strict=True):
                half.normal_(generator=gen)
        return out.view(shape)


def _native_randn(n: int, seed: int) -> torch.Tensor:
    """``n`` float32 normals from the compiled kernel (:mod:`.native_rng`): two halves
    keyed by seeds derived from ``seed`` (the same split as the MT19937 path)."""
    from .native_rng import fill_normal_

    out = torch.empty(n, dtype=torch.float32)
    halves = (out[: n // 2], out[n // 2 :])
    keys = [derive_seed(seed, "native", k) for k in (0, 1)]
    words = [seed_pair(key) for key in keys]
    # Both halves on this thread: a worker thread would compete with the OpenMP workers of
    # the surrounding matmuls, which spin after each call (measured slower on 2 cores).
    for half, (lo, hi) in zip(halves, words, strict=True):
        fill_normal_(half, lo, hi)
    return out


def _fill_normal(out: torch.Tensor, generator: torch.Generator, inference: bool) -> None:
    """``out.normal_`` on a worker thread, in the caller's inference mode (grad mode and
    inference mode are thread-local; an inference tensor may only be written in it)."""
    with torch.inference_mode(inference):
        out.normal_(generator=generator)


def randn_split(
    shape, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normals for ``shape`` drawn reproducibly from ``generator``: one seed is
    taken from it and the draw is made by a :class:`NoiseSource` (two threads on CPU)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return NoiseSource(seed).randn(shape, torch.device(device), dtype)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Bijective 32-bit xorshift-multiply hash on int32 lanes (wrapping multiplies; the
    right shifts are made logical with masks)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x2C1B3C6D
    return x ^ ((x >> 16) & 0xFFFF)


def hash_normal(shape, seed: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normals that are a pure function of (seed, element index): a counter-based
    generator that compiles into the kernel that uses it (no separate pass, no state).

    ``seed`` is an int32 tensor of two independent 31-bit words. Each element hashes its
    index twice (two keyed bijections), giving two 24-bit uniforms for Box-Muller.
    """
    index = torch.arange(math.prod(shape), device=device, dtype=torch.int32)
    return hash_normal_at(index, seed, dtype).view(shape)


def hash_normal_at(index: torch.Tensor, seed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``hash_normal`` for given element indices (int32): the draw of element i is the same
    whatever other elements are computed with it."""
    i2 = index * 2
    lo, hi = seed[0], seed[1]
    h1 = _hash32(_hash32(i2 + lo) ^ hi)
    h2 = _hash32(_hash32(i2 + 1 + lo) ^ hi)
    u1 = (((h1 >> 8) & 0xFFFFFF).to(dtype) + 0.5) * (1.0 / 16777216.0)
    u2 = ((h2 >> 8) & 0xFFFFFF).to(dtype) * (1.0 / 16777216.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def seed_pair(seed: int) -> tuple[int, int]:
    """Two 31-bit words of a derived seed: the key of the counter-based streams."""
    return seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF


def seed_words(seed: int, device) -> torch.Tensor:
    """:func:`seed_pair` as the int32 tensor ``hash_normal`` takes."""
    return torch.tensor(seed_pair(seed), dtype=torch.int32, device=device)


__all__ = [
    "NoiseSource",
    "derive_seed",
    "hash_normal",
    "hash_normal_at",
    "make_generator",
    "randn_split",
    "seed_pair",
    "seed_words",
]
