"""Fast Q8_0, Q4_0 and Q5_0 quantizers, byte-identical to ``gguf.quants.quantize``, and a fast finiteness check.

gguf-py's numpy quantizers are the reference (they reproduce ggml-quants.c's
``quantize_row_q8_0_ref`` / ``_q4_0_ref`` / ``_q5_0_ref``), but they work on groups of 16
rows, allocate every intermediate afresh, reduce over 32-element rows (numpy's slowest
case) and run on one core: on a 1.1B model, Q8_0 export took 5x the time of writing the
file. Here the same float32 arithmetic runs over chunks of blocks, with per-thread scratch
buffers reused in place, on a thread pool (numpy and torch release the GIL inside their
kernels, so chunks run in parallel); every step that rounds is an IEEE float32 operation
(add, multiply, divide, float16/int conversion) in the same order as gguf-py, so the bytes
are the same. tests/test_export_quants.py checks that on random, zero, tied and extreme data.

Q8_0, the type a plain export writes most, never imports torch (over a second of start-up). It
runs in export/_q8.c, one pass a weight in C, where the install could compile it; otherwise in
numpy (:func:`_q8_0_numpy`, about twice the time), which avoids numpy's two slow spots, float16
-> float32 casts (~2 ns a weight) and reductions over 32-element rows (~1 ns), by widening float16
through its bits and taking block maxima on the magnitude bits. Both write gguf-py's bytes. Q4_0
and Q5_0 use torch kernels, which widen float16 and reduce over short rows about 10x faster than
numpy's.

Block layouts (ggml-common.h), 32 weights per block, scale ``d`` stored as float16:
- Q8_0 (34 bytes): d, 32 x int8 q.  d = amax / 127; q = round_half_away(x * (1 / d)).
- Q4_0 (18 bytes): d, 16 bytes qs.  d = max / -8, max being the weight of largest magnitude
  with its sign (the first one on a tie); q = min(15, trunc(x * (1 / d) + 8.5));
  qs byte j = q[j] | q[j + 16] << 4.
- Q5_0 (22 bytes): d, 4 bytes qh, 16 bytes qs.  d = max / -16; q = min(31, trunc(x * (1 / d) + 16.5));
  qs as Q4_0 with q's low nibbles; bit j of qh (a little-endian uint32) = bit 4 of q[j].
In all three, 1 / d is taken as 0 where d == 0.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

try:  # export/_q8.c, compiled when lowrank is installed on a machine with a C compiler
    from lowrank.export import _q8
except ImportError:
    _q8 = None

BLOCK = 32
BLOCKS_PER_CHUNK = 4096  # 128K weights: the 512 KiB float32 scratch buffers stay in a core's L2
# 0.5 rounded down to the next float32. trunc(q + copysign(HALF_DOWN, q)) in float32 is q rounded
# half away from zero (gguf-py's np_roundf): checked for every float32 |q| < 130, all that Q8_0's
# q = x / d can be. The obvious q + 0.5 is not: 0.49999997 + 0.5 rounds to 1.0 in float32.
HALF_DOWN_BITS = int(np.nextafter(np.float32(0.5), np.float32(0)).view(np.int32))
SIGN_BIT = np.int32(-(2**31))

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def default_threads() -> int:
    """The cores this process may use, or OMP_NUM_THREADS when it says fewer (torch's own rule, without torch)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        return max(1, min(cores, int(os.environ.get("OMP_NUM_THREADS", "") or cores)))
    except ValueError:
        return cores


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers != threads:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(threads, thread_name_prefix="lowrank-quant")
        return _pool


def _scratch(n: int):
    """This thread's float32 buffers x, t of (n, 32) and uint8 q of (n, 32), reused across chunks."""
    import torch

    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].shape[0] < n:
        size = max(n, BLOCKS_PER_CHUNK)
        bufs = (torch.empty((size, BLOCK)), torch.empty((size, BLOCK)), torch.empty((size, BLOCK), dtype=torch.uint8))
        _local.bufs = bufs
    return tuple(b[:n] for b in bufs)


