"""Hardware profile: the measured rates the cost model turns bytes and FLOPs into seconds.

`measure_profile` times, on this machine, the operations the engine's schedule is made of:
host<->compute copies, disk reads and writes that bypass the page cache, layer-shaped matmuls at
decode and prefill row counts, attention at prefill and decode shapes on the compute device and on
the host, dequantization, and the fixed per-layer-call cost (kernel dispatch). It reuses the
engine's own kernels and disk file class, so what is timed is what the engine runs.

Profiles are JSON (`HardwareProfile.to_json` / `from_json`); `load_or_measure` caches the measured
one per (device, dtype) so later runs reuse it. `profiles/t4-gcp.json` holds FlexGen's published
T4 constants, to reproduce the paper's setting on paper.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Union

from ..engine.config import ConfigError, default_dtype

if TYPE_CHECKING:
    from ..engine.model_spec import ModelSpec

PROFILES_DIR = os.path.join(os.path.dirname(__file__), "profiles")
SCHEMA = 5  # 3: compute/disk contention shares; 4: median timings, per-micro-batch schedule cost;
# 5: a prefix read's queueing wait beside the weight stream, the 4-bit loop's curve on AVX512-BF16
# (older cached profiles are measured again)
OPT_VOCAB = 50272
CurveKey = Union[int, str]  # see layer_key / head_key
Curves = dict[CurveKey, list[tuple[int, float]]]


def layer_key(spec: "ModelSpec") -> CurveKey:
    """Key of a decoder layer's shape in `layer_curves`. An OPT layer (ffn = 4 x hidden, heads as
    wide as hidden) is keyed by its hidden size, as in profiles measured before other families
    existed, so those stay valid; any other layer by 'family:hidden:ffn:heads:kv_heads:head_dim'."""
    if spec.family == "opt" and spec.ffn == 4 * spec.hidden and spec.q_width == spec.kv_width == spec.hidden:
        return spec.hidden
    return f"{spec.family}:{spec.hidden}:{spec.ffn}:{spec.num_heads}:{spec.num_kv_heads}:{spec.head_dim}"


def head_key(spec: "ModelSpec") -> CurveKey:
    """Key of an LM head's shape in `head_curves`: the embedding width for OPT's (vocabulary 50272,
    no projection), else 'family:hidden:embed_dim:vocab'."""
    if spec.family == "opt" and spec.vocab_size == OPT_VOCAB and not spec.has_projections:
        return spec.embed_dim
    return f"{spec.family}:{spec.hidden}:{spec.embed_dim}:{spec.vocab_size}"


def opt_probe_spec(hidden: int, vocab: int = OPT_VOCAB) -> "ModelSpec":
    """One OPT decoder layer of width `hidden` (ffn 4 x hidden), the shape behind an integer curve
    key: the public size of that width when there is one (its heads), else heads of 64."""
    from dataclasses import replace

    from ..engine.families import FAMILIES
    from ..engine.model_spec import spec_from_name
    for name, cfg in FAMILIES["opt"].sizes.items():
        if cfg["hidden_size"] == hidden and "word_embed_proj_dim" not in cfg and vocab == OPT_VOCAB:
            return spec_from_name(name).probe(1)
    if hidden % 64:
        raise ConfigError(f"an OPT-shaped probe layer needs a width divisible by 64, got {hidden}")
    heads = hidden // 64
    return replace(spec_from_name("opt-125m").probe(1), name=f"opt-h{hidden}-probe", hidden=hidden,
                   num_heads=heads, num_kv_heads=heads, head_dim=64, ffn=4 * hidden, vocab_size=vocab)


def profile_dtype(device: str, dtype_bytes: int) -> str:
    """The compute dtype a profile is measured in for `dtype_bytes`-byte elements."""
    if dtype_bytes == 4:
        return "float32"
    return "float16" if str(device).startswith("cuda") else "bfloat16"


@dataclass
class HardwareProfile:
    """Rates in bytes/s, FLOP/s and seconds. "compute" is the tier the engine calls "gpu"."""

    name: str
    device: str  # "cpu" or "cuda": where the compute tier lives
    dtype: str  # compute dtype the compute-side rates were measured in
    h2d_bw: float  # host tier -> compute tier (pinned on CUDA; a memcpy when compute is the CPU)
    d2h_bw: float  # compute tier -> host tier
    disk_read_bw: float  # disk -> host, O_DIRECT (no page cache)
    disk_write_bw: float  # host -> disk, including the fsync that makes it durable
    dev_copy_bw: float  # a copy inside the compute tier (weight staging of compute-resident bytes)
    disk_read_serial_bw: float | None = None  # one request at a time (cache prefix reads); None: = read
    # the same while a parallel stream (weights) reads beside it: a device queue serves requests
    # in turn, so one request among several gets a share (this VM disk: 0.2-0.5 GB/s instead of
    # ~1.8 GB/s with 4 weight requests in flight). None: no contention known.
    disk_read_mixed_bw: float | None = None
    # ... and the fixed wait of a small one-request read beside the stream, beyond its bytes: the
    # request ahead of it in the device queue (see _measure_disk; this VM disk: 2.7-4 ms behind an
    # 8 MB request, while a cache prefix of 0.5-2 MB takes 1-4 ms at the mixed rate)
    disk_read_mixed_latency_s: float = 0.0
    disk_sync_s: float = 0.0  # extra cost of reading a disk KV block right after appending a row to it
    # Shares of their rates that compute keeps while the disk streams weights, and the disk keeps
    # while compute runs (measure_contention; 1.0: independent, as FlexGen's model assumes)
    compute_share_disk: float = 1.0
    disk_share_compute: float = 1.0
    # Matmul throughput of layer-shaped products, as (rows, FLOP/s) points; rows = tokens in the
    # product (gpu_batch_size when decoding, gpu_batch_size * prompt_len in prefill). Interpolated
    # log-log. Profiles without a curve (FlexGen's fitted T4 constants) give one rate per phase.
    mm_curve: list[tuple[int, float]] = field(default_factory=list)
    mm_flops_prefill: float | None = None
    mm_flops_decode: float | None = None
    # Whole decoder layers (the engine's own layer function: matmuls, norms, bias, rotary, residuals,
    # op dispatch) per layer shape (layer_key): [(rows, FLOP/s counted as ModelSpec.layer_matmul_flops)];
    # and the LM head with greedy sampling per head shape (head_key; FLOPs ModelSpec.head_flops).
    # Used when present.
    layer_curves: Curves = field(default_factory=dict)
    head_curves: Curves = field(default_factory=dict)
    # CPU compute: the fused 4-bit matmul (compression.fused_int4: torch's
    # _weight_int4pack_mm_for_cpu or the compiled loop) on the same MLP shapes as mm_curve,
    # [(rows, FLOP/s)]; 4-bit decoder weights are multiplied by it (empty: n/a)
    int4_curve: list[tuple[int, float]] = field(default_factory=list)
    # prompt attention on the compute device, in FLOPs of ModelSpec.attention_flops (causal: each
    # query against half the prompt on average)
    attn_prefill_flops: float = 1e12
    attn_prefill_overhead_s: float = 0.0  # fixed cost per prompt-attention call
    attn_decode_bw: float = 1e11  # K+V bytes attended per second, compute device
    attn_decode_overhead_s: float = 0.0  # fixed cost per decode-attention call
    host_attn_decode_bw: float = 1e10  # the same on the host (CPU delegation of decode attention)
    dequant_bw: float = 1e10  # dequantized output bytes per second on the compute device
    quant_bw: float = 1e9  # input bytes quantized per second on the compute device (new KV entries)
    layer_overhead_s: float = 0.0  # fixed cost of one layer call on one micro-batch (op dispatch)
    # Measured on the engine itself with a tiny model: its schedule's fixed cost per (layer,
    # micro-batch) beyond the layer function (futures, views, cache bookkeeping), and the extra
    # fixed cost of each KV block on disk per decode step (append, wait, read request, re-layout).
    sched_overhead_s: float = 0.0
    disk_block_s: float = 0.0
    copy_overlaps_compute: bool = True  # DMA engines (CUDA); False: copies run on the compute cores
    host_cores: int = 0  # CPU compute device: cores shared by compute and the I/O threads' copies (0: n/a)
    disk_direct: bool = True  # False when O_DIRECT was refused (tmpfs) and fadvise was the fallback
    source: str = "measured"
    meta: dict = field(default_factory=dict)

    # ---- rates ------------------------------------------------------------------------------
    def mm_rate(self, rows: int, prefill: bool) -> float:
        """FLOP/s of a layer-shaped matmul on `rows` tokens."""
        if not self.mm_curve:
            rate = self.mm_flops_prefill if prefill else self.mm_flops_decode
            if rate is None:
                raise ConfigError(f"profile {self.name} has neither mm_curve nor mm_flops_*")
            return rate
        return _interp_rows(self.mm_curve, rows)

    def int4_rate(self, rows: int) -> float | None:
        """FLOP/s of the fused 4-bit CPU matmul on `rows` tokens (None: not measured)."""
        return _interp_rows(self.int4_curve, rows) if self.int4_curve else None

    def layer_rate(self, rows: int, spec: "ModelSpec") -> float | None:
        """FLOP/s of one of `spec`'s decoder layers on `rows` tokens: its own measured curve, else
        the OPT-shaped curves at its hidden width (None: no layer curves, use mm_rate + overheads)."""
        return _curve_rate(self.layer_curves, rows, layer_key(spec), spec.hidden)

    def head_rate(self, rows: int, spec: "ModelSpec") -> float | None:
        """FLOP/s of `spec`'s LM head with greedy sampling, likewise."""
        return _curve_rate(self.head_curves, rows, head_key(spec), spec.embed_dim)

    # ---- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("mm_curve", "int4_curve"):
            d[k] = [[int(r), float(f)] for r, f in getattr(self, k)]
        for k in ("layer_curves", "head_curves"):
            d[k] = {str(w): [[int(r), float(f)] for r, f in c] for w, c in getattr(self, k).items()}
        d["schema"] = SCHEMA
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in d]
        if missing:
            raise ConfigError(f"hardware profile lacks {', '.join(missing)}; re-run `flexgen-helm profile`")
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("mm_curve", "int4_curve"):
            kw[k] = [(int(r), float(f)) for r, f in kw.get(k, [])]
        for k in ("layer_curves", "head_curves"):
            kw[k] = {_read_key(w): [(int(r), float(f)) for r, f in c] for w, c in kw.get(k, {}).items()}
        return cls(**kw)

    def to_json(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)  # never leave a half-written cache behind

    @classmethod
    def from_json(cls, path: str) -> "HardwareProfile":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read hardware profile {path}: {e}") from e


