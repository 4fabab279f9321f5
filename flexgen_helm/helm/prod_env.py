"""HELM's `prod_env/` for the flexgen deployments: the shipped OPT templates (flexgen_helm/helm/prod_env/)
and entries generated from the family tables (Llama, Mistral, Qwen2.5, Qwen3), adapted to where the
weights are, plus lookups `flexgen-helm run` needs."""
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
           "# Client args: model_path (checkpoint dir | hub id | dummy:NAME), device, dtype, policy\n"
           "# (auto | FILE.json), percent, gpu_batch_size, num_gpu_batches, gpu_mem, cpu_mem, disk_mem,\n"
           "# compress_weight, compress_cache, offload_dir, tokenizer_path.\n")
CLIENT_CLASS = "flexgen_helm.helm.client.FlexGenClient"
OPT_TOKENIZER = "facebook/opt-66b"  # the name every HELM OPT deployment uses


ORGANIZATIONS = {"llama": "meta", "mistral": "mistralai", "qwen2": "qwen", "qwen3": "qwen"}


def template(name: str) -> dict:
    """The shipped YAML (OPT) with the generated entries of the other families appended."""
    text = resources.files("flexgen_helm.helm").joinpath("prod_env", name).read_text()
    data = yaml.safe_load(text)
    entries = data[_LIST_KEY[name]]
    for entry in family_entries()[name]:
        _upsert(entries, entry)
    return data


def _helm_names(config: str, key: str) -> set[str]:
    """Names HELM itself ships in helm/config/<config> (models or tokenizers)."""
    text = resources.files("helm.config").joinpath(config).read_text()
    return {e["name"] for e in (yaml.safe_load(text) or {}).get(key, [])}


def family_entries() -> dict[str, list[dict]]:
    """Metadata, deployments (plain and -4bit) and tokenizer configs for every public size of the
    non-OPT families. HELM's own model and tokenizer names are used where HELM has them."""
    from ..engine.families import FAMILIES
    from ..engine.model_spec import spec_from_name
    helm_models = _helm_names("model_metadata.yaml", "models")
    helm_tokenizers = _helm_names("tokenizer_configs.yaml", "tokenizer_configs")
    out: dict[str, list[dict]] = {name: [] for name in FILES}
    for fam in FAMILIES.values():
        if fam.name not in ORGANIZATIONS:
            continue  # OPT: the shipped templates
        for size in fam.sizes:
            spec = spec_from_name(size)
            model, hub = f"{ORGANIZATIONS[fam.name]}/{size}", fam.hub_ids[size]
            if model not in helm_models:
                out["model_metadata.yaml"].append(_metadata(model, f"{size} (base)", f"{hub}, run by flexgen-helm",
                                                            spec.num_params(), ORGANIZATIONS[fam.name].title()))
            tokenizer = next((t for t in (model, hub) if t in helm_tokenizers), hub)
            if tokenizer not in helm_tokenizers:
                out["tokenizer_configs.yaml"].append(_tokenizer_entry(tokenizer, hub, *fam.tokens_for(size)))
            for suffix, extra in (("-4bit", {"compress_weight": True}), ("", {})):
                out["model_deployments.yaml"].append({
                    "name": f"flexgen/{size}{suffix}", "model_name": model, "tokenizer_name": tokenizer,
                    "max_sequence_length": spec.max_positions - int(fam.add_bos),  # room for the BOS added
                    "client_spec": {"class_name": CLIENT_CLASS, "args": {"model_path": hub, **extra}}})
    return out


def _metadata(model: str, display: str, description: str, params: int, creator: str) -> dict:
    return {"name": model, "display_name": display, "description": description,
            "creator_organization_name": creator, "access": "open", "num_parameters": params,
            "release_date": None, "tags": ["TEXT_MODEL_TAG", "FULL_FUNCTIONALITY_TEXT_MODEL_TAG"]}


def known_sizes() -> list[str]:
    """Checkpoint names with shipped deployments: opt-125m ... opt-175b, opt-iml-30b, and every
    public size of the other families (llama-3.1-8b, qwen2.5-72b, ...)."""
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
    from ..engine.families import FAMILIES
    from ..engine.model_spec import load_spec
    path = os.path.abspath(path)
    deployments = cfgs["model_deployments.yaml"]["model_deployments"]
    tokenizers = cfgs["tokenizer_configs.yaml"]["tokenizer_configs"]
    spec = load_spec(path)
    family = FAMILIES[spec.family]
    if name in known_sizes():  # a public size: keep its model name, repoint both deployments
        mine = [d for d in deployments if d["name"] in (f"flexgen/{name}", f"flexgen/{name}-4bit")]
        for d in mine:
            d["client_spec"]["args"].update({"model_path": path, **client_args})
        if _has_tokenizer(path):  # the deployments' tokenizer, read from the checkpoint (offline)
            tok = mine[0]["tokenizer_name"]
            old = next((t for t in tokenizers if t["name"] == tok), None)
            prefix, end = (old["prefix_token"], old["end_of_text_token"]) if old else family.tokens_for(name)
            _upsert(tokenizers, _tokenizer_entry(tok, path, prefix, end))
        return f"flexgen/{name}"
    model = f"flexgen/{name}"
    _upsert(cfgs["model_metadata.yaml"]["models"],
            _metadata(model, f"{name} (local {spec.family} checkpoint)", f"{spec.family} checkpoint at {path}",
                      spec.num_params(), "Local"))
    if _has_tokenizer(path):
        tokenizer = model
        _upsert(tokenizers, _tokenizer_entry(model, path, *family.tokens_for(name)))
    elif spec.family == "opt":  # every OPT size shares one tokenizer
        tokenizer = OPT_TOKENIZER
    else:
        raise ConfigError(f"{path} has no tokenizer files (tokenizer.json); copy the model's tokenizer there")
    _upsert(deployments, {
        "name": model, "model_name": model, "tokenizer_name": tokenizer,
        "max_sequence_length": spec.max_positions - int(family.add_bos),  # room for the BOS the client adds
        "client_spec": {"class_name": CLIENT_CLASS, "args": {"model_path": path, **client_args}}})
    return model


def _tokenizer_entry(name: str, path: str, prefix: str = "</s>", end: str = "</s>") -> dict:
    source = os.path.abspath(path) if os.path.isdir(path) else path
    return {"name": name,
            "tokenizer_spec": {"class_name": "helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer",
                               "args": {"pretrained_model_name_or_path": source}},
            "end_of_text_token": end, "prefix_token": prefix}


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

    if not any(d["name"] == model for d in deployments) and any(d["name"] == f"flexgen/{model}" for d in deployments):
        model = f"flexgen/{model}"  # a bare public size: llama-3.1-8b
    for d in deployments:
        if d["name"] == model:
            name = d.get("model_name") or d["name"]
            return name, d["name"], default(name) == d["name"]
    if any(d.get("model_name") == model for d in deployments):
        return model, default(model), True
    names = ", ".join(d["name"] for d in deployments)
    raise ConfigError(f"--model {model!r} is not a flexgen deployment or model in {path}; "
                      f"use one of: {names}, or a checkpoint directory")