@contextlib.contextmanager
def _one_torch_thread_per_worker(threads: int):
    """Our pool runs ``threads`` chunks at once; torch's own intra-op threads on top only contend for cores.

    Nothing to do (and torch is not imported) when torch has not been imported already.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_chunks(n: int, work: Callable[[int, int], object], threads: int | None, unit: int | None = None) -> list:
    """work(start, stop) over [0, n) in pieces of ``unit`` (default BLOCKS_PER_CHUNK, read at call time), on
    ``threads`` threads; results in order."""
    unit = unit or BLOCKS_PER_CHUNK
    spans = [(s, min(s + unit, n)) for s in range(0, n, unit)]
    threads = min(threads or default_threads(), len(spans))
    with _one_torch_thread_per_worker(threads):
        if threads <= 1:
            return [work(*span) for span in spans]
        futures = [_executor(threads).submit(work, *span) for span in spans]
        return [f.result() for f in futures]


def _inverse(d: np.ndarray) -> np.ndarray:
    """gguf-py's ``np.where(d == 0, 0, 1 / d)`` for a float32 (n, 1) array."""
    with np.errstate(divide="ignore"):
        inv = np.float32(1) / d
    inv[d == 0] = 0
    return inv


# float16 bits, sign-extended to int32 and shifted left 13, with bits 28-30 (copies of the sign) cleared:
# the float32 with the same sign and mantissa and an exponent 112 (= 127 - 15) too small.
_F16_TO_F32_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF
_F16_TO_F32_SCALE = np.float32(2.0**112)


def _numpy_scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's int32 buffers of n * 32 (viewed as float32 where needed), reused across chunks."""
    bufs = getattr(_local, "numpy_bufs", None)
    if bufs is None or len(bufs[0]) < n * BLOCK:
        size = max(n, BLOCKS_PER_CHUNK) * BLOCK
        bufs = _local.numpy_bufs = (np.empty(size, np.int32), np.empty(size, np.int32))
    return bufs[0][: n * BLOCK], bufs[1][: n * BLOCK]


def _block_max(magnitudes: np.ndarray, n: int) -> np.ndarray:
    """(n,) per-block maxima of (n * 32,) non-negative integers: halving by pairs, 4x faster than max(axis=1)."""
    m = np.maximum(magnitudes[0::2], magnitudes[1::2])
    while len(m) > n:
        m = np.maximum(m[0::2], m[1::2])
    return m


def _q8_0(src: np.ndarray, out: np.ndarray) -> None:
    """src: (n, 32) float16 or float32 numpy blocks -> out: (n, 34) uint8: the C kernel when it was built,
    else :func:`_q8_0_numpy`."""
    if _q8 is None:
        _q8_0_numpy(src, out)
        return
    d = np.empty(len(src), np.float32)
    _q8.q8_0(src, out, d, src.dtype == np.float16)
    with np.errstate(over="ignore"):  # d beyond float16 becomes inf, as in gguf-py
        out[:, 0:2].view(np.float16)[:, 0] = d  # float32 -> float16 rounds to nearest even, as gguf-py's astype


