"""How much compute and a disk stream slow each other down on this machine (the profile's
`compute_share_disk` / `disk_share_compute`, which the cost model charges to every slot that reads
the disk): an OPT-1.3b-shaped MLP (2048 -> 8192 -> 2048, three copies cycled so weights come from
memory) through the engine's `layers.linear` at a few row counts, and O_DIRECT reads of a file
through the engine's disk file class (8 MB requests in parallel, as weight loads), each alone and
both at once.

    python scripts/measure_contention.py --offload-dir DIR [--dtype bf16] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offload-dir", default=None, help="directory for the probe file (default: a temp dir)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--rows", default="4,32,256")
    ap.add_argument("--file-mb", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=1.5, help="per measurement window")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from flexgen_helm.engine import layers
    from flexgen_helm.engine.config import ConfigError, dtype_name
    from flexgen_helm.policy.profiler import contention_rates
    try:
        dt = getattr(torch, dtype_name(args.dtype))
    except ConfigError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    h = 2048
    pairs = [(torch.randn(4 * h, h).to(dt), torch.randn(h, 4 * h).to(dt)) for _ in range(3)]
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "threads": torch.get_num_threads(), "dtype": str(dt), "file_mb": args.file_mb, "rows": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        x, it = torch.randn(rows, h).to(dt), [0]

        def mlp() -> None:
            w1, w2 = pairs[it[0] % 3]
            it[0] += 1
            layers.linear(layers.linear(x, w1), w2)
        flops = 2 * rows * 8 * h * h
        runs = []
        for _ in range(args.repeat):
            r = contention_rates(mlp, args.offload_dir, args.file_mb << 20, args.seconds)
            runs.append({"gflops_alone": r["work_alone"] * flops / 1e9, "gflops_beside_disk": r["work_both"] * flops / 1e9,
                         "disk_gbs_alone": r["read_alone"] / 1e9, "disk_gbs_beside_compute": r["read_both"] / 1e9})
            print(f"rows {rows:4d}: compute {runs[-1]['gflops_alone']:6.1f} -> {runs[-1]['gflops_beside_disk']:6.1f} "
                  f"GFLOP/s (x{r['work_both'] / r['work_alone']:.2f}), disk {runs[-1]['disk_gbs_alone']:.2f} -> "
                  f"{runs[-1]['disk_gbs_beside_compute']:.2f} GB/s (x{r['read_both'] / r['read_alone']:.2f})", flush=True)
        out["rows"][rows] = runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
