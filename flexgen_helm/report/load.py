"""Read a suite's HELM run folders and the runner's timing log into pandas tables.

Only files are read; neither the engine nor HELM is imported, so a report can be made on any machine
that has the `benchmark_output/` folder.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .. import ConfigError

RUN_FILES = ("run_spec.json", "scenario_state.json", "stats.json", "per_instance_stats.json")
TIMING_LOG = "flexgen_timing.jsonl"
# Run-name keys that are not the task: the model, and the instance cap (run_specs.conf caps each entry
# and `-m` may lower it), so runs of one sub-scenario line up across suites; counts have their own column.
NON_TASK_KEYS = ("model", "model_deployment", "max_eval_instances")

# Main metric per run group, as HELM's classic schema (schema_classic.yaml) defines it, for suites that were
# never passed through `helm-summarize` (which writes the schema next to the runs).
KNOWN_MAIN_METRICS: dict[str, tuple[str, str]] = {
    "wikifact": ("quasi_exact_match", "test"),
    "mmlu": ("exact_match", "test"),
    "synthetic_reasoning": ("quasi_exact_match", "test"),
    "synthetic_reasoning_natural": ("f1_set_match", "test"),
    "summarization_xsum": ("rouge_2", "test"),
    "summarization_xsum_sampled": ("rouge_2", "test"),
}
# Used only when no group names a main metric that the run has: the first one present wins.
FALLBACK_METRICS = ("exact_match", "quasi_exact_match", "f1_set_match", "f1_score", "rouge_2", "rouge_l",
                    "rouge_1", "bleu_4", "perplexity")
# Accuracy-type metrics worth showing next to the main one (HELM also logs dozens of bookkeeping stats).
OTHER_METRICS = ("exact_match", "quasi_exact_match", "prefix_exact_match", "quasi_prefix_exact_match",
                 "f1_score", "f1_set_match", "exact_set_match", "rouge_1", "rouge_2", "rouge_l", "bleu_1",
                 "bleu_4", "ece_10_bin", "perplexity", "bits_per_byte")


class ReportError(ConfigError):
    """Bad report input (unknown suite, nothing to compare); the CLI prints it as one line."""


def split_run_name(name: str) -> tuple[str, dict[str, str]]:
    """'mmlu:subject=x,model=m' -> ('mmlu', {'subject': 'x', 'model': 'm'})."""
    scenario, _, rest = name.partition(":")
    args = dict(part.split("=", 1) if "=" in part else (part, "") for part in rest.split(",") if part)
    return scenario, args


def sub_scenario_of(run_name: str) -> str:
    """The run name without its model and instance-cap keys, so runs of one task in two suites line up."""
    scenario, args = split_run_name(run_name)
    kept = [f"{k}={v}" for k, v in args.items() if k not in NON_TASK_KEYS]
    return f"{scenario}:{','.join(kept)}" if kept else scenario


@dataclass
class RunData:
    """What one HELM run folder holds (whatever of it could be read)."""

    suite: str
    name: str
    path: Path
    sub_scenario: str
    notes: list[str] = field(default_factory=list)
    run_spec: dict[str, Any] | None = None
    stats: list[dict[str, Any]] | None = None
    # long table of unperturbed per-instance stats: instance_id, train_trial_index, metric, split, value
    per_instance: pd.DataFrame | None = None
    # instance_id -> every completion text of that instance, in a fixed order (for "prediction changed")
    predictions: dict[str, tuple[str, ...]] | None = None
    main_metric: str | None = None
    main_split: str | None = None

    @property
    def groups(self) -> list[str]:
        return list((self.run_spec or {}).get("groups") or [])

    def stat_mean(self, metric: str, split: str | None) -> float:
        """HELM's aggregated value of an unperturbed stat (NaN if absent)."""
        for s in self.stats or []:
            n = s["name"]
            if n["name"] == metric and n.get("split") == split and "perturbation" not in n \
                    and "sub_split" not in n and s.get("count", 0) > 0:
                return float(s["mean"])
        return math.nan

    def instance_values(self, metric: str | None = None, split: str | None = None) -> pd.Series:
        """Per-instance value of a metric (averaged over train trials), indexed by instance id."""
        metric, split = metric or self.main_metric, split or self.main_split
        if self.per_instance is None or metric is None:
            return pd.Series(dtype=float)
        df = self.per_instance
        df = df[(df["metric"] == metric) & (df["split"] == split)]
        return df.groupby("instance_id", sort=True)["value"].mean()


@dataclass
class SuiteData:
    suite: str
    path: Path
    runs: dict[str, RunData]        # by sub-scenario
    timing: pd.DataFrame | None     # one row per (batch, run spec) with apportioned tokens and times
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, notes: list[str]) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        notes.append(f"unreadable {path.name} ({e.__class__.__name__})")
        return None