def _q8_0_numpy(src: np.ndarray, out: np.ndarray) -> None:
    """src: (n, 32) float16 or float32 numpy blocks -> out: (n, 34) uint8, in numpy.

    Exact tricks (no rounding step differs from gguf-py's float32 arithmetic):
    - max |x| of a block is the max of its bits with the sign masked off, read back as a float: for finite
      floats of one sign the bit patterns order as the values (load_tensor has refused NaN and inf).
    - float16 -> float32: the float16's bits shifted into a float32's place (_F16_TO_F32_MASK), times 2^112,
      which is exact for every finite float16, subnormals and zeros included (Giesen's half_to_float_fast).
    """
    n = len(src)
    x, t = _numpy_scratch(n)
    xf = x.view(np.float32)
    if src.dtype == np.float16:
        bits = src.reshape(-1).view(np.int16)
        amax = _block_max(np.bitwise_and(bits, np.int16(0x7FFF)), n).view(np.float16).astype(np.float32)
        np.copyto(x, bits)  # sign-extending int16 -> int32
        np.left_shift(x, 13, out=x)
        np.bitwise_and(x, _F16_TO_F32_MASK, out=x)
        np.multiply(xf, _F16_TO_F32_SCALE, out=xf)
    else:
        np.copyto(xf, src.reshape(-1))
        amax = _block_max(np.bitwise_and(x, np.int32(0x7FFFFFFF)), n).view(np.float32)
    d = (amax / np.float32(127))[:, None]  # (n, 1)
    blocks = xf.reshape(n, BLOCK)
    np.multiply(blocks, _inverse(d), out=blocks)  # q = x * (1 / d), as gguf-py (not x / d)
    # x += copysign(HALF_DOWN, x): the float -> int8 cast below truncates, so this rounds half away from zero.
    np.bitwise_and(x, SIGN_BIT, out=t)
    np.bitwise_or(t, np.int32(HALF_DOWN_BITS), out=t)
    np.add(xf, t.view(np.float32), out=xf)
    np.copyto(out[:, 2:].view(np.int8), blocks, casting="unsafe")
    with np.errstate(over="ignore"):  # d beyond float16 becomes inf, as in gguf-py
        out[:, 0:2].view(np.float16)[:] = d  # float32 -> float16 rounds to nearest even, as gguf-py's astype


def _store_scale(out, d: np.ndarray) -> None:
    """d (n, 1) float32 as float16 into bytes 0-1 of each block of ``out`` (a torch uint8 (n, type_size)).

    float32 -> float16 rounds to nearest even (IEEE), as numpy's astype does, and 4x faster.
    """
    import torch

    out[:, 0:2].view(torch.float16).copy_(torch.from_numpy(d))


def _signed_absmax(x) -> np.ndarray:
    """(n, 1) float32: per block the weight of largest magnitude, with its sign; on a tie the first, as argmax."""
    import torch

    hi, lo = torch.amax(x, dim=1).numpy(), torch.amin(x, dim=1).numpy()  # 5x faster than aminmax here
    out = np.where(hi >= -lo, hi, lo)
    # Both +m and -m present (or an all-zero block, where the sign of the first zero shows in d):
    # only the first occurrence decides, as in gguf-py's argmax over |x|.
    tied = np.flatnonzero(hi == -lo)
    if len(tied):
        rows = x.numpy()[tied]
        out[tied] = np.take_along_axis(rows, np.abs(rows).argmax(axis=1)[:, None], axis=1)[:, 0]
    return out[:, None]


def _nibbles(src, divisor: int, offset: float, top: int):
    """Q4_0 / Q5_0 shared part: (d as float32 (n, 1), q as torch uint8 (n, 32) in [0, top])."""
    import torch

    x, _, q = _scratch(len(src))
    x.copy_(src)
    d = _signed_absmax(x) / np.float32(divisor)
    x.mul_(torch.from_numpy(_inverse(d)))
    x.add_(offset)  # x + float32(offset): a float32 add, as gguf-py
    q.copy_(x)  # trunc toward zero, as np.trunc(...).astype(np.uint8); x + offset >= 0 here
    q.clamp_(max=top)
    return d, q


def _pack_nibbles(q, qs) -> None:
    """qs[:, j] = low nibble of q[:, j] | q[:, j + 16] << 4 (torch uint8; the shift drops q's bit 4)."""
    import torch

    torch.bitwise_left_shift(q[:, 16:], 4, out=qs)
    qs.bitwise_or_(q[:, :16] & 0x0F)


