"""Small C loops the engine compiles on first use, with the torch-op path as the fallback:
group-wise dequantization (also straight into a transposed view) and quantization, bit-equal to
compression.py's torch ops, decode attention read straight from a compressed KV prefix, matmuls by
4-bit and bf16 weights, and a decode step's RMS norms and rotary embeddings.

The source ships with the package; the shared object is built once per (source, compiler, CPU
flags) with the system C compiler into a cache directory (FLEXGEN_HELM_KERNEL_DIR, else
~/.cache/flexgen-helm/kernels) and called through ctypes, which releases the GIL, so a few Python
threads split one call across cores. No compiler, a failed build, or FLEXGEN_HELM_NO_KERNELS=1:
the callers run their torch-op path (same results, slower; for attention: dequantize the prefix,
then SDPA) after one warning that says so.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

_SRC = os.path.join(os.path.dirname(__file__), "groupquant.c")
# -ffp-contract=off: no fused multiply-add, so results equal the torch-op path bit for bit.
# -march=native is why the cache key includes the CPU flags: a shared home dir may serve other CPUs.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]
_MIN_PARALLEL = 1 << 20   # values: below this a thread hand-off costs more than it saves
# Values from which a decode attention call splits over OpenMP threads inside the C loop, where a
# fork/join costs ~1-2 us (not a pool hand-off). Speed: batch 1, 2 Zen 4 cores, 2 threads vs 1: dense
# 1.03-1.13x at 32-64K values, 1.3-1.4x at 100-200K, 1.5-2.0x at 0.26-2M; compressed 4-bit prefix
# 1.12-1.26x, 1.13-1.35x and 1.6-1.8x (a prompt of a few hundred tokens was below the old 1M).
_MIN_PARALLEL_OMP = 1 << 15
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> str:
    return os.environ.get("FLEXGEN_HELM_KERNEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                       "flexgen-helm", "kernels")


def _warn(msg: str) -> None:
    print(f"flexgen-helm: {msg}", file=sys.stderr, flush=True)


def _build(cc: str) -> str:
    with open(_SRC, "rb") as f:
        src = f.read()
    key = hashlib.sha256(src + cc.encode() + " ".join(_FLAGS).encode() + _cpu_flags().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    path = os.path.join(out_dir, f"groupquant-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    # build beside the target and rename: concurrent processes never load a half-written file
    fd, tmp = tempfile.mkstemp(prefix=".groupquant-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        # OpenMP where the compiler has it: the process then holds one libgomp (torch's, same
        # soname), so the kernels' threads are torch's own; without it, Python threads (_split)
        for extra in (["-fopenmp"], []):
            proc = subprocess.run([cc, *_FLAGS, *extra, _SRC, "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-500:] or f"{cc} exited {proc.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@lru_cache(maxsize=1)
def _library():
    """The loaded kernel library, or None (and one warning) when it cannot be had."""
    if os.environ.get("FLEXGEN_HELM_NO_KERNELS"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _warn("no C compiler (cc/gcc/clang) found: 4-bit (de)quantization uses the torch-op path "
              "(same results, ~4x slower on the CPU); install gcc to speed it up")
        return None
    try:
        lib = ctypes.CDLL(_build(cc))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        _warn(f"building the quantization kernels with {cc} failed ({e}); using the torch-op path "
              "(same results, slower)")
        return None
    i64, i64p, ptr, c_int = ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_int
    lib.fg_dequantize_strided.restype = lib.fg_quantize.restype = c_int
    lib.fg_dequantize_strided.argtypes = [ptr, ptr, ptr, i64, i64, c_int, i64, i64, i64, c_int, c_int, i64, c_int,
                                          i64p, i64p]
    lib.fg_quantize.argtypes = [ptr, c_int, ptr, ptr, i64, i64, c_int, i64, i64, i64, c_int]
    lib.fg_attend_compressed.restype = c_int
    lib.fg_attend_compressed.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, c_int, i64, i64, i64, c_int, ptr, ptr,
                                         ptr, ptr, ptr, c_int, ctypes.c_float, i64, i64]
    lib.fg_attend_compressed_mt.restype = c_int
    lib.fg_attend_compressed_mt.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, c_int, i64, i64, i64, c_int, ptr,
                                            ptr, ptr, ptr, ptr, c_int, ctypes.c_float, i64, c_int]
    lib.fg_attend_dense_mt.restype = c_int
    lib.fg_attend_dense_mt.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, c_int,
                                       ctypes.c_float, c_int]
    lib.fg_int4_matmul.restype = c_int
    lib.fg_int4_matmul.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, c_int]
    lib.fg_int4_matmul_x16.restype = c_int
    lib.fg_int4_matmul_x16.argtypes = [ptr, ptr, ptr, c_int, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, c_int]
    lib.fg_bf16_matmul.restype = c_int
    lib.fg_bf16_matmul.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, c_int]
    lib.fg_bf16_matmul_dp.restype = c_int
    lib.fg_bf16_matmul_dp.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i64, c_int]
    lib.fg_rms_norm.restype = lib.fg_rope.restype = c_int
    lib.fg_rms_norm.argtypes = [ptr, i64, ptr, ptr, i64, i64, ctypes.c_float, c_int]
    lib.fg_rope.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64, i64, i64, c_int]
    lib.fg_openmp.restype = lib.fg_int4_x16.restype = lib.fg_bf16_dp.restype = c_int
    lib.fg_int4_dq_min_rows.restype = c_int
    return lib


def available() -> bool:
    return _library() is not None


def dequantize_into(packed, meta, out, num_codes: int, bits: int, block_codes: int, block_bytes: int,
                    group: int, symmetric: bool, rows_of: tuple[int, ...] | None = None) -> bool:
    """Fill `out` (a CPU fp32 or bf16 tensor) from `packed` (uint8) and `meta` (fp16) with the C loop.
    Without rows_of, `out` is contiguous and takes the codes in order. With rows_of, the codes are
    vectors of out's last-axis length indexed by rows_of (an axis order of out: the codes' axis a is
    out's axis rows_of[a]), e.g. position-major KV rows written straight into a head-major buffer.
    False when it cannot (the caller falls back)."""
    import torch
    lib = _library()
    kind = _kind(out.dtype)
    if lib is None or kind is None or out.device.type != "cpu" or not (
            packed.is_contiguous() and meta.is_contiguous()) or meta.dtype != torch.float16:
        return False
    if rows_of is None:
        if not out.is_contiguous():
            return False
        vec, nd, dims, strides = 0, 0, None, None
    else:
        if out.stride(-1) != 1 or len(rows_of) != out.dim() - 1:
            return False
        vec, nd = out.shape[-1], len(rows_of)
        dims = (ctypes.c_int64 * nd)(*(out.shape[a] for a in rows_of))
        strides = (ctypes.c_int64 * nd)(*(out.stride(a) for a in rows_of))
        if vec * math.prod(out.shape[a] for a in rows_of) != num_codes:
            return False
    head = (packed.data_ptr(), meta.data_ptr(), out.data_ptr())
    tail = (bits, block_codes, block_bytes, group, int(symmetric), kind, vec, nd, dims, strides)
    return _split(lambda b, e: lib.fg_dequantize_strided(*head, b, e, *tail), num_codes, block_codes)


def quantize_into(x, packed, meta, bits: int, block_codes: int, block_bytes: int, group: int,
                  symmetric: bool) -> bool:
    """Quantize `x` (a contiguous CPU fp32/bf16/fp16 tensor whose numel is a whole number of groups,
    groups along its last axis) into `packed` (uint8) and `meta` (fp16) with the C loop: the same
    bytes as compression.quantize's torch-op path. False when it cannot (the caller falls back)."""
    import torch
    lib = _library()
    kind = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}.get(x.dtype)
    if lib is None or kind is None or x.device.type != "cpu" or not (
            x.is_contiguous() and packed.is_contiguous() and meta.is_contiguous()) or x.numel() % group:
        return False
    head = (x.data_ptr(), kind, packed.data_ptr(), meta.data_ptr())
    tail = (bits, block_codes, block_bytes, group, int(symmetric))
    # pieces start where a block and a group both start
    return _split(lambda b, e: lib.fg_quantize(*head, b, e, *tail), x.numel(), math.lcm(block_codes, group))


