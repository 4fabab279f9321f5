"""Issue #11's acceptance on a CUDA machine, as one prepared run that fits a short device lease.

    python3 scripts/cuda_acceptance.py --out DIR [--deadline-s 420] [--phases tests,q1,...]

Phases run in order of value (the CUDA tests first, the big models last). A phase whose estimate no
longer fits the deadline is skipped and recorded as such; one that runs past the deadline is stopped.
After every phase DIR/acceptance.json (summary: card, versions, each phase's wall time, exit status
and headline figures) is rewritten, and DIR/acceptance.log holds every command's output, so a run
killed from outside still returns what it finished. Each bench phase's full JSON is kept inside
acceptance.json (the device tool returns at most 8 files).

`--device cpu --smoke` runs the same phases on tiny sizes (CI checks the plumbing that way);
`--dry-run` prints the commands.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Phase:
    name: str
    what: str  # the acceptance item it measures
    args: list[str]  # `flexgen-helm bench` arguments, or pytest arguments for kind "pytest"
    estimate_s: float  # wall time it is expected to need on an H100/H200 machine (start it only if it fits)
    kind: str = "bench"
    env: dict[str, str] = field(default_factory=dict)


def _bench(model: str, prompt: int, gen: int, bs: int, ngb: int = 1, *extra: str) -> list[str]:
    return ["--model", model, "--prompt-len", str(prompt), "--gen-len", str(gen), "--gpu-batch-size", str(bs),
            "--num-gpu-batches", str(ngb), *extra]


ALL_GPU = ["--percent", "100", "0", "100", "0", "100", "0"]
W_DISK = ["--percent", "0", "0", "100", "0", "100", "0"]


def phases(smoke: bool, device: str) -> list[Phase]:
    """The README's rows on CUDA (fp16, the engine's CUDA default), then opt-6.7b and opt-13b with the
    GPU capped at 16 GB against Accelerate's offloading. `smoke`: the same shapes of command on a tiny
    model and one short run each."""
    m13, m67, m13b = ("dummy:opt-125m",) * 3 if smoke else ("dummy:opt-1.3b", "dummy:opt-6.7b", "dummy:opt-13b")
    rep = (lambda n: "1") if smoke else str
    g32 = "4" if smoke else "32"
    test_args = ["-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "tests/test_compression.py::test_cuda_matches_cpu"]
    if smoke:
        test_args[3:] = ["tests/test_cuda.py::test_overlap_on_and_off_give_the_same_answers"]
    cap = ["--gpu-mem", "16GB", "--policy", "auto", "--cpu-mem", "96GB"]
    return [
        Phase("tests", "CUDA correctness: every family x placement vs HF, fp16, 4-bit, overlap, allocator peak",
              test_args, 150, kind="pytest", env={"FLEXGEN_TEST_DEVICE": device}),
        Phase("q1", "4-bit weights in GPU memory, batch 1: >= 2x the 16-bit engine",
              _bench(m13, 16, 4 if smoke else 16, 1, 1, *ALL_GPU, "--compress-weight", "--baseline", "uncompressed",
                     "--repeat", rep(5)), 60),
        Phase("m1", "in memory, batch 16: >= 1.1x HF generate",
              _bench(m13, 64, 4 if smoke else 16, 16, 1, *ALL_GPU, "--baseline", "hf", "--repeat", rep(3)), 60),
        Phase("opt67", "opt-6.7b, GPU capped at 16 GB, policy search vs Accelerate's CPU offload",
              _bench(m67, 128, 8, 8, 1, *cap, "--baseline", "accelerate-cpu", "--repeat", rep(2)), 150),
        Phase("p2", "4-bit weights on disk, block 4x2: >= 2x 16-bit; disk bytes <= 0.35",
              _bench(m13, 32, int(g32), 4, 2, *W_DISK, "--compress-weight", "--baseline", "uncompressed",
                     "--repeat", rep(2), "--bound"), 120),
        Phase("p1", "16-bit weights on disk, block 32x8: >= 0.85 of the per-step bound",
              _bench(m13, 32, int(g32), 32 if not smoke else 4, 8 if not smoke else 2, *W_DISK, "--repeat", rep(2),
                     "--bound"), 120),
        Phase("opt13", "opt-13b, GPU capped at 16 GB, policy search vs Accelerate's CPU offload",
              _bench(m13b, 128, 8, 8, 1, *cap, "--baseline", "accelerate-cpu", "--repeat", rep(2)), 240),
        Phase("r1", "4-bit weights on disk, block 8x4, against 16-bit and the bound",
              _bench(m13, 32, int(g32), 8, 4, *W_DISK, "--compress-weight", "--baseline", "uncompressed",
                     "--repeat", rep(2), "--bound"), 120),
    ]


def headline(result: dict) -> dict:
    """The figures the README's table takes from a bench JSON."""
    h = {k: result.get(k) for k in ("generation_throughput", "decode_throughput", "prefill_throughput",
                                     "speedup_vs_baseline", "cuda_max_memory_allocated", "weight_bytes")}
    if "baseline" in result:
        h["baseline_generation_throughput"] = result["baseline"].get("generation_throughput")
        if "bytes_moved" in result["baseline"]:
            mine, theirs = result["bytes_moved"], result["baseline"]["bytes_moved"]
            h["disk_bytes_ratio"] = (mine.get("disk->cpu", 0) + mine.get("disk->gpu", 0)) / max(
                1, theirs.get("disk->cpu", 0) + theirs.get("disk->gpu", 0))
    if "bound" in result:
        h["fraction_of_bound"] = result["bound"].get("fraction_of_bound")
    h["policy"] = {k: result["policy"][k] for k in ("gpu_batch_size", "num_gpu_batches", "w_gpu_percent",
                                                    "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                                                    "compress_weight")} if "policy" in result else None
    return h


def machine() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, card_memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    for mod in ("transformers", "accelerate", "pulp"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - recorded, the phase that needs it fails on its own
            info[mod] = f"missing ({type(e).__name__})"
    return info


def command(ph: Phase, device: str, work: str, json_path: str) -> list[str]:
    if ph.kind == "pytest":
        return [sys.executable, "-m", "pytest", *ph.args]
    return [sys.executable, "-m", "flexgen_helm", "bench", *ph.args, "--device", device,
            "--offload-dir", work, "--json", json_path]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where acceptance.json and acceptance.log go")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="stop starting phases past this")
    ap.add_argument("--phases", default=None, help="comma-separated subset, in the given order")
    ap.add_argument("--work-dir", default=REPO, help="a temporary folder for offload files is made (and removed) here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one run each (checks the plumbing)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)

    todo = phases(args.smoke, args.device)
    if args.phases:
        by_name = {p.name: p for p in todo}
        unknown = [n for n in args.phases.split(",") if n not in by_name]
        if unknown:
            ap.error(f"unknown phases {unknown}; choose from {sorted(by_name)}")
        todo = [by_name[n] for n in args.phases.split(",")]
    if args.dry_run:
        for ph in todo:
            print(f"[{ph.name}] ~{ph.estimate_s:.0f}s {ph.what}\n  " + " ".join(command(ph, args.device, "WORK", "J")))
        return 0

    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="flexgen-acceptance-", dir=args.work_dir)
    summary = {"machine": machine(), "device": args.device, "smoke": args.smoke, "deadline_s": args.deadline_s,
               "phases": []}
    log_path, sum_path = os.path.join(args.out, "acceptance.log"), os.path.join(args.out, "acceptance.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLEXGEN_HELM_OFFLOAD_DIR": work}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    t0 = time.monotonic()
    failed = False
    try:
        with open(log_path, "a") as log:
            for ph in todo:
                left = args.deadline_s - (time.monotonic() - t0)
                rec = {"name": ph.name, "what": ph.what, "estimate_s": ph.estimate_s}
                if left < ph.estimate_s:
                    rec["status"] = f"skipped: {left:.0f}s left of the deadline, estimate {ph.estimate_s:.0f}s"
                    summary["phases"].append(rec)
                    continue
                json_path = os.path.join(work, f"{ph.name}.json")
                cmd = command(ph, args.device, work, json_path)
                log.write(f"\n=== {ph.name}: {' '.join(cmd)}\n")
                log.flush()
                start = time.monotonic()
                try:
                    rc = subprocess.run(cmd, cwd=REPO, env={**env, **ph.env}, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=left).returncode
                    rec["status"] = "ok" if rc == 0 else f"exit {rc}"
                except subprocess.TimeoutExpired:
                    rec["status"] = "stopped at the deadline"
                rec["wall_s"] = round(time.monotonic() - start, 1)
                failed |= rec["status"] != "ok"
                if os.path.exists(json_path):
                    with open(json_path) as f:
                        rec["result"] = json.load(f)
                    rec["headline"] = headline(rec["result"])
                summary["phases"].append(rec)
                with open(sum_path, "w") as f:
                    json.dump(summary, f, indent=2)
                print(f"[{ph.name}] {rec['status']} in {rec['wall_s']}s {json.dumps(rec.get('headline', {}))}",
                      flush=True)
    finally:
        summary["total_s"] = round(time.monotonic() - t0, 1)
        with open(sum_path, "w") as f:
            json.dump(summary, f, indent=2)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
