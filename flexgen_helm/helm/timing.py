"""Progress bar and the per-batch timing log (`<output>/runs/<suite>/flexgen_timing.jsonl`, read by
`flexgen-helm report`). One line per executed engine batch; batches served from the cache on a
resumed run are not logged again."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from .client import BatchObserver, BatchReport

TIMING_LOG = "flexgen_timing.jsonl"


class TimingObserver(BatchObserver):
    """Appends one line per executed batch to the suite's timing log; shows progress with ETA."""

    def __init__(self, log_path: str | None, suite: str, model: str, deployment: str,
                 tags: list[str], progress: bool):
        self.log_path, self.suite, self.model, self.deployment = log_path, suite, model, deployment
        self.tags = tags  # run spec name per request index
        self.progress = progress
        self.bar: Any = None
        self.batches = 0
        self.rows = 0

    def start(self, rows: int, cached: int) -> None:
        if self.progress and rows:
            from tqdm import tqdm
            self.bar = tqdm(total=rows, unit="row", desc=f"flexgen {self.deployment}", file=sys.stderr,
                            dynamic_ncols=True, postfix={"cached": cached})

    def rows_done(self, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(rows)

    def batch_done(self, r: BatchReport) -> None:
        self.batches += 1
        self.rows += r.rows
        if self.log_path is None:
            return
        per_spec: dict[str, dict[str, int]] = {}
        for idx, rows, prompt_tokens, generated in r.members:
            s = per_spec.setdefault(self.tags[idx], {"rows": 0, "prompt_tokens": 0, "generated_tokens": 0})
            s["rows"] += rows
            s["prompt_tokens"] += prompt_tokens
            s["generated_tokens"] += generated
        st = r.stats
        line = {
            "suite": self.suite, "model": self.model, "deployment": self.deployment, "batch_id": r.batch_id,
            "group": r.group, "rows": r.rows, "prompt_tokens": st.prompt_tokens,
            "padded_prompt_tokens": st.padded_prompt_tokens, "generated_tokens": st.generated_tokens,
            "prefill_s": st.prefill_time, "decode_s": st.decode_time, "io_wait_s": st.io_wait_time,
            "wall_s": r.wall_s, "policy": r.policy, "peak_memory_bytes": st.peak_memory_bytes,
            "compress_weight": bool(r.policy.get("compress_weight")),
            "compress_cache": bool(r.policy.get("compress_cache")), "time": time.time(),
            "run_specs": per_spec, "model_path": r.settings.model_path,
        }
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        if self.batches == 1:
            drop_partial_line(self.log_path)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def drop_partial_line(path: str) -> None:
    """A run killed (SIGKILL, power loss) in the middle of a write leaves half a line at the end;
    cut it off before appending, so the log stays one JSON object per line."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - (1 << 20)))
            tail = f.read()
            if tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0 if size <= len(tail) else size)
    except FileNotFoundError:
        pass
