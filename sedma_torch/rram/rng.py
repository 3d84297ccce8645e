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

    Each draw gets its own generator seeded from (seed, draw number). On CPU a large draw
    is split into two halves with their own generators, filled concurrently by two
    threads (torch releases the GIL): MT19937 normal generation is serial and otherwise
    costs as much as the layer's matmul. The split does not depend on the thread count,
    so results are identical with 1 or more threads.
    """

    _pool: ThreadPoolExecutor | None = None
    SPLIT_MIN = 1 << 15

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.draws = 0

    def randn(self, shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        seed = derive_seed(self.seed, self.draws)
        self.draws += 1
        n = math.prod(shape)
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
            pending = NoiseSource._pool.submit(halves[1].normal_, generator=gens[1])
            halves[0].normal_(generator=gens[0])
            pending.result()
        else:
            for half, gen in zip(halves, gens, strict=True):
                half.normal_(generator=gen)
        return out.view(shape)


def randn_split(
    shape, generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normals for ``shape`` drawn reproducibly from ``generator``: one seed is
    taken from it and the draw is made by a :class:`NoiseSource` (two threads on CPU)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return NoiseSource(seed).randn(shape, torch.device(device), dtype)


__all__ = ["NoiseSource", "derive_seed", "make_generator", "randn_split"]
