"""Synthetic HELM suites for the report tests, and a check that they are in HELM's exact file format.

The builder writes what `helm-run` writes for a run (run_spec.json, scenario.json, scenario_state.json,
stats.json, per_instance_stats.json) plus the flexgen timing log. HELM aggregates a run like this: per
train trial, the mean of each (metric, split) over instances; then the mean over trials, so stats.json
counts trials, not instances. Perturbed copies of instances get their own stats, which reports must skip.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

RUN_FILES = ("run_spec.json", "scenario.json", "scenario_state.json", "stats.json", "per_instance_stats.json")
PERTURBATION = {"name": "robustness", "robustness": True, "fairness": False, "computed_on": "worst"}


def stat(name: str, split: str | None, values: list[float], perturbation: dict | None = None) -> dict:
    """A HELM Stat as asdict_without_nones writes it (population variance; None fields dropped)."""
    metric_name: dict = {"name": name}
    if split is not None:
        metric_name["split"] = split
    if perturbation is not None:
        metric_name["perturbation"] = perturbation
    out: dict = {"name": metric_name, "count": len(values), "sum": float(sum(values)),
                 "sum_squared": float(sum(v * v for v in values))}
    if values:
        mean = out["sum"] / len(values)
        var = max(out["sum_squared"] / len(values) - mean ** 2, 0.0)
        out.update(min=float(min(values)), max=float(max(values)), mean=mean, variance=var, stddev=math.sqrt(var))
    return out


def adapter_spec(model: str, deployment: str, max_tokens: int = 5) -> dict:
    return {
        "method": "generation", "global_prefix": "", "global_suffix": "", "instructions": "",
        "input_prefix": "", "input_suffix": "\n", "reference_prefix": "A. ", "reference_suffix": "\n",
        "chain_of_thought_prefix": "", "chain_of_thought_suffix": "\n", "output_prefix": "Answer: ",
        "output_suffix": "\n", "instance_prefix": "\n", "substitutions": [], "max_train_instances": 5,
        "max_eval_instances": 10, "num_outputs": 1, "num_train_trials": 1, "num_trials": 1, "sample_train": True,
        "model_deployment": deployment, "model": model, "temperature": 0.0, "max_tokens": max_tokens,
        "stop_sequences": ["\n"], "multi_label": False,
    }


def write_run(suite_dir: Path, task: str, groups: list[str], values: dict[str, dict[str, float]],
              splits: dict[str, str], predictions: dict[str, str], deployment: str = "flexgen/opt-1.3b",
              trials: int = 1, omit: tuple[str, ...] = (), perturbed: bool = True) -> Path:
    """One HELM run folder for `task` (e.g. "mmlu:subject=x"): values[instance_id][metric] per instance
    (the same in every trial), split and greedy prediction per instance. `omit` drops files (partial runs)."""
    model = "meta/opt-1.3b"
    name = f"{task}{',' if ':' in task else ':'}model={model.replace('/', '_')}," \
           f"model_deployment={deployment.replace('/', '_')}"
    run_dir = suite_dir / name
    run_dir.mkdir(parents=True)
    scenario, _, args_text = task.partition(":")
    spec = adapter_spec(model, deployment)
    run_spec = {
        "name": name,
        "scenario_spec": {"class_name": f"helm.benchmark.scenarios.fake.{scenario}",
                          "args": dict(a.split("=") for a in args_text.split(",") if a)},
        "adapter_spec": spec,
        "metric_specs": [{"class_name": "helm.benchmark.metrics.basic_metrics.BasicGenerationMetric",
                          "args": {"names": ["exact_match", "quasi_exact_match"]}}],
        "data_augmenter_spec": {"perturbation_specs": [], "should_augment_train_instances": False,
                                "should_include_original_train": False, "should_skip_unchanged_train": False,
                                "should_augment_eval_instances": False, "should_include_original_eval": False,
                                "should_skip_unchanged_eval": False, "seeds_per_instance": 1},
        "groups": groups,
    }
    per_instance, request_states = [], []
    for trial in range(trials):
        for iid, metrics in values.items():
            stats = [stat("num_prompt_tokens", splits[iid], [40.0])]
            stats += [stat(m, splits[iid], [v]) for m, v in metrics.items()]
            per_instance.append({"instance_id": iid, "train_trial_index": trial, "stats": stats})
            if perturbed:  # a robustness copy with a wrong score, as data augmentation would add
                per_instance.append({"instance_id": iid, "perturbation": PERTURBATION, "train_trial_index": trial,
                                     "stats": [stat(m, splits[iid], [v + 100]) for m, v in metrics.items()]})
            instance = {"input": {"text": f"question {iid}"},
                        "references": [{"output": {"text": "yes"}, "tags": ["correct"]}],
                        "split": splits[iid], "id": iid}
            request_states.append({
                "instance": instance, "train_trial_index": trial,
                "request": {"model_deployment": deployment, "model": model, "embedding": False,
                            "prompt": f"question {iid}\nAnswer:", "temperature": 0.0, "num_completions": 1,
                            "top_k_per_token": 1, "max_tokens": 5, "stop_sequences": ["\n"], "echo_prompt": False,
                            "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0},
                "result": {"success": True, "embedding": [],
                           "completions": [{"text": predictions[iid], "logprob": -1.5,
                                            "tokens": [{"text": predictions[iid], "logprob": -1.5}]}],
                           "cached": False, "request_time": 0.01, "request_datetime": 1700000000},
                "num_train_instances": 5, "prompt_truncated": False, "num_conditioning_tokens": 0})
    stats = []
    metric_names = sorted({m for v in values.values() for m in v} | {"num_prompt_tokens"})
    for split in sorted(set(splits.values())):
        ids = [i for i in values if splits[i] == split]
        for m in metric_names:
            vals = [40.0 if m == "num_prompt_tokens" else values[i][m] for i in ids if
                    m == "num_prompt_tokens" or m in values[i]]
            trial_means = [sum(vals) / len(vals)] * trials if vals else []
            stats.append(stat(m, split, trial_means))
            if m != "num_prompt_tokens" and vals:
                stats.append(stat(m, split, [x + 100 for x in trial_means], PERTURBATION))
        stats.append(stat("num_instances", split, [float(len(ids))] * trials))
    files = {
        "run_spec.json": run_spec,
        "scenario.json": {"name": scenario, "description": "fake", "tags": []},
        "scenario_state.json": {"adapter_spec": spec, "request_states": request_states},
        "stats.json": stats,
        "per_instance_stats.json": per_instance,
    }
    for fname, obj in files.items():
        if fname not in omit:
            (run_dir / fname).write_text(json.dumps(obj, indent=2))
    return run_dir


def policy(gbs: int = 8, ngb: int = 2, w_gpu: float = 20, w_cpu: float = 80, compress: bool = False) -> dict:
    """Policy.to_dict() as the engine writes it into the timing log."""
    return {"gpu_batch_size": gbs, "num_gpu_batches": ngb, "w_gpu_percent": w_gpu, "w_cpu_percent": w_cpu,
            "cache_gpu_percent": 0.0, "cache_cpu_percent": 100.0, "act_gpu_percent": 0.0, "act_cpu_percent": 100.0,
            "overlap": True, "pin_weight": True, "cpu_cache_compute": False, "compress_weight": compress,
            "comp_weight_config": {"num_bits": 4, "group_size": 64, "group_dim": 0}, "compress_cache": compress,
            "comp_cache_config": {"num_bits": 4, "group_size": 64, "group_dim": -1}}


def batch(suite: str, batch_id: str, run_specs: dict[str, dict[str, int]], padded: int, prefill: float,
          decode: float, io_wait: float, wall: float, peak: dict[str, int], compress: bool = False) -> dict:
    """One line of the flexgen timing log (contract in /tmp/contracts.md)."""
    return {"suite": suite, "model": "facebook/opt-1.3b", "deployment": "flexgen/opt-1.3b", "batch_id": batch_id,
            "group": "t=0.0,max_tokens=5", "rows": sum(s["rows"] for s in run_specs.values()),
            "prompt_tokens": sum(s["prompt_tokens"] for s in run_specs.values()), "padded_prompt_tokens": padded,
            "generated_tokens": sum(s["generated_tokens"] for s in run_specs.values()),
            "prefill_s": prefill, "decode_s": decode, "io_wait_s": io_wait, "wall_s": wall,
            "policy": policy(compress=compress), "peak_memory_bytes": peak, "compress_weight": compress,
            "compress_cache": compress, "time": 1700000000.0, "run_specs": run_specs}


def write_timing(suite_dir: Path, batches: list[dict], garbage: bool = False) -> None:
    lines = [json.dumps(b) for b in batches] + (['{"batch_id": "cut off'] if garbage else [])
    (suite_dir / "flexgen_timing.jsonl").write_text("\n".join(lines) + "\n")


def run_name(suite_dir: Path, task_prefix: str) -> str:
    return next(p.name for p in suite_dir.iterdir() if p.name.startswith(task_prefix))


# ---------------------------------------------------------------------------------------------------------------
def test_fixture_is_helm_format(tmp_path):
    """Each fixture file parses with HELM's own decoder into HELM's dataclasses and serializes back to
    exactly the same JSON, so the field names, nesting and omitted-None convention are HELM's."""
    pytest.importorskip("helm.benchmark.run_spec")
    from typing import List

    from helm.benchmark.adaptation.scenario_state import ScenarioState
    from helm.benchmark.metrics.metric import PerInstanceStats
    from helm.benchmark.metrics.statistic import Stat
    from helm.benchmark.run_spec import RunSpec
    from helm.common.codec import from_json
    from helm.common.general import asdict_without_nones

    run_dir = write_run(tmp_path, "mmlu:subject=x", ["mmlu"], {"id1": {"exact_match": 1.0}, "id2": {"exact_match": 0.0}},
                        {"id1": "test", "id2": "valid"}, {"id1": "A", "id2": "B"}, trials=2)
    for fname, cls in (("run_spec.json", RunSpec), ("scenario_state.json", ScenarioState),
                       ("stats.json", List[Stat]), ("per_instance_stats.json", List[PerInstanceStats])):
        text = (run_dir / fname).read_text()
        obj = from_json(text, cls)
        again = [asdict_without_nones(o) for o in obj] if isinstance(obj, list) else asdict_without_nones(obj)
        assert again == json.loads(text), fname
