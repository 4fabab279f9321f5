"""Build small OPT checkpoints offline: random weights from `transformers` and a byte-level BPE
tokenizer trained here with `tokenizers`, saved in the standard HF layout, so that the loading code
real checkpoints go through is the code that runs on them (demo and tests)."""
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


def train_tokenizer(out_dir: str, vocab_size: int, corpus: list[str] | None = None) -> int:
    """OPT-style ids: <s>=0, <pad>=1, </s>=2 (bos and eos), <unk>=3; </s> is prepended like OPT's.
    Learns from `corpus` lines (default: the built-in text) and returns the size of the learned
    vocabulary (at most vocab_size: the corpus may run out of merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus if corpus is not None else _CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", model_max_length=2048)
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


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
    with torch.no_grad():  # random init has tiny std; widen it so logits are not all near-uniform
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
            elif "bias" in name:
                p.normal_(0.0, 0.02)
            else:
                p.normal_(1.0, 0.05)
    kw = {"safe_serialization": fmt == "safetensors"}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kw)
    with open(os.path.join(out_dir, "flexgen_tiny.json"), "w") as f:
        json.dump(cfg.__dict__, f)
    return out_dir


def default_model_dir(root: str = ".cache") -> str:
    """The embedded default model of the demo, built once under root."""
    out = os.path.join(root, "tiny-opt")
    if not os.path.exists(os.path.join(out, "tokenizer.json")):
        build_tiny_checkpoint(out, TinyOPT(num_layers=4, hidden=128, num_heads=4, ffn=512, vocab_size=1024))
    return out
