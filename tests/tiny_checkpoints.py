"""Tiny stand-ins of the real checkpoints for the adapter's tests (table-driven, as peft's tests).

Each keeps the module paths, layer count and FFN type of the checkpoint it stands for (method.md)
with small widths and random weights, so the shipped target/grace names are checked offline.
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


def _t5(num_layers: int, ffn: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=num_layers,
                       num_decoder_layers=num_layers, feed_forward_proj=ffn, tie_word_embeddings=False,
                       dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T5ForConditionalGeneration(cfg).eval()
    return build


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                     intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=5, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=48, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=1, pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


T5_WO = "DenseReluDense.wo"
CASES = [
    Case("t5-small-ssm-nq", _t5(8, "gated-gelu"),
         tuple([f"encoder.block.{i}.layer.1.{T5_WO}" for i in (5, 6)] + [f"decoder.block.{i}.layer.2.{T5_WO}" for i in (5, 6)]),
         f"encoder.block.4.layer.1.{T5_WO}", "seq2seq"),
    Case("t5-large-ssm-nq", _t5(24, "relu"),
         tuple([f"encoder.block.{i}.layer.1.DenseReluDense.{w}" for i in (22, 23) for w in ("wi", "wo")]
               + [f"decoder.block.{i}.layer.2.DenseReluDense.{w}" for i in (22, 23) for w in ("wi", "wo")]),
         f"encoder.block.12.layer.1.{T5_WO}", "seq2seq"),
    Case("scotus-bert", _bert, tuple(f"bert.encoder.layer.{i}.output.dense" for i in (9, 10, 11)),
         "bert.encoder.layer.4.output.dense", "classification"),
    Case("gpt2-xl", _gpt2, tuple(f"transformer.h.{i}.mlp.c_fc" for i in (36, 37)),
         "transformer.h.35.mlp.c_fc", "causal_lm"),
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
