"""Hostile and odd requests through the FlexGenClient: each gets a clear, non-retriable error or a
correct result, and the requests around it are answered as if it were not there.

"Correct" for greedy requests means: equal to HF `OPTForCausalLM.generate` on the same weights,
decoded and cut at the first stop string. The fuzz test mixes 320 generated requests.
"""
from __future__ import annotations

import random
import threading

import pytest
import torch

from helm.common.cache import SqliteCacheConfig
from helm.common.request import Request

MODEL = "flexgen/tiny-opt"
REF_TOKENS = 8  # reference continuations are this long; shorter max_tokens use a prefix (greedy)


@pytest.fixture(scope="module")
def client(tiny_opt, tmp_path_factory):
    from flexgen_helm.helm.client import FlexGenClient
    cache = SqliteCacheConfig(str(tmp_path_factory.mktemp("cache") / "flexgen.sqlite"))
    return FlexGenClient(cache, model_path=tiny_opt, dtype="float32", gpu_batch_size=8, model_name=MODEL)


class Reference:
    """HF greedy continuations, computed once per prompt, then decoded and cut like HELM wants."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer, OPTForCausalLM
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = OPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.memo: dict[str, list[int]] = {}

    def ids(self, prompt: str) -> list[int]:
        ids = self.tok.encode(prompt, add_special_tokens=False)
        return ids if ids[:1] == [self.tok.bos_token_id] else [self.tok.bos_token_id] + ids

    def tokens(self, prompt: str) -> list[int]:
        if prompt not in self.memo:
            p = self.ids(prompt)
            with torch.no_grad():
                out = self.model.generate(torch.tensor([p]), max_new_tokens=REF_TOKENS, do_sample=False,
                                          pad_token_id=1, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            self.memo[prompt] = out[0, len(p):].tolist()
        return self.memo[prompt]

    def text(self, prompt: str, max_tokens: int, stops: list[str]) -> str:
        seq = self.tokens(prompt)[:max_tokens]
        if self.tok.eos_token_id in seq:
            seq = seq[:seq.index(self.tok.eos_token_id)]
        text = self.tok.decode(seq, clean_up_tokenization_spaces=False)
        hits = [text.find(s) for s in stops if s and s in text]
        return text[:min(hits)] if hits else text


@pytest.fixture(scope="module")
def ref(tiny_opt):
    return Reference(tiny_opt)


def req(prompt: str = "The dog is small.", **kw) -> Request:
    base = dict(model=MODEL, model_deployment=MODEL, prompt=prompt, temperature=0.0, max_tokens=6,
                stop_sequences=[], num_completions=1)
    return Request(**{**base, **kw})


def assert_refused(result, *words: str) -> None:
    assert not result.success and result.completions == []
    assert result.error_flags.is_retriable is False and result.error_flags.is_fatal is False
    for w in words:
        assert w in result.error, result.error


# ---- each odd case on its own, next to a normal request ------------------------------------------

REFUSED = {
    "lone surrogate in the prompt": (req("abc\ud800def"), ["prompt is not valid Unicode", "U+D800"]),
    "lone surrogate in a stop": (req(stop_sequences=["\udcff"]), ["stop sequence is not valid Unicode"]),
    "negative max_tokens": (req(max_tokens=-1), ["max_tokens"]),
    "max_tokens beyond the context": (req(max_tokens=5000), ["context of 2048"]),
    "negative temperature": (req(temperature=-0.5), ["temperature must be >= 0"]),
    "top_p 0": (req(top_p=0.0), ["top_p in (0, 1]"]),
    "top_p above 1": (req(top_p=1.5), ["top_p in (0, 1]"]),
    "no completions": (req(num_completions=0), ["num_completions must be >= 1"]),
    "another model": (req(model="openai/gpt-4"), ["serves flexgen/tiny-opt", "not openai/gpt-4"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_clearly_and_neighbours_served(client, ref, name):
    bad, words = REFUSED[name]
    normal = req("If a cat is red")
    out = client.make_batch_request([bad, normal])
    assert_refused(out[0], *words)
    assert out[1].success and out[1].completions[0].text == ref.text("If a cat is red", 6, [])
    again = client.make_request(bad)  # errors are never cached
    assert_refused(again, *words) and not again.cached


@pytest.mark.parametrize("prompt", ["", "</s>", "</s><pad><unk></s>", "<s>", "😀 𝕏 テスト ü", "\x00\x7f"])
def test_odd_prompts_get_the_reference_answer(client, ref, prompt):
    (out,) = client.make_request(req(prompt)).completions
    assert out.text == ref.text(prompt, 6, [])
    assert len(out.tokens) <= 6 and all(t.logprob <= 0 for t in out.tokens)


def test_odd_settings_get_correct_results(client, ref):
    p = "Question: Find the degree"
    zero = client.make_request(req(p, max_tokens=0))
    assert zero.success and zero.completions[0].text == "" and zero.completions[0].tokens == []
    greedy_1000 = client.make_request(req(p, num_completions=1000))  # greedy: one row, copied
    assert len(greedy_1000.completions) == 1000 and {c.text for c in greedy_1000.completions} == {ref.text(p, 6, [])}
    sampled = client.make_request(req(p, num_completions=1000, temperature=1.0, max_tokens=1))
    assert len(sampled.completions) == 1000 and len({c.text for c in sampled.completions}) > 1
    assert all(len(c.tokens) <= 1 for c in sampled.completions)
    huge_top_k = client.make_request(req(p, top_k_per_token=10 ** 6))  # more than the vocabulary
    assert huge_top_k.success and huge_top_k.completions[0].text == ref.text(p, 6, [])
    for stops in ([""], ["x" * 20000], ["", "🙂" * 3000]):  # never match: as if absent
        out = client.make_request(req(p, stop_sequences=stops)).completions[0]
        assert out.text == ref.text(p, 6, []) and out.finish_reason == {"reason": "length"}


def test_echo_with_generation(client, ref):
    """echo_prompt with max_tokens > 0: the prompt's tokens and logprobs (as in scoring), then the
    generated tokens (as without echo); the text is the prompt followed by the continuation."""
    p = "The dog is small. If a cat is red"
    both = client.make_request(req(p, echo_prompt=True, max_tokens=5)).completions[0]
    scored = client.make_request(req(p, echo_prompt=True, max_tokens=0)).completions[0]
    gen = client.make_request(req(p, max_tokens=5)).completions[0]
    assert both.text == p + gen.text and gen.text == ref.text(p, 5, [])
    assert [t.text for t in both.tokens] == [t.text for t in scored.tokens] + [t.text for t in gen.tokens]
    assert [t.logprob for t in both.tokens] == pytest.approx([t.logprob for t in scored.tokens]
                                                             + [t.logprob for t in gen.tokens], abs=1e-4)


def test_stop_splitting_a_multibyte_character(monkeypatch, tiny_opt):
    """The byte-level tokenizer writes 'é' as two tokens whose own texts are U+FFFD. A stop 'é' (or
    one that starts in the middle of those bytes' character) is found in the decoded text; the
    engine replays a fixed continuation so the case does not depend on what random weights say."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from flexgen_helm.engine.config import Policy
    from flexgen_helm.helm import client as client_mod

    tok = AutoTokenizer.from_pretrained(tiny_opt)
    reply = tok.encode(" le café au lait", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in reply)  # é is split into byte tokens here

    class Replay:
        policy = Policy(gpu_batch_size=4)
        spec = SimpleNamespace(vocab_size=len(tok))

        def generate(self, input_ids, max_new_tokens, num_completions, **kw):
            rows = len(input_ids) * num_completions
            seq = reply[:max_new_tokens]
            stats = SimpleNamespace(prompt_tokens=1, padded_prompt_tokens=1, generated_tokens=1, prefill_time=0.0,
                                    decode_time=0.0, io_wait_time=0.0, peak_memory_bytes={})
            return SimpleNamespace(sequences=[list(seq)] * rows, logprobs=[[-0.1] * len(seq)] * rows,
                                   top_logprobs=[[{} for _ in seq]] * rows, prompt_logprobs=None,
                                   finish_reasons=["length"] * rows, stats=stats)

    monkeypatch.setattr(client_mod, "shared_engine", lambda *a, **k: Replay())
    c = client_mod.FlexGenClient(None, model_path=tiny_opt, dtype="float32")
    for stop, text in (("é", " le caf"), ("é au", " le caf"), ("au l", " le café "), ("t", " le café au lai")):
        (out,) = c.make_request(req("x", max_tokens=20, stop_sequences=[stop])).completions
        assert out.text == text and out.finish_reason == {"reason": "stop"}, (stop, out.text)
        kept = tok.decode(reply[:len(out.tokens)])
        assert text.startswith(kept) and len(text) - len(kept) < 4  # no half character kept as a token


# ---- the fuzz test ---------------------------------------------------------------------------------

WORDS = ("The dog cat is red small big round If a then Question Answer Find the degree for given field "
         "Summarize document sentence officials storm homes plaintiff city 0 1 2 3 ### A B C = + ; : ?").split()


def _normal_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))