def attend_compressed(packed, meta, n: int, q, new_k, new_v, allowed, bits: int, block_codes: int,
                      block_bytes: int, group: int, symmetric: bool):
    """One decode step of attention read straight from a compressed KV prefix (the C loop).
    packed/meta: positions [0, n) of an (n, 2, B, H, D) tensor as compression.quantize lays it out
    (groups of `group` along D); q (B, Hq, 1, D); new_k, new_v (B, H, 1, D): the current token at
    position n; allowed (B, n + 1) bool. Returns (B, Hq, 1, D) in q's dtype, or None when the loop
    cannot (the caller dequantizes the prefix and runs SDPA instead)."""
    import torch
    lib = _library()
    kind = _kind(q.dtype)
    B, Hq, _, D = q.shape
    H = new_k.shape[1]
    if (lib is None or kind is None or q.device.type != "cpu" or not attend_compressed_ok(B, H, Hq, D, block_codes, group)
            or new_k.dtype != q.dtype or new_v.dtype != q.dtype or meta.dtype != torch.float16):
        return None
    q, new_k, new_v = q.contiguous(), new_k.contiguous(), new_v.contiguous()
    ok = allowed.to(torch.uint8).contiguous()
    out = torch.empty_like(q)

    args = (packed.data_ptr(), meta.data_ptr(), n, B, H, Hq, D, bits, block_codes, block_bytes, group,
            int(symmetric), q.data_ptr(), new_k.data_ptr(), new_v.data_ptr(), ok.data_ptr(), out.data_ptr(), kind,
            D ** -0.5)
    # pieces of whole (row, KV head) pairs whose codes start on a packing block
    unit = block_codes // math.gcd(block_codes, D)
    work = 2 * n * B * H * D
    if lib.fg_openmp():  # split inside, on torch's OpenMP pool
        threads = max(1, torch.get_num_threads()) if work >= _MIN_PARALLEL_OMP else 1
        return out if lib.fg_attend_compressed_mt(*args, unit, threads) == 0 else None
    return out if _split(lambda b, e: lib.fg_attend_compressed(*args, b, e), B * H, unit, work=work) else None


def attend_dense(q, k, v, allowed):
    """One decode step of attention over a dense cache, read in place by the C loop: q (B, Hq, 1, D); k, v
    (B, H, n, D) views whose rows of D are contiguous (a cache buffer's prefix, the new token included);
    allowed (B, n) bool. Returns (B, Hq, 1, D) in q's dtype, or None where the loop does not apply (the
    caller runs SDPA): not the CPU, not fp32/bf16, D not a multiple of 64, no AVX2, no compiler."""
    import torch
    lib = _library()
    kind = _kind(q.dtype)
    B, Hq, one, D = q.shape
    if (lib is None or kind is None or q.device.type != "cpu" or one != 1 or D % 64 or k.dtype != q.dtype
            or v.dtype != q.dtype or k.shape != v.shape or k.stride() != v.stride() or k.shape[0] != B
            or k.shape[3] != D or k.stride(3) != 1 or k.stride(2) != D or Hq % k.shape[1]):
        return None
    H, n = k.shape[1], k.shape[2]
    q = q.contiguous()
    ok = allowed.to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    threads = max(1, torch.get_num_threads()) if 2 * n * B * Hq * D >= _MIN_PARALLEL_OMP and lib.fg_openmp() else 1
    rc = lib.fg_attend_dense_mt(k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), n, B, H, Hq, D, q.data_ptr(),
                                ok.data_ptr(), out.data_ptr(), kind, D ** -0.5, threads)
    return out if rc == 0 else None


# Values up to which a decode step's norms and rotations run in the one-pass C loops below (one
# thread): the rows of a decode step (32 rows x 32 heads x 128 = 131K); prefills keep torch's ops,
# which split over threads.
SMALL_OP_MAX = 1 << 18


@lru_cache(maxsize=None)
def _kind(dtype) -> int | None:
    """The C loops' element kind: 0 fp32, 1 bf16, None for dtypes they do not take."""
    import torch
    return {torch.float32: 0, torch.bfloat16: 1}.get(dtype)


