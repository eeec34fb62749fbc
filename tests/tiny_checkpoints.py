"""Tiny stand-ins of the real checkpoints for the tests (table-driven, as peft's tests).

Each keeps the module paths, layer count and FFN type of the checkpoint it stands for (method.md)
with small widths and random weights, so the shipped target/grace names are checked offline.
The ``build_*`` functions are shared: the adapter tests use their defaults (:data:`CASES`), the
baseline tests (``test_baselines_tiny``) narrower widths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


@dataclass(frozen=True)
class Case:
    """One checkpoint: how to build it, its MELO targets and grace layer, and a batch maker."""

    name: str
    build: Callable[[], torch.nn.Module]
    targets: tuple[str, ...]
    grace_layer: str
    kind: str  # seq2seq | classification | causal_lm


def build_t5(num_layers: int, ffn: str, *, vocab: int = VOCAB, d_model: int = 32, d_ff: int = 48,
             heads: int = 4, seed: int = 0) -> torch.nn.Module:
    """A seeded random T5 (untied head, d_kv 8, dropout 0) with ``num_layers`` + ``num_layers``."""
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_ff=d_ff, d_kv=8, num_heads=heads,
                   num_layers=num_layers, num_decoder_layers=num_layers, feed_forward_proj=ffn,
                   tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def build_bert(*, vocab: int = VOCAB, hidden: int = 32, intermediate: int = 48, heads: int = 4,
               num_labels: int = 5, seed: int = 0, **extra: object) -> torch.nn.Module:
    """A seeded random 12-layer BERT classifier (dropout 0); ``extra`` goes to ``BertConfig``."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=12,
                     num_attention_heads=heads, intermediate_size=intermediate,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=num_labels, max_position_embeddings=64, **extra)
    return BertForSequenceClassification(cfg).eval()


def build_gpt2(*, vocab: int = VOCAB, n_embd: int = 32, heads: int = 4, seed: int = 0,
               **extra: object) -> torch.nn.Module:
    """A seeded random 48-block GPT-2 (Conv1D, dropout 0); ``extra`` goes to ``GPT2Config``."""
    torch.manual_seed(seed)
    ids = {"eos_token_id": 1, "pad_token_id": 1} | extra  # ``extra`` may override the ids
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=48, n_head=heads, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    return GPT2LMHeadModel(cfg).eval()


_DECODERS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def build_decoder(family: str, num_layers: int, *, vocab: int = VOCAB, hidden: int = 32,
                  intermediate: int = 48, heads: int = 4, kv_heads: int = 4, seed: int = 0,
                  **extra: object) -> torch.nn.Module:
    """A seeded random Llama / Mistral / Qwen2 causal LM (gated SiLU FFN, rotary, grouped-query
    attention with ``kv_heads``, untied head) with ``num_layers`` layers; eos = pad = 1."""
    torch.manual_seed(seed)
    config_cls, model_cls = _DECODERS[family]
    cfg = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                     num_hidden_layers=num_layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=hidden // heads,
                     max_position_embeddings=64, attention_dropout=0.0, tie_word_embeddings=False,
                     bos_token_id=2, eos_token_id=1, pad_token_id=1, **extra)
    return model_cls(cfg).eval()


def build_gptj(*, vocab: int = VOCAB, n_embd: int = 32, heads: int = 4, seed: int = 0,
               **extra: object) -> torch.nn.Module:
    """A seeded random 28-block GPT-J (parallel attention + FFN, rotary, Linear layers)."""
    torch.manual_seed(seed)
    cfg = GPTJConfig(vocab_size=vocab, n_embd=n_embd, n_layer=28, n_head=heads, n_positions=64,
                     rotary_dim=2, n_inner=48, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=1, eos_token_id=1, pad_token_id=1, **extra)
    return GPTJForCausalLM(cfg).eval()


T5_WO = "DenseReluDense.wo"
#: MELO's key layer and the two adapted FFNs above it on the decoder LLMs (config/model/*.yaml).
_DOWN = "mlp.down_proj"
CASES = [
    Case("t5-small-ssm-nq", lambda: build_t5(8, "gated-gelu"),
         tuple([f"encoder.block.{i}.layer.1.{T5_WO}" for i in (5, 6)] + [f"decoder.block.{i}.layer.2.{T5_WO}" for i in (5, 6)]),
         f"encoder.block.4.layer.1.{T5_WO}", "seq2seq"),
    Case("t5-large-ssm-nq", lambda: build_t5(24, "relu"),
         tuple([f"encoder.block.{i}.layer.1.DenseReluDense.{w}" for i in (22, 23) for w in ("wi", "wo")]
               + [f"decoder.block.{i}.layer.2.DenseReluDense.{w}" for i in (22, 23) for w in ("wi", "wo")]),
         f"encoder.block.12.layer.1.{T5_WO}", "seq2seq"),
    Case("scotus-bert", build_bert, tuple(f"bert.encoder.layer.{i}.output.dense" for i in (9, 10, 11)),
         "bert.encoder.layer.4.output.dense", "classification"),
    Case("gpt2-xl", build_gpt2, tuple(f"transformer.h.{i}.mlp.c_fc" for i in (36, 37)),
         "transformer.h.35.mlp.c_fc", "causal_lm"),
    # seed 1: at seed 0 the random block happens to leave this stand-in's greedy tokens unchanged
    Case("llama-2-7b", lambda: build_decoder("llama", 32, seed=1),
         tuple(f"model.layers.{i}.{_DOWN}" for i in (28, 29)), f"model.layers.27.{_DOWN}", "causal_lm"),
    Case("qwen2.5-7b", lambda: build_decoder("qwen2", 28, kv_heads=2),
         tuple(f"model.layers.{i}.{_DOWN}" for i in (24, 25)), f"model.layers.23.{_DOWN}", "causal_lm"),
    Case("mistral-7b", lambda: build_decoder("mistral", 32, kv_heads=1, sliding_window=4096),
         tuple(f"model.layers.{i}.{_DOWN}" for i in (28, 29)), f"model.layers.27.{_DOWN}", "causal_lm"),
    Case("gpt-j-6b", build_gptj, tuple(f"transformer.h.{i}.mlp.fc_out" for i in (22, 23)),
         "transformer.h.21.mlp.fc_out", "causal_lm"),
]
CASE_IDS = [c.name for c in CASES]


def make_batch(kind: str, n: int = 4, seq: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """A labelled batch for ``kind`` with right padding on the last rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[n // 2:, seq - 2:] = 0  # some padded rows
    pad = 1 if kind == "causal_lm" else 0
    ids = ids.masked_fill(mask == 0, pad)
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        labels = torch.randint(3, VOCAB, (n, 3), generator=g)
        labels[0, -1] = -100
        batch["labels"] = labels
    elif kind == "classification":
        batch["labels"] = torch.randint(0, 5, (n,), generator=g)
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch
