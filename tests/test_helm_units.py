"""HELM layer pieces that need no engine: batch planning, stop cutting, conf and entry handling,
prod_env, stand-ins, policy resolution, the client's request handling against a fake engine."""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import yaml

from flexgen_helm import ConfigError, Policy
from flexgen_helm.helm.batching import (GenParams, Item, cut_at_stop, padded_tokens, plan_batches,
                                        single_pad_efficiency)


def params(**kw) -> GenParams:
    base = dict(temperature=0.0, top_p=1.0, num_completions=1, max_tokens=8, stop_sequences=("\n",),
                top_k_per_token=1, echo_prompt=False)
    return GenParams(**{**base, **kw})


# ---- planning ---------------------------------------------------------------------------------

def test_plan_groups_by_params_and_sorts_by_length():
    a, b = params(), params(max_tokens=50)
    items = [Item(i, [0] * n, p, key=str(i)) for i, (n, p) in
             enumerate([(5, a), (30, b), (12, a), (7, a), (3, b), (40, a)])]
    batches = plan_batches(items, max_rows=2)
    assert [sorted(len(it.ids) for it in bt.items) for bt in batches] == [[12, 40], [5, 7], [3, 30]]
    assert all(len({it.params for it in bt.items}) == 1 for bt in batches)
    assert sorted(it.index for bt in batches for it in bt.items) == list(range(6))


def test_plan_counts_completions_as_rows():
    p = params(num_completions=5, temperature=1.0)
    items = [Item(i, [0] * (i + 1), p, key=str(i)) for i in range(7)]
    batches = plan_batches(items, max_rows=12)  # 2 prompts x 5 completions per batch
    assert [len(bt.items) for bt in batches] == [2, 2, 2, 1]
    assert max(bt.rows for bt in batches) <= 12
    assert len(plan_batches(items, max_rows=3)) == 7  # a prompt never splits across batches


def test_batch_id_depends_on_members_only():
    p = params()
    x = [Item(0, [1], p, key="k1"), Item(1, [1, 2], p, key="k2")]
    y = [Item(5, [1, 2], p, key="k2"), Item(7, [1], p, key="k1")]
    assert plan_batches(x, 8)[0].batch_id == plan_batches(y, 8)[0].batch_id


def test_padding_helpers():
    assert padded_tokens([2, 4, 4, 8], micro_batch=2) == 4 * 2 + 8 * 2
    assert single_pad_efficiency([100, 200], round_to=256) == pytest.approx(300 / 512)


def test_label_is_readable_and_stable():
    assert params(stop_sequences=("###",)).label() == \
        'temperature=0,top_p=1,n=1,max_tokens=8,stop=["###"],top_k=1,echo=0'


# ---- stop strings ------------------------------------------------------------------------------

def _texts_decoder(texts):
    """Token i is texts[i]: decoding is concatenation (a tokenizer without multi-byte pieces)."""
    return lambda ids: "".join(texts[i] for i in ids)


@pytest.mark.parametrize("texts,stops,expected", [
    (["a", "b", "c"], ["\n"], (3, "abc", False)),
    (["Hello", " world", "\n", "more"], ["\n"], (2, "Hello world", True)),
    (["x", ".\n", "y"], ["\n"], (1, "x.", True)),  # stop inside a token: the text before it stays
    (["ab", "#", "##", "c"], ["###"], (1, "ab", True)),  # multi-token stop across a token boundary
    (["#", "#"], ["###"], (2, "##", False)),
    (["\n", "a"], ["\n"], (0, "", True)),
    (["a", "#", "##", "\n"], ["\n", "###"], (1, "a", True)),  # earliest of several stops wins
    (["a", "b"], ["", "zzzz" * 1000], (2, "ab", False)),  # empty and very long stops never match
])
def test_cut_at_stop(texts, stops, expected):
    assert cut_at_stop(_texts_decoder(texts), list(range(len(texts))), stops) == expected


