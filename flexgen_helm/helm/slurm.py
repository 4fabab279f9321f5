"""`flexgen-helm run --slurm`: one Slurm job per shard, through HELM's own helpers
(`helm.benchmark.slurm_jobs`: sbatch via simple-slurm, `scontrol show job`, `scancel`).

Job resources come from `<local_path>/runner_config.yaml` (`slurm_args`, as HELM's SlurmRunner reads
them) and `--slurm-arg KEY=VALUE` (wins). Keys are sbatch options with `_` for `-`
(`cpus_per_task=8`, `mem=64G`, `time=12:00:00`, `partition=gpu`, `gres=gpu:1`).
"""
from __future__ import annotations

import os
import shlex
from typing import Any

from ..engine.config import ConfigError
from .shards import Shard

RUNNER_CONFIG = "runner_config.yaml"
GPU_KEYS = ("gres", "gpus", "gpus_per_node", "gpus_per_task")
_STATES = {"PENDING": "queued", "CONFIGURING": "queued", "REQUEUED": "queued", "RUNNING": "running",
           "COMPLETING": "running", "SUSPENDED": "running", "STAGE_OUT": "running", "COMPLETED": "done"}


def parse_slurm_args(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--slurm-arg takes KEY=VALUE (e.g. mem=64G, time=04:00:00, partition=gpu), got {item!r}")
        out[key] = value
    return out


def runner_config_args(local_path: str) -> dict[str, str]:
    """`slurm_args` of HELM's runner_config.yaml, when there is one."""
    path = os.path.join(local_path, RUNNER_CONFIG)
    if not os.path.exists(path):
        return {}
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        args = config.get("slurm_args") or {}
        if not isinstance(args, dict):
            raise ValueError("slurm_args must be a mapping")
    except (OSError, ValueError, yaml.YAMLError, AttributeError) as e:
        raise ConfigError(f"cannot read slurm_args from {path}: {e}") from e
    return {str(k): str(v) for k, v in args.items()}


def job_args(local_path: str, cli_args: dict[str, str], uses_gpu: bool) -> dict[str, str]:
    """The sbatch options of every job: runner_config.yaml, then --slurm-arg; one GPU per job when
    the deployment runs on one and nobody asked otherwise."""
    args = {**runner_config_args(local_path), **cli_args}
    if uses_gpu and not any(k in args for k in GPU_KEYS):
        args["gres"] = "gpu:1"
    return args


def check_sbatch_options(args: dict[str, str]) -> None:
    """simple-slurm exits on an unknown option; say which one before any job is submitted."""
    import contextlib
    import io

    from simple_slurm import Slurm

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            Slurm(**args)
    except SystemExit:
        raise ConfigError(f"unknown sbatch option in --slurm-arg / runner_config.yaml: "
                          f"{err.getvalue().strip().splitlines()[-1]}") from None


def deployment_uses_gpu(local_path: str, model: str, engine: dict) -> bool:
    """False only when the engine is told to run on the CPU (flag or the deployment's client args):
    "auto" means CUDA when the node has it, so the job asks for one."""
    from .batch_run import setup_helm
    from .prod_env import resolve_model

    device = engine.get("device")
    if device is None:
        from helm.benchmark.model_deployment_registry import get_model_deployment

        _, deployment, _ = resolve_model(local_path, model)
        setup_helm(local_path, None, False)
        device = get_model_deployment(deployment).client_spec.args.get("device", "auto")
    return str(device) != "cpu"


class SlurmBackend:
    name = "slurm"
    ERRORS_BEFORE_LOST = 3

    def __init__(self, suite: str, base_args: dict[str, str]):
        try:
            from helm.benchmark import slurm_jobs
        except ImportError as e:  # simple-slurm is a dependency; say what to do if it went missing
            raise ConfigError(f"--slurm needs HELM's Slurm helpers ({e}): pip install 'crfm-helm[slurm]'") from e
        self.jobs = slurm_jobs
        check_sbatch_options(base_args)
        self.suite = suite
        self.base_args = base_args
        self.errors: dict[Any, int] = {}  # consecutive scontrol failures per job

    def submit(self, shard: Shard, argv: list[str], log_path: str) -> int:
        args = {"job_name": f"flexgen-{self.suite}-{shard.label}", "output": log_path, **self.base_args}
        return int(self.jobs.submit_slurm_job(shlex.join(argv), args))

    def state(self, job_id: Any) -> str:
        try:
            raw = self.jobs.get_slurm_job_state(job_id)
            self.errors.pop(job_id, None)
        except Exception:  # noqa: BLE001 - scontrol hiccup, or the job aged out of slurmctld's memory
            self.errors[job_id] = self.errors.get(job_id, 0) + 1
            # a hiccup must not resubmit a live job; once gone for good, the result file decides
            return "failed" if self.errors[job_id] >= self.ERRORS_BEFORE_LOST else "running"
        if raw in self.jobs.FAILURE_SLURM_JOB_STATES:
            return "failed"
        return _STATES.get(raw, "running")

    def cancel(self, job_id: Any) -> None:
        try:
            self.jobs.cancel_slurm_job(job_id)
        except Exception as e:  # noqa: BLE001 - cancel the others anyway
            print(f"[slurm] could not cancel job {job_id}: {e}")
