"""The offline tokenizer and the model loading (tiny stand-ins; hub ids fail fast offline)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.pytorch_utils import Conv1D

from btp.errors import ConfigError, ModelLoadError
from btp.models import load_model_and_tokenizer, zero_dropout
from btp.tokenizer import (
    ASSET_PATH,
    SPECIAL_IDS,
    base_tokenizer,
    build_tokenizer,
    corpus_texts,
    get_tokenizer,
)

# --------------------------------------------------------------------------- tokenizer


def test_special_ids_per_family() -> None:
    t5, bert, gpt2 = get_tokenizer("t5"), get_tokenizer("bert"), get_tokenizer("gpt2")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert (bert.pad_token_id, bert.unk_token_id, bert.cls_token_id, bert.sep_token_id,
            bert.mask_token_id) == (3, 4, 5, 6, 7)
    assert gpt2.eos_token_id == gpt2.pad_token_id == gpt2.bos_token_id == 8
    assert len(t5) == len(bert) == len(gpt2) == base_tokenizer().get_vocab_size()
    # a model kind names no tokenizer (a causal LM may be GPT-2, Llama or Qwen2): refused
    with pytest.raises(ValueError, match="unknown tokenizer family 'causal_lm'"):
        get_tokenizer("causal_lm")


def test_post_processors() -> None:
    text = "Who won the 1979 World Series?"
    plain = get_tokenizer("gpt2")(text)["input_ids"]
    assert 8 not in plain
    assert get_tokenizer("t5")(text)["input_ids"] == plain + [1]
    assert get_tokenizer("bert")(text)["input_ids"] == [5] + plain + [6]
    assert get_tokenizer("gpt2").decode(plain) == text  # byte-level: lossless round trip
    assert get_tokenizer("t5").unk_token_id not in get_tokenizer("t5")("Ünïcødé ✓")["input_ids"]


def test_tokenizer_build_is_deterministic(sample_dir: Path) -> None:
    texts = corpus_texts(sample_dir)
    assert len(texts) > 1000
    a = build_tokenizer(texts, vocab_size=2000).to_str()
    b = build_tokenizer(texts, vocab_size=2000).to_str()
    assert a == b
    tok = build_tokenizer(texts[:200], vocab_size=500)
    assert [tok.token_to_id(t) for t in SPECIAL_IDS] == list(SPECIAL_IDS.values())
    assert ASSET_PATH.is_file() and base_tokenizer().get_vocab_size() == 6000


# --------------------------------------------------------------------------- tiny models


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def test_tiny_t5small_paths(tiny_model) -> None:
    model, tok = tiny_model("t5small")
    names = module_names(model)
    assert len(model.encoder.block) == len(model.decoder.block) == 8
    for side, ffn in (("encoder", 1), ("decoder", 2)):
        for i in (4, 5, 6):
            base = f"{side}.block.{i}.layer.{ffn}.DenseReluDense"
            assert isinstance(names[f"{base}.wo"], nn.Linear)
            assert f"{base}.wi_0" in names and f"{base}.wi_1" in names and f"{base}.wi" not in names
    # Untied like T5 v1.1: a separate lm_head and no decoder-output scaling.
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    assert getattr(model.config, "scale_decoder_outputs", False) is False
    assert model.config.vocab_size == len(tok) and model.config.decoder_start_token_id == 0


def test_tiny_t5large_paths(tiny_model) -> None:
    model, _ = tiny_model("t5large")
    names = module_names(model)
    assert len(model.encoder.block) == len(model.decoder.block) == 24
    for name in ("encoder.block.12.layer.1.DenseReluDense.wo", "encoder.block.22.layer.1.DenseReluDense.wi",
                 "decoder.block.23.layer.2.DenseReluDense.wi", "decoder.block.23.layer.2.DenseReluDense.wo"):
        assert isinstance(names[name], nn.Linear), name
    assert "encoder.block.22.layer.1.DenseReluDense.wi_0" not in names
    assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()  # T5 v1.0: tied


def test_tiny_bert_paths(tiny_model) -> None:
    model, tok = tiny_model("scotus-bert")
    names = module_names(model)
    assert len(model.bert.encoder.layer) == 12
    for i in (4, 9, 10, 11):
        assert isinstance(names[f"bert.encoder.layer.{i}.output.dense"], nn.Linear)
    assert "bert.encoder.layer.12.output.dense" not in names
    assert model.config.num_labels == 14
    batch = tok(["a case"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 14)


def test_tiny_gpt2_paths(tiny_model) -> None:
    model, tok = tiny_model("gpt2xl")
    names = module_names(model)
    assert len(model.transformer.h) == 48
    for i in (35, 36, 37, 47):
        assert isinstance(names[f"transformer.h.{i}.mlp.c_fc"], Conv1D)
    # Conv1D stores weight as (in, out): the fan_in_fan_out case of the adapter.
    assert names["transformer.h.36.mlp.c_fc"].weight.shape == (64, 256)
    assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize("arch", ["t5small", "t5large", "scotus-bert", "gpt2xl"])
def test_tiny_models_frozen_eval_no_dropout(tiny_model, arch: str) -> None:
    model, _ = tiny_model(arch)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    for key, value in model.config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            assert value == 0.0, key
    for m in model.modules():
        for key, value in vars(m).items():
            if "dropout" in key and isinstance(value, float):
                assert value == 0.0, (type(m).__name__, key)


def test_train_mode_forward_is_deterministic(tiny_model) -> None:
    model, tok = tiny_model("t5small")
    batch = tok(["What university did Watts Humphrey attend?"], return_tensors="pt")
    labels = tok(["Illinois Institute of Technology"], return_tensors="pt")["input_ids"]
    model.train()
    try:
        a = model(**batch, labels=labels).logits
        b = model(**batch, labels=labels).logits
    finally:
        model.eval()
    assert torch.equal(a, b)


def test_zero_dropout_on_a_dropout_model() -> None:
    model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_ff=16, d_kv=4,
                                                num_heads=2, num_layers=1, dropout_rate=0.3))
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())
    zero_dropout(model)
    assert model.config.dropout_rate == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert model.encoder.block[0].layer[0].SelfAttention.dropout == 0.0


def test_tiny_seeded_and_dictconfig() -> None:
    cfg = OmegaConf.create({"name": "tiny-scotus-bert", "kind": "classification",
                            "tiny": {"d_model": 32, "d_ff": 64, "heads": 2}, "num_labels": 5})
    a, _ = load_model_and_tokenizer(cfg, "cpu")
    b, _ = load_model_and_tokenizer(cfg, "cpu")
    c, _ = load_model_and_tokenizer(cfg, "cpu", seed=1)
    wa, wb, wc = (m.bert.encoder.layer[4].output.dense.weight for m in (a, b, c))
    assert wa.shape == (32, 64) and torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.num_labels == 5
    before = torch.rand(1)
    torch.manual_seed(123)
    x = torch.rand(1)
    torch.manual_seed(123)
    load_model_and_tokenizer(cfg, "cpu")
    assert torch.equal(torch.rand(1), x) and before.shape == (1,)  # global RNG untouched


@pytest.mark.parametrize("arch,kind", [("gpt2xl", "causal_lm"), ("scotus-bert", "classification"),
                                       ("t5small", "seq2seq")])
def test_tiny_initializer_range(arch: str, kind: str) -> None:
    """``tiny.initializer_range`` scales the init: BERT/GPT-2 std, T5 ``initializer_factor``."""
    def weight_std(scale: float | None) -> float:
        tiny = {"arch": arch, "d_model": 32, "d_ff": 64, "heads": 2, "num_layers": 2}
        if scale is not None:
            tiny["initializer_range"] = scale
        model, _ = load_model_and_tokenizer({"name": "x", "kind": kind, "tiny": tiny}, "cpu")
        emb = model.get_input_embeddings().weight
        if arch == "t5small":
            assert model.config.initializer_factor == (1.0 if scale is None else scale)
            assert model.lm_head.weight.std().item() == pytest.approx(emb.std().item(), rel=0.1)
        else:
            assert model.config.initializer_range == (0.02 if scale is None else scale)
        return emb.std().item()

    default = weight_std(None)
    scaled = weight_std(0.2 if arch != "t5small" else 0.1)  # 10x GPT-2/BERT's 0.02, T5 1/10
    assert scaled == pytest.approx(default * (10 if arch != "t5small" else 0.1), rel=0.05)


@pytest.mark.parametrize("arch,kind,expected", [
    ("t5large", "seq2seq", {"encoder.block.0.layer.0.SelfAttention.o",
                            "encoder.block.1.layer.1.DenseReluDense.wo",
                            "decoder.block.0.layer.0.SelfAttention.o",
                            "decoder.block.1.layer.2.DenseReluDense.wo"}),
    ("scotus-bert", "classification", {"bert.encoder.layer.0.attention.output.dense",
                                       "bert.encoder.layer.1.output.dense"}),
    ("gpt2xl", "causal_lm", {"transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_proj"}),
])
def test_tiny_residual_scale(arch: str, kind: str, expected: set[str]) -> None:
    """``tiny.residual_scale`` multiplies exactly the residual branches' output projections."""
    tiny = {"arch": arch, "d_model": 32, "d_ff": 64, "heads": 2, "num_layers": 2}
    base, _ = load_model_and_tokenizer({"name": "x", "kind": kind, "tiny": tiny}, "cpu")
    scaled, _ = load_model_and_tokenizer(
        {"name": "x", "kind": kind, "tiny": {**tiny, "residual_scale": 0.1}}, "cpu")
    base_w = dict(base.named_parameters())
    changed = set()
    for name, weight in scaled.named_parameters():
        if torch.equal(weight, base_w[name]):
            continue
        assert name.endswith(".weight"), f"{name} changed (biases stay)"
        torch.testing.assert_close(weight, base_w[name] * 0.1)
        changed.add(name[: -len(".weight")])
    assert expected <= changed
    n_layers = 2 * (2 if arch == "t5large" else 1)  # T5: encoder and decoder stacks
    assert len(changed) == 2 * n_layers, sorted(changed)  # attention out + FFN out per layer
    if arch == "t5large":  # cross-attention is not a residual branch we scale
        assert not any("EncDecAttention" in name for name in changed)
    with pytest.raises(ConfigError, match="residual_scale must be > 0"):
        load_model_and_tokenizer({"name": "x", "kind": kind,
                                  "tiny": {**tiny, "residual_scale": 0.0}}, "cpu")