def test_cut_at_stop_splits_no_character():
    """Byte-level pieces: 'é' is two tokens whose own texts are U+FFFD; the stop is found in the
    decoded text and no token that holds half of it is kept."""
    pieces = [b"caf", b"\xc3", b"\xa9", b" au", b" lait"]

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    seq = list(range(len(pieces)))
    assert cut_at_stop(decode, seq, ["é"]) == (1, "caf", True)
    assert cut_at_stop(decode, seq, ["é au"]) == (1, "caf", True)
    assert cut_at_stop(decode, seq, ["\ufffd"]) == (5, "café au lait", False)
    assert cut_at_stop(decode, seq, ["u l"]) == (3, "café a", True)


# ---- conf and run entries ------------------------------------------------------------------------

def test_read_entries_errors(tmp_path):
    from flexgen_helm.helm.batch_run import read_entries

    with pytest.raises(ConfigError, match="does not exist"):
        read_entries([str(tmp_path / "nope.conf")], [])
    bad = tmp_path / "bad.conf"
    bad.write_text('entries: [ {description: "mmlu:subject=anatomy", priority: 1 ')
    with pytest.raises(ConfigError, match="cannot read run entries"):
        read_entries([str(bad)], [])
    nodesc = tmp_path / "nodesc.conf"
    nodesc.write_text("entries: [ {priority: 1} ]")
    with pytest.raises(ConfigError, match="cannot read run entries"):
        read_entries([str(nodesc)], [])
    with pytest.raises(ConfigError, match="no run entries"):
        read_entries([], [])


def test_shipped_conf_has_the_seven_subscenarios():
    from flexgen_helm.helm.batch_run import read_entries

    root = os.path.join(os.path.dirname(__file__), "..")
    entries = read_entries([os.path.join(root, "run_specs.conf")], [])
    names = [e.description.split(":")[0] for e in entries]
    assert names == ["wikifact", "wikifact", "mmlu", "mmlu", "synthetic_reasoning", "synthetic_reasoning_natural",
                     "summarization_xsum_sampled_rouge"]
    counts = [int(e.description.split("max_eval_instances=")[1].split(",")[0]) for e in entries]
    assert counts == [96, 850, 100, 100, 515, 515, 518]


def test_rewrite_description_keeps_order_and_caps():
    from flexgen_helm.helm.batch_run import rewrite_description

    d = rewrite_description("mmlu:subject=anatomy,max_eval_instances=100", "meta/opt-30b", None, cap=10)
    assert d == "mmlu:subject=anatomy,max_eval_instances=10,model=meta/opt-30b"
    d = rewrite_description("wikifact:k=5,model=text,subject=plaintiff", "m/x", "flexgen/x-4bit", cap=None)
    assert d == "wikifact:k=5,model=m/x,subject=plaintiff,model_deployment=flexgen/x-4bit"
    with pytest.raises(ConfigError):
        rewrite_description("mmlu:subject", "m/x", None, None)


def test_unknown_run_entry_is_reported_before_running():
    from flexgen_helm.helm.batch_run import run_specs_for, setup_helm
    from helm.benchmark.presentation.run_entry import RunEntry

    setup_helm("prod_env_does_not_exist", None, verbose=False)
    entries = [RunEntry("synthetic_reasoning:mode=pattern_match"), RunEntry("no_such_scenario:x=1")]
    with pytest.raises(ConfigError, match="no_such_scenario.*Unknown run spec name"):
        run_specs_for(entries, "meta/opt-30b", "flexgen/opt-30b", cap=5)


# ---- prod_env ------------------------------------------------------------------------------------

def _fake_checkpoint(path, tokenizer: bool) -> str:
    os.makedirs(path, exist_ok=True)
    cfg = dict(model_type="opt", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
               vocab_size=512, max_position_embeddings=1024)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    if tokenizer:
        open(os.path.join(path, "tokenizer.json"), "w").write("{}")
    return str(path)