def _interp_rows(curve: list[tuple[int, float]], rows: float) -> float:
    """Log-log interpolation of (rows, rate) points; proportional below the first point (a fixed
    cost per call dominates there), flat beyond the last."""
    pts = sorted(curve)
    if rows <= pts[0][0]:
        return pts[0][1] * rows / pts[0][0]
    if rows >= pts[-1][0]:
        return pts[-1][1]
    for (r0, f0), (r1, f1) in zip(pts, pts[1:]):
        if r0 <= rows <= r1:
            t = math.log(rows / r0) / math.log(r1 / r0)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    return pts[-1][1]


def _read_key(key: str | int) -> CurveKey:
    """JSON object keys are strings: OPT widths back to int."""
    return int(key) if str(key).isdigit() else str(key)


def _curve_rate(curves: Curves, rows: float, key: CurveKey, width: int) -> float | None:
    """The curve of exactly this shape when measured, else the OPT-shaped (integer-keyed) curves
    interpolated at `width` (a profile of another machine, measured for other models)."""
    if key in curves:
        return _interp_rows(curves[key], rows)
    return _interp_2d({w: c for w, c in curves.items() if isinstance(w, int)}, rows, width)


def _interp_2d(curves: dict[int, list[tuple[int, float]]], rows: float, width: int) -> float | None:
    """Rate at (rows, width): each width's curve at `rows`, then log-linear in width (flat outside)."""
    if not curves:
        return None
    ws = sorted(curves)
    if width <= ws[0]:
        return _interp_rows(curves[ws[0]], rows)
    if width >= ws[-1]:
        return _interp_rows(curves[ws[-1]], rows)
    for w0, w1 in zip(ws, ws[1:]):
        if w0 <= width <= w1:
            f0, f1 = _interp_rows(curves[w0], rows), _interp_rows(curves[w1], rows)
            t = math.log(width / w0) / math.log(w1 / w0)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    return None


