"""Bad inputs to `flexgen-helm run`: each gives a clear message, and what was computed stays."""
from __future__ import annotations

import os
import time

import pytest
import yaml

from flexgen_helm.cli import main
from flexgen_helm.tiny import TinyOPT, build_tiny_checkpoint


@pytest.fixture(scope="module")
def env(tiny_opt, tmp_path_factory):
    from flexgen_helm.helm.prod_env import add_checkpoint

    root = tmp_path_factory.mktemp("errors")
    local = str(root / "prod_env")
    add_checkpoint(local, tiny_opt, name="tiny-opt", client_args={"dtype": "float32"})
    return {"root": root, "prod_env": local}


def run(env, *args: str) -> int:
    return main(["run", "--model", "flexgen/tiny-opt", "--suite", "s", "--local-path", env["prod_env"],
                 "--no-progress", *args])


def test_malformed_conf(env, capsys, tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text('entries: [ {description: "synthetic_reasoning:mode=pattern_match" priority: 1 ')
    assert run(env, "--conf", str(conf), "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot read run entries" in err and "bad.conf" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")  # failed before touching anything


def test_unknown_run_entry(env, capsys, tmp_path):
    assert run(env, "-r", "synthetic_reasoning:mode=pattern_match", "no_such_scenario:x=1",
               "-m", "2", "-o", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no_such_scenario" in err and "Unknown run spec name" in err and "nothing was run" in err


def test_unknown_model(env, capsys, tmp_path):
    assert main(["run", "--model", "flexgen/opt-31b", "-r", "synthetic_reasoning:mode=pattern_match",
                 "--local-path", env["prod_env"], "-o", str(tmp_path / "out")]) == 2
    assert "flexgen/tiny-opt" in capsys.readouterr().err  # lists what is available


def test_missing_data_without_network(env, capsys, tmp_path):
    """WikiFact's files are absent and cannot be downloaded: that run fails with a clear message,
    the other sub-scenario is computed, scored and kept."""
    out = str(tmp_path / "out")
    rc = run(env, "-r", "wikifact:k=5,subject=plaintiff", "synthetic_reasoning:mode=pattern_match",
             "-m", "2", "-o", out)
    assert rc == 1
    captured = capsys.readouterr()
    assert "FAILED wikifact" in captured.err and "could not be downloaded" in captured.err
    assert "1 runs written" in captured.out
    runs = os.listdir(os.path.join(out, "runs", "s"))
    synth = [r for r in runs if r.startswith("synthetic_reasoning")]
    assert synth and os.path.exists(os.path.join(out, "runs", "s", synth[0], "stats.json"))
    assert not any(r.startswith("wikifact") for r in runs)
    # the rerun reuses the computed batch: nothing is recomputed
    assert run(env, "-r", "synthetic_reasoning:mode=pattern_match", "-m", "2", "-o", out) == 0
    assert "0 rows computed" in capsys.readouterr().out


def test_prompt_longer_than_context(tmp_path, capsys):
    """A deployment whose max_sequence_length exceeds the model's context lets HELM send prompts the
    model cannot take: those requests fail fast (no retries) with the reason, the run completes."""
    from flexgen_helm.helm.prod_env import add_checkpoint

    ckpt = build_tiny_checkpoint(str(tmp_path / "short"), TinyOPT(max_positions=128))
    local = str(tmp_path / "prod_env")
    add_checkpoint(local, ckpt, name="short-opt", client_args={"dtype": "float32"})
    path = os.path.join(local, "model_deployments.yaml")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    for d in cfg["model_deployments"]:
        if d["name"] == "flexgen/short-opt":
            d["max_sequence_length"] = 4096  # wrong on purpose
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    t0 = time.time()
    rc = main(["run", "--model", "flexgen/short-opt", "-r", "synthetic_reasoning:mode=pattern_match", "-m", "3",
               "--suite", "s", "--local-path", local, "-o", str(tmp_path / "out"), "--no-progress"])
    assert rc == 1 and time.time() - t0 < 120
    captured = capsys.readouterr()
    assert "3 requests could not be served" in captured.err
    assert "too long for the model's context of 128 tokens" in captured.err
    assert "1 runs written" in captured.out  # scored, with those completions empty