def test_prod_env_templates_and_checkpoints(tmp_path):
    from flexgen_helm.helm.prod_env import add_checkpoint, known_sizes, resolve_model, write_prod_env

    assert {"opt-125m", "opt-30b", "opt-175b", "opt-iml-30b"} <= set(known_sizes())
    root = tmp_path / "weights"
    _fake_checkpoint(root / "opt-30b", tokenizer=True)
    out = tmp_path / "prod_env"
    write_prod_env(str(out), weights_root=str(root))
    deps = yaml.safe_load((out / "model_deployments.yaml").read_text())["model_deployments"]
    by_name = {d["name"]: d for d in deps}
    assert by_name["flexgen/opt-30b"]["client_spec"]["args"]["model_path"] == str(root / "opt-30b")
    assert by_name["flexgen/opt-30b-4bit"]["client_spec"]["args"]["compress_weight"] is True
    assert by_name["flexgen/opt-13b"]["client_spec"]["args"]["model_path"] == "facebook/opt-13b"
    toks = yaml.safe_load((out / "tokenizer_configs.yaml").read_text())["tokenizer_configs"]
    assert toks[0]["tokenizer_spec"]["args"]["pretrained_model_name_or_path"] == str(root / "opt-30b")
    # HELM's default deployment for a model is the last listed: the uncompressed one
    assert resolve_model(str(out), "meta/opt-30b") == ("meta/opt-30b", "flexgen/opt-30b", True)
    assert resolve_model(str(out), "flexgen/opt-30b-4bit") == ("meta/opt-30b", "flexgen/opt-30b-4bit", False)
    with pytest.raises(ConfigError, match="not a flexgen deployment"):
        resolve_model(str(out), "flexgen/opt-31b")
    # a local checkpoint of another name gets its own model, deployment and tokenizer
    ck = _fake_checkpoint(tmp_path / "My Model", tokenizer=True)
    assert add_checkpoint(str(out), ck, client_args={"dtype": "float32"}) == "flexgen/my-model"
    assert resolve_model(str(out), "flexgen/my-model") == ("flexgen/my-model", "flexgen/my-model", True)
    dep = {d["name"]: d for d in yaml.safe_load((out / "model_deployments.yaml").read_text())["model_deployments"]}
    assert dep["flexgen/my-model"]["max_sequence_length"] == 1023
    assert dep["flexgen/my-model"]["tokenizer_name"] == "flexgen/my-model"
    assert dep["flexgen/my-model"]["client_spec"]["args"]["dtype"] == "float32"
    # --model may be a checkpoint directory: it is added to a (possibly new) prod_env on the fly
    fresh = str(tmp_path / "fresh_prod_env")
    assert resolve_model(fresh, ck) == ("flexgen/my-model", "flexgen/my-model", True)
    assert os.path.exists(os.path.join(fresh, "model_deployments.yaml"))


def test_prod_env_yaml_loads_in_helm(tmp_path):
    """The written files parse with HELM's own registries (dates, dataclass fields)."""
    from flexgen_helm.helm.prod_env import add_checkpoint, write_prod_env
    from helm.benchmark.model_deployment_registry import get_model_deployment
    from helm.benchmark.model_metadata_registry import get_model_metadata
    from helm.benchmark.config_registry import register_configs_from_directory

    out = str(tmp_path / "pe")
    write_prod_env(out)
    add_checkpoint(out, _fake_checkpoint(tmp_path / "tinyx", tokenizer=True))
    register_configs_from_directory(out)
    assert get_model_deployment("flexgen/opt-iml-30b").model_name == "meta/opt-iml-30b"
    assert get_model_metadata("meta/opt-30b").num_parameters == 30_000_000_000
    assert get_model_deployment("flexgen/tinyx").client_spec.class_name == "flexgen_helm.helm.client.FlexGenClient"


# ---- stand-ins -----------------------------------------------------------------------------------