def load_profile(name_or_path: str) -> HardwareProfile:
    """A JSON path, or the name of a shipped profile ("t4-gcp")."""
    if os.path.exists(name_or_path):
        return HardwareProfile.from_json(name_or_path)
    shipped = os.path.join(PROFILES_DIR, f"{name_or_path}.json")
    if os.path.exists(shipped):
        return HardwareProfile.from_json(shipped)
    names = sorted(f[:-5] for f in os.listdir(PROFILES_DIR) if f.endswith(".json"))
    raise ConfigError(f"no hardware profile {name_or_path!r}: pass a JSON file from `flexgen-helm profile` "
                      f"or one of the shipped profiles: {', '.join(names)}")


def cache_path(device: str, dtype: str) -> str:
    root = os.environ.get("FLEXGEN_HELM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flexgen_helm")
    import torch  # the thread count changes CPU rates a lot (and how other processes disturb them)
    return os.path.join(root, f"profile-{platform.node()}-{device.split(':')[0]}-{dtype}"
                              f"-t{torch.get_num_threads()}.json")


def load_or_measure(device: str = "cpu", dtype: str | None = None, offload_dir: str | None = None,
                    refresh: bool = False, log: Callable[[str], None] | None = None,
                    spec: "ModelSpec | None" = None) -> HardwareProfile:
    """The cached profile for this machine, device and dtype, measuring (and caching) it if absent.
    With a model's `spec`, its decoder-layer and LM-head curves are measured on its own shapes if
    the profile lacks them (seconds), and cached too."""
    dtype = dtype or default_dtype(device)
    path = cache_path(device, dtype)
    prof = None
    if not refresh and os.path.exists(path):
        try:
            with open(path) as f:
                d = json.load(f)
            # cached before a measured field existed: its default would mislead, so measure again
            prof = HardwareProfile.from_dict(d) if d.get("schema", 0) >= SCHEMA else None
        except (ConfigError, OSError, ValueError):
            prof = None  # broken cache: measure again
    if prof is None:
        prof = measure_profile(device=device, dtype=dtype, offload_dir=offload_dir, log=log)
        prof.to_json(path)
    if spec is None:
        return prof
    wider = with_widths(prof, spec, log=log)
    if wider is not prof:
        wider.to_json(path)
    return wider


