"""`flexgen-helm train-demo`: train the demo's small model (Llama or OPT) on HELM's synthetic-reasoning data.

The data (demo_tasks.py) comes from HELM's own generators under seeds other than HELM's, in HELM's
prompt format with in-context examples; HELM's eval splits are held out. The loss is next-token
prediction on every token, with the answer tokens weighted up (a run with the loss on the answers
alone sat at chance for 200 steps: predicting a pattern-match "Result" or a rule's subject teaches
the same lookups the answers need); the answer tokens' loss is logged beside it. Deterministic given --seed and
--threads; prints progress and loss. The result is a standard HF checkpoint (safetensors, tokenizer).

The shipped model took five stages (README, "The demo model"): both tasks from scratch, where
pattern_match was learned and synthetic_reasoning_natural never was; then the curriculum tasks
srn_easy_r1..r3 (HELM's generator with 1-3 rules) with the answer tokens weighted 40x, where the
one-rule lookup was learned first, mixed with pattern_match so it is kept.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .demo_tasks import (TASKS, Example, baselines, eval_prompt, generate_examples, num_shots, score,
                         training_text)

VAL_SEED = 7          # generator seed of the validation examples printed at the end (not HELM's 42)
EVALUATED = ("pattern_match", "srn_easy")  # the demo conf's synthetic sub-scenarios


@dataclass(frozen=True)
class DemoModel:
    """Shape of the demo model. "llama" (RoPE, RMSNorm, gated SiLU, GQA, tied embeddings) learns the
    position-matching these tasks need faster than OPT's learned positions; "opt" stays available."""
    arch: str = "llama"
    num_layers: int = 6
    hidden: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn: int = 384
    vocab_size: int = 2048      # an upper bound: the tokenizer may learn fewer merges
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "opt"):
            raise ValueError(f"arch {self.arch!r}: choose llama or opt")
        if self.hidden % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden must be a multiple of num_heads, and num_heads of num_kv_heads")

    @property
    def bos(self) -> str:
        return "<s>" if self.arch == "llama" else "</s>"

    def hf_config(self, vocab: int):
        """The transformers config of this shape (fp32, no dropout; ids as tiny.train_tokenizer makes them)."""
        from transformers import LlamaConfig, OPTConfig
        if self.arch == "opt":
            return OPTConfig(
                vocab_size=vocab, hidden_size=self.hidden, num_hidden_layers=self.num_layers, ffn_dim=self.ffn,
                num_attention_heads=self.num_heads, max_position_embeddings=self.max_positions,
                word_embed_proj_dim=self.hidden, do_layer_norm_before=True, pad_token_id=1, bos_token_id=2,
                eos_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                torch_dtype="float32")
        return LlamaConfig(
            vocab_size=vocab, hidden_size=self.hidden, num_hidden_layers=self.num_layers,
            intermediate_size=self.ffn, num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, attention_dropout=0.0, torch_dtype="float32")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str
    seed: int = 0
    steps: int = 500
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    # share of training sequences per task: the two the demo evaluates (add variable_substitution or
    # induction here to train them too; on a shared 2-core CPU every step counts)
    task_weights: tuple[tuple[str, float], ...] = (("pattern_match", 0.55), ("srn_easy", 0.45))
    answer_weight: float = 4.0   # loss weight of answer tokens relative to the other tokens
    model: DemoModel = field(default_factory=DemoModel)
    seeds_per_task: int = 8      # generator seeds (11,000 instances each) in the training pool
    threads: int = 1             # 2 threads on 2 busy cores ran 4x slower than 1
    log_every: int = 10
    save_every: int = 250        # write the checkpoint every this many steps, so a stopped run keeps its work
    val_queries: int = 48        # validation prompts per evaluated task, greedy-decoded at the end
    init_from: str | None = None  # continue from this checkpoint (its shape and tokenizer), not from scratch
    grow_layers: int = 0         # with init_from: insert this many layers, each starting as the identity

    def __post_init__(self) -> None:
        unknown = [t for t, _ in self.task_weights if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")
        if self.grow_layers < 0 or (self.grow_layers and not self.init_from):
            raise ValueError("grow_layers needs init_from (it deepens a trained checkpoint) and must be >= 0")

    def train_seeds(self) -> list[int]:
        return [1000 + 100 * self.seed + i for i in range(self.seeds_per_task)]


# ---- data -> tensors ------------------------------------------------------------------------------

def encode(tok, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids as the HELM client builds them (BOS, then the text without special tokens) and
    answer flags: 1 where the token overlaps an answer span."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, answer = [tok.bos_token_id], [0]
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        ids.append(tid)
        answer.append(int(any(a < e and b > s for s, e in spans)))
    return ids, answer


def make_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    import torch
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    answer = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):  # right padding: causal attention never sees it
        ids[i, :len(x)], answer[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, answer, mask


def losses_of(model, ids, answer, mask, answer_weight: float = 1.0):
    """(training loss: next-token loss over real tokens with answer tokens weighted answer_weight,
    mean loss over all real tokens, mean over answer tokens only)."""
    import torch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    real, ans = mask[:, 1:].float(), answer[:, 1:].float()
    weight = real + (answer_weight - 1.0) * ans
    return ((nll * weight).sum() / weight.sum(), (nll * real).sum() / real.sum(),
            (nll * ans).sum() / ans.sum().clamp(min=1))


class SequenceSampler:
    """Random training sequences: a task by weight, then max_train_instances + 1 examples of it."""

    def __init__(self, pools: dict[str, list[Example]], weights: tuple[tuple[str, float], ...], seed: int):
        self.pools, self.rng = pools, random.Random(seed)
        self.names = [t for t, _ in weights]
        self.weights = [w for _, w in weights]

    def __call__(self) -> tuple[str, list[tuple[int, int]]]:
        task = self.rng.choices(self.names, self.weights)[0]
        return training_text(task, self.rng.sample(self.pools[task], num_shots(task) + 1))


# ---- evaluation: greedy answers scored with HELM's metric ----------------------------------------

Generate = Callable[[list[str], int], list[str]]  # prompts, max new tokens -> completions


def evaluate(generate: Generate, task: str, shots: list[Example], queries: list[Example]) -> float:
    prompts = [eval_prompt(task, shots, q) for q in queries]
    max_tokens = TASKS[task].adapter_spec().max_tokens
    completions = generate(prompts, max_tokens)
    return sum(score(task, q.output, c) for q, c in zip(queries, completions)) / len(queries)


def newline_ids(tok) -> list[int]:
    """Every token whose text contains a newline: HELM stops generation at "\\n"."""
    return [i for i in range(len(tok)) if "\n" in tok.decode([i])]


def hf_generate(model, tok) -> Generate:
    import torch

    stops = newline_ids(tok)

    def run(prompts: list[str], max_tokens: int) -> list[str]:
        out = []
        for p in prompts:  # one at a time: no padding questions, and fast enough for a tiny model
            ids = torch.tensor([[tok.bos_token_id] + tok.encode(p, add_special_tokens=False)])
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                     do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(gen[0, ids.shape[1]:]))
        return out
    return run


def engine_generate(model_dir: str, **policy_kw) -> tuple[Generate, Callable[[], None]]:
    """Greedy completions through the offloading engine (the real checkpoint loading code)."""
    import torch
    from transformers import AutoTokenizer

    from .engine.config import Policy
    from .engine.engine import Engine

    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine.from_pretrained(model_dir, policy=Policy(**policy_kw), device="cpu", dtype=torch.float32,
                                    prompt_len=1024, gen_len=64)
    stops = newline_ids(tok)

    def run(prompts: list[str], max_tokens: int) -> list[str]:
        ids = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in prompts]
        res = engine.generate(ids, max_new_tokens=max_tokens, stop_token_ids=stops)
        return [tok.decode(seq) for seq in res.sequences]
    return run, engine.close