def test_standins_are_placed_marked_and_never_overwrite_real_data(tmp_path):
    from flexgen_helm.helm.batch_run import STANDIN_MARKER, standin_scenarios
    from flexgen_helm.helm.standins import place_standins

    real = tmp_path / "scenarios" / "wikifact" / "data"
    real.mkdir(parents=True)
    (real / "test.jsonl").write_text("real\n")
    status = place_standins(str(tmp_path))
    assert status == {"mmlu": "placed", "wikifact": "real data present, left alone", "summarization": "placed"}
    assert (real / "test.jsonl").read_text() == "real\n"
    assert standin_scenarios(str(tmp_path)) == ["mmlu", "summarization"]
    assert "STAND-IN" in (tmp_path / "scenarios" / "mmlu" / STANDIN_MARKER).read_text()
    with open(tmp_path / "scenarios" / "summarization" / "data" / "xsum-sampled.pk", "rb") as f:
        xsum = pickle.load(f)
    assert set(xsum) == {"train", "validation", "test"} and {"document", "summary"} <= set(xsum["test"][0])
    assert all(50 <= len(d["document"].split()) <= 150 for d in xsum["train"])  # HELM's few-shot filter
    csv = tmp_path / "scenarios" / "mmlu" / "data" / "test" / "abstract_algebra_test.csv"
    assert csv.read_text().count("\n") >= 20
    assert place_standins(str(tmp_path))["mmlu"] == "already placed"


# ---- policy resolution ---------------------------------------------------------------------------

def test_resolve_policy(tmp_path):
    from flexgen_helm.helm.client import EngineSettings, resolve_policy

    p = resolve_policy(EngineSettings("m"))
    assert isinstance(p, Policy) and p.w_gpu_percent == 100 and p.block_size == 32
    p = resolve_policy(EngineSettings("m", percent=(20, 80, 0, 100, 0, 100), gpu_batch_size=48,
                                      num_gpu_batches=3, compress_weight=True))
    assert (p.w_gpu_percent, p.cache_cpu_percent, p.block_size, p.compress_weight) == (20, 100, 144, True)
    f = tmp_path / "p.json"
    f.write_text(json.dumps(Policy(gpu_batch_size=4, w_gpu_percent=50, w_cpu_percent=50).to_dict()))
    assert resolve_policy(EngineSettings("m", policy=str(f))).w_cpu_percent == 50
    with pytest.raises(ConfigError, match="cannot read policy file"):
        resolve_policy(EngineSettings("m", policy=str(tmp_path / "missing.json")))
    assert resolve_policy(EngineSettings("m", policy="auto")) == "auto"
    assert resolve_policy(EngineSettings("m", gpu_mem="16GB")) == "auto"  # a budget alone: search
    assert isinstance(resolve_policy(EngineSettings("m", gpu_mem="16GB", percent=(100, 0, 100, 0, 100, 0))),
                      Policy)


# ---- the client against a fake engine ------------------------------------------------------------

class FakeTokenizer:
    """Character-level: id = ord(c) + 10; bos/eos = 2; '##' is one token (id 5)."""

    bos_token_id = eos_token_id = 2

    def __len__(self):
        return 300

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        if text.startswith("</s>"):
            ids, i = [2], 4
        while i < len(text):
            if text.startswith("##", i):
                ids.append(5)
                i += 2
            else:
                ids.append(ord(text[i]) + 10)
                i += 1
        return ids

    def convert_ids_to_tokens(self, ids):
        return [self._piece(i) for i in ids]

    @staticmethod
    def _piece(i):
        return {2: "</s>", 5: "##"}.get(i, chr(i - 10) if i >= 10 else f"<{i}>")

    def convert_tokens_to_string(self, pieces):
        return "".join(pieces)

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join(self._piece(i) for i in ids)


@dataclass
class FakeResult:
    sequences: list
    logprobs: list
    top_logprobs: list
    prompt_logprobs: list | None
    finish_reasons: list
    stats: object


