"""Kernel figures behind the engine's CPU choices (issue: compute-side speed), in one JSON.

Per row count: dense matmul in bf16 and fp32 (torch's), the engine's bf16 linear (layers.linear:
the compiled bf16 loops, torch's bf16 matmul from 33 rows with hardware bf16, widened fp32 beyond the
loop's rows where bf16 is emulated), torch's fused 4-bit matmul (bf16 activations, the
engine's `int4pack` slots) and the compiled 4-bit multiply (fp32 and bf16 activations, the engine's
`int4` slots, when a C compiler is there), the same slots through the engine's choice by rows
(layers.linear with bf16 activations: the loop, or beyond layers.int4_loop_max_rows dequantized for
torch's matmul) and dequantized to fp32 for torch's fp32 matmul, on an OPT-1.3b MLP-shaped weight
(8192 x 2048, three copies cycled so reads come from memory); 4-bit g64 dequantization through the compiled loop (engine/kernels) and
the torch-op fallback, in ns per value, next to a plain bf16 copy (memory speed); 4-bit quantization
the same two ways, of the whole weight and of one new KV-cache row; one decode step of attention
over a 4-bit g64 KV cache read in place by the compiled loop (kernels.attend_compressed), over the
same cache held dense by the compiled loop (kernels.attend_dense, the engine's CPU path) and by
torch's SDPA, for MHA and GQA head shapes.

    python scripts/measure_kernels.py --json reports/bench/kernels.json [--threads N] [--parts attention]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time


def _median_s(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def attention_figures(reps: int) -> list[dict]:
    """One decode step of attention (8 sequences, 530 cached positions), per head shape: the compiled
    loop over a 4-bit g64 cache, and over the dense cache next to torch's SDPA, fp32 and bf16, 24 caches
    cycled so their bytes come from memory as a model's layers' would."""
    import torch

    from flexgen_helm.engine import compression as C
    from flexgen_helm.engine import kernels
    from flexgen_helm.engine.config import CompressionConfig
    from flexgen_helm.engine.layers import _sdpa

    if not kernels.available():
        return []
    cfg, copies, B, n = CompressionConfig(group_dim=-1), 24, 8, 530
    block, block_bytes = C._BLOCK[4][:2]
    out = []
    # (name, KV heads, query heads, head_dim): OPT-125m, Qwen2.5-0.5B, Llama-3.2-1B, a 128-wide GQA head
    for name, H, Hq, D in (("opt-125m", 12, 12, 64), ("qwen2.5-0.5b", 2, 14, 64), ("llama-3.2-1b", 8, 32, 64),
                           ("gqa-d128", 4, 8, 128)):
        rows = [torch.randn(n, 2, B, H, D) for _ in range(copies)]
        packed = [C.quantize(r, cfg) for r in rows]
        mask = torch.ones(B, n + 1, dtype=torch.bool)
        for dt in (torch.float32, torch.bfloat16):
            q, nk, nv = (torch.randn(B, h, 1, D).to(dt) for h in (Hq, H, H))
            dense = [tuple(torch.cat([r[:, j].permute(1, 2, 0, 3).to(dt), new], 2).contiguous()
                           for j, new in ((0, nk), (1, nv))) for r in rows]
            it = [0]

            def loop(it=it):
                it[0] += 1
                pk, meta = packed[it[0] % copies]
                return kernels.attend_compressed(pk, meta, n, q, nk, nv, mask, 4, block, block_bytes, 64, False)

            def loop_dense(it=it):
                it[0] += 1
                k, v = dense[it[0] % copies]
                return kernels.attend_dense(q, k, v, mask)

            def sdpa(it=it):
                it[0] += 1
                k, v = dense[it[0] % copies]
                return _sdpa(q, k, v, mask[:, None, None, :])
            t_loop, t_dense, t_sdpa = (_median_s(lambda f=f: [f() for _ in range(copies)], reps) / copies
                                       for f in (loop, loop_dense, sdpa))
            row = {"shape": name, "kv_heads": H, "q_heads": Hq, "head_dim": D, "batch": B, "positions": n,
                   "dtype": str(dt).split(".")[1], "loop_4bit_ms": t_loop * 1e3, "loop_dense_ms": t_dense * 1e3,
                   "sdpa_dense_ms": t_sdpa * 1e3, "speedup": t_sdpa / t_loop, "dense_loop_speedup": t_sdpa / t_dense}
            out.append(row)
            print(" ".join(f"{key} {v:.3f}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()),
                  flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--parts", default="matmul,quant,attention", help="comma-separated subset of matmul,quant,attention")
    args = ap.parse_args()
    parts = set(args.parts.split(","))

    import torch

    from flexgen_helm.engine import compression as C
    from flexgen_helm.engine import kernels
    from flexgen_helm.engine.config import CompressionConfig, cpu_has_fast_bf16
    from flexgen_helm.engine.layers import _widened_linear, linear

    if args.threads:
        torch.set_num_threads(args.threads)
    n, k = 8192, 2048
    cfg = CompressionConfig()
    ws = [torch.randn(n, k) for _ in range(3)]
    dense = {dt: [w.to(dt) for w in ws] for dt in (torch.bfloat16, torch.float32)}
    int4 = [C.Int4Weight.from_dense(w, cfg, torch.bfloat16) for w in ws]
    own4 = [C.GroupInt4Weight.from_dense(w, cfg, torch.float32) for w in ws] if kernels.available() else []
    rows_out = []
    for rows in (1, 4, 8, 16, 32, 48, 64, 96, 128, 256) if "matmul" in parts else ():
        flops = 2 * rows * n * k
        row = {"rows": rows}
        for name, dt in (("bf16_dense", torch.bfloat16), ("fp32_dense", torch.float32)):
            x, it = torch.randn(rows, k, dtype=dt), [0]

            def mm(x=x, ws=dense[dt], it=it):
                it[0] += 1
                return x @ ws[it[0] % 3].t()
            row[name + "_gflops"] = flops / _median_s(mm, args.reps) / 1e9
        xb, it = torch.randn(rows, k, dtype=torch.bfloat16), [0]

        def mml(x=xb, it=it):  # the engine's bf16 path (layers.linear's choice by rows and CPU)
            it[0] += 1
            return linear(x, dense[torch.bfloat16][it[0] % 3])
        row["bf16_engine_linear_gflops"] = flops / _median_s(mml, args.reps) / 1e9

        def mm4(x=xb, it=it):
            it[0] += 1
            return int4[it[0] % 3].matmul(x)
        row["int4_fused_bf16_gflops"] = flops / _median_s(mm4, args.reps) / 1e9
        if own4:
            xf = torch.randn(rows, k)

            def mm4c(x=xf, it=it):
                it[0] += 1
                return own4[it[0] % 3].matmul(x)
            row["int4_compiled_fp32_gflops"] = flops / _median_s(mm4c, args.reps) / 1e9

            def mm4cb(x=xb, it=it):  # bf16 activations: the 16-bit fixed-point loop (the bf16 engine on AVX2)
                it[0] += 1
                return own4[it[0] % 3].matmul(x)
            row["int4_compiled_bf16_gflops"] = flops / _median_s(mm4cb, args.reps) / 1e9

            def mm4e(x=xb, it=it):  # the engine's choice by rows (layers.linear: loop, or dequantized)
                it[0] += 1
                return linear(x, own4[it[0] % 3])
            row["int4_engine_bf16_gflops"] = flops / _median_s(mm4e, args.reps) / 1e9

            def mm4d(x=xf, it=it):  # dequantized to fp32 a block of rows at a time, torch's fp32 matmul
                it[0] += 1
                w4 = own4[it[0] % 3]
                return _widened_linear(x, w4.shape, w4.dequantize_rows_into)
            row["int4_dequant_fp32_mm_gflops"] = flops / _median_s(mm4d, args.reps) / 1e9
        rows_out.append(row)
        print(" ".join(f"{key} {v:.1f}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()), flush=True)

    def both_paths(fn, reps: int) -> dict[str, float]:
        """Median seconds of fn through the compiled loop (when it builds here) and the torch ops."""
        out = {}
        for path in ("compiled", "torch_ops"):
            if path == "torch_ops":
                os.environ["FLEXGEN_HELM_NO_KERNELS"] = "1"
            kernels._library.cache_clear()
            if path == "compiled" and not kernels.available():
                continue
            out[path] = _median_s(fn, reps)
            os.environ.pop("FLEXGEN_HELM_NO_KERNELS", None)
        kernels._library.cache_clear()
        return out

    deq, quant = {}, {}
    if "quant" in parts:
        packed, meta = C.quantize(ws[0], cfg)
        for dt in (torch.bfloat16, torch.float32):
            out = torch.empty(n, k, dtype=dt)
            for path, t in both_paths(lambda: C.dequantize(packed, meta, (n, k), cfg, dt, out=out), args.reps).items():
                deq[f"{path}_{str(dt).split('.')[1]}_ns_per_value"] = t / (n * k) * 1e9
        # quantization: the whole weight, and one decode step's new K/V row of an OPT-1.3b micro-batch
        # of 32 (2 x 32 x 32 heads x 64), which the engine quantizes per (layer, micro-batch)
        kv_row = torch.randn(1, 2, 32, 32, 64)
        kv_cfg = CompressionConfig(group_dim=-1)  # the KV cache groups along head_dim
        for name, x, qcfg in (("weight_8192x2048", ws[0].to(torch.bfloat16), cfg),
                              ("kv_row_2x32x32x64", kv_row.to(torch.bfloat16), kv_cfg)):
            reps = args.reps if x.numel() > 1e6 else 20 * args.reps
            for path, t in both_paths(lambda: C.quantize(x, qcfg), reps).items():
                quant[f"{path}_{name}_ns_per_value"] = t / x.numel() * 1e9
        print(" ".join(f"{key} {v:.3f}" for key, v in quant.items()), flush=True)
        src, dst = ws[1].to(torch.bfloat16), torch.empty(n, k, dtype=torch.bfloat16)
        deq["bf16_copy_ns_per_value"] = _median_s(lambda: dst.copy_(src), args.reps) / (n * k) * 1e9
        print(" ".join(f"{key} {v:.3f}" for key, v in deq.items()), flush=True)

    attention = attention_figures(args.reps) if "attention" in parts else []

    result = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "fast_bf16": cpu_has_fast_bf16(),
              "threads": torch.get_num_threads(), "weight_shape": [n, k], "matmul": rows_out,
              "dequantize_4bit_g64": deq, "quantize_4bit_g64_from_bf16": quant, "decode_attention": attention}
    try:
        with open("/proc/cpuinfo") as f:
            result["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