def with_widths(prof: HardwareProfile, spec: "ModelSpec", budget_s: float = 20.0,
                log: Callable[[str], None] | None = None) -> HardwareProfile:
    """The profile with curves of `spec`'s own decoder layer (family, hidden, ffn, heads, kv heads,
    head_dim) and LM head measured on this machine if it lacks them. Interpolating between widths
    misleads (on a 2-core Xeon, opt-350m's 1024-wide layers ran ~610 GFLOP/s where the 768 and
    2048 curves said ~440), and so would another family's layer, so the model's own shape is
    measured. Profiles of other machines are left alone."""
    need_layer = layer_key(spec) not in prof.layer_curves
    need_head = head_key(spec) not in prof.head_curves
    if not (need_layer or need_head) or prof.source != "measured" or prof.meta.get("host") != platform.node():
        return prof
    import torch
    dev = torch.device(prof.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return prof
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    layers_, heads = _measure_curves(dev, getattr(torch, prof.dtype), sync, budget_s / 20,
                                     (spec,) if need_layer else (), (spec,) if need_head else (),
                                     log or (lambda s: None))
    return dataclasses.replace(prof, layer_curves={**prof.layer_curves, **layers_},
                               head_curves={**prof.head_curves, **heads})


def _measure_curves(dev, tdtype, sync, per: float, layer_specs: tuple["ModelSpec", ...],
                    head_specs: tuple["ModelSpec", ...], log: Callable[[str], None]) -> tuple[Curves, Curves]:
    """Decoder-layer curves of `layer_specs` and LM-head curves of `head_specs`, keyed by
    layer_key / head_key (`per`: a probe's seconds in measure_profile; each curve point gets a
    quarter of it)."""
    on_cuda = dev.type == "cuda"
    layer_curves: Curves = {}
    for spec in layer_specs:
        c = layer_curves[layer_key(spec)] = _layer_curve(dev, tdtype, sync, per / 4, spec, on_cuda)
        log(f"decoder layer {layer_key(spec)}: " + ", ".join(f"{r}:{f / 1e9:.0f}" for r, f in c) + " GFLOP/s")
    head_curves: Curves = {}
    for spec in head_specs:
        c = head_curves[head_key(spec)] = _head_curve(dev, tdtype, sync, per / 4, spec)
        log(f"LM head {head_key(spec)}: " + ", ".join(f"{r}:{f / 1e9:.0f}" for r, f in c) + " GFLOP/s")
    return layer_curves, head_curves


# ---- measurement ------------------------------------------------------------------------------

def _timeit(fn: Callable[[], object], sync: Callable[[], None], min_time: float, min_reps: int = 2,
            max_reps: int = 1000) -> float:
    """Seconds per call of fn after one warm-up call: the median of the samples. An engine run is a
    long sum of calls, so it lasts about as long as its typical call, not its fastest ones: on 2
    Zen 3 vCPUs the 20th percentile (used before) was 7% below the median for a decoder layer and up
    to 27% below it for an LM head, and the policy search over-predicted every policy it was
    checked on (validate run 9). Minute-long slowdowns of a neighbour are left out by the callers
    (best of several sweeps), as validate leaves them out of runs (best of several rounds)."""
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return _median(times)


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def measure_profile(device: str = "cpu", dtype: str = "bfloat16", offload_dir: str | None = None,
                    budget_s: float = 20.0, disk_mb: int = 256, hidden: int = 2048,
                    widths: tuple[int, ...] | None = None, head_widths: tuple[int, ...] | None = None,
                    specs: tuple["ModelSpec", ...] = (), quick: bool = False,
                    log: Callable[[str], None] | None = None) -> HardwareProfile:
    """Measure this machine. `budget_s` scales the time spent per probe (the default takes ~40 s on
    two CPU cores); `disk_mb` is the file size for the disk probe, `hidden` the width of the plain
    matmul probe, `widths` / `head_widths` the widths of OPT-shaped decoder-layer and LM-head probes,
    `specs` models whose own layer and head shapes are probed too (weights are cycled over copies
    larger than typical caches so that reads are real). `quick`: small buffers and no cache-busting
    copies (tests)."""
    import torch

    from ..engine import compression, layers
    from ..engine.config import CompressionConfig
    from ..engine.tiers import copies_share_compute_cores

    log = log or (lambda s: None)
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA device is available; use --device cpu")
    tdtype = getattr(torch, dtype, None)
    if not isinstance(tdtype, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float16, bfloat16 or float32")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    per = budget_s / 20  # seconds per elementary probe
    esize = torch.empty(0, dtype=tdtype).element_size()
    meta: dict = {"torch": torch.__version__, "host": platform.node(), "threads": torch.get_num_threads(),
                  "time": time.strftime("%Y-%m-%d %H:%M:%S"), "hidden_probe": hidden, "disk_mb": disk_mb}
    if on_cuda:
        meta["gpu"] = torch.cuda.get_device_name(dev)

    # copies made between compute calls are timed there, below (copies_share_compute_cores)
    share_cores = copies_share_compute_cores(dev)
    if not share_cores:
        h2d, d2h, dcopy = measure_copies(dev, per, log, copy_mb=8 if quick else 256)
    disk = measure_disk(offload_dir, disk_mb, per, log)

    # -- matmuls shaped like an OPT MLP (h -> 4h -> h); 3 weight pairs cycled so that at hidden=2048
    # (48 MB bf16 per pair) decode-size products read weights from memory, not from cache.
    h = hidden
    pairs = [(torch.randn(4 * h, h, device=dev).to(tdtype), torch.randn(h, 4 * h, device=dev).to(tdtype))
             for _ in range(3)]
    curve: list[tuple[int, float]] = []
    for rows in (1, 4, 16, 64, 256, 1024, 4096):
        x = torch.randn(rows, h, device=dev).to(tdtype)
        it = [0]

        def mlp() -> None:
            w1, w2 = pairs[it[0] % len(pairs)]
            it[0] += 1
            layers.linear(layers.linear(x, w1), w2)  # the engine's kernel choice (e.g. emulated bf16)
        t = _timeit(mlp, sync, per / 2)
        curve.append((rows, 2 * rows * 8 * h * h / t))
    int4_curve: list[tuple[int, float]] = []
    from ..engine import kernels
    if not on_cuda and (esize == 2 or (esize == 4 and kernels.available())):
        # the engine's CPU layout for 4-bit weights (placement.layer_layout): torch's kernel in
        # bf16, the compiled loop in fp32
        wcfg = CompressionConfig()
        cls = compression.fused_int4(esize)
        q = [(cls.from_dense(w1, wcfg, tdtype), cls.from_dense(w2, wcfg, tdtype)) for w1, w2 in pairs]
        for rows in (1, 4, 16, 64, 256, 1024):
            x = torch.randn(rows, h).to(tdtype)
            it = [0]

            def mlp4() -> None:
                a, b = q[it[0] % len(q)]
                it[0] += 1
                layers.linear(layers.linear(x, a), b)  # the engine's choice by rows (loop or dequantize)
            int4_curve.append((rows, 2 * rows * 8 * h * h / _timeit(mlp4, sync, per / 2)))
        del q
        log("fused 4-bit matmul " + ", ".join(f"{r}:{f / 1e9:.0f}" for r, f in int4_curve) + " GFLOP/s")
    # -- compute and a disk stream at once (a disk-streaming schedule overlaps them): a decode-sized
    # MLP, 32 rows
    x32, it32 = torch.randn(32, h, device=dev).to(tdtype), [0]

    def mlp32() -> None:
        w1, w2 = pairs[it32[0] % len(pairs)]
        it32[0] += 1
        layers.linear(layers.linear(x32, w1), w2)
        sync()
    share_c, share_d = measure_contention(mlp32, offload_dir, disk_mb << 20, per / 2)
    log(f"beside a disk stream compute keeps {share_c:.0%} of its rate; beside compute the disk keeps "
        f"{share_d:.0%} of its read rate")
    if share_cores:  # the engine copies between compute calls: price them there
        h2d = d2h = dcopy = _copy_between_compute(mlp32, (8 if quick else 32) << 20, per)
        log(f"copy between compute calls {h2d / 1e9:.2f} GB/s")
    del pairs
    log("matmul " + ", ".join(f"{r}:{f / 1e9:.0f}" for r, f in curve) + " GFLOP/s (rows:rate)")

    # -- whole decoder layers and LM heads, with the engine's functions, at a few OPT widths and the
    # shapes of the given models
    if widths is None:
        widths = (1024, 4096, 8192) if on_cuda else (768, 2048, 4096)
    if head_widths is None:
        head_widths = widths[:2]
    layer_specs = tuple(opt_probe_spec(w) for w in widths) + tuple(specs)
    head_specs = tuple(opt_probe_spec(e) for e in head_widths) + tuple(specs)
    layer_curves, head_curves = _measure_curves(dev, tdtype, sync, per, layer_specs, head_specs, log)

    # -- attention with the engine's kernels, fitted as fixed cost + size / rate from two sizes;
    # counted with ModelSpec's formulas on a 16-head, 64-wide-head shape
    att = opt_probe_spec(1024)
    heads, d = att.num_heads, att.head_dim

    def prefill_probe(b: int, s: int) -> tuple[float, float]:
        q = torch.randn(b, heads, s, d, device=dev).to(tdtype)
        mask = torch.ones(b, s, dtype=torch.bool, device=dev)
        flops = att.attention_flops(b * s, s / 2)  # causal: half the prompt per query on average
        return flops, _timeit(lambda: layers.prefill_attention(q, q, q, mask), sync, per / 2)
    attn_pre, attn_pre_ov = _fit(prefill_probe(1, 64), prefill_probe(4, 512))

    def decode_probe(rows: int, ctx: int, where) -> tuple[float, float]:
        # capacity > ctx like the cache; as many blocks as it takes to overflow the last-level cache,
        # since a decode step walks every layer's blocks once (they are cold when attended)
        one = torch.randn(2, rows, heads, ctx + 16, d, device=where).to(tdtype)
        copies = 1 if quick else min(64, _cold_copies(one.numel() * esize))
        bufs = [one] + [one.clone() for _ in range(copies - 1)]
        q1 = torch.randn(rows, heads, 1, d, device=where).to(tdtype)
        m1 = torch.ones(rows, ctx, dtype=torch.bool, device=where)
        it = [0]

        def call() -> None:
            b = bufs[it[0] % len(bufs)]
            it[0] += 1
            layers.decode_attention(q1, b[0, :, :, :ctx], b[1, :, :, :ctx], m1)
        sy = sync if where == dev else (lambda: None)
        return rows * ctx * att.kv_bytes_per_token(esize), _timeit(call, sy, per / 2)
    attn_dec, attn_dec_ov = _fit(decode_probe(4, 128, dev), decode_probe(16, 1024, dev))
    if on_cuda:
        host_dec, _ = _fit(decode_probe(4, 128, torch.device("cpu")), decode_probe(16, 1024, torch.device("cpu")))
    else:
        host_dec = attn_dec
    log(f"attention prefill {attn_pre / 1e9:.0f} GFLOP/s + {attn_pre_ov * 1e6:.0f} us/call, decode "
        f"{attn_dec / 1e9:.1f} GB/s + {attn_dec_ov * 1e6:.0f} us/call (host {host_dec / 1e9:.1f} GB/s)")

    # -- 4-bit g64 (de)quantization in the engine's weight format: weights at load, KV entries at decode
    cfg = CompressionConfig()
    w = torch.randn(4 * h, h, device=dev).to(tdtype)
    packed, meta_t = compression.quantize(w, cfg)
    deq = w.numel() * esize / _timeit(lambda: compression.dequantize(packed, meta_t, w.shape, cfg, tdtype),
                                      sync, per / 2)
    kv_new = torch.randn(64, heads, 1, d, device=dev).to(tdtype)
    kcfg = CompressionConfig(num_bits=4, group_size=64, group_dim=-1)
    qnt = kv_new.numel() * esize / _timeit(lambda: compression.quantize(kv_new, kcfg), sync, per / 2)
    del w, packed, meta_t
    log(f"dequantize {deq / 1e9:.2f} GB/s out, quantize {qnt / 1e9:.3f} GB/s in")

    # -- fixed cost per layer call: a decoder layer of width 64 on one token is all dispatch
    overhead = _layer_overhead(dev, tdtype, sync, per / 2)
    sched, disk_block = _engine_overheads(dev, tdtype, offload_dir, attn_dec_ov, quick)
    log(f"layer-call overhead {overhead * 1e6:.0f} us; engine schedule +{sched * 1e6:.0f} us per layer and "
        f"micro-batch, +{disk_block * 1e6:.0f} us per disk KV block and step")
    if not quick:
        # A shared virtual disk changes speed from one minute to the next (this VM's: ~2.5 or ~4.9
        # GB/s): probe it again at the end of the profile and average the two, since a run of the
        # engine lasts long enough to see both speeds (the better of the two over-predicted
        # disk-streaming workloads by up to 1.8x, validate run 7b)
        again = _measure_disk(offload_dir, disk_mb << 20, per)
        log("disk again: " + _disk_line(again))
        disk = {k: v if isinstance(v, bool) else (v + again[k]) / 2 for k, v in disk.items()}

    return HardwareProfile(
        name=f"{platform.node()}-{dev.type}", device=dev.type, dtype=dtype, h2d_bw=h2d, d2h_bw=d2h,
        dev_copy_bw=dcopy, **disk, compute_share_disk=share_c, disk_share_compute=share_d,
        mm_curve=curve, int4_curve=int4_curve,
        layer_curves=layer_curves, head_curves=head_curves, attn_prefill_flops=attn_pre,
        attn_prefill_overhead_s=attn_pre_ov, attn_decode_bw=attn_dec, attn_decode_overhead_s=attn_dec_ov,
        host_attn_decode_bw=host_dec, dequant_bw=deq, quant_bw=qnt,
        layer_overhead_s=overhead, sched_overhead_s=sched, disk_block_s=disk_block,
        # CUDA copies run on DMA engines; on a CPU compute device the I/O threads' copies overlap
        # compute only when torch leaves a core free for them
        copy_overlaps_compute=not share_cores,
        host_cores=0 if on_cuda else (os.cpu_count() or 1),
        source="measured", meta=meta)


def measure_copies(dev, per: float, log: Callable[[str], None], copy_mb: int = 256) -> tuple[float, float, float]:
    """(host->compute, compute->host, within-compute) copy rates in bytes/s, each copy timed alone."""
    import torch
    on_cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    # 256 MB so that host-side copies are not served from a large last-level cache; pinned host
    # memory on CUDA (what the engine stages through)
    n = copy_mb << 20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=on_cuda)
    comp = torch.empty(n, dtype=torch.uint8, device=dev)
    h2d = n / _timeit(lambda: comp.copy_(host, non_blocking=True), sync, per)
    d2h = n / _timeit(lambda: host.copy_(comp, non_blocking=True), sync, per)
    if on_cuda:
        comp2 = torch.empty_like(comp)
        dcopy = n / _timeit(lambda: comp2.copy_(comp), sync, per)
        del comp2
    else:  # the compute tier is host memory: every copy is a memcpy
        dcopy = h2d = d2h = (h2d + d2h) / 2
    del host, comp
    log(f"copy host->compute {h2d / 1e9:.2f} GB/s, compute->host {d2h / 1e9:.2f} GB/s, "
        f"within compute {dcopy / 1e9:.2f} GB/s")
    return h2d, d2h, dcopy


def measure_disk(offload_dir: str | None, disk_mb: int, per: float, log: Callable[[str], None]) -> dict:
    """The disk figures (profile fields, see _measure_disk), logged."""
    disk = _measure_disk(offload_dir, disk_mb << 20, per)
    log("disk " + _disk_line(disk))
    return disk


def _disk_line(d: dict) -> str:
    return (f"read {d['disk_read_bw'] / 1e9:.2f} GB/s ({d['disk_read_serial_bw'] / 1e9:.2f} one request at a "
            f"time, {d['disk_read_mixed_bw'] / 1e9:.2f} beside a parallel stream; a small one waits "
            f"{d['disk_read_mixed_latency_s'] * 1e3:.1f} ms for a request ahead), write "
            f"{d['disk_write_bw'] / 1e9:.2f} GB/s, append-then-read +{d['disk_sync_s'] * 1e3:.2f} ms "
            f"({'O_DIRECT' if d['disk_direct'] else 'fadvise'})")


def refresh_io(hw: HardwareProfile, offload_dir: str | None = None, seconds: float = 4.0,
               log: Callable[[str], None] | None = None) -> HardwareProfile:
    """The profile with its copy and disk rates measured again now (a few seconds): on shared
    machines I/O rates drift with what the neighbours do, compute rates much less."""
    import torch
    dev = torch.device("cuda" if hw.device == "cuda" else "cpu")
    log = log or (lambda s: None)
    if hw.device == "cpu" and not hw.copy_overlaps_compute:  # priced between compute calls: kept
        h2d, d2h, dcopy = hw.h2d_bw, hw.d2h_bw, hw.dev_copy_bw
    else:
        h2d, d2h, dcopy = measure_copies(dev, seconds / 6, log)
    disk = measure_disk(offload_dir, 256, seconds / 6, log)
    return dataclasses.replace(hw, h2d_bw=h2d, d2h_bw=d2h, dev_copy_bw=dcopy, **disk)


@contextlib.contextmanager
def disk_read_probe(offload_dir: str | None, nbytes: int = 256 << 20):
    """A callable `rate(per=0.4) -> B/s`: the profile's parallel O_DIRECT read rate measured again
    now, on one probe file written once (validate brackets each timed run with it: this machine's
    disk rate swings 2x within a minute, so a profile taken before a workload prices its runs at a
    rate the runs may not see)."""
    with _probe_file(offload_dir, nbytes) as (f, buf):
        yield lambda per=0.4: nbytes / _timeit(lambda: f.read_into(0, buf[:nbytes]), lambda: None, per)


def with_disk_rate(hw: HardwareProfile, read_bw: float) -> HardwareProfile:
    """The profile with its disk read rates scaled to a parallel read rate measured later (the
    one-request and mixed rates keep their measured ratios to it, the queueing wait scales inversely)."""
    k = read_bw / hw.disk_read_bw
    return dataclasses.replace(hw, disk_read_bw=read_bw,
                               disk_read_serial_bw=hw.disk_read_serial_bw and hw.disk_read_serial_bw * k,
                               disk_read_mixed_bw=hw.disk_read_mixed_bw and hw.disk_read_mixed_bw * k,
                               disk_read_mixed_latency_s=hw.disk_read_mixed_latency_s / k)


def _llc_bytes() -> int:
    """Last-level CPU cache size (Linux sysfs), 32 MB when unknown."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return 32 << 20


def _cold_copies(nbytes: int) -> int:
    """How many distinct buffers of nbytes to cycle so each use finds its buffer out of the
    last-level cache (twice its size in total), capped at 1 GB."""
    return max(1, min(2 * _llc_bytes(), 1 << 30) // max(1, nbytes) + 1)


def _fit(small: tuple[float, float], large: tuple[float, float]) -> tuple[float, float]:
    """(rate, fixed seconds per call) through two (work, seconds) points."""
    (w0, t0), (w1, t1) = small, large
    if t1 <= t0:  # noise: no measurable fixed part
        return w1 / t1, 0.0
    rate = (w1 - w0) / (t1 - t0)
    return rate, max(0.0, t0 - w0 / rate)


def _tiny_opt_spec(num_layers: int = 1) -> "ModelSpec":
    """An OPT of width 64 (4 heads of 16, vocabulary 512): a layer call there is all dispatch."""
    from dataclasses import replace

    from ..engine.model_spec import spec_from_name
    return replace(spec_from_name("opt-125m").probe(num_layers, max_positions=128), name="tiny-probe",
                   hidden=64, num_heads=4, num_kv_heads=4, head_dim=16, ffn=256, vocab_size=512)


def _layer_weights(spec: "ModelSpec", j: int, dev, tdtype) -> dict:
    """Scheduling layer j of `spec` as layers.py reads it (keyed by role), synthetic values."""
    from ..engine.weights import DummyReader
    reader = DummyReader(spec)
    return {ref.role: reader.get_shaped(ref).to(device=dev, dtype=tdtype) for ref in spec.layer_tensors(j)}


def _decode_step(spec: "ModelSpec", rows: int, ctx: int, dev, tdtype):
    """(x, attend, rotary) for one decode step of `rows` sequences over `ctx` cached positions."""
    import torch

    from ..engine import layers
    from ..engine.rope import Rotary
    x = torch.randn(rows, 1, spec.hidden, device=dev).to(tdtype)
    kv = torch.randn(rows, spec.num_kv_heads, ctx, spec.head_dim, device=dev).to(tdtype)
    mask = torch.ones(rows, ctx, dtype=torch.bool, device=dev)
    rotary = None
    if spec.positions == "rotary":
        pos = torch.full((rows, 1), ctx, dtype=torch.long, device=dev)
        rotary = Rotary(spec.rope, spec.head_dim).cos_sin(pos, tdtype)
    return x, (lambda q, k, v: layers.decode_attention(q, kv, kv, mask)), rotary


def _best_of_passes(points: tuple[int, ...], measure: Callable[[int], float], passes: int,
                    too_long: Callable[[int, float], bool] = lambda rows, rate: False) -> list[tuple[int, float]]:
    """(rows, best rate) over `passes` sweeps of the points. Sweeping again, instead of timing each
    point longer, spreads each point's samples over the whole probe, so a few seconds of
    neighbour load on a shared machine slow one sweep of a point, not the point."""
    best: dict[int, float] = {}
    for p in range(passes):
        for rows in points:
            if p == 0 and best and too_long(rows, best[max(best)]):
                break
            if p > 0 and rows not in best:
                break
            best[rows] = max(best.get(rows, 0.0), measure(rows))
    return sorted(best.items())


# Row counts of the layer and head curves. 96 and 128 bracket the engine's switch from its compiled
# bf16 loop to widened fp32 matmuls (layers.BF16_LOOP_MAX_ROWS) and the fp32 4-bit loop's switch:
# log-log interpolation from 64 to 256 across it put a 128-row prefill at 0.7x its measured rate.
CURVE_ROWS = (1, 4, 16, 64, 96, 128, 256, 1024, 4096)


def _layer_curve(dev, tdtype, sync, per: float, spec: "ModelSpec", on_cuda: bool,
                 passes: int = 3) -> list[tuple[int, float]]:
    """FLOP/s (ModelSpec.layer_matmul_flops) of layers.decoder_layer with one of `spec`'s decoder
    layers on `rows` one-token sequences (attention over 16 cached positions, so this is the layer
    without its context-dependent attention)."""
    from ..engine import layers

    probe = spec.probe(1)
    layer_bytes = probe.layer_params(1) * _itemsize(tdtype)
    # a few distinct copies cycled (on a 2-core Xeon with a 300 MB L3, small-row bf16 layers ran at
    # the same speed with weights hot or cold: the kernels, not memory, bound them)
    copies = min(4, _cold_copies(layer_bytes)) if not on_cuda else 1
    base = _layer_weights(probe, 1, dev, tdtype)
    ws = [base] + [{k: v.clone() for k, v in base.items()} for _ in range(copies - 1)]
    flops_per_row = probe.layer_matmul_flops(1)

    def measure(rows: int) -> float:
        x, attend, rotary = _decode_step(probe, rows, 16, dev, tdtype)
        it = [0]

        def call() -> None:
            layers.decoder_layer(ws[it[0] % copies], probe, x, attend, rotary)
            it[0] += 1
        return rows * flops_per_row / _timeit(call, sync, per / passes)
    # beyond ~0.5 s per call the curve is flat; larger sizes are extrapolated flat
    out = _best_of_passes(CURVE_ROWS, measure, passes,
                          lambda rows, rate: rows * flops_per_row / rate > 0.5)
    del ws
    return out


def _head_curve(dev, tdtype, sync, per: float, spec: "ModelSpec", passes: int = 3) -> list[tuple[int, float]]:
    """FLOP/s (ModelSpec.head_flops) of layers.lm_head with `spec`'s head on the last position plus
    greedy sampling (log_softmax, argmax)."""
    import torch

    from ..engine import layers
    from ..engine.sampling import SamplingParams, next_tokens

    probe = spec.probe(1)
    w = _layer_weights(probe, probe.num_layers + 1, dev, tdtype)
    params = SamplingParams()

    def measure(rows: int) -> float:
        x = torch.randn(rows, 1, probe.hidden, device=dev).to(tdtype)
        t = _timeit(lambda: next_tokens(layers.lm_head(w, probe, x)[:, 0], params, None), sync, per / passes)
        return probe.head_flops(rows) / t
    return _best_of_passes(tuple(r for r in CURVE_ROWS if r <= 256), measure, passes)


def _itemsize(tdtype) -> int:
    import torch
    return torch.empty(0, dtype=tdtype).element_size()


def _engine_overheads(dev, tdtype, offload_dir: str | None, attn_call_s: float,
                      quick: bool = False) -> tuple[float, float]:
    """(schedule overhead per scheduling layer and micro-batch, extra cost per disk KV block and
    decode step), from decode steps of the engine on a tiny 8-layer model where the math is
    negligible. The first is what one more micro-batch adds to a step, less its decode-attention
    calls (attn_call_s each, priced by the attention probe): the cache write, the per-micro-batch
    views and bookkeeping of every layer, its sampling. Block-wide decode runs one layer call for
    all micro-batches, so this is not the cost of a layer call (measured on 2 Zen 3 vCPUs, bf16:
    ~100 us per layer and micro-batch beside a ~540 us layer call; charged nothing before, as the
    difference of the two clipped at zero)."""
    from ..engine.config import MemoryBudget, Policy
    from ..engine.engine import Engine
    from ..engine.weights import DummyReader

    spec = _tiny_opt_spec(num_layers=8)
    L, K, steps, runs = spec.num_layers, 4, (4 if quick else 16), (1 if quick else 3)
    root = tempfile.mkdtemp(prefix="flexgen-profile-", dir=offload_dir)

    def step_s(percent: list[float], ccc: bool, k: int) -> float:
        pol = Policy.from_percent(percent, gpu_batch_size=2, num_gpu_batches=k, cpu_cache_compute=ccc)
        eng = Engine(spec, pol, DummyReader(spec), dev, tdtype, root, MemoryBudget(), "probe")
        try:
            prompts = [[2, 5, 6, 7]] * (2 * k)
            eng.generate(prompts, max_new_tokens=3)
            best = min(eng.generate(prompts, max_new_tokens=steps + 1).stats.decode_time for _ in range(runs))
        finally:
            eng.close()
        return best / steps
    try:
        resident = [100, 0, 100, 0, 100, 0]
        one, many = step_s(resident, False, 1), step_s(resident, False, K)
        host = step_s([100, 0, 0, 100, 100, 0], True, K)
        disk = step_s([100, 0, 0, 0, 100, 0], True, K)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_mb = (many - one) / (K - 1)  # one more micro-batch, every layer of a step
    return max(0.0, (per_mb - L * attn_call_s) / (L + 2)), max(0.0, (disk - host) / (K * L))


def _layer_overhead(dev, tdtype, sync, per: float) -> float:
    """Seconds of one decoder-layer call of width 64 on one token: all dispatch, no math."""
    from ..engine import layers

    spec = _tiny_opt_spec()
    w = _layer_weights(spec, 1, dev, tdtype)
    x, attend, rotary = _decode_step(spec, 1, 16, dev, tdtype)
    return _timeit(lambda: layers.decoder_layer(w, spec, x, attend, rotary), sync, per, min_reps=20)


@contextlib.contextmanager
def _probe_file(offload_dir: str | None, nbytes: int):
    """(disk file, aligned host buffer) of nbytes, through the engine's disk file class, in a temp
    directory inside offload_dir (removed afterwards)."""
    import torch

    from ..engine.tiers import Tiers, aligned_host_buffer

    root = tempfile.mkdtemp(prefix="flexgen-profile-", dir=offload_dir)
    tiers = Tiers(torch.device("cpu"), root, None, None, None, pin_memory=False)
    try:
        f = tiers.disk_file("probe.bin", nbytes, "disk probe")
        buf = aligned_host_buffer(nbytes)
        buf.random_(0, 255)
        f.write(0, buf[:nbytes])
        f.flush()  # fsync + drop from the page cache: reads must hit the disk
        yield f, buf
    finally:
        tiers.close()
        shutil.rmtree(root, ignore_errors=True)


def _measure_disk(offload_dir: str | None, nbytes: int, per: float) -> dict:
    """Disk fields of the profile: parallel read, one-request-at-a-time read (alone, and beside a
    parallel stream) and write in B/s, the append-then-read extra seconds, whether O_DIRECT was
    used; timed through the engine's disk file class (weights are read with parallel requests,
    cache prefixes without)."""
    import threading

    from ..engine.tiers import ALIGN, aligned_host_buffer

    with _probe_file(offload_dir, nbytes) as (f, buf):
        def write() -> None:
            f.write(0, buf[:nbytes])
            f.flush()  # fsync + drop from the page cache: the read below must hit the disk
        wr = nbytes / _timeit(write, lambda: None, per)
        rd = nbytes / _timeit(lambda: f.read_into(0, buf[:nbytes]), lambda: None, per)
        rd1 = nbytes / _timeit(lambda: f.read_into(0, buf[:nbytes], parallel=False), lambda: None, per)
        # one-request reads of the second half while parallel reads of the first half stream, as
        # cache prefixes are read while the next layer's weights load
        half = nbytes // 2 // ALIGN * ALIGN
        other = aligned_host_buffer(half)

        def beside_stream(parallel: bool, fn: Callable[[], object], per_s: float, reps: int) -> float:
            """Median seconds of fn while parallel (or one-at-a-time) reads of the first half run."""
            stop = threading.Event()

            def stream() -> None:
                while not stop.is_set():
                    f.read_into(0, other[:half], parallel=parallel)
            bg = threading.Thread(target=stream, daemon=True)
            bg.start()
            try:
                time.sleep(0.05)
                return _timeit(fn, lambda: None, per_s, min_reps=reps)
            finally:
                stop.set()
                bg.join()
        mixed = (nbytes - half) / beside_stream(
            True, lambda: f.read_into(half, buf[half:nbytes], parallel=False), per / 2, 2)
        # Small one-request reads (cache-prefix sized, at offsets that move) beside a stream with one
        # CHUNK request in flight: their time beyond their bytes is the wait for the request ahead.
        # One, not the parallel stream's four: a layer's weight reads are a burst that a prefix read
        # meets part of the time. Engine measurement (Zen 4, opt-1.3b, cache and weights on disk):
        # prefix reads took 4.2-4.7 ms beyond their bytes at the mixed rate; this probe gave 2.7-4.0
        # ms, the parallel-stream one 11-14 ms; validate runs 16-17 re-priced fit best at 2.5-4 ms.
        small, at = 512 << 10, [half]

        def small_read() -> None:
            f.read_into(at[0], buf[at[0]:at[0] + small], parallel=False)
            at[0] = half + (at[0] - half + small) % max(small, (nbytes - half) // small * small)
        latency = max(0.0, beside_stream(False, small_read, per / 4, 5) - small / rd1)
        # A KV block on disk appends a row (buffered write) and then reads its prefix with O_DIRECT,
        # which makes the kernel write the dirty page back first: a fixed cost per block and step.
        pre, row = 1 << 20, 16 << 10
        read_s = _timeit(lambda: f.read_into(0, buf[:pre], parallel=False), lambda: None, per / 2)

        def append_then_read() -> None:  # the row lands inside the prefix read next, as in decode
            f.write(pre - row, buf[pre:pre + row])
            f.read_into(0, buf[:pre], parallel=False)
        sync_s = max(0.0, _timeit(append_then_read, lambda: None, per / 2) - read_s)
        return {"disk_read_bw": rd, "disk_read_serial_bw": rd1, "disk_read_mixed_bw": mixed,
                "disk_read_mixed_latency_s": latency, "disk_write_bw": wr, "disk_sync_s": sync_s,
                "disk_direct": f.direct}


def _copy_between_compute(work: Callable[[], None], nbytes: int, per: float) -> float:
    """Bytes/s that layer-sized copies from a cold source add to the compute calls they sit
    between, on the compute's own cores: the engine's weight staging on a CPU whose torch threads
    take every core (weight_store). The caches the compute leaves dirty, and those the copy evicts,
    are the engine's too: on 2 Zen 3 vCPUs a 256 MB copy timed alone ran 13-15 GB/s while the
    engine's steps copied at ~8 GB/s, and the search over-predicted host-tier policies by up to
    1.5x. Calls alone and with a copy alternate, so a slow minute slows both."""
    import torch
    srcs = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(_cold_copies(nbytes))]
    dsts = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(2)]
    alone: list[float] = []
    both: list[float] = []
    work()
    start, i = time.perf_counter(), 0
    while len(both) < 5 or time.perf_counter() - start < per:
        t0 = time.perf_counter()
        work()
        t1 = time.perf_counter()
        dsts[i % 2].copy_(srcs[i % len(srcs)])
        work()
        alone.append(t1 - t0)
        both.append(time.perf_counter() - t1)
        i += 1
    extra = _median(both) - _median(alone)
    return nbytes / max(extra, nbytes / 100e9)  # noise can hide a fast copy: at most 100 GB/s


def measure_contention(work: Callable[[], None], offload_dir: str | None, nbytes: int,
                        per: float) -> tuple[float, float]:
    """(share of its rate `work` keeps while the disk streams, share of its read rate the disk keeps
    while `work` runs), each in (0, 1]. `work` is one synchronized compute call on the compute device.
    On a small VM the two are far from independent: on 2 Zen 3 vCPUs a weight stream of O_DIRECT reads
    cost bf16/fp32 matmuls 45% of their rate at every row count and the reads a third of theirs
    (steal time rose from 1% to 15%: the hypervisor's I/O work competes for the same cores), so a
    disk-streaming schedule lasts about max(C, D) + 0.6 min(C, D), not max(C, D); on a GPU the
    compute share should stay ~1. (scripts/measure_contention.py prints the rates behind them.)"""
    r = contention_rates(work, offload_dir, nbytes, per)
    clip = lambda v: min(1.0, max(0.05, v))  # noqa: E731
    return clip(r["work_both"] / r["work_alone"]), clip(r["read_both"] / r["read_alone"])


def contention_rates(work: Callable[[], None], offload_dir: str | None, nbytes: int, per: float) -> dict:
    """Calls of `work` per second and disk read bytes per second (parallel requests over an nbytes
    file, as weight loads read), each alone and both at once; means over `per`-second windows."""
    import threading

    def rate(fn: Callable[[], object], seconds: float) -> float:  # calls per second, mean over the window
        fn()
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        return n / (time.perf_counter() - t0)

    with _probe_file(offload_dir, nbytes) as (f, buf):
        read = lambda: f.read_into(0, buf[:nbytes])  # noqa: E731
        work_alone, read_alone = rate(work, per), rate(read, per)
        stop, done = threading.Event(), [0, 0.0]

        def stream() -> None:
            t0 = time.perf_counter()
            while not stop.is_set():
                read()
                done[0] += 1
            done[1] = time.perf_counter() - t0
        bg = threading.Thread(target=stream, daemon=True)
        bg.start()
        try:
            work_both = rate(work, per)
        finally:
            stop.set()
            bg.join()
        read_both = done[0] / done[1] if done[1] > 0 else read_alone
    return {"work_alone": work_alone, "work_both": work_both,
            "read_alone": read_alone * nbytes, "read_both": read_both * nbytes}
