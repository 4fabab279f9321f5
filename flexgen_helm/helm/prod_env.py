"""HELM's `prod_env/` for the flexgen deployments: the shipped templates (flexgen_helm/helm/prod_env/)
adapted to where the weights are, plus lookups `flexgen-helm run` needs."""
from __future__ import annotations

import os
import re
from importlib import resources
from typing import Any

import yaml

from ..engine.config import ConfigError

FILES = ("model_metadata.yaml", "model_deployments.yaml", "tokenizer_configs.yaml")
_LIST_KEY = {"model_metadata.yaml": "models", "model_deployments.yaml": "model_deployments",
             "tokenizer_configs.yaml": "tokenizer_configs"}
_HEADER = ("# Written by `flexgen-helm prod-env` from the templates in flexgen_helm/helm/prod_env/.\n"
           "# Client args: model_path (checkpoint dir | hub id | dummy:opt-XXX), device, dtype, policy\n"
           "# (auto | FILE.json), percent, gpu_batch_size, num_gpu_batches, gpu_mem, cpu_mem, disk_mem,\n"
           "# compress_weight, compress_cache, offload_dir, tokenizer_path.\n")
CLIENT_CLASS = "flexgen_helm.helm.client.FlexGenClient"
OPT_TOKENIZER = "facebook/opt-66b"  # the name every HELM OPT deployment uses


def template(name: str) -> dict:
    text = resources.files("flexgen_helm.helm").joinpath("prod_env", name).read_text()
    return yaml.safe_load(text)


def known_sizes() -> list[str]:
    """Checkpoint names with shipped deployments: opt-125m ... opt-175b, opt-iml-30b."""
    names = [d["name"].split("/", 1)[1] for d in template("model_deployments.yaml")["model_deployments"]]
    return [n for n in names if not n.endswith("-4bit")]


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))


def _load(out_dir: str, name: str) -> dict:
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    else:
        data = template(name)
    data.setdefault(_LIST_KEY[name], [])
    return data


def _save(out_dir: str, name: str, data: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(_HEADER)
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def _upsert(entries: list[dict], entry: dict, first: bool = False) -> None:
    for i, e in enumerate(entries):
        if e.get("name") == entry["name"]:
            entries[i] = entry
            return
    entries.insert(0, entry) if first else entries.append(entry)


def checkpoint_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path)).lower()
    return re.sub(r"[^a-z0-9._-]+", "-", base).strip("-") or "checkpoint"


def _point_at(cfgs: dict[str, dict], name: str, path: str, client_args: dict[str, Any]) -> str:
    """Register checkpoint `path` under `name` in the loaded YAMLs; return its deployment name."""
    path = os.path.abspath(path)
    deployments = cfgs["model_deployments.yaml"]["model_deployments"]
    tokenizers = cfgs["tokenizer_configs.yaml"]["tokenizer_configs"]
    if name in known_sizes():  # a public OPT size: keep HELM's model name, repoint both deployments
        for d in deployments:
            if d["name"] in (f"flexgen/{name}", f"flexgen/{name}-4bit"):
                d["client_spec"]["args"].update({"model_path": path, **client_args})
        if _has_tokenizer(path):  # all OPT sizes share one tokenizer
            _upsert(tokenizers, _tokenizer_entry(OPT_TOKENIZER, path))
        return f"flexgen/{name}"
    from ..engine.model_spec import load_spec
    spec = load_spec(path)
    model = f"flexgen/{name}"
    _upsert(cfgs["model_metadata.yaml"]["models"], {
        "name": model, "display_name": f"{name} (local OPT checkpoint)",
        "description": f"OPT checkpoint at {path}", "creator_organization_name": "Local", "access": "open",
        "num_parameters": spec.num_params(), "release_date": None,
        "tags": ["TEXT_MODEL_TAG", "FULL_FUNCTIONALITY_TEXT_MODEL_TAG"]})
    tokenizer = model if _has_tokenizer(path) else OPT_TOKENIZER
    if tokenizer == model:
        _upsert(tokenizers, _tokenizer_entry(model, path))
    _upsert(deployments, {
        "name": model, "model_name": model, "tokenizer_name": tokenizer,
        "max_sequence_length": spec.max_positions - 1,  # room for the </s> the client adds
        "client_spec": {"class_name": CLIENT_CLASS, "args": {"model_path": path, **client_args}}})
    return model


def _tokenizer_entry(name: str, path: str) -> dict:
    return {"name": name,
            "tokenizer_spec": {"class_name": "helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer",
                               "args": {"pretrained_model_name_or_path": os.path.abspath(path)}},
            "end_of_text_token": "</s>", "prefix_token": "</s>"}


def write_prod_env(out_dir: str, checkpoints: dict[str, str] | None = None, weights_root: str | None = None,
                   client_args: dict[str, Any] | None = None) -> list[str]:
    """Write the three YAMLs into out_dir from the templates (cache/ and credentials are kept).

    checkpoints: name -> directory (a public size such as "opt-30b" repoints flexgen/opt-30b{,-4bit};
    any other name adds flexgen/<name>). weights_root: every DIR/opt-XXX found is used.
    """
    cfgs = {name: template(name) for name in FILES}
    found = dict(checkpoints or {})
    if weights_root:
        if not os.path.isdir(weights_root):
            raise ConfigError(f"--weights-root {weights_root} is not a directory")
        for size in known_sizes():
            if os.path.isdir(os.path.join(weights_root, size)):
                found.setdefault(size, os.path.join(weights_root, size))
    for name, path in found.items():
        if not os.path.isdir(path):
            raise ConfigError(f"checkpoint {name}={path}: not a directory")
        _point_at(cfgs, name, path, client_args or {})
    return [_save(out_dir, name, data) for name, data in cfgs.items()]


def add_checkpoint(out_dir: str, path: str, name: str | None = None,
                   client_args: dict[str, Any] | None = None) -> str:
    """Add (or update) a local checkpoint's deployment in an existing prod_env; returns its name."""
    cfgs = {n: _load(out_dir, n) for n in FILES}
    deployment = _point_at(cfgs, name or checkpoint_name(path), path, client_args or {})
    for n, data in cfgs.items():
        _save(out_dir, n, data)
    return deployment


def resolve_model(local_path: str, model: str) -> tuple[str, str, bool]:
    """(HELM model name, deployment, is it the model's default deployment) for `--model`: a flexgen
    deployment or model name from local_path's model_deployments.yaml, or a checkpoint directory
    (added to it)."""
    if os.path.isdir(model):
        model = add_checkpoint(local_path, model)
    path = os.path.join(local_path, "model_deployments.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist: run `flexgen-helm prod-env --out {local_path}` first "
                          "(or pass --model a checkpoint directory)")
    deployments = [d for d in _load(local_path, "model_deployments.yaml")["model_deployments"]
                   if d.get("client_spec", {}).get("class_name") == CLIENT_CLASS]
    def default(model_name: str) -> str:  # HELM's rule: the last deployment listed for a model
        return [d["name"] for d in deployments if (d.get("model_name") or d["name"]) == model_name][-1]

    for d in deployments:
        if d["name"] == model:
            name = d.get("model_name") or d["name"]
            return name, d["name"], default(name) == d["name"]
    if any(d.get("model_name") == model for d in deployments):
        return model, default(model), True
    names = ", ".join(d["name"] for d in deployments)
    raise ConfigError(f"--model {model!r} is not a flexgen deployment or model in {path}; "
                      f"use one of: {names}, or a checkpoint directory")
