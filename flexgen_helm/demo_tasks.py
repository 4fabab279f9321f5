"""The data of the trained demo model: HELM's own synthetic-reasoning generators, HELM's prompt format.

Instances come from HELM's scenario classes run with seeds other than HELM's (42); every instance
whose input appears in an eval split (valid or test) of HELM's seed is dropped, so the demo's test
instances are never trained on. Prompts are assembled from the run spec's own `AdapterSpec` with
HELM's `Prompt`, exactly like HELM's generation adapter (instructions, in-context examples, query).
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

HELM_SEED = 42  # the seed HELM's scenarios use: its test split is what the demo evaluates


@dataclass(frozen=True)
class Example:
    input: str
    output: str


@dataclass(frozen=True)
class Task:
    name: str
    run_spec: str    # HELM run-spec name (the demo conf's sub-scenario for the evaluated ones)
    metric: str      # HELM's main metric for it
    # curriculum variant of a natural-language task: HELM's own rule generator asked for at most this
    # many rules (HELM's scenario uses 5); trains the lookup on fewer distractors. None: HELM's task
    max_rules: int | None = None

    @property
    def held_out_from(self) -> str:
        """The evaluated task (HELM's own, same run spec) whose eval splits this task's training data avoids."""
        if self.max_rules is None:
            return self.name
        return next(t.name for t in TASKS.values() if t.run_spec == self.run_spec and t.max_rules is None)

    def adapter_spec(self):
        from helm.benchmark.run_specs.classic_run_specs import (get_synthetic_reasoning_natural_spec,
                                                               get_synthetic_reasoning_spec)
        key, value = self.run_spec.split(":", 1)[1].split("=")
        if key == "mode":
            return get_synthetic_reasoning_spec(value).adapter_spec
        return get_synthetic_reasoning_natural_spec(value).adapter_spec

    def scenario(self, seed: int):
        from helm.benchmark.scenarios.synthetic_reasoning_natural_scenario import SRNScenario
        from helm.benchmark.scenarios.synthetic_reasoning_scenario import SyntheticReasoningScenario
        key, value = self.run_spec.split(":", 1)[1].split("=")
        if key == "mode":
            return SyntheticReasoningScenario(mode=value, random_seed=seed)
        if self.max_rules is None:
            return SRNScenario(difficulty=value, random_seed=seed)
        return _few_rules_srn(self.max_rules, difficulty=value, random_seed=seed)


def _few_rules_srn(max_rules: int, **kw):
    """HELM's SRNScenario whose problems have at most `max_rules` rules: its own generate_rules and
    generate_test functions, called with HELM's max_rules parameter."""
    from helm.benchmark.scenarios import synthetic_reasoning_natural_scenario as srn

    class FewRules(srn.SRNScenario):
        def generate_problem(self):
            category = random.choice(list(self.subjects.keys()))
            subject = random.choice(self.subjects[category])
            rules = srn.generate_rules(self.attribute_groups, subject, category, max_rules=max_rules,
                                       specific_category=self.specific_category)
            return (rules, *srn.generate_test(self.attribute_groups, subject, category, rules,
                                              self.use_specific_attributes))
    return FewRules(**kw)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("pattern_match", "synthetic_reasoning:mode=pattern_match", "quasi_exact_match"),
    Task("variable_substitution", "synthetic_reasoning:mode=variable_substitution", "quasi_exact_match"),
    Task("induction", "synthetic_reasoning:mode=induction", "quasi_exact_match"),
    Task("srn_easy", "synthetic_reasoning_natural:difficulty=easy", "f1_set_match"),
    # the curriculum for srn_easy, which a tiny model trained on 5-rule problems alone never learned
    *(Task(f"srn_easy_r{k}", "synthetic_reasoning_natural:difficulty=easy", "f1_set_match", max_rules=k)
      for k in range(1, 5)),
)}


def _instances(task: Task, seed: int):
    # SRNScenario seeds the global `random` module; keep the caller's stream untouched
    state = random.getstate()
    try:
        return task.scenario(seed).get_instances(output_path="")
    finally:
        random.setstate(state)


def _example(inst) -> Example:
    return Example(inst.input.text, inst.references[0].output.text)


@lru_cache(maxsize=None)
def helm_split(task_name: str, split: str) -> tuple[Example, ...]:
    """HELM's own instances (seed 42) of one split: "train" (in-context examples), "valid", "test"."""
    return tuple(_example(i) for i in _instances(TASKS[task_name], HELM_SEED) if i.split == split)


@lru_cache(maxsize=None)
def held_out_inputs(task_name: str) -> frozenset[str]:
    """Inputs of HELM's eval splits (valid + test, seed 42) of the task (or of the task a curriculum
    variant trains for): never used for training."""
    base = TASKS[task_name].held_out_from
    return frozenset(e.input for split in ("valid", "test") for e in helm_split(base, split))


