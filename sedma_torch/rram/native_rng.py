"""Compiled CPU kernels, built once per machine from C and used through ctypes: a fast
Gaussian stream and the fused crossbar read.

**Gaussian stream.** Per-tile read noise needs one normal per tile output (T x batch x
outputs), and PyTorch's CPU generator (MT19937, serial) costs about as much as the layer's
matmul. This is a counter-based generator that the C compiler vectorises (8 lanes with
AVX2, glibc's libmvec for ``logf``/``cosf``): about 3x faster per core than
``Tensor.normal_`` here. Pair ``p`` of a draw keyed by two 31-bit words ``(lo, hi)``
hashes the 64-bit counters ``2p`` and ``2p + 1`` with two rounds of a 32-bit integer hash
each, ``h(h(i_lo + lo) ^ hi ^ h(i_hi))`` for the low and high 32 bits ``i_lo``, ``i_hi``
of counter ``i`` (``h``: the bijective xorshift-multiply ``lowbias32``; ``h(0) = 0``, so
below ``2^32`` this is ``h(h(i + lo) ^ hi)``; each 2^32 counters further on, ``h(i_hi)``
changes the key word, so the stream never repeats: counters ``i`` and ``i + 2^32 k`` never
share a hash), takes 24-bit uniforms ``u1`` in (0, 1) and ``u2`` in [0, 1) and returns the
Box-Muller pair
``r cos(2 pi u2)`` and ``r sin(2 pi u2)``, ``r = sqrt(-2 ln u1)``, with the sine taken as
``sign * sqrt(1 - cos^2)`` (absolute error below 4e-4 near the zeros of the sine). The
first output of pair p goes to ``out[p]``, the second to ``out[n // 2 + p]``
(:func:`fill_normal_`'s ``offset`` starts at pair ``offset`` instead of 0). The tests
check it against a NumPy reimplementation and for mean, variance, normality and
independence.

**Fused crossbar read** (:func:`fused_read_`, :func:`fused_conv_read_`). A simulated
crossbar read is a matmul per input tile followed by elementwise passes (read noise, ADC,
de-quantisation, column scale, tile sum) over T partial sums per output: run apart, the
passes cost more than the matmul and the partial sums T outputs of memory. Here the matmul
is a packed-panel GEMM with a 6 x 16 AVX2/FMA register block, or 6 x 32 (two strips) on
AVX-512 CPUs (built with ``-mavx512f`` there unless ``SEDMA_NATIVE_AVX512=0``; about the
speed of the BLAS ``sgemm`` behind ``nn.Linear``), and each block of partial sums goes
through the whole epilogue while it is in L1 cache. The input DAC runs while the input is
packed, and a convolution's windows are gathered there too (implicit im2col). Tests check
it against a float64 NumPy reference of the read, noise stream included.

The library is built from ``kernels/fused_read.c`` (package data; the shared helpers of
``kernels/sedma_inline.h`` spliced in by :func:`kernel_source`) with the system C compiler
(``cc``, or ``$CC``) into ``$SEDMA_CACHE_DIR`` (default ``~/.cache/sedma_torch``) the first
time it is needed (about 1.5 s). Without a compiler, or with ``SEDMA_NATIVE_RNG=0``,
callers fall back to PyTorch (same distributions, other noise streams).

**Operand checks.** The C code trusts its arguments, so every wrapper that hands it
pointers (:func:`fill_normal_`, :func:`pack_weights`, :func:`tile_absmax`,
:func:`fused_read_`, :func:`fused_conv_read_`, and those of
:mod:`~sedma_torch.rram.native_depthwise` and :mod:`~sedma_torch.rram.native_program`)
first checks everything it is given -- dtype, CPU, contiguity and strides, shapes
consistent with each other, kernel size / stride / dilation / tile sizes >= 1, output
sizes that follow from the input's, sizes, index products and noise counters below
:data:`INDEX_LIMIT` -- and raises ``ValueError`` naming the operand. Reads of no rows return
at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import numbers
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

INLINE_HEADER = "sedma_inline.h"
"""The header of C helpers shared by the compiled kernels, in ``kernels/`` next to them."""


def kernel_text(filename: str) -> str:
    """The text of the C file ``kernels/<filename>`` (package data of ``sedma_torch.rram``)."""
    return resources.files("sedma_torch.rram").joinpath(f"kernels/{filename}").read_text()


C_INLINE = kernel_text(INLINE_HEADER)
"""C helpers shared by the compiled kernels (sedma_torch.rram.native_*), the text of
``kernels/sedma_inline.h``: the ``lowbias32`` hash ``h32``, ``key_hi``, ``pairs_in_run``
and inline float32 ``ln``, ``ln1p``, ``em1``, ``sincos_turn`` / ``cos_turn``."""


def kernel_source(filename: str) -> str:
    """The C translation unit built from ``kernels/<filename>``: its text with the one line
    ``#include "sedma_inline.h"`` replaced by the header's text (:data:`C_INLINE`).

    The splice is textual, so :func:`build_library` compiles one self-contained source (no
    include path) and its cache key, a hash of that text, covers the header too."""
    text = kernel_text(filename)
    include = f'#include "{INLINE_HEADER}"'
    if text.count(include) != 1:
        raise ValueError(f"kernels/{filename}: expected one line {include}")
    return text.replace(include, C_INLINE)


_SOURCE = kernel_source("fused_read.c")
"""The C source of the normal stream, packed GEMM fused read and tile_absmax."""

INDEX_LIMIT = 1 << 62
"""Bound on every size, index product and noise counter handed to the compiled kernels:
they compute in int64 (counters in uint64), with room for a sum of two such values."""

MAX_ELEMENTS = INDEX_LIMIT
"""Largest draw (and largest first pair counter plus pairs): the counters are 64-bit."""


def _flags(openmp: bool, bf16: bool = True) -> list[str]:
    # -fopenmp: the kernels run on OpenMP threads. PyTorch has loaded its own
    # libgomp.so.1 by then, so the kernel shares PyTorch's thread pool and thread count.
    # Without OpenMP support the same source builds single-threaded (-fopenmp-simd).
    flags = ["-O3", "-ffast-math", "-fopenmp" if openmp else "-fopenmp-simd", "-fPIC", "-shared"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512" and os.environ.get("SEDMA_NATIVE_AVX512", "1") != "0":
        flags += ["-mavx512f"]
        # the read-noise variance product in bfloat16 (kernels/fused_read.c, kernel_bf16)
        if bf16 and _cpu_has_avx512_bf16() and os.environ.get("SEDMA_NATIVE_BF16", "1") != "0":
            flags += ["-mavx512bf16"]
    return flags


def _cpu_has_avx512_bf16() -> bool:
    """Whether this CPU executes AVX512_BF16 (``vdpbf16ps``): the ``avx512_bf16`` flag of
    ``/proc/cpuinfo`` (Linux; False elsewhere, which keeps the float32 variance product)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