def _q4_0(src, out: np.ndarray) -> None:
    """src: (n, 32) torch float blocks -> out: (n, 18) uint8."""
    d, q = _nibbles(src, -8, 8.5, 15)
    out_t = _as_torch(out)
    _pack_nibbles(q, out_t[:, 2:])
    _store_scale(out_t, d)


def _q5_0(src, out: np.ndarray) -> None:
    """src: (n, 32) torch float blocks -> out: (n, 22) uint8."""
    d, q = _nibbles(src, -16, 16.5, 31)
    out_t = _as_torch(out)
    _pack_nibbles(q, out_t[:, 6:])
    out[:, 2:6] = np.packbits(q.numpy() >= 16, axis=1, bitorder="little")
    _store_scale(out_t, d)


# ggml type name -> (kernel, bytes per 32-weight block)
KERNELS: dict[str, tuple[Callable, int]] = {"Q8_0": (_q8_0, 34), "Q4_0": (_q4_0, 18), "Q5_0": (_q5_0, 22)}


def _as_torch(array: np.ndarray):
    import torch

    with warnings.catch_warnings():  # read-only (mmap'd) arrays: we never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def quantize(array: np.ndarray, qtype, threads: int | None = None) -> np.ndarray:
    """``array`` (float16 or float32, last dim a multiple of 32) as ggml blocks of ``qtype``.

    Returns what ``gguf.quants.quantize(array.astype(np.float32), qtype)`` returns: uint8 of shape
    (*array.shape[:-1], array.shape[-1] // 32 * bytes_per_block). Types other than Q8_0, Q4_0 and
    Q5_0 are handed to gguf-py. Float16 input is widened a chunk at a time, so no float32 copy of
    the tensor is made. ``threads`` defaults to the cores (or OMP_NUM_THREADS). Q8_0 never imports torch.
    """
    import gguf

    name = getattr(qtype, "name", str(qtype))
    if name not in KERNELS or array.dtype not in (np.float16, np.float32):
        return gguf.quants.quantize(array.astype(np.float32, copy=False), qtype)
    kernel, type_size = KERNELS[name]
    if array.ndim == 0 or array.shape[-1] % BLOCK:
        raise ValueError(f"cannot quantize shape {array.shape} to {name}: the row size is not a multiple of {BLOCK}")
    blocks = np.ascontiguousarray(array).reshape(-1, BLOCK)
    if kernel is not _q8_0:
        blocks = _as_torch(blocks)
    out = np.empty((len(blocks), type_size), np.uint8)
    _run_chunks(len(blocks), lambda start, stop: kernel(blocks[start:stop], out[start:stop]), threads)
    return out.reshape(*array.shape[:-1], array.shape[-1] // BLOCK * type_size)


# exponent mask per float dtype, as the integer type of the same width: a value is inf or NaN
# exactly when all its exponent bits are set.
_EXPONENT_MASKS = {np.dtype(np.float16): (np.int16, 0x7C00), np.dtype(np.float32): (np.int32, 0x7F800000),
                   np.dtype(np.float64): (np.int64, 0x7FF0000000000000)}


def all_finite(array: np.ndarray, threads: int | None = None) -> bool:
    """True when ``array`` has no NaN or infinity: ``np.isfinite(array).all()``, several times faster on float16.

    Works on the bits: with the sign masked off, a finite value is below the all-ones exponent.
    """
    if array.dtype not in _EXPONENT_MASKS:
        return bool(np.isfinite(array).all())
    itype, exponent = _EXPONENT_MASKS[array.dtype]
    bits = np.ascontiguousarray(array).reshape(-1).view(itype)
    magnitude = itype(np.iinfo(itype).max)  # all bits but the sign

    def work(start: int, stop: int) -> bool:
        return bool(np.bitwise_and(bits[start:stop], magnitude).max() < exponent)

    return all(_run_chunks(len(bits), work, threads, unit=4 * BLOCKS_PER_CHUNK * BLOCK))
