"""The demo model's training script: held-out data, HELM's prompt format, and that training learns."""
from __future__ import annotations

import json
import os

import pytest

from flexgen_helm.demo_tasks import (HELM_SEED, Example, copy_last, eval_prompt, generate_examples, helm_split,
                                     held_out_inputs, num_shots, score, training_text)
from flexgen_helm.train_demo import DemoModel, TrainConfig, train


def test_helm_seed_is_refused_and_eval_splits_are_removed():
    with pytest.raises(ValueError, match="42"):
        generate_examples("srn_easy", [HELM_SEED])
    # a pool built from HELM's own seed minus its eval splits would be exactly its train split
    assert len(held_out_inputs("srn_easy")) > 9000
    train = generate_examples("srn_easy", [3])
    assert train and not {e.input for e in train} & held_out_inputs("srn_easy")


@pytest.mark.parametrize("rules", [1, 3])
def test_curriculum_tasks_are_helms_generator_with_fewer_rules(rules):
    """srn_easy_rK: HELM's own rule and fact generators asked for at most K rules, same format and
    run spec as srn_easy, and srn_easy's eval splits held out from them too."""
    from flexgen_helm.demo_tasks import TASKS
    name = f"srn_easy_r{rules}"
    assert TASKS[name].held_out_from == "srn_easy" and TASKS[name].run_spec == TASKS["srn_easy"].run_spec
    assert held_out_inputs(name) == held_out_inputs("srn_easy")
    ex = generate_examples(name, [5])
    counts = {e.input.count("\nIf ") + e.input.startswith("If ") for e in ex}
    assert max(counts) == rules and min(counts) >= 1
    assert all(e.input.split("\n")[-1].startswith("The following can be determined about") for e in ex)
    outputs = {e.output for e in ex}
    assert "Nothing." in outputs and any(o != "Nothing." and " is " in o for o in outputs)
    assert not {e.input for e in ex} & held_out_inputs("srn_easy")
    text, spans = training_text(name, ex[:num_shots(name) + 1])
    assert text[:spans[-1][0]] == eval_prompt("srn_easy", ex[:num_shots(name)], ex[num_shots(name)])


def test_training_text_is_helm_prompt_with_answer_spans():
    shots = list(helm_split("srn_easy", "train"))[:num_shots("srn_easy")]
    query = helm_split("srn_easy", "test")[0]
    text, spans = training_text("srn_easy", shots + [query])
    # the eval prompt HELM would send is this text cut just before the last answer
    assert text[:spans[-1][0]] == eval_prompt("srn_easy", shots, query)
    assert [text[a:b] for a, b in spans] == [e.output + "\n" for e in shots + [query]]
    assert text.startswith("Please solve the following problem.\n\nRules:\n")


def test_trivial_baselines_and_metric():
    ex = Example("Rules: X + Y | Y + X | X - Y | Y - X | Result: cat + dog", "Y + X")
    assert copy_last("pattern_match", ex) == "Y - X"
    assert score("pattern_match", "Y + X", " Y + X\nRules: ...") == 1.0
    srn = Example("If a dog is red, then the dog is big.\nIf a dog is old, then the dog is blue.\nFact:\n...",
                  "The dog is blue.")
    assert copy_last("srn_easy", srn) == "The dog is blue."
    assert score("srn_easy", "The dog is blue and big.", "The dog is blue.") == pytest.approx(2 / 3)


