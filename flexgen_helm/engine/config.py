"""Configuration values shared by the engine, the policy search and the HELM layer.

`Policy` keeps FlexGen's field names so its published policies can be typed in unchanged.
Percentages are of bytes; whatever a (gpu, cpu) pair leaves goes to disk.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration the engine cannot run; the message says what to change."""


_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}


def dtype_name(name: str) -> str:
    """torch's name of a compute dtype given as bf16 / fp16 / fp32 or bfloat16 / float16 / float32:
    the one parser of every command's --dtype."""
    try:
        return _DTYPE_NAMES[str(name).strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use bf16, fp16 or fp32 (or bfloat16, float16, float32)") from None


def cpu_has_fast_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 or AMX)? Without it torch emulates
    bf16 matmuls: measured ~10 GFLOP/s per core on an AVX2-only EPYC, where fp32 reaches ~70."""
    return _torch_cpu_has("_is_avx512_bf16_supported") or cpu_has_amx()


def cpu_has_amx() -> bool:
    """Does this CPU have AMX tiles (torch's bf16 kernels then run on them: a different speed class)?"""
    return _torch_cpu_has("_is_amx_tile_supported")


def _torch_cpu_has(probe: str) -> bool:
    import torch
    fn = getattr(torch.cpu, probe, None)
    return bool(fn is not None and fn())


def default_dtype(device: str) -> str:
    """The compute dtype when none is given: fp16 on CUDA; on the CPU bf16 where it runs in
    hardware (fp16 matmuls are slow there), else fp32 (emulated bf16 is several times slower than
    fp32 at every row count, see cpu_has_fast_bf16). The one place this default lives."""
    if str(device).startswith("cuda"):
        return "float16"
    return "bfloat16" if cpu_has_fast_bf16() else "float32"


@dataclass(frozen=True)
class CompressionConfig:
    """Group-wise min-max quantization (FlexGen default: 4 bits, groups of 64).

    group_dim is the axis the `group_size` consecutive elements of one group run along: 1 for an
    (out, in) Linear weight (along in_features, the layout torch's fused 4-bit matmuls need; FlexGen
    grouped along the output dim, 0), -1 (head_dim) for the KV cache. Axes not
    divisible by group_size are padded; see engine/compression.py for the storage format.
    """

    num_bits: int = 4
    group_size: int = 64
    group_dim: int = 1  # weights: 1 (in_features; FlexGen used 0); KV cache: the head_dim axis (-1)
    symmetric: bool = False

    def __post_init__(self) -> None:
        # bool is an int subclass: reject it explicitly, `num_bits=True` is never meant
        if isinstance(self.num_bits, bool) or self.num_bits not in (2, 3, 4, 8):
            raise ConfigError(f"num_bits must be one of 2, 3, 4, 8 (4 is FlexGen's), got {self.num_bits!r}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size <= 0 or self.group_size % 2):
            raise ConfigError(
                f"group_size must be a positive even integer (FlexGen uses 64), got {self.group_size!r}")
        if isinstance(self.group_dim, bool) or not isinstance(self.group_dim, int):
            raise ConfigError(f"group_dim must be an integer axis (0 for weights, -1 for the KV cache), "
                              f"got {self.group_dim!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"symmetric must be true or false, got {self.symmetric!r}")

    @property
    def label(self) -> str:
        """Short name for tables: '4-bit g64' (+ ' sym')."""
        return f"{self.num_bits}-bit g{self.group_size}" + (" sym" if self.symmetric else "")


INT4_KERNELS = ("auto", "fused", "dequantize")


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100.0
    w_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True
    pin_weight: bool = True
    cpu_cache_compute: bool = False
    # decode: run each layer's projections and MLP once over all micro-batches' rows (attention
    # stays per micro-batch); needs gpu_batch_size x num_gpu_batches rows of activations at once
    block_matmul: bool = True
    compress_weight: bool = False
    comp_weight_config: CompressionConfig = field(
        default_factory=lambda: CompressionConfig(num_bits=4, group_size=64, group_dim=1))
    compress_cache: bool = False
    comp_cache_config: CompressionConfig = field(
        default_factory=lambda: CompressionConfig(num_bits=4, group_size=64, group_dim=-1))
    # 4-bit weights on a CPU compute device: "fused" multiplies them without a dequantized copy
    # (bf16: torch's fused 4-bit kernel; fp32: the compiled loop, kernels.int4_matmul), "dequantize"
    # expands them at load for dense matmuls, "auto": the compiled loop always, torch's kernel by
    # rows per decode matmul (placement.uses_fused_int4)
    int4_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.int4_kernel not in INT4_KERNELS:
            raise ConfigError(f"int4_kernel={self.int4_kernel!r}: choose one of {', '.join(INT4_KERNELS)}")
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise ConfigError("gpu_batch_size and num_gpu_batches must be >= 1")
        for kind in ("w", "cache", "act"):
            g, c = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
            if g < 0 or c < 0 or g + c > 100 + 1e-9:
                raise ConfigError(
                    f"{kind}_gpu_percent={g} and {kind}_cpu_percent={c} must be >= 0 and sum to <= 100 "
                    "(the remainder goes to disk)")

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def attends_on_host(self) -> bool:
        """cpu_cache_compute as it acts: it moves attention only for cache held off the compute tier."""
        return self.cpu_cache_compute and self.cache_gpu_percent < 100

    @property
    def w_disk_percent(self) -> float:
        return 100.0 * self.fractions("w")[2]

    @property
    def cache_disk_percent(self) -> float:
        return 100.0 * self.fractions("cache")[2]

    @property
    def act_disk_percent(self) -> float:
        return 100.0 * self.fractions("act")[2]

    def fractions(self, kind: str) -> tuple[float, float, float]:
        """(gpu, cpu, disk) fractions in [0, 1] for kind in {"w", "cache", "act"}."""
        g = getattr(self, f"{kind}_gpu_percent") / 100.0
        c = getattr(self, f"{kind}_cpu_percent") / 100.0
        d = 1.0 - g - c
        # 1 - 0.09337 - 0.90663 leaves ~1e-16: float residue, not a disk share (it would reserve
        # disk staging and fail a zero disk budget)
        return g, c, d if d > 1e-9 else 0.0

    @classmethod
    def from_percent(cls, percent: list[float] | tuple[float, ...], **kw) -> "Policy":
        """FlexGen's `--percent w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu`."""
        if len(percent) != 6:
            raise ConfigError(f"--percent takes 6 numbers, got {len(percent)}")
        names = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                 "act_gpu_percent", "act_cpu_percent")
        return cls(**dict(zip(names, map(float, percent))), **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The one text form of a policy, for logs and tables:
        '48x3 w 20/80/0 kv 0/100/0 act 0/100/0 cpu-attn w4 kv4' = gpu_batch_size x num_gpu_batches,
        then gpu/cpu/disk percent of weights, KV cache and activations, then the flags that are on."""
        def split(kind: str) -> str:
            return "/".join(f"{round(100 * f, 2):g}" for f in self.fractions(kind))
        flags = [name for name, on in (("cpu-attn", self.cpu_cache_compute),
                                       ("per-mb-matmul", not self.block_matmul and self.num_gpu_batches > 1),
                                       (f"w{self.comp_weight_config.num_bits}", self.compress_weight),
                                       (f"int4-{self.int4_kernel}", self.compress_weight and self.int4_kernel != "auto"),
                                       (f"kv{self.comp_cache_config.num_bits}", self.compress_cache)) if on]
        return " ".join([f"{self.gpu_batch_size}x{self.num_gpu_batches}", "w", split("w"), "kv", split("cache"),
                         "act", split("act"), *flags])

    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        d = dict(d)
        for key in ("comp_weight_config", "comp_cache_config"):
            if isinstance(d.get(key), dict):
                d[key] = CompressionConfig(**d[key])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes each tier may hold; None means "whatever the machine has"."""

    gpu: int | None = None
    cpu: int | None = None
    disk: int | None = None


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'16GB' -> 16e9, '1.5TB', '512MiB', or a plain number of bytes."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise ConfigError(f"cannot read memory size {text!r}; write e.g. 16GB, 1.5TB or 512MiB")
    return int(float(num) * _UNITS[unit])
