"""Tiny HF models with the real checkpoints' module paths, for the baseline editors' tests.

Built with tests/tiny_checkpoints.py's builders (not btp.models) so the editor unit tests run
without the runner, at narrower widths than the adapter tests; the sanity tests below only check
that the stand-ins have the paths the editors are configured with.
Other baseline test modules import the builders from this file.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.tiny_checkpoints import build_bert, build_gpt2, build_t5

T5_TARGETS = [
    "encoder.block.5.layer.1.DenseReluDense.wo",
    "encoder.block.6.layer.1.DenseReluDense.wo",
    "decoder.block.5.layer.2.DenseReluDense.wo",
    "decoder.block.6.layer.2.DenseReluDense.wo",
]
BERT_TARGETS = [f"bert.encoder.layer.{i}.output.dense" for i in (9, 10, 11)]
GPT2_TARGETS = ["transformer.h.36.mlp.c_fc", "transformer.h.37.mlp.c_fc"]


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_t5(seed: int = 0) -> tuple[torch.nn.Module, SimpleNamespace]:
    """T5 v1.1-style (gated-gelu, 8+8 blocks, untied) with d_model 16."""
    model = _freeze(build_t5(8, "gated-gelu", vocab=48, d_model=16, d_ff=32, heads=2, seed=seed))
    mcfg = SimpleNamespace(target_modules=list(T5_TARGETS),
                           grace_layer="encoder.block.4.layer.1.DenseReluDense.wo")
    return model, mcfg


def tiny_bert(seed: int = 0, num_labels: int = 3) -> tuple[torch.nn.Module, SimpleNamespace]:
    """12-layer BERT sequence classifier with hidden size 16."""
    model = _freeze(build_bert(vocab=48, hidden=16, intermediate=32, heads=2,
                               num_labels=num_labels, seed=seed, pad_token_id=0,
                               initializer_range=0.3))  # default 0.02: ~0 logits and gradients
    mcfg = SimpleNamespace(target_modules=list(BERT_TARGETS),
                           grace_layer="bert.encoder.layer.4.output.dense")
    return model, mcfg


def tiny_gpt2(seed: int = 0) -> tuple[torch.nn.Module, SimpleNamespace]:
    """48-layer GPT-2 (Conv1D MLPs) with n_embd 16."""
    model = _freeze(build_gpt2(vocab=48, n_embd=16, heads=2, seed=seed, pad_token_id=0,
                               bos_token_id=1))
    mcfg = SimpleNamespace(target_modules=list(GPT2_TARGETS),
                           grace_layer="transformer.h.35.mlp.c_fc")
    return model, mcfg


def seq2seq_batch(n: int = 2, length: int = 6, label_len: int = 3, seed: int = 1,
                  pad_last: bool = True) -> dict[str, torch.Tensor]:
    """Random T5 inputs (ids >= 2, eos at the end), right-padded like the collator."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 48, (n, length), generator=g)
    ids[:, -1] = 1
    am = torch.ones_like(ids)
    if pad_last and n > 1:  # make the first row shorter: its last positions are pads
        ids[0, -2:] = 0
        ids[0, -3] = 1
        am[0, -2:] = 0
    labels = torch.randint(2, 48, (n, label_len), generator=g)
    labels[:, -1] = 1
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def cls_batch(n: int = 2, length: int = 6, seed: int = 1, num_labels: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 48, (n, length), generator=g)
    am = torch.ones_like(ids)
    if n > 1:
        ids[0, -2:] = 0
        am[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": am,
            "labels": torch.randint(0, num_labels, (n,), generator=g)}


def causal_batch(n: int = 2, prompt_len: int = 4, label_len: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """"prompt label<eos>" rows, right-padded; labels -100 on prompt and pads."""
    g = torch.Generator().manual_seed(seed)
    length = prompt_len + label_len + 1
    ids = torch.randint(2, 48, (n, length), generator=g)
    ids[:, prompt_len + label_len] = 1
    am = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    if n > 1:  # shorter first row: one pad at the end
        ids[0, -1] = 0
        ids[0, -2] = 1
        am[0, -1] = 0
        labels[0, -1] = -100
        labels[0, -2] = 1
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


@pytest.mark.parametrize("build", [tiny_t5, tiny_bert, tiny_gpt2])
def test_tiny_models_have_the_configured_paths(build) -> None:
    model, mcfg = build()
    names = dict(model.named_modules())
    assert mcfg.grace_layer in names
    assert all(t in names for t in mcfg.target_modules)
    assert not any(p.requires_grad for p in model.parameters())