def _tiny_cfg(out_dir: str, arch: str = "llama") -> TrainConfig:
    return TrainConfig(out_dir=out_dir, steps=12, batch_size=4, lr=3e-3, warmup_steps=2, log_every=4,
                       task_weights=(("srn_easy", 1.0),), seeds_per_task=1,
                       model=DemoModel(arch=arch, num_layers=1, hidden=32, num_heads=2, num_kv_heads=1, ffn=64,
                                       vocab_size=512))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_few_steps_lower_the_loss_deterministically(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    logs: list[str] = []
    res = train(_tiny_cfg(str(tmp_path / "a"), arch), log=lambda *a, **k: logs.append(" ".join(map(str, a))),
                validate=False)
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 0.5, res.losses
    assert any("answer loss" in line for line in logs)  # progress is shown
    # the checkpoint is a standard HF one: it loads, and its vocabulary is the tokenizer's
    model = AutoModelForCausalLM.from_pretrained(res.out_dir)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(res.out_dir))
    with open(os.path.join(res.out_dir, "train_demo.json")) as f:
        assert HELM_SEED not in json.load(f)["train_seeds"]
    again = train(_tiny_cfg(str(tmp_path / "b"), arch), log=lambda *a, **k: None, validate=False)
    assert again.losses == res.losses  # same seed, same threads: same run


def test_training_continues_from_a_checkpoint(tmp_path):
    """--init-from: the second stage starts from the first stage's weights and tokenizer (its loss
    starts where the first ended, not at a new model's) and records every seed both trained on."""
    import dataclasses
    first = train(_tiny_cfg(str(tmp_path / "a")), log=lambda *a, **k: None, validate=False)
    cfg = dataclasses.replace(_tiny_cfg(str(tmp_path / "b")), init_from=first.out_dir, seed=1, steps=4)
    second = train(cfg, log=lambda *a, **k: None, validate=False)
    fresh = train(dataclasses.replace(cfg, init_from=None, out_dir=str(tmp_path / "c")), log=lambda *a, **k: None,
                  validate=False)
    assert second.losses[0] < fresh.losses[0] - 0.5
    with open(os.path.join(second.out_dir, "train_demo.json")) as f:
        rec = json.load(f)
    with open(os.path.join(first.out_dir, "train_demo.json")) as f:
        parent_seeds = json.load(f)["train_seeds"]
    assert set(parent_seeds) | set(cfg.train_seeds()) == set(rec["train_seeds"]) and rec["parent"]
    assert open(os.path.join(second.out_dir, "tokenizer.json")).read() == \
        open(os.path.join(first.out_dir, "tokenizer.json")).read()


def test_grown_model_computes_the_parent_function_and_its_new_layers_train(tmp_path):
    """--grow-layers: the deeper model starts with the parent's logits exactly (new layers are the
    identity), its new layers sit between the old ones, and a training stage moves them."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM

    from flexgen_helm.train_demo import grow_layers, grown_order
    assert grown_order(6, 3) == [0, 1, None, 2, 3, None, 4, 5, None]
    assert grown_order(2, 1) == [0, 1, None] and grown_order(2, 2) == [0, None, 1, None]
    base = dataclasses.replace(_tiny_cfg(str(tmp_path / "a")), model=dataclasses.replace(_tiny_cfg("").model,
                                                                                        num_layers=2))
    first = train(base, log=lambda *a, **k: None, validate=False)
    parent = AutoModelForCausalLM.from_pretrained(first.out_dir).eval()
    grown = grow_layers(parent, 2).eval()
    x = torch.randint(4, parent.config.vocab_size, (2, 30))
    with torch.no_grad():
        assert grown.config.num_hidden_layers == 4
        assert torch.equal(parent(x).logits, grown(x).logits)
        assert grown.model.layers[1].mlp.down_proj.weight.abs().sum() == 0
        assert grown.model.layers[3].self_attn.o_proj.weight.abs().sum() == 0
        assert torch.equal(grown.model.layers[2].self_attn.q_proj.weight, parent.model.layers[1].self_attn.q_proj.weight)
    cfg = dataclasses.replace(_tiny_cfg(str(tmp_path / "b")), init_from=first.out_dir, grow_layers=2, seed=1, steps=3)
    train(cfg, log=lambda *a, **k: None, validate=False)
    out = AutoModelForCausalLM.from_pretrained(cfg.out_dir)
    assert out.config.num_hidden_layers == 4 and out.model.layers[3].mlp.down_proj.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="init_from"):
        dataclasses.replace(cfg, init_from=None)