class FakeEngine:
    """Replies with a fixed continuation per prompt (all rows alike) and records its calls."""

    policy = Policy(gpu_batch_size=4)
    spec = SimpleNamespace(vocab_size=300)

    def __init__(self, reply: str, tok: FakeTokenizer):
        self.reply, self.tok, self.calls = tok.encode(reply), tok, []

    def generate(self, input_ids, max_new_tokens, num_completions, stop_token_ids, stop_sequences,
                 prompt_logprobs, top_logprobs, progress=None, **kw):
        self.calls.append(dict(n=len(input_ids), rows=num_completions, stop_token_ids=stop_token_ids,
                               stop_sequences=stop_sequences))
        rows = num_completions if (max_new_tokens or not prompt_logprobs) else 1
        seqs, reasons = [], []
        for _ in input_ids:
            for _ in range(rows):
                seq = []
                for t in self.reply[:max_new_tokens]:  # like the engine: stop token included, then stop
                    seq.append(t)
                    if t in stop_token_ids[0]:
                        break
                seqs.append(seq)
                reasons.append("stop" if len(seq) < max_new_tokens else "length")
        stats = SimpleNamespace(prompt_tokens=1, padded_prompt_tokens=1, generated_tokens=1, prefill_time=0.0,
                                decode_time=0.0, io_wait_time=0.0, peak_memory_bytes={})
        return FakeResult(seqs, [[-0.5] * len(s) for s in seqs], [[{} for _ in s] for s in seqs],
                          [[-1.0] * (len(p) - 1) for p in input_ids] if prompt_logprobs else None, reasons, stats)


@pytest.fixture
def fake_client(monkeypatch, tmp_path):
    from flexgen_helm.helm import client as client_mod
    from helm.common.cache import SqliteCacheConfig
    from helm.common.concurrency import ThreadSafeWrapper

    tok = FakeTokenizer()
    engine = FakeEngine("abc###e\nrest", tok)
    monkeypatch.setattr(client_mod, "shared_engine", lambda *a, **k: engine)
    monkeypatch.setattr(client_mod, "_local_tokenizer", lambda path: ThreadSafeWrapper(tok))
    c = client_mod.FlexGenClient(SqliteCacheConfig(str(tmp_path / "c.sqlite")), model_path="fake", gpu_batch_size=4)
    import dataclasses

    from flexgen_helm.engine.model_spec import spec_from_name
    fake_eos = tok.eos_token_id if tok.eos_token_id is not None else ()
    c._spec = dataclasses.replace(spec_from_name("opt-125m"), max_positions=64, vocab_size=300,
                                  eos_token_id=fake_eos)
    return c, engine


def req(**kw):
    from helm.common.request import Request
    base = dict(model="m/x", model_deployment="flexgen/x", prompt="Q: hi", temperature=0.0, max_tokens=10,
                stop_sequences=["\n"], num_completions=1)
    return Request(**{**base, **kw})


def test_client_cuts_multi_token_stop_and_reports_finish(fake_client):
    c, engine = fake_client
    r = c.make_request(req(stop_sequences=["###"]))
    (out,) = r.completions
    assert out.text == "abc" and [t.text for t in out.tokens] == ["a", "b", "c"]
    assert out.finish_reason == {"reason": "stop"} and out.logprob == pytest.approx(-1.5)
    # early stopping is requested from the engine: "###" encodes to ('##', '#'); "\n" is a token
    assert (5, ord("#") + 10) in engine.calls[0]["stop_sequences"][0]
    r = c.make_request(req(stop_sequences=["\n"]))
    assert r.completions[0].text == "abc###e" and r.completions[0].finish_reason == {"reason": "stop"}
    assert ord("\n") + 10 in engine.calls[-1]["stop_token_ids"][0]
    r = c.make_request(req(stop_sequences=[], max_tokens=3))
    assert r.completions[0].text == "abc" and r.completions[0].finish_reason == {"reason": "length"}


