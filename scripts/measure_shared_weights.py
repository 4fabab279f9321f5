"""Resident memory of N engine processes on one host, host-tier weights shared or not.

Each worker loads MODEL with all weights on the host tier (w 0/100), runs one short generation
(every weight page is touched), then waits; the parent reads each worker's RSS/PSS from
/proc/PID/smaps_rollup and the host's MemFree drop (page cache included: a shared file's pages are
counted once there), then lets them close.

    python scripts/measure_shared_weights.py --model dummy:opt-1.3b --offload-dir /tmp/x --out r.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _worker(model: str, offload: str, shared: bool, ready, done) -> None:
    import torch

    from flexgen_helm.engine.config import Policy
    from flexgen_helm.engine.engine import Engine

    torch.set_num_threads(1)
    policy = Policy(gpu_batch_size=1, num_gpu_batches=1, w_gpu_percent=0, w_cpu_percent=100)
    engine = Engine.from_pretrained(model, policy=policy, dtype=torch.bfloat16, offload_dir=offload,
                                    shared_host_weights=shared, prompt_len=8, gen_len=2)
    engine.generate([[2, 10, 11, 12]], max_new_tokens=2)
    ready.put((os.getpid(), engine.weights.shared_built, engine.tiers.stats["cpu"].used))
    done.wait()
    engine.close()


def measure(model: str, offload: str, workers: int, shared: bool) -> dict:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Event()
    free0 = _meminfo("MemFree")
    t0 = time.time()
    procs = [ctx.Process(target=_worker, args=(model, offload, shared, ready, done)) for _ in range(workers)]
    for p in procs:
        p.start()
    info = [ready.get(timeout=1800) for _ in procs]
    load_s = time.time() - t0
    time.sleep(2)
    per = []
    for pid, built, host_tier in info:
        r = _rollup(pid)
        per.append({"pid": pid, "built_shared_file": built, "host_tier_bytes": host_tier, "rss": r["Rss"],
                    "pss": r["Pss"], "pss_file": r.get("Pss_File"), "pss_anon": r.get("Pss_Anon")})
    free_drop = free0 - _meminfo("MemFree")
    done.set()
    for p in procs:
        p.join()
    return {"model": model, "workers": workers, "shared": shared, "load_s": round(load_s, 1), "per_worker": per,
            "sum_rss": sum(w["rss"] for w in per), "sum_pss": sum(w["pss"] for w in per),
            "host_memfree_drop": free_drop}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:opt-1.3b")
    ap.add_argument("--offload-dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = []
    for shared in (False, True):
        for n in (1, 2):
            row = measure(a.model, a.offload_dir, n, shared)
            gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
            print(f"shared={shared} workers={n}: RSS/worker {[gb(w['rss']) for w in row['per_worker']]} GB, "
                  f"PSS/worker {[gb(w['pss']) for w in row['per_worker']]} GB, sum PSS {gb(row['sum_pss'])} GB, "
                  f"host MemFree drop {gb(row['host_memfree_drop'])} GB, load {row['load_s']} s", flush=True)
            rows.append(row)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
