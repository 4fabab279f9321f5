"""Build small checkpoints of every supported family offline: random weights from `transformers`'
own model classes and a byte-level BPE tokenizer trained here with `tokenizers`, saved in the
standard HF layout, so that the loading code real checkpoints go through is the code that runs on
them (demo and tests)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

# Text the tokenizer learns its merges from: enough English, digits and HELM prompt markup that
# prompts of the offline scenarios tokenize to sensible lengths. Any byte still encodes (byte-level BPE).
_CORPUS = """
The following are multiple choice questions (with answers) about abstract algebra and us foreign policy.
Question: Find the degree for the given field extension Q(sqrt(2)) over Q. Answer: B
Passage: The plaintiff in the case was the company that filed the lawsuit against the city.
Rules: A B C D E F G H I J K L M N O P Q R S T U V W X Y Z = + - * / ( ) , . ; : ? ! ###
If a cat is red and round, then the cat is big. The dog is small. Target: the dog is not red.
Summarize the given document in one sentence. Document: Officials said the storm caused damage
to homes across the north of the country on Monday, and the government will meet on Tuesday.
instance of: a human is a member of the species, a city is an instance of a settlement.
0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2023 zero one two three four five six seven eight nine ten
""" * 4


@dataclass(frozen=True)
class TinyOPT:
    num_layers: int = 2
    hidden: int = 64
    num_heads: int = 4
    ffn: int = 256
    vocab_size: int = 512
    max_positions: int = 2048
    word_embed_proj_dim: int | None = None  # set (e.g. 32) with post_ln=True for an opt-350m-like model
    post_ln: bool = False
    seed: int = 0


def train_tokenizer(out_dir: str, vocab_size: int, bos: str | None = "</s>", corpus: list[str] | None = None) -> int:
    """Ids <s>=0, <pad>=1, </s>=2 (eos), <unk>=3. `bos` is prepended to every prompt: "</s>" like
    OPT's tokenizer, "<s>" like Llama's and Mistral's, None like Qwen's (no BOS). Learns from
    `corpus` lines (default: the built-in text) and returns the size of the learned vocabulary (at
    most vocab_size: the corpus may run out of merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus if corpus is not None else _CORPUS.splitlines(), trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", model_max_length=2048)
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


def _randomize(model, far_norms: bool) -> None:
    """Random init has tiny std; widen it so logits are not all near-uniform. far_norms: norm weights
    drawn in [0.3, 2.5], so a missing or misplaced norm cannot go unnoticed (else around 1)."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
            elif far_norms:
                p.uniform_(0.3, 2.5)
            else:
                p.normal_(1.0, 0.05)


def build_tiny_checkpoint(out_dir: str, cfg: TinyOPT = TinyOPT(), *, fmt: str = "safetensors",
                          max_shard_size: str | None = None, tokenizer: bool = True) -> str:
    """Write a random OPT checkpoint (+ tokenizer) to out_dir and return it.

    fmt: "safetensors" or "bin"; max_shard_size (e.g. "20KB") writes a sharded checkpoint with an index.
    """
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    # the model's vocabulary is the tokenizer's, so every id the model can emit decodes to text
    vocab = train_tokenizer(out_dir, cfg.vocab_size) if tokenizer else cfg.vocab_size
    config = OPTConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.num_layers,
        ffn_dim=cfg.ffn, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
        word_embed_proj_dim=cfg.word_embed_proj_dim or cfg.hidden, do_layer_norm_before=not cfg.post_ln,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, torch_dtype="float32")
    torch.manual_seed(cfg.seed)
    model = OPTForCausalLM(config).eval()
    _randomize(model, far_norms=False)
    kw = {"safe_serialization": fmt == "safetensors"}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kw)
    with open(os.path.join(out_dir, "flexgen_tiny.json"), "w") as f:
        json.dump(cfg.__dict__, f)
    return out_dir


DEMO_MODEL = "demo-model"  # its deployment name: flexgen/demo-model (and flexgen/demo-model-4bit)


def demo_model_dir() -> str:
    """The demo's default model: a small Llama trained by `flexgen-helm train-demo` on HELM's
    synthetic-reasoning generators, shipped with the package (safetensors + tokenizer, HF layout)."""
    from importlib import resources
    path = str(resources.files("flexgen_helm").joinpath("data", DEMO_MODEL))
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        from .engine.config import ConfigError
        raise ConfigError(f"the demo model is missing from {path}: reinstall the package, or rebuild it with "
                          f"`flexgen-helm train-demo --out {path}`")
    return path


# Tiny configs of the other families: GQA, a sliding window shorter than test prompts, tied and
# untied heads, biases, q/k norms, head_dim != hidden/heads and llama3 rope scaling all occur.
TINY_FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64},
                  tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama-tied": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=1, intermediate_size=96, head_dim=16, attention_bias=True,
                       mlp_bias=True, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 10000.0}),
    "mistral": dict(model_type="mistral", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, sliding_window=5, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 32}, max_position_embeddings=128),
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=128, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
_BOS = {"llama": "<s>", "mistral": "<s>", "qwen2": None, "qwen3": None}


def build_tiny_family(out_dir: str, variant: str, *, seed: int = 0, tokenizer: bool = True, vocab_size: int = 512,
                      legacy_rope_keys: bool = False, **overrides) -> str:
    """A random checkpoint of TINY_FAMILIES[variant] saved by transformers itself (safetensors).

    legacy_rope_keys rewrites config.json with `rope_theta` + `rope_scaling`, as older hub files are.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY_FAMILIES[variant], **overrides}
    model_type = cfg.pop("model_type")
    os.makedirs(out_dir, exist_ok=True)
    bos = _BOS[model_type]
    vocab = train_tokenizer(out_dir, vocab_size, bos=bos) if tokenizer else vocab_size
    config = AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=1, eos_token_id=2,
                                  bos_token_id=0 if bos == "<s>" else None, attention_dropout=0.0, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    _randomize(model, far_norms=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if legacy_rope_keys:
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            saved = json.load(f)
        rp = dict(saved.pop("rope_parameters"))
        saved["rope_theta"] = rp.pop("rope_theta")
        if rp.get("rope_type", "default") != "default":
            rp["type"] = rp.pop("rope_type")
            saved["rope_scaling"] = rp
        with open(path, "w") as f:
            json.dump(saved, f, indent=2)
    return out_dir