def test_tiny_arch_from_tiny_key_and_errors() -> None:
    cfg = {"name": "my-model", "kind": "seq2seq", "tiny": {"arch": "t5small", "d_model": 16,
                                                            "d_ff": 32, "heads": 2}}
    model, _ = load_model_and_tokenizer(cfg, "cpu")
    assert len(model.encoder.block) == 8
    with pytest.raises(ConfigError, match="unknown key"):
        load_model_and_tokenizer({**cfg, "tiny": {"arch": "t5small", "width": 3}}, "cpu")
    with pytest.raises(ConfigError, match="model.tiny.arch"):
        load_model_and_tokenizer({**cfg, "tiny": {}}, "cpu")
    with pytest.raises(ConfigError, match="not causal_lm"):
        load_model_and_tokenizer({**cfg, "kind": "causal_lm"}, "cpu")
    with pytest.raises(ConfigError, match="model.kind"):
        load_model_and_tokenizer({**cfg, "kind": "vision"}, "cpu")


@pytest.mark.parametrize("ident", ["google/t5-small-ssm-nq", "tomh/gpt2xl-grace"])
def test_hub_id_offline_raises_fast(monkeypatch, ident: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"name": "real", "kind": "seq2seq", "pretrained": ident, "tiny": None}
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_model_and_tokenizer(cfg, "cpu")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert ident in msg and "no network" in msg and "tiny-*" in msg and "\n" not in msg


def test_bad_local_path_says_local(tmp_path: Path) -> None:
    cfg = {"name": "real", "kind": "causal_lm", "pretrained": str(tmp_path)}
    with pytest.raises(ModelLoadError, match="local path"):
        load_model_and_tokenizer(cfg, "cpu")