def generate_examples(task_name: str, seeds: list[int], exclude: frozenset[str] = frozenset()) -> list[Example]:
    """Every instance of HELM's generator under the given seeds, minus HELM's eval splits and `exclude`."""
    if HELM_SEED in seeds:
        raise ValueError(f"seed {HELM_SEED} is HELM's own: its test split is the demo's evaluation data")
    held = held_out_inputs(task_name) | exclude
    out, seen = [], set()
    for seed in seeds:
        for inst in _instances(TASKS[task_name], seed):
            ex = _example(inst)
            if ex.input not in held and ex.input not in seen:
                seen.add(ex.input)
                out.append(ex)
    return out


def _prompt_text(spec, blocks: list[str]) -> str:
    from helm.benchmark.adaptation.prompt import Prompt
    return Prompt(global_prefix=spec.global_prefix, global_suffix=spec.global_suffix,
                  instance_prefix=spec.instance_prefix, substitutions=spec.substitutions,
                  instructions_block=spec.instructions, train_instance_blocks=blocks[:-1],
                  eval_instance_block=blocks[-1]).text


def eval_prompt(task_name: str, shots: list[Example], query: Example) -> str:
    """The prompt HELM's generation adapter sends for `query` with in-context examples `shots`."""
    spec = TASKS[task_name].adapter_spec()
    blocks = [f"{spec.input_prefix}{e.input}{spec.input_suffix}{spec.output_prefix}{e.output}{spec.output_suffix}"
              for e in shots]
    blocks.append(f"{spec.input_prefix}{query.input}{spec.input_suffix}{spec.output_prefix.rstrip()}")
    return _prompt_text(spec, blocks)


def training_text(task_name: str, examples: list[Example]) -> tuple[str, list[tuple[int, int]]]:
    """One training sequence: a HELM prompt whose every example, the last one included, carries its
    answer. Returns the text and the character spans of the answers (output + output_suffix, i.e.
    the newline that stops generation): the tokens the loss is computed on."""
    spec = TASKS[task_name].adapter_spec()
    if spec.global_prefix or spec.substitutions:
        raise ValueError("answer spans assume no global prefix and no substitutions")
    text = spec.instructions + spec.instance_prefix if spec.instructions else ""
    spans = []
    for i, e in enumerate(examples):
        if i:
            text += spec.instance_prefix
        text += f"{spec.input_prefix}{e.input}{spec.input_suffix}{spec.output_prefix}"
        start = len(text)
        text += f"{e.output}{spec.output_suffix}"
        spans.append((start, len(text)))
    text += spec.global_suffix
    blocks = [f"{spec.input_prefix}{e.input}{spec.input_suffix}{spec.output_prefix}{e.output}{spec.output_suffix}"
              for e in examples]
    assert text == _prompt_text(spec, blocks), "training text must be HELM's prompt format"
    return text, spans


def num_shots(task_name: str) -> int:
    return TASKS[task_name].adapter_spec().max_train_instances


def score(task_name: str, gold: str, completion: str) -> float:
    """HELM's main metric on the completion's first line (HELM stops generation at "\\n")."""
    from helm.benchmark.metrics.evaluate_reference_metrics import f1_set_match, quasi_exact_match
    pred = completion.split("\n")[0].strip()
    fn: Callable[[str, str], float] = f1_set_match if TASKS[task_name].metric == "f1_set_match" else quasi_exact_match
    return fn(gold, pred)


# ---- trivial baselines, to compare the trained model against --------------------------------------

def most_frequent_answer(train: list[Example]) -> str:
    return Counter(e.output for e in train).most_common(1)[0][0]


def copy_last(task_name: str, query: Example) -> str:
    """'Copy the last pattern' of the input: the last listed rule (pattern_match), or the subject with
    the consequent of the last rule (natural: "If the dog is a and b, then the dog is c." -> "The dog is c.")."""
    text = query.input
    if TASKS[task_name].run_spec.startswith("synthetic_reasoning_natural"):
        last_rule = [line for line in text.split("\n") if line.startswith("If ")][-1]
        then = last_rule.split(", then ", 1)[1]
        return then[0].upper() + then[1:]
    if "Rules: " in text:
        rules = text.split("Rules: ", 1)[1].split(" | Result:")[0].split(" | Substitutions:")[0]
        return rules.split(" | ")[-1]
    return text.split(" | ")[-1]


def baselines(task_name: str, train: list[Example], sample: list[Example]) -> dict[str, float]:
    """Mean HELM score of the two trivial answers on `sample`."""
    frequent = most_frequent_answer(train)
    n = len(sample)
    return {"most_frequent": sum(score(task_name, e.output, frequent) for e in sample) / n,
            "copy_last": sum(score(task_name, e.output, copy_last(task_name, e)) for e in sample) / n}


def held_out_text(task_names: tuple[str, ...], sequences_per_task: int) -> str:
    """Text the demo model never saw, for `flexgen-helm accuracy`: HELM-format prompts with answers,
    cut from the start of HELM's test split (seed 42)."""
    parts = []
    for task in task_names:
        test, k = helm_split(task, "test"), num_shots(task) + 1
        if sequences_per_task * k > len(test):
            raise ValueError(f"{task}: at most {len(test) // k} sequences")
        parts += [training_text(task, list(test[i * k:(i + 1) * k]))[0] for i in range(sequences_per_task)]
    return "\n".join(parts)