# ---- training ------------------------------------------------------------------------------------

def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainResult:
    out_dir: str
    losses: list[float]          # mean next-token loss of each step
    wall_s: float
    val: dict[str, dict[str, float]]


def build_pools(cfg: TrainConfig, log=print) -> dict[str, list[Example]]:
    pools = {}
    for task, _ in cfg.task_weights:
        t0 = time.time()
        pools[task] = generate_examples(task, cfg.train_seeds())
        log(f"    {task}: {len(pools[task])} training examples (seeds {cfg.train_seeds()}, HELM's eval "
            f"splits removed) in {time.time() - t0:.0f} s")
    return pools


def grown_order(num_layers: int, extra: int) -> list[int | None]:
    """Layer order of a model deepened by `extra` layers: old layer indices, with None for a new
    layer, the new ones spread evenly (each after old layer ceil((i + 1) * L / extra) - 1)."""
    after = [math.ceil((i + 1) * num_layers / extra) - 1 for i in range(extra)]
    order: list[int | None] = []
    for j in range(num_layers):
        order.append(j)
        order += [None] * after.count(j)
    return order


def grow_layers(model, extra: int):
    """A deeper copy of a Llama-style HF model computing the same function: each new layer copies the
    layer before it with its attention output and MLP down projections zeroed, so its residual
    branches add nothing until training moves them (block expansion, as in LLaMA Pro). Deeper
    models compose more lookups; the trained layers keep what they learned."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM
    if model.config.model_type != "llama":
        raise ValueError(f"grow_layers: a llama checkpoint, not {model.config.model_type}")
    order = grown_order(model.config.num_hidden_layers, extra)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(order)
    old = model.state_dict()
    new = {k: v for k, v in old.items() if not k.startswith("model.layers.")}
    src = 0
    for i, j in enumerate(order):
        src = src if j is None else j  # a new layer copies the old layer it follows
        prefix = f"model.layers.{src}."
        for k, v in old.items():
            if k.startswith(prefix):
                name = k[len(prefix):]
                zero = j is None and name in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
                new[f"model.layers.{i}.{name}"] = torch.zeros_like(v) if zero else v.clone()
    grown = AutoModelForCausalLM.from_config(config).float()
    grown.load_state_dict(new, strict=False)  # strict=False: tied lm_head.weight is absent from old
    grown.tie_weights()
    return grown


def train(cfg: TrainConfig, log=print, validate: bool = True) -> TrainResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tiny import _CORPUS, train_tokenizer

    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)
    log("1/4 data from HELM's generators ...")
    pools = build_pools(cfg, log)
    sample = SequenceSampler(pools, cfg.task_weights, cfg.seed)

    parent: dict = {}
    if cfg.init_from:
        log(f"2/4 tokenizer and weights of {cfg.init_from} (training continues from them) ...")
        with open(os.path.join(cfg.init_from, "train_demo.json")) as f:
            parent = json.load(f)
        tok = AutoTokenizer.from_pretrained(cfg.init_from)
        tok.save_pretrained(cfg.out_dir)
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
        if cfg.grow_layers:
            model = grow_layers(model, cfg.grow_layers)
            log(f"    grown by {cfg.grow_layers} identity layers to {model.config.num_hidden_layers}")
        vocab = model.config.vocab_size
    else:
        log("2/4 tokenizer ...")
        corpus_rng = random.Random(cfg.seed + 1)
        corpus = _CORPUS.splitlines() + [
            training_text(t, corpus_rng.sample(pools[t], num_shots(t) + 1))[0] for t, _ in cfg.task_weights
            for _ in range(200)]
        vocab = train_tokenizer(cfg.out_dir, cfg.model.vocab_size, bos=cfg.model.bos, corpus=corpus)
        tok = AutoTokenizer.from_pretrained(cfg.out_dir)
        model = AutoModelForCausalLM.from_config(cfg.model.hf_config(vocab)).float()

    log(f"3/4 training: {cfg.steps} steps x {cfg.batch_size} sequences, {cfg.threads} thread(s) ...")
    n_params = sum(p.numel() for p in model.parameters())
    mc = model.config
    log(f"    {mc.model_type} {mc.num_hidden_layers} layers x {mc.hidden_size} wide, vocab {vocab}: "
        f"{n_params / 1e6:.2f} M params")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    losses: list[float] = []
    answer_losses: list[float] = []
    tokens, t0 = 0, time.time()
    for step in range(cfg.steps):
        ids, answer, mask = make_batch([encode(tok, *sample()) for _ in range(cfg.batch_size)], tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        loss, plain_loss, answer_loss = losses_of(model, ids, answer, mask, cfg.answer_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(plain_loss.item())
        answer_losses.append(answer_loss.item())
        tokens += int(mask.sum())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            el = time.time() - t0
            recent, recent_ans = losses[-cfg.log_every:], answer_losses[-cfg.log_every:]
            log(f"    step {step + 1:5d}/{cfg.steps}  loss {sum(recent) / len(recent):.3f}  "
                f"answer loss {sum(recent_ans) / len(recent_ans):.3f}  "
                f"lr {lr_at(cfg, step):.2e}  {tokens / el:,.0f} tok/s  {el:.0f} s elapsed, "
                f"~{el / (step + 1) * (cfg.steps - step - 1):.0f} s left", flush=True)
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            model.save_pretrained(cfg.out_dir, safe_serialization=True)
    model.eval()
    model.save_pretrained(cfg.out_dir, safe_serialization=True)

    val: dict[str, dict[str, float]] = {}
    if validate:
        log(f"4/4 validation: greedy answers to {cfg.val_queries} prompts per task (generator seed {VAL_SEED}) ...")
        gen = hf_generate(model, tok)
        for task in EVALUATED:
            if task not in pools:
                continue
            seen = frozenset(e.input for e in pools[task])
            queries = generate_examples(task, [VAL_SEED], exclude=seen)[:cfg.val_queries]
            shots = pools[task][:num_shots(task)]
            val[task] = {"model": evaluate(gen, task, shots, queries), **baselines(task, pools[task], queries)}
            log(f"    {task} ({TASKS[task].metric}): model {val[task]['model']:.3f}, trivial baselines: "
                f"most frequent answer {val[task]['most_frequent']:.3f}, copy last {val[task]['copy_last']:.3f}")
    wall = time.time() - t_start
    with open(os.path.join(cfg.out_dir, "train_demo.json"), "w") as f:
        # every generator seed any stage of this model trained on (the held-out test checks them all)
        seeds = sorted(set(cfg.train_seeds()) | set(parent.get("train_seeds", [])))
        json.dump({"config": asdict(cfg) | {"out_dir": None}, "train_seeds": seeds,
                   "parent": parent or None,
                   "held_out": "HELM seed 42 valid+test splits", "val_seed": VAL_SEED, "params": n_params,
                   "final_loss": sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]),
                   "final_answer_loss": sum(answer_losses[-cfg.log_every:]) / len(answer_losses[-cfg.log_every:]),
                   "val": val,
                   "wall_s": round(wall, 1), "threads": cfg.threads, "torch": torch.__version__}, f, indent=1)
    log(f"done in {wall:.0f} s: {cfg.out_dir}")
    return TrainResult(cfg.out_dir, losses, wall, val)


def _main(args: argparse.Namespace) -> int:
    from .engine.config import ConfigError
    if args.held_out_text:
        from .demo_tasks import held_out_text
        with open(args.held_out_text, "w") as f:
            f.write(held_out_text(EVALUATED, args.held_out_sequences))
        print(f"wrote {args.held_out_text}: {args.held_out_sequences} prompts with answers per task from "
              f"HELM's test split (seed 42) of {', '.join(EVALUATED)}")
        return 0
    if not args.out:
        raise ConfigError("give --out DIR (where to write the checkpoint) or --held-out-text FILE")
    try:
        weights = tuple((t, float(w)) for t, _, w in (item.partition("=") for item in args.task_weights.split(",")))
        shape = DemoModel(arch=args.arch, num_layers=args.layers, hidden=args.hidden, num_heads=args.heads,
                          num_kv_heads=args.kv_heads, ffn=args.ffn)
        cfg = TrainConfig(out_dir=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, threads=args.threads, model=shape, task_weights=weights,
                          seeds_per_task=args.seeds_per_task, init_from=args.init_from,
                          grow_layers=args.grow_layers,
                          answer_weight=args.answer_weight)
        if args.init_from and not os.path.exists(os.path.join(args.init_from, "train_demo.json")):
            raise ValueError(f"--init-from {args.init_from}: not a train-demo checkpoint (no train_demo.json)")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    train(cfg, log=lambda *a, **k: print(*a, **{"flush": True, **k}))
    return 0


def register(subparsers) -> None:
    d = TrainConfig(out_dir="")
    p = subparsers.add_parser("train-demo", help="train the demo's small model on HELM's synthetic reasoning data",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", help="checkpoint directory to write (HF layout)")
    p.add_argument("--arch", choices=("llama", "opt"), default=d.model.arch)
    p.add_argument("--layers", type=int, default=d.model.num_layers)
    p.add_argument("--hidden", type=int, default=d.model.hidden)
    p.add_argument("--heads", type=int, default=d.model.num_heads)
    p.add_argument("--kv-heads", type=int, default=d.model.num_kv_heads, help="key/value heads (llama)")
    p.add_argument("--ffn", type=int, default=d.model.ffn)
    p.add_argument("--init-from", metavar="DIR",
                   help="continue training this train-demo checkpoint (its shape and tokenizer) instead of a new model")
    p.add_argument("--grow-layers", type=int, default=0, metavar="N",
                   help="with --init-from: insert N layers that start as the identity (a deeper model keeps what the parent learned)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seeds-per-task", type=int, default=d.seeds_per_task,
                   help="HELM generator seeds in the training pool (about 11,000 instances each)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (results depend on it)")
    p.add_argument("--answer-weight", type=float, default=d.answer_weight,
                   help="loss weight of answer tokens relative to the other tokens")
    p.add_argument("--task-weights", default=",".join(f"{t}={w}" for t, w in d.task_weights),
                   help=f"share of training sequences per task, TASK=W,... (tasks: {', '.join(TASKS)})")
    p.add_argument("--held-out-text", metavar="FILE",
                   help="instead of training, write held-out text for `flexgen-helm accuracy --text FILE`")
    p.add_argument("--held-out-sequences", type=int, default=8, help="prompts per task in --held-out-text")
    p.set_defaults(func=_main)
