"""FlexGenClient on the real engine and a tiny local checkpoint (in-process, no HELM run)."""
from __future__ import annotations

import pytest
import torch

from helm.common.request import Request


@pytest.fixture(scope="module")
def client(tiny_opt):
    from flexgen_helm.helm.client import FlexGenClient
    return FlexGenClient(None, model_path=tiny_opt, dtype="float32", gpu_batch_size=4)


def req(prompt: str, **kw) -> Request:
    base = dict(model="flexgen/tiny", model_deployment="flexgen/tiny", prompt=prompt, temperature=0.0,
                max_tokens=12, stop_sequences=[], num_completions=1)
    return Request(**{**base, **kw})


PROMPTS = ["If a cat is red", "The dog is small.", "A B ##", "Question: Find the degree", "0 1 2 3",
           "Summarize the given document in one sentence."]


def test_greedy_is_batch_invariant_with_real_logprobs(client):
    together = client.make_batch_request([req(p) for p in PROMPTS])
    alone = [client.make_request(req(p)) for p in PROMPTS]
    for a, b in zip(together, alone):
        assert a.success and b.success
        assert a.completions[0].text == b.completions[0].text
        lps = [t.logprob for t in a.completions[0].tokens]
        assert len(lps) == 12 and all(lp <= 0 for lp in lps) and any(lp < -1e-3 for lp in lps)
        assert [t.logprob for t in b.completions[0].tokens] == pytest.approx(lps, abs=1e-4)
    assert together[0].batch_size == 4 and alone[0].batch_size == 1


def test_logprobs_match_transformers(client, tiny_opt):
    """Echo scoring (max_tokens=0) returns the model's own log-probabilities of the prompt tokens."""
    from transformers import AutoTokenizer, OPTForCausalLM

    text = "The dog is small. If a cat is red and round, then the cat is big."
    (out,) = client.make_request(req(text, echo_prompt=True, max_tokens=0)).completions
    assert out.text == text
    tok = AutoTokenizer.from_pretrained(tiny_opt)
    ids = tok(text).input_ids  # </s> first
    with torch.no_grad():
        logits = OPTForCausalLM.from_pretrained(tiny_opt, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert len(out.tokens) == len(ids) - 1  # the implicit </s> is not part of the text
    assert [t.logprob for t in out.tokens] == pytest.approx(ref.tolist(), abs=1e-4)
    # a prompt that spells the prefix token itself keeps it as a token (HELM's language-modelling prompts)
    (out2,) = client.make_request(req("</s>" + text, echo_prompt=True, max_tokens=0)).completions
    assert out2.tokens[0].text == "</s>" and out2.tokens[0].logprob == 0.0
    assert [t.logprob for t in out2.tokens[1:]] == pytest.approx(ref.tolist(), abs=1e-4)


def test_num_completions_and_top_k(client):
    r = client.make_request(req("The dog is", temperature=1.0, num_completions=5, max_tokens=8))
    assert len(r.completions) == 5 and len({c.text for c in r.completions}) > 1
    r = client.make_request(req("Answer:", max_tokens=1, top_k_per_token=5))
    assert len(r.completions[0].tokens) == 1


def test_string_stops(client):
    # "###": this prompt makes the tiny model write '#' tokens one by one; the cut is on the string
    plain = client.make_request(req("A B #", max_tokens=8)).completions[0]
    assert plain.text.startswith("###")
    cut = client.make_request(req("A B #", max_tokens=8, stop_sequences=["###"])).completions[0]
    assert cut.text == "" and cut.tokens == [] and cut.finish_reason == {"reason": "stop"}
    # a stop spanning a token boundary, taken from the model's own greedy output
    toks = [t.text for t in client.make_request(req("If a cat is red", max_tokens=12)).completions[0].tokens]
    i = next(i for i in range(2, len(toks) - 1) if toks[i] != toks[i - 1])
    stop = toks[i - 1][-1] + toks[i][:1]
    full = "".join(toks)
    out = client.make_request(req("If a cat is red", max_tokens=12, stop_sequences=[stop])).completions[0]
    pos = full.index(stop)
    assert out.text == full[:pos] and out.finish_reason == {"reason": "stop"}
    kept = [t.text for t in out.tokens]  # whole tokens that end before the stop
    assert kept == toks[:len(kept)] and len("".join(kept)) <= pos < len("".join(toks[:len(kept) + 1]))


def test_unservable_prompt_is_a_clear_non_retriable_error(client):
    long_prompt = "one two three four five " * 700
    out = client.make_batch_request([req(long_prompt), req("The dog is small.")])
    assert not out[0].success and "context of 2048" in out[0].error
    assert out[0].error_flags.is_retriable is False
    assert out[1].success