def _parsed(path: Path, notes: list[str], parse: Callable[[Any], Any]) -> Any:
    """Read and convert one run file; a file not in HELM's format becomes a note, not a crash."""
    raw = _read_json(path, notes)
    if raw is None:
        return None
    try:
        return parse(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        notes.append(f"malformed {path.name} ({e.__class__.__name__}: {e})")
        return None


def _check_run_spec(raw: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw.get("name", ""), str) or not isinstance(raw.get("groups", []), list):
        raise ValueError("run_spec needs a name and a list of groups")
    return raw


def _check_stats(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for s in raw:  # fail here, inside _parsed, rather than later while building tables
        if not isinstance(s["name"]["name"], str) or not isinstance(s["count"], int):
            raise ValueError("each stat needs name.name and count")
    return raw


def _per_instance_frame(raw: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for entry in raw:
        if entry.get("perturbation"):  # augmented copies of an instance; HELM's main numbers exclude them
            continue
        for s in entry.get("stats", []):
            n = s["name"]
            if "perturbation" in n or "sub_split" in n or s.get("count", 0) == 0:
                continue
            rows.append((entry["instance_id"], entry.get("train_trial_index", 0), n["name"], n.get("split"),
                         float(s["mean"]) if "mean" in s else s["sum"] / s["count"]))
    return pd.DataFrame(rows, columns=["instance_id", "train_trial_index", "metric", "split", "value"])


def _predictions(state: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    by_instance: dict[str, list[tuple[tuple, tuple[str, ...]]]] = {}
    for rs in state.get("request_states", []):
        inst = rs["instance"]
        if inst.get("perturbation"):
            continue
        texts = tuple(c.get("text", "") for c in ((rs.get("result") or {}).get("completions") or []))
        ref = rs.get("reference_index")
        order = (rs.get("train_trial_index", 0), -1 if ref is None else ref, rs.get("request_mode") or "")
        by_instance.setdefault(inst.get("id", ""), []).append((order, texts))
    return {k: tuple(t for _, ts in sorted(v) for t in ts) for k, v in by_instance.items()}


def choose_main_metric(groups: list[str], present: set[tuple[str, str | None]],
                       schema_main: dict[str, tuple[str, str]]) -> tuple[str | None, str | None]:
    """Pick the run's main metric as HELM's tables would: from its run groups' environment.

    A run lists its groups from general to specific (synthetic_reasoning, synthetic_reasoning_natural), and
    the specific group's metric is what its own table leads with, so groups are tried last-first. A group
    whose metric the run did not produce (a plugin run spec scoring XSUM with ROUGE-L only) is skipped.
    """
    for g in reversed(groups):
        for table in (schema_main, KNOWN_MAIN_METRICS):
            if g in table and table[g] in present:
                return table[g]
    splits = [s for s in ("test", "valid", None) if any(p[1] == s for p in present)]
    for split in splits:
        for m in FALLBACK_METRICS:
            if (m, split) in present:
                return m, split
    return None, None


def _schema_main_metrics(suite_dir: Path) -> dict[str, tuple[str, str]]:
    schema = _read_json(suite_dir / "schema.json", [])  # written by helm-summarize; optional
    out = {}
    for g in (schema or {}).get("run_groups", []):
        env = g.get("environment") or {}
        if "main_name" in env and "main_split" in env:
            out[g["name"]] = (env["main_name"], env["main_split"])
    return out


def load_run(suite: str, run_dir: Path, schema_main: dict[str, tuple[str, str]]) -> RunData:
    run = RunData(suite=suite, name=run_dir.name, path=run_dir, sub_scenario=sub_scenario_of(run_dir.name))
    missing = [f for f in RUN_FILES if not (run_dir / f).exists()]
    if len(missing) == len(RUN_FILES):
        run.notes.append("run failed or unfinished: HELM wrote no output files")
    elif missing:
        run.notes.append("partial run: missing " + ", ".join(missing))
    run.run_spec = _parsed(run_dir / "run_spec.json", run.notes, _check_run_spec)
    if run.run_spec and run.run_spec.get("name"):
        run.sub_scenario = sub_scenario_of(run.run_spec["name"])
    run.stats = _parsed(run_dir / "stats.json", run.notes, _check_stats)
    run.per_instance = _parsed(run_dir / "per_instance_stats.json", run.notes, _per_instance_frame)
    run.predictions = _parsed(run_dir / "scenario_state.json", run.notes, _predictions)
    present = {(s["name"]["name"], s["name"].get("split")) for s in run.stats or []
               if "perturbation" not in s["name"]}
    if run.per_instance is not None:
        present |= set(zip(run.per_instance["metric"], run.per_instance["split"]))
    run.main_metric, run.main_split = choose_main_metric(run.groups, present, schema_main)
    return run


def _is_run_dir(p: Path) -> bool:
    # HELM always puts "model=..." after a ':' in run names; failed runs leave an empty folder behind.
    return p.is_dir() and (":" in p.name or (p / "run_spec.json").exists())


def read_timing_log(path: Path, notes: list[str]) -> pd.DataFrame | None:
    """Batches of the timing log, one row per (batch, run spec), with times split by share of tokens.

    A batch can mix sub-scenarios; its prefill time is split by prompt tokens, decode time by generated
    tokens, and I/O wait and the rest of the wall time by all tokens, since those are what each phase
    processes. A sub-scenario's wall time is its prefill + decode shares plus its share of the rest.
    """
    if not path.exists():
        return None
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            b = json.loads(line)
            rows.extend(_apportion(b))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            bad += 1  # e.g. the last line of a run killed while writing
    if bad:
        notes.append(f"{bad} unreadable line(s) in {path.name} skipped")
    cols = ["batch_id", "run", "rows", "prompt_tokens", "padded_prompt_tokens", "generated_tokens",
            "prefill_s", "decode_s", "io_wait_s", "wall_s", "policy", "compress_weight", "compress_cache",
            "peak_gpu", "peak_cpu", "peak_disk"]
    return pd.DataFrame(rows, columns=cols)


def _share(part: float, whole: float, n: int) -> float:
    return part / whole if whole > 0 else 1.0 / n


def _apportion(b: dict[str, Any]) -> list[tuple]:
    specs: dict[str, dict[str, int]] = b["run_specs"]
    tot_p = sum(s["prompt_tokens"] for s in specs.values())
    tot_g = sum(s["generated_tokens"] for s in specs.values())
    peak = b.get("peak_memory_bytes") or {}
    rest = max(b["wall_s"] - b["prefill_s"] - b["decode_s"], 0.0)  # batching, tokenizing, writing results
    out = []
    for name, s in specs.items():
        sp = _share(s["prompt_tokens"], tot_p, len(specs))
        sg = _share(s["generated_tokens"], tot_g, len(specs))
        sa = _share(s["prompt_tokens"] + s["generated_tokens"], tot_p + tot_g, len(specs))
        out.append((str(b["batch_id"]), name, s["rows"], s["prompt_tokens"], b["padded_prompt_tokens"] * sp,
                    s["generated_tokens"], b["prefill_s"] * sp, b["decode_s"] * sg, b.get("io_wait_s", 0.0) * sa,
                    b["prefill_s"] * sp + b["decode_s"] * sg + rest * sa,
                    policy_label(b.get("policy") or {}), bool(b.get("compress_weight")),
                    bool(b.get("compress_cache")), peak.get("gpu", np.nan), peak.get("cpu", np.nan),
                    peak.get("disk", np.nan)))
    return out


def policy_label(p: dict[str, Any]) -> str:
    """The policy's one text form (Policy.describe; engine/config.py is torch-free)."""
    from ..engine.config import Policy
    return Policy.from_dict(p).describe() if p else ""


def load_suite(output_path: str | Path, suite: str) -> SuiteData:
    suite_dir = Path(output_path) / "runs" / suite
    if not suite_dir.is_dir():
        known = sorted(p.name for p in (Path(output_path) / "runs").glob("*") if p.is_dir())
        raise ReportError(f"no suite folder {suite_dir}; suites under {output_path}/runs: "
                          f"{', '.join(known) or 'none'} (pass --output-path if the runs live elsewhere)")
    data = SuiteData(suite=suite, path=suite_dir, runs={}, timing=None)
    schema_main = _schema_main_metrics(suite_dir)
    for run_dir in sorted(p for p in suite_dir.iterdir() if _is_run_dir(p)):
        run = load_run(suite, run_dir, schema_main)
        if run.sub_scenario in data.runs:  # same task under two models in one suite: keep both apart
            run.sub_scenario = run.name
        data.runs[run.sub_scenario] = run
    # shards (`flexgen-helm run --shard`) each write flexgen_timing.shard-I-of-N.jsonl: read the union
    logs = sorted(suite_dir.glob(TIMING_LOG.replace(".jsonl", "*.jsonl")))
    frames = [t for t in (read_timing_log(p, data.notes) for p in logs) if t is not None]
    data.timing = pd.concat(frames, ignore_index=True) if frames else None
    if data.timing is None:
        data.notes.append(f"no timing log ({TIMING_LOG}): timing columns are empty")
    else:
        known_names = {r.name for r in data.runs.values()} | {(r.run_spec or {}).get("name") for r in data.runs.values()}
        for name in sorted(set(data.timing["run"]) - known_names):
            sub = sub_scenario_of(name)
            if sub not in data.runs:  # engine ran it, HELM never wrote its folder
                data.runs[sub] = RunData(suite=suite, name=name, path=suite_dir / name, sub_scenario=sub,
                                         notes=["no run folder (only in the timing log)"])
    if not data.runs:
        raise ReportError(f"suite folder {suite_dir} holds no HELM run folders")
    return data