def rms_norm(x, w, eps: float):
    """round(round(x * (1 / sqrt(mean(x^2) + eps))) * w) over x's last axis (fp32 or bf16, w the same dtype),
    or None where the loop does not apply (the caller runs torch's ops). Speed: the checks are few and
    cheap, as the whole call is meant to cost a few microseconds."""
    import torch
    lib = _library()
    kind = _kind(x.dtype)
    if lib is None or kind is None or not x.is_cpu or w.dtype != x.dtype or x.numel() > SMALL_OP_MAX:
        return None
    width = x.shape[-1]
    if w.numel() != width or not w.is_contiguous():
        return None
    if not x.is_contiguous():  # e.g. q/k norms over a split of the fused projection's output
        x = x.contiguous()
    y = torch.empty_like(x)
    rc = lib.fg_rms_norm(x.data_ptr(), width, w.data_ptr(), y.data_ptr(), x.numel() // width, width, eps, kind)
    return y if rc == 0 else None


def rope(x, cos, sin):
    """x (B, H, T, D) * cos + rotate_half(x) * sin, cos/sin (B, 1, T, D), rounded like the torch ops;
    None where the loop does not apply."""
    import torch
    lib = _library()
    kind = _kind(x.dtype)
    if (lib is None or kind is None or not x.is_cpu or x.dim() != 4 or x.numel() > SMALL_OP_MAX
            or cos.dtype != x.dtype or sin.dtype != x.dtype):
        return None
    B, H, T, D = x.shape
    xs, cst = x.stride(), cos.stride()
    if xs[3] != 1 or D % 2 or cos.shape != (B, 1, T, D) or sin.stride() != cst or cst[3] != 1:
        return None
    out = torch.empty(B, H, T, D, dtype=x.dtype)
    rc = lib.fg_rope(x.data_ptr(), xs[0], xs[1], xs[2], cos.data_ptr(), sin.data_ptr(), cst[0], cst[2],
                     out.data_ptr(), B, H, T, D, kind)
    return out if rc == 0 else None


def attend_compressed_ok(B: int, H: int, Hq: int, D: int, block_codes: int, group: int) -> bool:
    """Shapes attend_compressed takes: each position's keys (values) start on a packing block, and
    groups tile head_dim."""
    return Hq % H == 0 and D % group == 0 and (B * H * D) % block_codes == 0


def _split(call, num_codes: int, unit: int, work: int | None = None) -> bool:
    """call(begin, end) over [0, num_codes), in one piece per thread (cut at multiples of `unit`) when
    the work (values touched; default num_codes) is big enough: the first piece runs on the calling
    thread, the others in pool threads (ctypes drops the GIL). Speed: one hand-off fewer per call,
    which counts for sub-millisecond calls (a decode step's 4-bit matmuls)."""
    import torch
    threads = max(1, torch.get_num_threads())
    if (num_codes if work is None else work) < _MIN_PARALLEL or threads == 1 or num_codes < 2 * unit:
        return call(0, num_codes) == 0
    per = -(-num_codes // threads // unit) * unit
    bounds = [(b, min(b + per, num_codes)) for b in range(0, num_codes, per)]
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < len(bounds):
            _pool = ThreadPoolExecutor(max_workers=len(bounds), thread_name_prefix="fg-quant")
        pool = _pool
    rest = [pool.submit(call, *be) for be in bounds[1:]]
    first = call(*bounds[0])
    return all([first == 0] + [f.result() == 0 for f in rest])


def int4_matmul_ok(shape, group: int) -> bool:
    """Weights int4_matmul takes: (N, K) with K a multiple of 128 and groups a multiple of 64 along K."""
    n, k = shape
    return k % 128 == 0 and group % 64 == 0 and k % group == 0


class Int4Parts(list):
    """[(packed, meta, rows), ...]: a 4-bit weight's parts stacked along N, as int4_matmul takes them
    (a plain list works too), keeping what the C call needs from them once computed. Speed: a decode
    step's matmul call is 10-100 us, and rebuilding the row count, shape check and pointer arrays took
    ~4 us of it (97 calls per opt-1.3b token; weights on the compute tier keep their objects)."""
    __slots__ = ("call_args",)


def _parts_args(parts, k: int, group: int):
    """(N, whether int4_matmul takes these parts, the C call's pointer and row arrays)."""
    args = getattr(parts, "call_args", None)
    if args is None or args[3] != (k, group):
        np_ = len(parts)
        args = (sum(r for _, _, r in parts), all(int4_matmul_ok((r, k), group) for _, _, r in parts),
                ((ctypes.c_void_p * np_)(*[p.data_ptr() for p, _, _ in parts]),
                 (ctypes.c_void_p * np_)(*[q.data_ptr() for _, q, _ in parts]),
                 (ctypes.c_int64 * np_)(*[r for _, _, r in parts])), (k, group))
        if isinstance(parts, Int4Parts):
            parts.call_args = args
    return args


def int4_matmul(parts, x, k: int, group: int, ks: int):
    """x (..., K) @ w.T for a 4-bit asymmetric (N, K) weight in compression.GroupInt4Weight's format
    (groups of `group` along K, K in slices of `ks` values, slice-major), given as parts stacked
    along N: [(packed, meta, rows), ...] (one part, or e.g. q, k and v; an Int4Parts keeps the call's
    arguments between calls). The C loop reads the codes where they lie, never a dequantized copy.
    Returns (..., N) in x's dtype (fp32 accumulation), or None when it cannot (the caller dequantizes)."""
    import torch
    lib = _library()
    if lib is None or not x.is_cpu or x.shape[-1] != k:
        return None
    n, ok, ptrs, _ = _parts_args(parts, k, group)
    if not ok:
        return None
    threads = max(1, torch.get_num_threads())
    if x.dtype == torch.bfloat16 and lib.fg_int4_x16():
        # Speed: bf16 activations (8 significant bits) go through the 16-bit fixed-point loop, 1.3x
        # the fp32 one at 1-32 rows on AVX2 (integer multiply-adds on the codes, no convert per
        # weight); it reads bf16 and writes bf16 itself (two torch conversions cost ~20 us per call),
        # and takes all parts in one call (one activation prep, one thread split).
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m = x2.shape[0]
        y = torch.empty(m, n, dtype=torch.bfloat16)
        np_ = len(parts)

        def call(b: int, e: int, t: int) -> int:
            return lib.fg_int4_matmul_x16(*ptrs, np_, x2.data_ptr(), y.data_ptr(), m, k, n, group, ks, b, e, t)
    else:  # fp32 activations keep their 24 bits in the fp32 loop (bf16 ones are widened once), per part
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        m = x2.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        starts = [0, *itertools.accumulate(r for _, _, r in parts)][:-1]  # each part's first output column

        def call(b: int, e: int, t: int) -> int:  # output columns [b, e), each part's share of them
            rc = 0
            for (pk, mt, r), s0 in zip(parts, starts):
                lo, hi = max(b, s0), min(e, s0 + r)
                if lo < hi:
                    rc |= lib.fg_int4_matmul(pk.data_ptr(), mt.data_ptr(), x2.data_ptr(), y.data_ptr() + 4 * s0,
                                             m, k, r, n, group, ks, lo - s0, hi - s0, t)
            return rc
    if lib.fg_openmp():  # split inside, on torch's OpenMP pool
        ok = call(0, n, threads) == 0
    else:
        ok = _split(lambda b, e: call(b, e, 1), n, 16, work=m * n * k)
    if not ok:
        return None
    return (y if y.dtype == x.dtype else y.to(x.dtype)).view(*x.shape[:-1], n)


@lru_cache(maxsize=1)
def int4_dq_min_rows() -> int:
    """Rows from which int4_matmul multiplies bf16 activations through bf16 blocks of the weight
    (dequantized in cache, then vdpbf16ps: AVX512-BF16 builds); 0 where it has no such path."""
    lib = _library()
    return int(lib.fg_int4_dq_min_rows()) if lib is not None else 0


@lru_cache(maxsize=1)
def bf16_dp() -> bool:
    """Does the compiled library have the bf16 dot-product loop (built where the CPU has AVX512-BF16)?"""
    lib = _library()
    return lib is not None and bool(lib.fg_bf16_dp())


def bf16_matmul(w, x, max_rows: int):
    """x (..., K) @ w.T for a bf16 (N, K) weight, fp32 accumulation, up to `max_rows` rows; None
    beyond, or when it cannot (the caller then runs another matmul). bf16 activations on a CPU with
    AVX512-BF16 take the dot-product loop (bf16 in, bf16 out); otherwise the weights are read once as
    bf16 and widened in registers against fp32 activations. Returns (..., N) in x's dtype."""
    import torch
    n, k = w.shape
    lib = _library()
    rows = x.numel() // max(1, x.shape[-1])
    if (lib is None or rows > max_rows or w.dtype != torch.bfloat16 or w.device.type != "cpu" or k % 32
            or x.shape[-1] != k or not w.is_contiguous()):
        return None
    threads = max(1, torch.get_num_threads())
    if x.dtype == torch.bfloat16 and bf16_dp():  # the same answer layers.linear's row limit came from
        # Speed: reads and writes bf16 itself (no widened copy of x, no conversion of y)
        x2 = x.reshape(-1, k).contiguous()
        y = torch.empty(rows, n, dtype=torch.bfloat16)
        fn = lib.fg_bf16_matmul_dp
    else:
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()  # bf16 rows widened once, not per weight
        y = torch.empty(rows, n, dtype=torch.float32)
        fn = lib.fg_bf16_matmul
    if lib.fg_openmp():
        ok = fn(w.data_ptr(), x2.data_ptr(), y.data_ptr(), rows, k, n, 0, n, threads) == 0
    else:
        ok = _split(lambda b, e: fn(w.data_ptr(), x2.data_ptr(), y.data_ptr(), rows, k, n, b, e, 1),
                    n, 16, work=rows * n * k)
    if not ok:
        return None
    return y.to(x.dtype).view(*x.shape[:-1], n)
