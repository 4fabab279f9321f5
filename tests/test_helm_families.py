"""HELM end to end on a tiny local Llama (its own tokenizer adds BOS), offline: stock `helm-run` with
the flexgen client and `flexgen-helm run` give the same runs; prompts are encoded per family (BOS
for Llama, none for Qwen); prod-env knows every public size."""
from __future__ import annotations

import os

import pytest
from test_helm_e2e import BIN, load_runs, sh

CONF = """entries: [
  {description: "synthetic_reasoning:mode=pattern_match,model=flexgen/tiny-llama,max_eval_instances=3", priority: 1}
  {description: "mmlu:subject=abstract_algebra,model=flexgen/tiny-llama,max_eval_instances=3", priority: 1}
]
"""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    from flexgen_helm.tiny import build_tiny_family
    return build_tiny_family(str(tmp_path_factory.mktemp("tiny-llama")), "llama", seed=7)


def _env(root: str, ckpt: str) -> dict:
    from flexgen_helm.helm.prod_env import add_checkpoint
    from flexgen_helm.helm.standins import place_standins
    os.makedirs(root, exist_ok=True)
    env = {"root": root, "prod_env": os.path.join(root, "prod_env"), "out": os.path.join(root, "out"),
           "conf": os.path.join(root, "conf")}
    add_checkpoint(env["prod_env"], ckpt, name="tiny-llama", client_args={"dtype": "float32"})
    place_standins(env["out"])
    with open(env["conf"], "w") as f:
        f.write(CONF)
    return env


def test_llama_stock_helm_run_and_flexgen_run_agree(tiny_llama, tmp_path):
    stock, fg = _env(str(tmp_path / "stock"), tiny_llama), _env(str(tmp_path / "fg"), tiny_llama)
    sh([os.path.join(BIN, "helm-run"), "-c", stock["conf"], "--suite", "s", "-m", "3", "-n", "1",
        "--local-path", stock["prod_env"], "-o", stock["out"]], stock)
    sh([os.path.join(BIN, "flexgen-helm"), "run", "--conf", fg["conf"], "--model", "flexgen/tiny-llama", "--suite",
        "s", "-m", "3", "--local-path", fg["prod_env"], "-o", fg["out"], "--no-progress"], fg)
    a, b = load_runs(stock), load_runs(fg)
    assert len(a) == 2 and sorted(a) == sorted(b)
    for name in a:
        assert a[name]["texts"] == b[name]["texts"], name
        for x, y in zip(a[name]["logprobs"], b[name]["logprobs"]):
            assert x == pytest.approx(y, abs=1e-4)
    lps = [lp for run in a.values() for row in run["logprobs"] for lp in row]
    assert lps and all(lp <= 0 for lp in lps) and any(lp < -1e-3 for lp in lps)


@pytest.mark.parametrize("variant, bos", [("llama", 0), ("qwen2", None)])
def test_prompts_get_the_family_bos(variant, bos, tmp_path):
    import dataclasses

    from flexgen_helm.engine.model_spec import load_spec
    from flexgen_helm.helm.client import FlexGenClient, _local_tokenizer
    from flexgen_helm.tiny import build_tiny_family
    from helm.common.cache import SqliteCacheConfig

    d = build_tiny_family(str(tmp_path / variant), variant)
    c = FlexGenClient(SqliteCacheConfig(str(tmp_path / "c.sqlite")), model_path=d)
    with _local_tokenizer(d) as tok:
        ids, added = c._encode(tok, "Question: 1 + 1 = 2")
        plain = tok.encode("Question: 1 + 1 = 2", add_special_tokens=False)
        if bos is None:
            assert (ids, added) == (plain, 0)
        else:
            assert (ids, added) == ([bos] + plain, 1)
            assert c._encode(tok, "<s>Question")[1] == 0  # BOS already in the text: not doubled
        assert 2 in c._eos_ids(tok)
    c._spec = dataclasses.replace(load_spec(d), eos_token_id=(2, 5))
    with _local_tokenizer(d) as tok:
        assert c._eos_ids(tok) == {2, 5}  # every EOS id the config lists stops generation


def test_prod_env_has_every_public_size(tmp_path):
    import yaml

    from flexgen_helm.engine.families import public_names
    from flexgen_helm.helm.prod_env import resolve_model, write_prod_env
    write_prod_env(str(tmp_path))
    with open(tmp_path / "model_deployments.yaml") as f:
        names = {d["name"] for d in yaml.safe_load(f)["model_deployments"]}
    for sizes in public_names().values():
        for size in sizes:
            assert {f"flexgen/{size}", f"flexgen/{size}-4bit"} <= names
    # HELM's own model and tokenizer names where HELM has them
    assert resolve_model(str(tmp_path), "llama-3-8b") == ("meta/llama-3-8b", "flexgen/llama-3-8b", True)
    assert resolve_model(str(tmp_path), "flexgen/mistral-7b-v0.1-4bit")[0] == "mistralai/mistral-7b-v0.1"
    with open(tmp_path / "model_metadata.yaml") as f:
        meta = {m["name"]: m for m in yaml.safe_load(f)["models"]}
    assert meta["qwen/qwen2.5-72b"]["num_parameters"] == 72_706_203_648