def test_client_cache_keys_and_hits(fake_client):
    c, engine = fake_client
    first = c.make_request(req())
    again = c.make_request(req())
    assert not first.cached and again.cached and len(engine.calls) == 1
    assert again.completions == first.completions and again.batch_size == 1
    c.make_request(req(random="trial-1"))  # HELM's `random` is part of the key
    assert len(engine.calls) == 2
    key = c.cache_key(req(random="trial-1"))
    assert key["random"] == "trial-1" and key["model"] == "fake" and key["compression"] == "none"


def test_client_batches_dedups_and_keeps_order(fake_client):
    c, engine = fake_client
    rs = [req(prompt=f"p{i}", num_completions=2, temperature=1.0) for i in range(5)] + [req(prompt="p1")]
    rs.append(rs[0])  # identical request: computed once
    out = c.make_batch_request(rs)
    assert all(r.success for r in out) and [len(r.completions) for r in out] == [2] * 5 + [1, 2]
    assert [call["n"] for call in engine.calls] == [2, 2, 1, 1]  # 4 rows per block / 2 completions
    assert out[-1].completions == out[0].completions


def test_client_echo_prompt_scoring(fake_client):
    c, _ = fake_client
    (out,) = c.make_request(req(prompt="hey", echo_prompt=True, max_tokens=0, num_completions=1)).completions
    assert out.text == "hey" and [t.text for t in out.tokens] == ["h", "e", "y"]
    assert [t.logprob for t in out.tokens] == [-1.0, -1.0, -1.0]  # BOS added by the client, not shown
    r = c.make_request(req(prompt="</s>hey", echo_prompt=True, max_tokens=0, num_completions=3))
    assert len(r.completions) == 3
    assert [t.text for t in r.completions[0].tokens] == ["</s>", "h", "e", "y"]
    assert r.completions[0].tokens[0].logprob == 0.0  # the first token has no context


def test_client_unservable_requests_are_not_retried(fake_client):
    c, engine = fake_client
    out = c.make_batch_request([req(prompt="x" * 60), req(temperature=-1.0), req(prompt="ok")])
    assert not out[0].success and "context of 64 tokens" in out[0].error
    assert not out[1].success and "temperature" in out[1].error
    for r in out[:2]:
        assert r.error_flags.is_retriable is False and r.error_flags.is_fatal is False
    assert out[2].success and len(engine.calls) == 1


def test_client_engine_config_error_is_non_retriable(monkeypatch, tmp_path):
    from flexgen_helm.helm.client import FlexGenClient
    from helm.proxy.retry import NonRetriableException

    c = FlexGenClient(None, model_path=str(tmp_path / "missing-dir-or-name"))
    with pytest.raises(NonRetriableException, match="no tokenizer found|unknown OPT model"):
        c.make_request(req())


def test_cache_key_names_the_compression(tmp_path):
    from flexgen_helm.helm.client import FlexGenClient

    assert FlexGenClient(None, model_path="m").cache_key(req())["compression"] == "none"
    assert FlexGenClient(None, model_path="m", compress_weight=True).cache_key(req())["compression"] == "w4g64"
    both = FlexGenClient(None, model_path="m", compress_weight=True, compress_cache=True)
    assert both.cache_key(req())["compression"] == "w4g64+kv4g64"
    f = tmp_path / "p.json"  # compression set inside a policy file counts too
    f.write_text(json.dumps(Policy(compress_weight=True).to_dict()))
    assert FlexGenClient(None, model_path="m", policy=str(f)).cache_key(req())["compression"] == "w4g64"


def test_greedy_completions_are_computed_once(fake_client):
    c, engine = fake_client
    r = c.make_request(req(num_completions=3, temperature=0.0))
    assert len(r.completions) == 3 and len({x.text for x in r.completions}) == 1
    assert engine.calls[-1]["rows"] == 1
