"""Pipeline stages over torch.distributed (gloo, CPU): several local processes, one stage each,
must give exactly the single-process engine's tokens and fp32 logprobs; bad starts, mismatched
calls and a dead rank end with clear errors. Each spawn runs many cases (process start-up is the
slow part on a small machine)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from pipeline_cases import GREEDY, PROMPTS, SAMPLED, load, spawn  # noqa: E402

from flexgen_helm.engine.config import ConfigError, Policy  # noqa: E402
from flexgen_helm.engine.engine import Engine  # noqa: E402
from flexgen_helm.tiny import TinyOPT, build_tiny_checkpoint, build_tiny_family  # noqa: E402

ALL_IDS = list(range(512))  # every token stops: each row finishes at its first token
HALF_STOP = [ALL_IDS if i % 2 == 0 else [] for i in range(len(PROMPTS))]
OPT_CASES = [
    dict(gbs=2, ngb=2, place=["compute", "mixed"], gen=GREEDY),                      # 0
    dict(gbs=2, ngb=2, place=["disk", "host-ccc"], gen=SAMPLED),                     # 1
    dict(gbs=1, ngb=3, place=["host-ccc", "disk"], gen=GREEDY, groups=3, stages=[0, 1, 4]),  # 2
    dict(gbs=3, ngb=1, place=["mixed", "compute"], gen=GREEDY, groups=1, stages=[0, 3, 4]),  # 3
    dict(gbs=2, ngb=2, place=["compute"], gen=GREEDY, bad_start_rank=1),              # 4
    dict(gbs=2, ngb=2, place=["compute"], gen=GREEDY, mismatch_rank=1),               # 5
    dict(gbs=2, ngb=1, place=["compute", "disk"], gen=SAMPLED, serve=True),           # 6
    dict(gbs=2, ngb=2, place=["mixed", "host-ccc"], gen=dict(max_new_tokens=0, prompt_logprobs=True)),  # 7
    dict(gbs=2, ngb=1, place=["compute"], gen=dict(max_new_tokens=5, stop_token_ids=ALL_IDS)),  # 8: all stop at once
    dict(gbs=2, ngb=1, place=["compute", "mixed"], gen=dict(max_new_tokens=5, stop_token_ids=HALF_STOP)),  # 9
]
FAMILY_CASES = [
    dict(gbs=2, ngb=2, place=["mixed", "disk", "host-ccc"], gen=GREEDY),               # 0
    dict(gbs=3, ngb=1, place=["compute", "host-ccc", "mixed"], gen=SAMPLED, groups=2),  # 1
    dict(gbs=2, ngb=1, place=["compute"], gen=dict(max_new_tokens=8), die_rank=1),     # 2: last, kills the group
]


def _reference(model: str, gbs: int, gen: dict, n: int = len(PROMPTS)):
    with Engine.from_pretrained(model, policy=Policy(gpu_batch_size=gbs, num_gpu_batches=1), device="cpu",
                                dtype=torch.float32) as eng:
        return eng.generate(PROMPTS[:n], **gen)


def _same(res: dict, ref) -> None:
    assert res["sequences"] == ref.sequences
    # fp32; block-wide decode matmuls (one call over a block's rows) may round differently in the last bit
    for got, want in zip(res["logprobs"], ref.logprobs):
        assert got == pytest.approx(want, abs=1e-5)
    assert res["finish_reasons"] == ref.finish_reasons
    if ref.prompt_logprobs is None:
        assert res["prompt_logprobs"] is None
    else:
        for got, want in zip(res["prompt_logprobs"], ref.prompt_logprobs):
            assert got == pytest.approx(want, abs=1e-5)
    for got_row, want_row in zip(res["top"], ref.top_logprobs, strict=True):
        for got, want in zip(got_row, want_row, strict=True):
            assert got == pytest.approx({str(k): v for k, v in want.items()}, abs=1e-5)


@pytest.fixture(scope="module")
def opt_run(tmp_path_factory):
    model = build_tiny_checkpoint(str(tmp_path_factory.mktemp("opt4")), TinyOPT(num_layers=4, seed=3), tokenizer=False)
    out = str(tmp_path_factory.mktemp("pipe2"))
    codes = spawn(2, model, OPT_CASES, out)
    assert codes == [0, 0], codes
    return model, out


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    model = build_tiny_family(str(tmp_path_factory.mktemp("mistral3")), "mistral", tokenizer=False,
                              num_hidden_layers=3)
    out = str(tmp_path_factory.mktemp("pipe3"))
    codes = spawn(3, model, FAMILY_CASES, out)
    return model, out, codes


@pytest.mark.parametrize("i", [0, 1, 2, 3, 7, 8, 9])
def test_two_stages_match_single_process_opt(opt_run, i):
    model, out = opt_run
    case, rec = OPT_CASES[i], load(out, i)
    assert "error" not in rec, rec.get("trace")
    _same(rec["result"], _reference(model, case["gbs"], case["gen"]))
    stages = rec["result"]["stages"]
    assert [s["stage"] for s in stages] == [0, 1]
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == 4
    if "stages" in case:
        assert [s["layers"] for s in stages] == [[0, case["stages"][1]], [case["stages"][1], 4]]
    assert all(s["totals"]["busy_s"] > 0 for s in stages)
    if i == 8:  # everyone finished at step 0: the pipeline stopped early instead of running 5 steps
        assert max(u["step"] for u in stages[1]["units"]) <= 1
    assert load(out, i, 1) == {"seconds": load(out, i, 1)["seconds"]}  # other ranks return None


def test_mismatched_start_and_generate_are_refused_on_every_rank(opt_run):
    _, out = opt_run
    for rank in (0, 1):
        start = load(out, 4, rank)
        assert start["error"] == "ConfigError" and "disagree on gpu_batch_size" in start["message"]
        call = load(out, 5, rank)
        assert call["error"] == "ConfigError" and "ranks [1] called generate" in call["message"]


def test_serving_ranks_follow_rank_zero(opt_run):
    model, out = opt_run
    rec = load(out, 6)
    assert "error" not in rec, rec.get("trace")
    _same(rec["result"], _reference(model, 2, SAMPLED))
    _same(rec["second"], _reference(model, 2, SAMPLED, n=3))


@pytest.mark.parametrize("i", [0, 1])
def test_three_stages_match_single_process_mistral(family_run, i):
    model, out, _ = family_run
    rec = load(out, i)
    assert "error" not in rec, rec.get("trace")
    _same(rec["result"], _reference(model, FAMILY_CASES[i]["gbs"], FAMILY_CASES[i]["gen"]))
    assert [s["layers"] for s in rec["result"]["stages"]] == [[0, 1], [1, 2], [2, 3]]


def test_dead_rank_ends_the_others_with_a_clear_error(family_run):
    _, out, codes = family_run
    assert codes[1] == 17  # the killed stage
    for rank in (0, 2):
        assert codes[rank] == 3
        rec = load(out, 2, rank)
        assert rec["error"] == "PipelineError", rec
        assert "a stage died or hung" in rec["message"]
        assert rec["seconds"] < 60


def test_distributed_without_torchrun_env_names_torchrun(tiny_opt, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        Engine.from_pretrained(tiny_opt, policy=Policy(), distributed=True)