def fuzz_requests(n: int, seed: int) -> list[tuple[str, Request, object]]:
    """(kind, request, expectation): kind "greedy" expects the reference text; "sampled" a well-formed
    result; "refused" a list of words of the error."""
    rng = random.Random(seed)
    odd_prompts = ["", "</s>", "</s></s><pad>", "<unk>" * 7, "😀" * 30, "𝕏 テスト ü\u200b", "\t\n\r", "é" * 50]
    stop_choices = [[], ["\n"], ["###"], [" the"], ["e"], ["", "zzz" * 3000], ["é"], ["😀"]]
    out: list[tuple[str, Request, object]] = []
    for i in range(n):
        roll = rng.random()
        prompt = rng.choice(odd_prompts) if rng.random() < 0.2 else _normal_prompt(rng)
        stops = rng.choice(stop_choices)
        mt = rng.randint(1, REF_TOKENS)
        if roll < 0.45:
            out.append(("greedy", req(prompt, max_tokens=mt, stop_sequences=stops), (prompt, mt, stops)))
        elif roll < 0.6:
            n_c = rng.choice([1, 2, 3, 50])
            out.append(("sampled", req(prompt, max_tokens=mt, temperature=rng.choice([0.3, 1.0]),
                                       top_p=rng.choice([1.0, 0.9]), num_completions=n_c, stop_sequences=stops),
                        (n_c, mt)))
        elif roll < 0.7:
            out.append(("greedy-echo", req(prompt, max_tokens=rng.choice([0, mt]), echo_prompt=True,
                                           stop_sequences=stops), (prompt, mt, stops)))
        else:
            bad = rng.choice(list(REFUSED.items()))
            kind_words = bad[1][1]
            r = bad[1][0]
            out.append(("refused", Request(**{**r.__dict__, "prompt": r.prompt + " " * (i % 3)}), kind_words))
    return out


def test_fuzz_320_requests(client, ref):
    cases = fuzz_requests(320, seed=14)
    requests = [r for _, r, _ in cases]
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["results"] = client.make_batch_request(requests)
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout=600)
    assert not t.is_alive(), "the client hung on the fuzz batch"
    assert "error" not in box, box.get("error")
    results = box["results"]
    assert len(results) == len(cases)
    counts: dict[str, int] = {}
    for (kind, r, expect), res in zip(cases, results):
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "refused":
            assert_refused(res, *expect)
            continue
        assert res.success, (kind, r, res.error)
        if kind == "greedy":
            prompt, mt, stops = expect
            assert res.completions[0].text == ref.text(prompt, mt, stops), (r.prompt, mt, stops)
        elif kind == "greedy-echo":
            prompt, mt, stops = expect
            gen = ref.text(prompt, r.max_tokens, stops) if r.max_tokens else ""
            assert res.completions[0].text == prompt + gen
        else:
            n_c, mt = expect
            assert len(res.completions) == n_c
            assert all(len(c.tokens) <= mt and all(t.logprob <= 0 for t in c.tokens) for c in res.completions)
    assert min(counts.values()) >= 20 and len(counts) == 4, counts
    # the same requests one by one (HELM's per-request path) are served from the cache, identically
    for (kind, r, _), res in list(zip(cases, results))[:40]:
        again = client.make_request(r)
        assert again.success == res.success
        if res.success:
            assert again.cached and [c.text for c in again.completions] == [c.text for c in res.completions]


# ---- HELM's -n 8: eight threads, clients built concurrently ------------------------------------------

def test_eight_threads_equal_one_thread_with_one_engine(tiny_opt, monkeypatch):
    """What `helm-run -n 8` does: clients are built concurrently (AutoClient has no lock) and eight
    threads call make_request at once. Same results as one thread, no deadlock, one engine."""
    from flexgen_helm.engine import engine as engine_mod
    from flexgen_helm.helm.client import FlexGenClient, close_engine

    builds = []
    real = engine_mod.Engine.from_pretrained.__func__

    def counting(cls, *a, **kw):
        builds.append(threading.current_thread().name)
        return real(cls, *a, **kw)

    monkeypatch.setattr(engine_mod.Engine, "from_pretrained", classmethod(counting))
    close_engine()
    rng = random.Random(8)
    requests = [req(_normal_prompt(rng), max_tokens=rng.randint(1, 8), temperature=rng.choice([0.0, 0.7]),
                    num_completions=rng.choice([1, 2])) for _ in range(48)]

    def new_client():
        return FlexGenClient(None, model_path=tiny_opt, dtype="float32", gpu_batch_size=8, model_name=MODEL)

    one = new_client()
    sequential = [[c.text for c in one.make_request(r).completions] for r in requests]
    close_engine()
    builds.clear()
    results: list = [None] * len(requests)
    barrier = threading.Barrier(8)

    def worker(w: int) -> None:
        barrier.wait()
        c = new_client()  # each thread its own client instance, as HELM's race produces
        for i in range(w, len(requests), 8):
            results[i] = [x.text for x in c.make_request(requests[i]).completions]

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert results == sequential
    assert len(builds) == 1  # one engine for the process
