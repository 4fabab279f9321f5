"""`flexgen-helm accuracy`: what 4-bit compression of weights and KV cache costs in accuracy.

For each configuration (uncompressed baseline, compressed weights, compressed cache, both) it runs
the same model over the same text and reports, side by side:
- perplexity: the text is tokenized once and cut into non-overlapping windows that fit the model
  context; each window starts with the BOS token, and every text token is scored given BOS and the
  text before it in its window (token-level perplexity, not lm-eval's word perplexity);
- mean |logprob difference| per scored token against the baseline;
- greedy agreement: greedy continuations (`--gen-len` tokens) of `--prompts` prompts cut from the
  text; per prompt the fraction of tokens generated identically to the baseline before the first
  divergence (strict: everything after a divergence counts as disagreement), averaged.

Backends: "engine" (default) runs the offloading engine with Policy(compress_weight=...,
compress_cache=...): what users run. "reference" runs HF transformers' OPT with weights and K/V
quantized then dequantized ("fake quantization", engine/compression.py); the engine's compressed
path is tested against it, and it alone offers KIVI-style per-channel keys (`--kivi-keys`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace

from .engine.config import CompressionConfig, ConfigError, Policy, dtype_name

# A default text of our own so the command runs offline; for numbers worth quoting pass a real
# corpus, e.g. the WikiText-2 test split saved as text, with --text.
SAMPLE_TEXT = """\
The river town woke slowly in the cold months. Before sunrise the bakers lit their ovens, and by the
time the first boats left the harbour the smell of bread had reached the market square. Traders set
out crates of apples, onions and dried fish, and argued about prices that had not changed in years.
In the afternoon the schoolchildren walked home along the old wall, counting the ships at anchor and
guessing where each had come from. Most evenings ended the same way: lamps in the windows, the bell of
the church striking nine, and the long sound of the wind coming off the water. Visitors said nothing
ever happened there, and the people who lived there were content to let them believe it.
"""


@dataclass(frozen=True)
class Variant:
    name: str
    compress_weight: bool
    compress_cache: bool


def variants(compress_weight: bool, compress_cache: bool, weight_cfg: CompressionConfig,
             cache_cfg: CompressionConfig, baseline: str, kivi_keys: bool = False) -> list[Variant]:
    """Baseline first, then what was asked; no flag at all means every configuration."""
    if not compress_weight and not compress_cache:
        compress_weight = compress_cache = True
    w, kv = f"w {weight_cfg.label}", f"kv {cache_cfg.label}" + (" kivi-k" if kivi_keys else "")
    out = [Variant(baseline, False, False)]
    if compress_weight:
        out.append(Variant(w, True, False))
    if compress_cache:
        out.append(Variant(kv, False, True))
    if compress_weight and compress_cache:
        out.append(Variant(f"{w} + {kv}", True, True))
    return out


# ---- backends: score windows (prompt logprobs) and greedy-decode prompts ---------------------------

class EngineRunner:
    def __init__(self, model: str, policy: Policy, device: str, dtype, offload_dir: str | None,
                 prompt_len: int, gen_len: int):
        try:
            from .engine.engine import Engine
        except ImportError as e:
            raise ConfigError(f"the offloading engine is not available ({e}); use --backend reference") from e
        # prompt_len/gen_len: sizes the engine's memory plan for our longest window
        self.engine = Engine.from_pretrained(model, policy=policy, device=device, dtype=dtype,
                                             offload_dir=offload_dir, prompt_len=prompt_len, gen_len=gen_len)
        self.max_context = int(self.engine.max_context)

    def score(self, windows: list[list[int]]) -> list[list[float]]:
        res = self.engine.generate(windows, max_new_tokens=0, prompt_logprobs=True)
        return [list(map(float, lp)) for lp in res.prompt_logprobs]

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return self.engine.generate(prompts, max_new_tokens=n, temperature=0.0).sequences

    def close(self) -> None:
        self.engine.close()


class ReferenceRunner:
    """HF OPTForCausalLM with fake-quantized weights and/or K/V (see engine/compression.py)."""

    def __init__(self, model: str, weight_cfg: CompressionConfig | None, cache_cfg: CompressionConfig | None,
                 kivi_keys: bool, device: str, dtype, batch_size: int):
        import torch
        from transformers import OPTForCausalLM

        from .engine.compression import fake_quantize_kv_cache, fake_quantize_model

        self.torch, self.device, self.batch_size = torch, device, batch_size
        import transformers
        old_hf = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56)
        kw = {"torch_dtype" if old_hf else "dtype": dtype}  # renamed in 4.56
        self.model = OPTForCausalLM.from_pretrained(model, **kw).to(device).eval()
        if weight_cfg is not None:
            fake_quantize_model(self.model, weight_cfg)
        if cache_cfg is not None:
            fake_quantize_kv_cache(self.model, cache_cfg, kivi_keys=kivi_keys)
        self.max_context = int(self.model.config.max_position_embeddings)

    def _batches(self, seqs: list[list[int]]):
        """Runs of equal-length sequences, at most batch_size each (no padding needed)."""
        i = 0
        while i < len(seqs):
            j = i + 1
            while j < len(seqs) and j - i < self.batch_size and len(seqs[j]) == len(seqs[i]):
                j += 1
            yield self.torch.tensor(seqs[i:j], device=self.device)
            i = j

    def score(self, windows: list[list[int]]) -> list[list[float]]:
        out = []
        with self.torch.no_grad():
            for ids in self._batches(windows):
                logp = self.torch.log_softmax(self.model(ids).logits.float(), -1)
                out += logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].tolist()
        return out

    def greedy(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        out = []
        with self.torch.no_grad():
            for ids in self._batches(prompts):
                res = self.model(ids, use_cache=True)
                gen = []
                for step in range(n):
                    nxt = res.logits[:, -1].argmax(-1, keepdim=True)
                    gen.append(nxt)
                    if step + 1 < n:  # the cache kwarg/attribute was renamed in transformers 5
                        key = "cache" if hasattr(res, "cache") else "past_key_values"
                        res = self.model(nxt, use_cache=True, **{key: getattr(res, key)})
                out += self.torch.cat(gen, 1).tolist() if gen else [[] for _ in range(ids.shape[0])]
        return out

    def close(self) -> None:
        del self.model


# ---- the measurement -----------------------------------------------------------------------------

def windows_of(ids: list[int], bos: int | None, seqlen: int) -> list[list[int]]:
    """Non-overlapping windows of at most seqlen tokens, each led by bos (when the tokenizer has one)."""
    head = [] if bos is None else [bos]
    step = seqlen - len(head)
    wins = [head + ids[i:i + step] for i in range(0, len(ids), step)]
    return [w for w in wins if len(w) >= 2]


def prompts_of(ids: list[int], bos: int | None, num: int, length: int) -> list[list[int]]:
    """Up to `num` prompts of `length` tokens (bos included) from evenly spaced places in the text."""
    head = [] if bos is None else [bos]
    body = min(length - len(head), len(ids))
    if num <= 0 or body <= 0:
        return []
    last = len(ids) - body
    starts = sorted({round(last * i / max(num - 1, 1)) for i in range(num)})
    return [head + ids[s:s + body] for s in starts]


def _agreement(base: list[int], other: list[int]) -> float:
    """Share of tokens generated identically before the first divergence (1.0: same sequence)."""
    if base == other:
        return 1.0
    k = 0
    while k < min(len(base), len(other)) and base[k] == other[k]:
        k += 1
    return k / max(len(base), len(other))


def run_accuracy(model: str, text: str, *, compress_weight: bool = False, compress_cache: bool = False,
                 weight_cfg: CompressionConfig | None = None, cache_cfg: CompressionConfig | None = None,
                 kivi_keys: bool = False, backend: str = "engine", device: str = "cpu",
                 dtype: str | None = None, seqlen: int | None = None, max_tokens: int | None = None,
                 num_prompts: int = 8, prompt_len: int = 64, gen_len: int = 32, batch_size: int = 4,
                 policy: Policy | None = None, offload_dir: str | None = None,
                 log=lambda msg: None) -> dict:
    """Measure every configuration asked for; returns the JSON document `--json` writes."""
    import torch
    from transformers import AutoTokenizer

    if model.startswith("dummy:"):
        raise ConfigError("accuracy needs real weights and a tokenizer: pass a checkpoint dir or hub id, "
                          "not a dummy: model")
    if backend not in ("engine", "reference"):
        raise ConfigError(f"--backend must be engine or reference, got {backend!r}")
    if kivi_keys and backend != "reference":
        raise ConfigError("--kivi-keys is simulated only: add --backend reference")
    weight_cfg = weight_cfg or Policy().comp_weight_config
    cache_cfg = cache_cfg or Policy().comp_cache_config
    dtype = dtype_name(dtype) if dtype else ("float32" if device == "cpu" else "float16")
    torch_dtype = getattr(torch, dtype)
    baseline = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer for {model!r}: {e}") from e
    ids = tok(text, add_special_tokens=False).input_ids
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ConfigError("the text is too short to score: give at least a sentence")
    bos = tok.bos_token_id

    rows, base = [], None
    for v in variants(compress_weight, compress_cache, weight_cfg, cache_cfg, baseline, kivi_keys):
        t0 = time.perf_counter()
        log(f"[accuracy] {v.name} ...")
        if backend == "engine":
            pol = dataclasses.replace(
                policy or Policy(gpu_batch_size=batch_size), compress_weight=v.compress_weight,
                comp_weight_config=weight_cfg, compress_cache=v.compress_cache, comp_cache_config=cache_cfg)
            runner = EngineRunner(model, pol, device, torch_dtype, offload_dir, seqlen or 2048, gen_len)
        else:
            runner = ReferenceRunner(model, weight_cfg if v.compress_weight else None,
                                     cache_cfg if v.compress_cache else None, kivi_keys, device,
                                     torch_dtype, batch_size)
        try:
            ctx = runner.max_context
            win_len = min(seqlen or ctx, ctx)
            if win_len < 2:
                raise ConfigError(f"--seqlen must be at least 2, got {win_len}")
            windows = windows_of(ids, bos, win_len)
            p_len = max(2, min(prompt_len, ctx - 1))
            n_gen = max(0, min(gen_len, ctx - p_len))
            prompts = prompts_of(ids, bos, num_prompts, p_len)
            lps = runner.score(windows)
            gens = runner.greedy(prompts, n_gen) if prompts and n_gen else []
        finally:
            runner.close()
        flat = [x for lp in lps for x in lp]
        row = {"config": v.name, "compress_weight": v.compress_weight, "compress_cache": v.compress_cache,
               "perplexity": math.exp(-sum(flat) / len(flat)), "finite": all(map(math.isfinite, flat)),
               "wall_s": round(time.perf_counter() - t0, 3)}
        if base is None:
            base = (row, flat, gens)
            row.update(delta_perplexity=0.0, mean_abs_logprob_diff=0.0, max_abs_logprob_diff=0.0,
                       greedy_agreement=1.0)
        else:
            diffs = [abs(a - b) for a, b in zip(flat, base[1])]
            agree = [_agreement(b, o) for b, o in zip(base[2], gens)]
            row.update(delta_perplexity=row["perplexity"] - base[0]["perplexity"],
                       mean_abs_logprob_diff=sum(diffs) / len(diffs), max_abs_logprob_diff=max(diffs),
                       greedy_agreement=sum(agree) / len(agree) if agree else None)
        rows.append(row)
    return {"model": model, "backend": backend, "device": device, "dtype": dtype,
            "weight_config": weight_cfg.__dict__, "cache_config": cache_cfg.__dict__,
            "kivi_keys": kivi_keys, "text_tokens": len(ids), "scored_tokens": len(base[1]),
            "windows": len(windows), "window_len": win_len,
            "greedy": {"prompts": len(prompts), "prompt_len": p_len, "gen_len": n_gen},
            "rows": rows}


def format_table(result: dict) -> str:
    head = f"{'config':<34} {'ppl':>10} {'d ppl':>9} {'mean|dlogp|':>12} {'greedy agree':>13} {'time s':>8}"
    lines = [f"{result['model']}  ({result['backend']}, {result['device']}, {result['dtype']}; "
             f"{result['scored_tokens']} tokens in {result['windows']} windows of <= {result['window_len']}; "
             f"greedy: {result['greedy']['prompts']} prompts x {result['greedy']['gen_len']} tokens)",
             head, "-" * len(head)]
    def num(x: float, sign: str = "") -> str:  # fixed point for real models, exponent for random ones
        return f"{x:{sign}.3f}" if abs(x) < 1e5 else f"{x:{sign}.3e}"

    for r in result["rows"]:
        agree = "n/a" if r["greedy_agreement"] is None else f"{100 * r['greedy_agreement']:.1f}%"
        lines.append(f"{r['config']:<34} {num(r['perplexity']):>10} {num(r['delta_perplexity'], '+'):>9} "
                     f"{r['mean_abs_logprob_diff']:>12.4f} {agree:>13} {r['wall_s']:>8.1f}")
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    if args.text:
        if not os.path.isfile(args.text):
            raise ConfigError(f"--text {args.text!r} is not a file")
        with open(args.text, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        text = SAMPLE_TEXT
        print("[accuracy] no --text given: using a short built-in sample (a smoke test; pass e.g. the "
              "WikiText-2 test split for real numbers)", file=sys.stderr)
    kw = {"gpu_batch_size": args.batch_size, "num_gpu_batches": args.num_gpu_batches}
    policy = Policy.from_percent(args.percent, **kw) if args.percent else Policy(**kw)
    result = run_accuracy(
        args.model, text, compress_weight=args.compress_weight, compress_cache=args.compress_cache,
        # the engine's own group axes: weights along in_features, the cache along head_dim
        weight_cfg=replace(Policy().comp_weight_config, num_bits=args.weight_bits, group_size=args.group_size,
                           symmetric=args.symmetric),
        cache_cfg=replace(Policy().comp_cache_config, num_bits=args.cache_bits, group_size=args.group_size,
                          symmetric=args.symmetric),
        kivi_keys=args.kivi_keys, backend=args.backend, device=args.device, dtype=args.dtype,
        seqlen=args.seqlen, max_tokens=args.max_tokens, num_prompts=args.prompts,
        prompt_len=args.prompt_len, gen_len=args.gen_len, batch_size=args.batch_size, policy=policy,
        offload_dir=args.offload_dir, log=lambda m: print(m, file=sys.stderr))
    result["text"] = args.text or "<built-in sample>"
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "accuracy", help="perplexity, greedy agreement and logprob drift of 4-bit weights / KV cache",
        description=__doc__.split("\n\n")[0] + " With neither --compress-weight nor --compress-cache, "
        "every configuration is measured.")
    p.add_argument("--model", required=True, help="checkpoint dir or hub id (facebook/opt-1.3b)")
    p.add_argument("--text", help="UTF-8 text file to score (default: a short built-in sample)")
    p.add_argument("--compress-weight", action="store_true", help="measure compressed weights")
    p.add_argument("--compress-cache", action="store_true", help="measure a compressed KV cache")
    p.add_argument("--weight-bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--cache-bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--symmetric", action="store_true", help="symmetric instead of min-max quantization")
    p.add_argument("--kivi-keys", action="store_true",
                   help="group keys per channel along tokens (KIVI); --backend reference only")
    p.add_argument("--backend", choices=("engine", "reference"), default="engine")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", help="fp32 | bf16 | fp16 (default: fp32 on cpu, fp16 on cuda)")
    p.add_argument("--seqlen", type=int, help="window length (default: the model context)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--prompts", type=int, default=8, help="greedy prompts cut from the text")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward (engine: gpu_batch_size)")
    p.add_argument("--num-gpu-batches", type=int, default=1, help="engine micro-batches per block")
    p.add_argument("--percent", type=float, nargs=6, metavar="P",
                   help="engine placement, FlexGen's: w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu "
                        "(default: all on the compute device)")
    p.add_argument("--offload-dir", help="engine disk tier directory")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=_main)