def _compile(compiler: str, flags: list[str], source_text: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "kernel.c"
        source.write_text(source_text)
        built = Path(tmp) / "kernel.so"
        subprocess.run(
            [compiler, *flags, str(source), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: concurrent builders never see half a file


def build_library(name: str, source: str) -> ctypes.CDLL | None:
    """Compile C ``source`` (once per machine: the file name carries a hash of source,
    flags and compiler) into ``$SEDMA_CACHE_DIR/<name>_<hash>.so`` and load it; ``None``
    where there is no C compiler (or not Linux). Built with OpenMP when the compiler has
    it, else single-threaded (``-fopenmp-simd``); with the bfloat16 variance product where
    the CPU has it, else (a compiler without ``-mavx512bf16``) without. Raises ``OSError`` /
    ``subprocess.SubprocessError`` when the build fails; callers fall back to PyTorch."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        return None
    cache = Path(os.environ.get("SEDMA_CACHE_DIR", Path.home() / ".cache" / "sedma_torch"))
    tries = [_flags(openmp, bf16) for openmp in (True, False) for bf16 in (True, False)]
    tries = [f for i, f in enumerate(tries) if f not in tries[:i]]  # bf16 may not apply
    for i, flags in enumerate(tries):
        key = hashlib.sha256((source + " ".join(flags) + compiler).encode()).hexdigest()[:16]
        target = cache / f"{name}_{key}.so"
        if target.exists():
            break
        try:
            _compile(compiler, flags, source, target)
            break
        except subprocess.CalledProcessError:
            if i == len(tries) - 1:
                raise
    return ctypes.CDLL(str(target))


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, u32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32, ctypes.c_void_p
    fn = lib.sedma_normal_f32
    fn.argtypes = [ptr, i64, u32, u32, ctypes.c_uint64]
    fn.restype = None
    lib.sedma_packed_size.argtypes = [i64, i64, i64, i64]
    lib.sedma_packed_size.restype = i64
    lib.sedma_pack_weights_f32.argtypes = [ptr, i64, i64, i64, i64, ptr]
    lib.sedma_pack_weights_f32.restype = None
    lib.sedma_bf16_variance.argtypes = []
    lib.sedma_bf16_variance.restype = ctypes.c_int
    lib.sedma_packed_var_bf16_size.argtypes = [i64, i64, i64, i64]
    lib.sedma_packed_var_bf16_size.restype = i64
    lib.sedma_pack_var_bf16.argtypes = [ptr, i64, i64, i64, i64, ptr]
    lib.sedma_pack_var_bf16.restype = None
    fused = lib.sedma_fused_read_f32
    fused.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ctypes.c_int, i64, ctypes.c_int, ptr, f32]
    fused.argtypes += [ptr, f32, f32]
    fused.argtypes += [f32, ptr]
    fused.argtypes += [u32, u32, ptr, i64, ctypes.c_int, i64]
    fused.restype = ctypes.c_int
    lib.sedma_tile_absmax_f32.argtypes = [ptr, i64, i64, i64, i64, i64, ptr]
    lib.sedma_tile_absmax_f32.restype = None


class LazyLibrary:
    """A C library built (:func:`build_library`) and loaded on first use, thread-safe.

    ``declare`` sets the ctypes signatures. ``get()`` returns the library, or None with
    ``SEDMA_NATIVE_RNG=0``, without a C compiler, or when the build failed (which warns
    once, naming ``what``); callers then take their PyTorch path."""

    def __init__(self, name: str, source: str, declare, what: str) -> None:
        self.name, self.source, self.declare, self.what = name, source, declare, what
        self._lib: ctypes.CDLL | bool | None = None
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        if self._lib is None:
            with self._lock:
                if self._lib is None:
                    self._lib = self._load()
        return self._lib or None  # type: ignore[return-value]

    def _load(self) -> ctypes.CDLL | bool:
        if os.environ.get("SEDMA_NATIVE_RNG", "1") == "0":
            return False
        try:
            lib = build_library(self.name, self.source)
        except (OSError, subprocess.SubprocessError) as exc:
            warnings.warn(
                f"{self.what} unavailable ({exc}); using PyTorch", RuntimeWarning, stacklevel=4
            )
            return False
        if lib is None:
            return False
        self.declare(lib)
        return lib


_KERNELS = LazyLibrary("native_rng", _SOURCE, _declare, "native kernels")


def available() -> bool:
    """True when the compiled kernels can be used (built on the first call)."""
    return _KERNELS.get() is not None


def _lib() -> ctypes.CDLL:
    lib = _KERNELS.get()
    if lib is None:
        raise RuntimeError("native kernels unavailable; call available() first")
    return lib


# ----- validation of the operands handed to the compiled kernels ----------------------------
# Every public wrapper that passes pointers to C checks here, before anything is read or
# written, all that the C code assumes: dtypes, CPU, contiguity / strides, consistent
# shapes, geometry >= 1 and the sizes it implies, and index products below INDEX_LIMIT.


def check_int(func: str, name: str, value, minimum: int = 0, maximum: int = INDEX_LIMIT) -> int:
    """``value`` as an int in [minimum, maximum], else ``ValueError`` naming ``name``."""
    if type(value) is int and minimum <= value <= maximum:  # the common case, quickly
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{func}: {name} must be an int, got {value!r}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{func}: {name} must be an int in [{minimum}, {maximum}], got {value}")
    return value


def check_pair(func: str, name: str, value) -> tuple[int, int]:
    """An int or a pair of ints, each >= 1 (and <= INDEX_LIMIT), as a pair."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= INDEX_LIMIT
        for v in pair
    ):
        raise ValueError(f"{func}: {name} must be two ints >= 1 (and <= 2^62), got {value!r}")
    return int(pair[0]), int(pair[1])


def check_tensor(
    func: str,
    name: str,
    tensor,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    contiguous: bool = True,
) -> None:
    """A CPU tensor of ``dtype`` (and ``shape``; contiguous unless told), else
    ``ValueError`` naming ``name``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{func}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype or tensor.device.type != "cpu":
        raise ValueError(
            f"{func}: {name} must be a CPU {str(dtype).removeprefix('torch.')} tensor, got "
            f"{tensor.dtype} on {tensor.device}"
        )
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{func}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}"
        )
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{func}: {name} must be contiguous, got strides {tensor.stride()}")


def check_products(func: str, what: str, *factors: int) -> None:
    """The product of ``factors`` must stay below INDEX_LIMIT (int64 in the C code)."""
    if math.prod(factors) > INDEX_LIMIT:
        raise ValueError(f"{func}: {what} ({' x '.join(map(str, factors))}) exceeds 2^62")


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) a (non-empty) tensor view spans."""
    start = tensor.data_ptr()
    if tensor.is_contiguous():
        return start, start + tensor.numel() * tensor.element_size()
    span = sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    return start, start + (span + 1) * tensor.element_size()


def check_no_overlap(func: str, out_name: str, out: torch.Tensor, **inputs) -> None:
    """``out`` (written by the kernel while it reads ``inputs``) shares no memory with them."""
    if out.numel() == 0:
        return
    o0, o1 = _extent(out)
    for name, tensor in inputs.items():
        if tensor is None or tensor.numel() == 0:
            continue
        i0, i1 = _extent(tensor)
        if i0 < o1 and o0 < i1:
            raise ValueError(f"{func}: {out_name} must not share memory with {name}")


def _check_real(func: str, name: str, value, minimum: float, *, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{func}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value <= minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{func}: {name} must be finite and {bound}, got {value}")
    return value


def check_spec(func: str, spec) -> None:
    """The fields of a :class:`ReadSpec` that the compiled reads use."""
    if not isinstance(spec, ReadSpec):
        raise ValueError(f"{func}: spec must be a native_rng.ReadSpec, got {type(spec).__name__}")
    check_int(func, "spec.group", spec.group, 1)
    if not isinstance(spec.quantise, (bool, int)):
        raise ValueError(f"{func}: spec.quantise must be a bool, got {spec.quantise!r}")
    _check_real(func, "spec.noise_std", spec.noise_std, 0.0)
    _check_real(func, "spec.levels", spec.levels, 1.0)
    _check_real(func, "spec.dac_levels", spec.dac_levels, 1.0)
    if spec.fixed_full is not None:
        _check_real(func, "spec.fixed_full", spec.fixed_full, 0.0, strict=True)
    key = spec.key
    if not (
        isinstance(key, (tuple, list))
        and len(key) == 2
        and all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in key)
    ):
        raise ValueError(f"{func}: spec.key must be two ints, got {key!r}")
    if isinstance(spec.mode, bool) or spec.mode not in (-1, 0, 1):
        raise ValueError(f"{func}: spec.mode must be -1, 0 or 1, got {spec.mode!r}")
    if spec.adc_full is not None:
        check_tensor(func, "spec.adc_full", spec.adc_full)
        full = spec.adc_full
        if not bool(torch.isfinite(full).all()) or not bool((full > 0).all()):
            raise ValueError(f"{func}: spec.adc_full must be finite and > 0")


def check_adc_full(func: str, spec, tiles: int, groups: int) -> None:
    """``spec.adc_full`` (when given) holds one full scale per tile and ADC group."""
    if spec.adc_full is not None and tuple(spec.adc_full.shape) != (tiles, groups):
        raise ValueError(
            f"{func}: spec.adc_full must be ({tiles}, {groups}) (tiles, ADC groups), got "
            f"{tuple(spec.adc_full.shape)}"
        )


def packed_size(t: int, k: int, c: int, group: int) -> int:
    """Floats of :func:`pack_weights` of a (t, k, c) stack with ADC groups of ``group``."""
    full, rest = divmod(c, group)
    strips = full * -(-group // 16) + -(-rest // 16)
    return t * strips * k * 16


# ----- the wrappers ---------------------------------------------------------------------------
def fill_normal_(out: torch.Tensor, lo: int, hi: int, *, offset: int = 0) -> torch.Tensor:
    """Fill a contiguous CPU float32 tensor with the stream keyed by ``(lo, hi)`` (two
    31-bit words): with ``n = out.numel()``, ``out[p]`` is the cosine and ``out[n // 2 + p]``
    the sine of pair ``offset + p`` (64-bit pair counters; ``offset`` 0 for a whole draw,
    larger to read the stream further on). Raises when the kernel is unavailable; call
    :func:`available` first."""
    check_tensor("fill_normal_", "out", out)
    lo = check_int("fill_normal_", "lo", lo, -(1 << 63), 1 << 63)
    hi = check_int("fill_normal_", "hi", hi, -(1 << 63), 1 << 63)
    n = out.numel()
    if n > MAX_ELEMENTS:
        raise ValueError(f"fill_normal_: out has {n} elements, more than {MAX_ELEMENTS}")
    offset = check_int("fill_normal_", "offset", offset, 0, INDEX_LIMIT - n // 2 - 1)
    if not available():
        raise RuntimeError("native RNG kernel unavailable")
    if n:
        _lib().sedma_normal_f32(out.data_ptr(), n, lo & 0x7FFFFFFF, hi & 0x7FFFFFFF, offset)
    return out


def pack_weights(w: torch.Tensor, group: int) -> torch.Tensor:
    """The (T, K, C) float32 weight stack packed for :func:`fused_read_`: per tile and ADC
    group of ``group`` columns, strips of 16 columns stored k-major (zero padded). A 1-D
    float32 tensor of about ``w.numel()`` elements (more when ``group`` is not a multiple
    of 16)."""
    return _pack_stack(
        "pack_weights", w, group, packed_size, torch.float32, "sedma_pack_weights_f32"
    )


def _pack_stack(func: str, w, group, size_of, dtype: torch.dtype, kernel: str) -> torch.Tensor:
    """Check a (T, K, C) float32 stack and pack it with the C function ``kernel`` into a
    1-D ``dtype`` tensor of ``size_of(T, K, C, group)`` elements."""
    check_tensor(func, "w", w, contiguous=False)
    if w.ndim != 3:
        raise ValueError(f"{func}: w must be a (T, K, C) tensor, got {tuple(w.shape)}")
    group = check_int(func, "group", group, 1)
    t, k, c = w.shape
    # ADC groups wider than the stack pack as one group of all C columns
    group = min(group, max(c, 1))
    size = size_of(t, k, c, group)
    check_products(func, "the packed size", size, dtype.itemsize)
    if not available():
        raise RuntimeError("native kernels unavailable")
    out = torch.empty(size, dtype=dtype)
    if size:
        w = w.contiguous()
        getattr(_lib(), kernel)(w.data_ptr(), t, k, c, group, out.data_ptr())
    return out


def bf16_variance() -> bool:
    """Whether the compiled read has the bfloat16 variance product (an AVX512_BF16 CPU,
    ``SEDMA_NATIVE_BF16`` not ``0``): then :func:`pack_variances` packs in bfloat16."""
    return available() and bool(_lib().sedma_bf16_variance())


def packed_var_bf16_size(t: int, k: int, c: int, group: int) -> int:
    """bfloat16 elements of :func:`pack_variances`' bfloat16 packing of a (t, k, c) stack:
    :func:`packed_size` with k rounded up to even (the product takes rows in pairs)."""
    return packed_size(t, k + k % 2, c, group)


def pack_variances(v: torch.Tensor, group: int) -> torch.Tensor:
    """The (T, K, C) stack of read-noise variances per weight (state-dependent read noise)
    packed for :func:`fused_read_`'s ``packed_var``. With :func:`bf16_variance` a 1-D
    ``torch.bfloat16`` tensor (rows in pairs, rounded to nearest even): the variance
    product ``codes^2 @ V`` then runs in bfloat16 with float32 sums, at twice the products
    per instruction; both operands are >= 0, so each variance is within a relative 2^-8 of
    the float32 product (the noise std within 2^-9), which the tests check. Else
    :func:`pack_weights` (float32)."""
    if not bf16_variance():
        return pack_weights(v, group)
    return _pack_stack(
        "pack_variances", v, group, packed_var_bf16_size, torch.bfloat16, "sedma_pack_var_bf16"
    )


@dataclass(frozen=True)
class ReadSpec:
    """What one compiled crossbar read does besides the products (see :func:`fused_read_`
    and :func:`~sedma_torch.rram.native_depthwise.depthwise_read_`)."""

    group: int
    """Columns sharing one ADC range (a physical column tile)."""
    quantise: bool
    """True: the DAC rounds the input to codes and clips at ``+-dac_levels``, as
    :func:`~sedma_torch.rram.crossbar.dac`. False: the input enters in code units at full
    precision (first-order correction's exact input)."""
    noise_std: float
    """Read-noise standard deviation per unit norm of a tile's input row (code units);
    0 = no noise."""
    levels: int
    """ADC levels (``quant_levels(adc_bits)``)."""
    dac_levels: int
    """DAC levels (1 without a DAC, with ranges of 1)."""
    fixed_full: float | None
    """Fixed ADC full scale in code units (saturating), or None (each group auto-ranges)."""
    key: tuple[int, int]
    """The noise stream's key (two 31-bit words)."""
    mode: int = 0
    """0 writes the output, +1 adds to it, -1 subtracts from it."""
    adc_full: torch.Tensor | None = None
    """Calibrated ADC full scales in code units (saturating), (T, ceil(C / group))
    contiguous float32 -- one per input tile and ADC group; overrides ``fixed_full``."""


def _check_input(name: str, x: torch.Tensor, ndim: int) -> None:
    if (
        not isinstance(x, torch.Tensor)
        or x.ndim != ndim
        or x.dtype != torch.float32
        or x.device.type != "cpu"
    ):
        raise ValueError(
            f"{name}: x must be a {ndim}-d CPU float32 tensor, got "
            f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)} on "
            f"{getattr(x, 'device', '-')}"
        )
    if not x.is_contiguous():
        raise ValueError(f"{name}: x must be contiguous, got strides {x.stride()}")


def _check_tiles(func: str, tiles: int, cpt: int, c_in: int, what: str) -> None:
    if tiles * cpt < c_in or (tiles - 1) * cpt >= c_in:
        raise ValueError(f"{func}: {tiles} tiles of {cpt} {what} do not cover {c_in}")


def tile_absmax(x: torch.Tensor, cpt: int, tiles: int) -> torch.Tensor:
    """DAC ranges of an input: (tiles, N), the largest ``|x|`` over each image's (or row's)
    channels ``[t cpt, (t + 1) cpt)``, or 1 where they are all zero. ``x`` is (N, C) or
    NCHW (N, C, H, W), contiguous float32 on CPU; N may be 0."""
    ndim = x.ndim if isinstance(x, torch.Tensor) and x.ndim in (2, 4) else 2
    _check_input("tile_absmax", x, ndim)
    cpt = check_int("tile_absmax", "cpt", cpt, 1)
    tiles = check_int("tile_absmax", "tiles", tiles, 1)
    n, c_in = x.shape[:2]
    _check_tiles("tile_absmax", tiles, cpt, c_in, "channels")
    if not available():
        raise RuntimeError("native kernels unavailable")
    out = torch.empty(tiles, n, dtype=torch.float32)
    hw = math.prod(x.shape[2:])
    if n:
        _lib().sedma_tile_absmax_f32(x.data_ptr(), n, c_in, hw, cpt, tiles, out.data_ptr())
    return out


def _read(name, x, geometry, s_in, packed, col_scale, out, spec, noise_offset, packed_var) -> None:
    """Validate the operands of a fused read and run it; ``geometry`` as in
    ``kernels/fused_read.c`` (its sizes already checked by the caller: x's shape, cpt,
    kernel, stride, dilation)."""
    n, c_in, _, _, oh, ow, cpt, kh, kw = geometry[:9]
    check_tensor(name, "col_scale", col_scale)
    if col_scale.ndim != 2 or col_scale.shape[0] < 1:
        raise ValueError(
            f"{name}: col_scale must be a (T, C) tensor, T >= 1, got {tuple(col_scale.shape)}"
        )
    t, c = col_scale.shape
    _check_tiles(name, t, cpt, c_in, "channels" if name == "fused_conv_read_" else "rows")
    check_spec(name, spec)
    rows, k = n * oh * ow, cpt * kh * kw
    check_tensor(name, "s_in", s_in, (t, n))
    check_tensor(name, "packed", packed, contiguous=False)
    group = min(spec.group, max(c, 1))  # a group wider than C is one group of C columns
    check_adc_full(name, spec, t, -(-c // group))
    expected = packed_size(t, k, c, group)
    if packed.numel() != expected or not packed.is_contiguous():
        raise ValueError(
            f"{name}: packed must be pack_weights of a ({t}, {k}, {c}) stack with group "
            f"{spec.group} ({expected} contiguous float32), got {packed.numel()} "
            f"(contiguous={packed.is_contiguous()})"
        )
    if packed.data_ptr() % 32:
        raise ValueError(f"{name}: packed must be 32-byte aligned (pack_weights' output)")
    var_bf16 = packed_var is not None and packed_var.dtype == torch.bfloat16
    if var_bf16:
        check_tensor(name, "packed_var", packed_var, dtype=torch.bfloat16)
        want = packed_var_bf16_size(t, k, c, group)
        if packed_var.numel() != want or packed_var.data_ptr() % 32:
            raise ValueError(
                f"{name}: a bfloat16 packed_var must be pack_variances of a ({t}, {k}, {c}) "
                f"variance stack with group {spec.group} ({want} bfloat16, 32-byte aligned), "
                f"got {packed_var.numel()}"
            )
        if not bf16_variance():
            raise ValueError(
                f"{name}: a bfloat16 packed_var needs the bfloat16 variance product, which "
                "this build lacks (no AVX512_BF16, or SEDMA_NATIVE_BF16=0): pack with "
                "pack_variances of this build"
            )
    elif packed_var is not None:
        check_tensor(name, "packed_var", packed_var)
        if packed_var.numel() != expected or packed_var.data_ptr() % 32:
            raise ValueError(
                f"{name}: packed_var must be pack_weights of a ({t}, {k}, {c}) variance stack "
                f"with group {spec.group} ({expected} float32, 32-byte aligned), got "
                f"{packed_var.numel()}"
            )
    check_tensor(name, "out", out, contiguous=False)
    if tuple(out.shape) != (rows, c) or out.stride(1) != 1 or (rows > 1 and out.stride(0) < c):
        raise ValueError(
            f"{name}: out must be a ({rows}, {c}) float32 row view (unit column stride, rows "
            f"apart by >= {c}), got {tuple(out.shape)} with strides {out.stride()}"
        )
    check_products(name, "rows x K x C x T", rows, k, c, t)
    # noise pair counters noise_offset + (t rows + r) C + c < noise_offset + T rows C
    noise_offset = check_int(name, "noise_offset", noise_offset, 0, INDEX_LIMIT - t * rows * c)
    check_no_overlap(
        name,
        "out",
        out,
        x=x,
        s_in=s_in,
        packed=packed,
        col_scale=col_scale,
        packed_var=packed_var,
        adc_full=spec.adc_full,
    )
    if not available():
        raise RuntimeError("native kernels unavailable")
    if rows == 0 or c == 0:
        return  # nothing to read (out has no elements)
    geo = (ctypes.c_int64 * len(geometry))(*geometry)
    status = _lib().sedma_fused_read_f32(
        x.data_ptr(),
        ctypes.addressof(geo),
        t,
        c,
        packed.data_ptr(),
        None if packed_var is None else packed_var.data_ptr(),
        int(var_bf16),
        group,
        int(bool(spec.quantise)),
        s_in.data_ptr(),
        float(spec.noise_std),
        col_scale.data_ptr(),
        float(spec.levels),
        float(spec.dac_levels),
        -1.0 if spec.fixed_full is None else float(spec.fixed_full),
        None if spec.adc_full is None else spec.adc_full.data_ptr(),
        spec.key[0] & 0x7FFFFFFF,
        spec.key[1] & 0x7FFFFFFF,
        out.data_ptr(),
        out.stride(0),
        spec.mode,
        noise_offset,
    )
    if status == -2:
        raise ValueError(f"{name}: the kernel rejected the geometry {geometry}")
    if status != 0:
        raise MemoryError(f"{name}: out of memory")


def fused_read_(
    x: torch.Tensor,
    s_in: torch.Tensor,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    out: torch.Tensor,
    spec: ReadSpec,
    *,
    tile_rows: int,
    noise_offset: int = 0,
    packed_var: torch.Tensor | None = None,
) -> None:
    """One crossbar read of the rows of ``x`` (B, in_features) through the packed weights
    (:func:`pack_weights` of a (T, tile_rows, C) stack) into ``out`` (B, C): the input DAC,
    the matmul of each input tile with its read noise, column ADC, de-quantisation, column
    scale and the digital sum over the tiles, in one pass. Inputs past ``in_features`` in
    the last tile are zero. An empty batch (B = 0) returns at once.

    ``s_in`` (T, B) is the DAC full scale of each row and tile (:func:`tile_absmax`);
    ``col_scale`` (T, C). The read-noise variance is ``spec.noise_std^2`` times the squared
    norm of the tile's input row in code units, plus, with ``packed_var`` (:func:`pack_weights`
    of a (T, tile_rows, C) stack V of variances per weight: state-dependent read noise),
    ``sum_k codes_k^2 V[t, k, c]``; the noise of (tile t, row r, column c) is
    keyed by ``spec.key`` and the 64-bit counter ``noise_offset + (t * B + r) * C + c``
    (``noise_offset`` 0 unless a read continues another's stream), drawn per ADC group, so
    it does not depend on the thread count. Same arithmetic as the eager path (a batched
    matmul, then ``crossbar.adc_dequantise_``) up to float rounding. Every operand is
    checked first (``ValueError`` naming it).
    """
    _check_input("fused_read_", x, 2)
    b, c_in = x.shape
    tile_rows = check_int("fused_read_", "tile_rows", tile_rows, 1)
    geometry = [b, c_in, 1, 1, 1, 1, tile_rows, 1, 1, 1, 1, 1, 1]
    _read("fused_read_", x, geometry, s_in, packed, col_scale, out, spec, noise_offset, packed_var)


def fused_conv_read_(
    x: torch.Tensor,
    s_in: torch.Tensor,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    out: torch.Tensor,
    spec: ReadSpec,
    *,
    cpt: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    noise_offset: int = 0,
    packed_var: torch.Tensor | None = None,
) -> None:
    """:func:`fused_read_` of a convolution (implicit im2col: each output pixel's window is
    gathered while the input is packed, so no patch matrix is stored).

    ``x`` (N, C_in, H, W) is NCHW, contiguous and already padded spatially. Tile t holds
    channels ``[t cpt, (t + 1) cpt)`` (those past C_in are zero) and its ``cpt * kh * kw``
    weight rows are ordered (channel, i, j). ``kernel_size``, ``stride`` and ``dilation``
    are ints >= 1 (or pairs). The output rows are the ``N * H' * W'`` output pixels, ``H'
    = (H - dh (kh - 1) - 1) // sh + 1`` (W' alike, both >= 1): ``out`` is (N * H' * W', C),
    NHWC. ``s_in`` (T, N) holds one DAC range per image and tile (:func:`tile_absmax`).
    N = 0 returns at once.
    """
    func = "fused_conv_read_"
    _check_input(func, x, 4)
    n, c_in, h, w = x.shape
    cpt = check_int(func, "cpt", cpt, 1)
    kh, kw = check_pair(func, "kernel_size", kernel_size)
    sh, sw = check_pair(func, "stride", stride)
    dh, dw = check_pair(func, "dilation", dilation)
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{func}: images {h}x{w} are smaller than the kernel {kh}x{kw} with dilation {dh}x{dw}"
        )
    geometry = [n, c_in, h, w, oh, ow, cpt, kh, kw, sh, sw, dh, dw]
    _read(func, x, geometry, s_in, packed, col_scale, out, spec, noise_offset, packed_var)


__all__ = [
    "INDEX_LIMIT",
    "MAX_ELEMENTS",
    "ReadSpec",
    "available",
    "build_library",
    "check_int",
    "check_pair",
    "check_spec",
    "check_tensor",
    "fill_normal_",
    "fused_conv_read_",
    "fused_read_",
    "pack_weights",
    "packed_size",
    "tile_absmax",
]
