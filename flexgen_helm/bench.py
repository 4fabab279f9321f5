"""`flexgen-helm bench`: FlexGen's throughput benchmark (one block of synthetic prompts), for the
engine and, on the same model and workload, for HF `generate` or Accelerate's disk offloading.

Metrics follow FlexGen: generation throughput = generated tokens / (prefill + decode time),
prefill throughput = prompt tokens / prefill time, decode throughput = tokens after the first / decode time.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from .engine.config import MemoryBudget, Policy, default_dtype, dtype_name, parse_bytes


def register(sub) -> None:
    p = sub.add_parser("bench", help="throughput benchmark of the engine (or a baseline) on one block")
    p.add_argument("--model", default="dummy:opt-1.3b", help="checkpoint dir, hub id, or dummy:NAME (any public size of a supported family, "
                        "e.g. dummy:llama-3.2-1b; see the README)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gpu-batch-size", type=int, default=4)
    p.add_argument("--num-gpu-batches", type=int, default=1)
    p.add_argument("--percent", type=float, nargs=6, default=[100, 0, 100, 0, 100, 0],
                   metavar=("W_GPU", "W_CPU", "CACHE_GPU", "CACHE_CPU", "ACT_GPU", "ACT_CPU"))
    p.add_argument("--policy", default=None, help="'auto' (policy search) or a JSON file of Policy fields")
    p.add_argument("--cpu-cache-compute", action="store_true")
    p.add_argument("--compress-weight", action="store_true")
    p.add_argument("--compress-cache", action="store_true")
    p.add_argument("--int4-kernel", choices=("auto", "fused", "dequantize"), default="auto",
                   help="4-bit weights on a CPU: multiply them without a dequantized copy (the compiled loop, or "
                        "torch's fused kernel in bf16 where the CPU has native bf16), or dequantize at load for "
                        "dense matmuls (auto: by rows per decode matmul)")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: fp16 on CUDA; bf16 on CPUs with AVX512-BF16 or AMX, else fp32")
    p.add_argument("--offload-dir", default=None, help="disk tier directory (a temporary one inside . by default)")
    p.add_argument("--gpu-mem", default=None, help="compute-tier budget, e.g. 16GB (CUDA: also caps the allocator)")
    p.add_argument("--cpu-mem", default=None)
    p.add_argument("--disk-mem", default=None)
    p.add_argument("--baseline", choices=["hf", "accelerate", "accelerate-cpu", "uncompressed"], default=None,
                   help="also run, alternating with the engine: HF generate (all in memory), Accelerate's disk "
                        "offload, Accelerate's CPU offload (weights in host memory, moved to the device layer by "
                        "layer), or the engine with the same policy but no compression")
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the JSON reports medians")
    p.add_argument("--bound", action="store_true",
                   help="also measure disk read bandwidth and matmul throughput here and report the per-step "
                        "lower bound max(disk bytes / disk bw, matmul FLOPs / matmul rate)")
    p.add_argument("--stages", default=None,
                   help="under torchrun: decoder-layer bounds of the stages, e.g. 0,12,24 (default: balanced)")
    p.add_argument("--pipeline-groups", type=int, default=None,
                   help="under torchrun: micro-batch groups in flight (default: one per stage)")
    p.add_argument("--json", default=None, help="write the result here")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one pipeline stage per rank
        from .distributed.bench import main_distributed
        return main_distributed(args)
    result = run_bench(args)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    keys = ("system", "model", "generation_throughput", "prefill_throughput", "decode_throughput")
    brief = {k: result[k] for k in keys}
    if "baseline" in result:
        brief["baseline"] = {k: result["baseline"][k] for k in keys if k in result["baseline"]}
        brief["speedup_vs_baseline"] = result["speedup_vs_baseline"]
    print(json.dumps(brief, indent=2))
    return 0


def _policy(args) -> Policy | str:
    if args.policy == "auto":
        return "auto"
    if args.policy:
        with open(args.policy) as f:
            return Policy.from_dict(json.load(f))
    return Policy.from_percent(args.percent, gpu_batch_size=args.gpu_batch_size,
                               num_gpu_batches=args.num_gpu_batches, cpu_cache_compute=args.cpu_cache_compute,
                               compress_weight=args.compress_weight, compress_cache=args.compress_cache,
                               overlap=not args.no_overlap, int4_kernel=args.int4_kernel)


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(4, vocab, (length - 1,), generator=g).tolist() for _ in range(n)]


def _summary(runs: list[dict], n: int, prompt_len: int, gen_len: int) -> dict:
    pre = statistics.median(r["prefill_s"] for r in runs)
    dec = statistics.median(r["decode_s"] for r in runs)
    tot = statistics.median(r["prefill_s"] + r["decode_s"] for r in runs)
    return {"prefill_s": pre, "decode_s": dec, "total_s": tot,
            "generation_throughput": n * gen_len / tot,
            "prefill_throughput": n * prompt_len / pre,
            "decode_throughput": n * (gen_len - 1) / dec if gen_len > 1 and dec > 0 else None,
            "runs": runs}


def run_bench(args) -> dict:
    """Engine alone, or engine and baseline side by side: timed runs alternate between the two in one
    process, so both see the same machine state (these machines are shared and noisy)."""
    import torch

    dtype = getattr(torch, dtype_name(args.dtype) if args.dtype else default_dtype(args.device))
    budget = MemoryBudget(parse_bytes(args.gpu_mem), parse_bytes(args.cpu_mem), parse_bytes(args.disk_mem))
    if args.device.startswith("cuda") and budget.gpu and torch.cuda.is_available():
        dev = torch.device(args.device)
        torch.cuda.set_per_process_memory_fraction(budget.gpu / torch.cuda.get_device_properties(dev).total_memory, dev)
    base = {"model": args.model, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "device": args.device,
            "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads()}
    from .runtime import load_engine
    with load_engine(args.model, policy=_policy(args), device=args.device, dtype=dtype,
                     offload_dir=args.offload_dir or os.getcwd(), budget=budget,
                     prompt_len=args.prompt_len, gen_len=args.gen_len,
                     allow_compression=args.compress_weight or args.compress_cache) as eng, \
            tempfile.TemporaryDirectory(prefix="flexgen-bench-", dir=args.offload_dir or os.getcwd()) as tmp:
        n = eng.policy.block_size
        prompts = _prompts(n, args.prompt_len, eng.spec.vocab_size)
        eng.generate(prompts[: eng.policy.gpu_batch_size], max_new_tokens=2)  # warm-up (allocator, kernels)
        if args.baseline == "uncompressed":
            baseline = _EngineBaseline(args, eng, prompts, budget)
        else:
            baseline = _Baseline(args, dtype, prompts, tmp) if args.baseline else None
        runs, base_runs, last = [], [], None
        for i in range(args.repeat):
            _progress(f"run {i + 1}/{args.repeat}")
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            last = eng.generate(prompts, max_new_tokens=args.gen_len)
            runs.append({"prefill_s": last.stats.prefill_time, "decode_s": last.stats.decode_time,
                         "io_wait_s": last.stats.io_wait_time})
            if baseline is not None:
                base_runs.append(baseline.run())
        out = {"system": "flexgen-helm", **base, "num_prompts": n, **_summary(runs, n, args.prompt_len, args.gen_len),
               "policy": eng.policy.to_dict(), "peak_memory_bytes": last.stats.peak_memory_bytes,
               "bytes_moved": last.stats.bytes_moved, "page_cache_fallback_reads": last.stats.page_cache_fallback_reads,
               "time_breakdown_s": {**last.stats.breakdown, "prefill_and_decode": last.stats.prefill_time
                                    + last.stats.decode_time},
               "weight_bytes": sum(l.nbytes for l in eng.weights.layouts)}
        if args.device.startswith("cuda"):
            out["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        if args.bound:
            out["bound"] = step_bound(eng, n, args.prompt_len, args.gen_len, out["generation_throughput"])
        if baseline is not None:
            b = _summary(base_runs, n, args.prompt_len, args.gen_len)
            out["baseline"] = {"system": args.baseline, **b, **baseline.info()}
            baseline.close()
            out["speedup_vs_baseline"] = out["generation_throughput"] / b["generation_throughput"]
        return out


def step_bound(eng, n: int, prompt_len: int, gen_len: int, measured: float) -> dict:
    """Lower bound on the generation time of one block: every step (the prefill, then each decode
    step) must read the disk-resident weights and do the matmuls. Constants are measured here, on
    the engine's own weight file (O_DIRECT, 8 MB requests in parallel, as the engine reads) and on
    layer-shaped matmuls in the engine's dtype."""
    import torch

    spec, pol, store = eng.spec, eng.policy, eng.weights
    disk_bytes = sum(db for _, _, db in store.segments)
    disk_bw = layer_bw = None
    if store.disk is not None:
        from .engine.tiers import aligned_host_buffer
        buf = aligned_host_buffer(min(disk_bytes, 1 << 30))
        buf.fill_(0)  # touched first: on a VM fresh memory faults in at ~1.6 ms per MB, which is not the disk
        times = []
        for off in (0, disk_bytes // 3, 2 * disk_bytes // 3):
            nb = min(buf.numel(), store.disk.size - off) // 4096 * 4096
            t0 = time.perf_counter()
            store.disk.read_into(off, buf[:nb])
            times.append(nb / (time.perf_counter() - t0))
        # the best of three, as a bound should (its matmul rate is the best too): on this VM one
        # read in a few ran at 0.3-0.6 GB/s beside 2.4-3.1 GB/s (a median of two read 0.5-0.64)
        disk_bw = max(times)
        # also the rate of the engine's own access pattern: one layer's disk segment at a time
        # (the engine keeps one layer in flight), reported beside the bound, not in it
        sizes = sorted(db for _, _, db in store.segments if db)
        seg = sizes[len(sizes) // 2] // 4096 * 4096  # a decoder layer's (the median segment)
        if seg:
            pieces = max(1, min(8, buf.numel() // seg, store.disk.size // seg))
            t0 = time.perf_counter()
            for i in range(pieces):
                store.disk.read_into(i * seg, buf[:seg])
            layer_bw = pieces * seg / (time.perf_counter() - t0)
    h = spec.hidden

    w = torch.randn(4 * h, h, dtype=eng.dtype)
    from .engine.compression import FUSED_INT4_KINDS
    fused = [FUSED_INT4_KINDS[s.kind] for lay in store.layouts for s in lay.slots if s.kind in FUSED_INT4_KINDS]
    if fused:  # 4-bit weights multiplied by a fused CPU kernel: its rate counts too
        w4 = fused[0].from_dense(w, pol.comp_weight_config, eng.dtype)

    def mm_rate(rows: int, fn) -> float:  # FLOP/s of an (rows x h) @ (h x 4h) product, best of a few
        a = torch.randn(rows, h, dtype=eng.dtype)
        fn(a)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn(a)
            best = min(best, time.perf_counter() - t0)
        return 2 * rows * h * 4 * h / best

    # the machine's best matmul rate at any row count (the engine may run all of a block's rows in
    # one call), so the bound does not excuse small-row matmuls
    row_counts = sorted({pol.gpu_batch_size, n, 16, 64, 256, 1024})
    from .engine.layers import linear  # the engine's dense kernel choice (faster than torch's emulated bf16)
    rates = {rows: mm_rate(rows, lambda a: linear(a, w)) for rows in row_counts}
    int4_rates = {rows: mm_rate(rows, lambda a: linear(a, w4)) for rows in row_counts} if fused else {}
    best = max([*rates.values(), *int4_rates.values()])
    io = disk_bytes / disk_bw if disk_bw else 0.0
    mm_pre, mm_dec = spec.step_matmul_flops(n * prompt_len) / best, spec.step_matmul_flops(n) / best
    prefill, decode = max(io, mm_pre), max(io, mm_dec)
    total = prefill + (gen_len - 1) * decode
    bound_tput = n * gen_len / total
    # Beside the bound, not in it: what the same steps take when compute and the disk stream slow
    # each other down as measured here (profiler.measure_contention; on a 2-core VM both lose a third
    # to a half of their rate): cost_model.contended per step.
    contended = {}
    if io and store.disk is not None:
        from .policy.cost_model import contended
        from .policy.profiler import measure_contention
        best_rows = max(rates, key=rates.get)
        a = torch.randn(best_rows, h, dtype=eng.dtype)
        probe_mb = min(256, max(8, disk_bytes >> 20))
        sc, sd = measure_contention(lambda: linear(a, w), eng.tiers.offload_dir, probe_mb << 20, 1.0)

        c_total = max(contended(mm_pre, io, sc, sd)) + (gen_len - 1) * max(contended(mm_dec, io, sc, sd))
        contended = {"compute_share_beside_disk": sc, "disk_share_beside_compute": sd,
                     "generation_throughput_bound_with_contention": n * gen_len / c_total,
                     "fraction_of_bound_with_contention": measured / (n * gen_len / c_total)}
    return {"formula": "per step: max(disk weight bytes / disk read bw, matmul FLOPs / matmul FLOP/s)",
            "disk_weight_bytes": disk_bytes, "disk_read_bw": disk_bw,
            "matmul_flops_per_s_by_rows": rates, "int4_fused_flops_per_s_by_rows": int4_rates,
            "matmul_flops_per_s_best": best,
            "prefill_bound_s": prefill, "decode_step_bound_s": decode,
            "generation_throughput_bound": bound_tput, "fraction_of_bound": measured / bound_tput,
            # the disk read in the engine's layer-sized pieces: what the disk gives this access pattern
            "disk_read_bw_layer_pieces": layer_bw,
            "disk_s_per_step_at_layer_rate": disk_bytes / layer_bw if layer_bw else None, **contended}


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _hf_model(model: str, dtype):
    """The same weights as the engine sees, in transformers' own model class for the family: a
    checkpoint, or the dummy generator's tensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .engine.families import public_config
    from .engine.model_spec import load_spec
    from .engine.weights import DummyReader, resolve_checkpoint

    if not model.startswith("dummy:"):
        return AutoModelForCausalLM.from_pretrained(resolve_checkpoint(model), dtype=dtype).eval()
    spec = load_spec(model)
    cfg = dict(public_config(model[len("dummy:"):]))
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    reader = DummyReader(spec)
    state = {}
    for j in range(spec.num_layers + 2):
        for ref in spec.layer_tensors(j):
            key = "model." + ref.name if ref.role != "lm_head.weight" else ref.name
            state[key] = reader.get_shaped(ref).to(dtype)
    m.load_state_dict(state, assign=True, strict=False)
    m.tie_weights()
    if spec.positions == "rotary":  # buffers the meta device left empty
        m.model.rotary_emb = type(m.model.rotary_emb)(config=m.config)
    return m.eval()


class _Baseline:
    """HF generate with everything in memory, or with Accelerate's disk or CPU offload, on the same weights
    (under the same allocator cap as the engine: one process)."""

    def __init__(self, args, dtype, prompts: list[list[int]], tmp: str):
        import torch

        model = _hf_model(args.model, dtype)
        if args.baseline == "accelerate-cpu":
            from accelerate import cpu_offload
            model = cpu_offload(model, execution_device=torch.device(args.device))
        elif args.baseline == "accelerate":
            from accelerate import disk_offload
            model = disk_offload(model, offload_dir=tmp, execution_device=torch.device(args.device))
            for f in os.scandir(tmp):  # start cold, like the engine's O_DIRECT reads
                if f.is_file():
                    fd = os.open(f.path, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
        else:
            model = model.to(args.device)
        self.model, self.gen_len = model, args.gen_len
        self.ids = torch.tensor(prompts, device=args.device)
        self.kw = dict(do_sample=False, pad_token_id=1, attention_mask=torch.ones_like(self.ids))
        with torch.no_grad():
            model.generate(self.ids[:1], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=1,
                           attention_mask=self.kw["attention_mask"][:1])

    def run(self) -> dict:
        import torch
        with torch.no_grad():
            t0 = time.perf_counter()
            self.model.generate(self.ids, max_new_tokens=1, min_new_tokens=1, **self.kw)
            t1 = time.perf_counter()
            self.model.generate(self.ids, max_new_tokens=self.gen_len, min_new_tokens=self.gen_len, **self.kw)
            t2 = time.perf_counter()
        # decode time = full run minus a prefill-only run
        return {"prefill_s": t1 - t0, "decode_s": max((t2 - t1) - (t1 - t0), 1e-9)}

    def info(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class _EngineBaseline:
    """The same policy without compression, to measure what 4 bits buy on the same workload."""

    def __init__(self, args, eng, prompts: list[list[int]], budget: MemoryBudget):
        import dataclasses

        from .engine.engine import Engine
        self.policy = dataclasses.replace(eng.policy, compress_weight=False, compress_cache=False)
        self.eng = Engine.from_pretrained(args.model, policy=self.policy, device=args.device, dtype=eng.dtype,
                                          offload_dir=args.offload_dir or os.getcwd(), budget=budget,
                                          prompt_len=args.prompt_len, gen_len=args.gen_len)
        self.prompts, self.gen_len = prompts, args.gen_len
        self.eng.generate(prompts[: self.policy.gpu_batch_size], max_new_tokens=2)
        self.last = None

    def run(self) -> dict:
        self.last = self.eng.generate(self.prompts, max_new_tokens=self.gen_len)
        st = self.last.stats
        return {"prefill_s": st.prefill_time, "decode_s": st.decode_time, "io_wait_s": st.io_wait_time}

    def info(self) -> dict:
        return {"policy": self.policy.to_dict(), "peak_memory_bytes": self.last.stats.peak_memory_bytes,
                "bytes_moved": self.last.stats.bytes_moved,
                "weight_bytes": sum(l.nbytes for l in self.eng.weights.layouts)}

    def close(self) -> None:
        self.eng.close()
