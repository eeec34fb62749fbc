"""The model-family table (btp.families): decoder-LLM stand-ins, their tokenizers, dtypes, and the
shipped model configs' module names."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from btp.errors import ConfigError, ModelLoadError
from btp.families import ARCHS, FAMILIES, family_of_model_type
from btp.models import load_model_and_tokenizer
from btp.tokenizer import base_tokenizer, get_tokenizer

REPO = Path(__file__).resolve().parent.parent
DECODERS = {"llama": (32, "LlamaForCausalLM", "llama"), "mistral": (32, "MistralForCausalLM", "llama"),
            "qwen2": (28, "Qwen2ForCausalLM", "qwen2"), "gptj": (28, "GPTJForCausalLM", "gpt2")}


def _model_yaml(name: str) -> dict:
    data = yaml.safe_load((REPO / "config" / "model" / f"{name}.yaml").read_text())
    return data.get("model", data)


def test_tokenizer_families_use_special_tokens_as_the_real_ones() -> None:
    text = "The mother tongue of Danielle Darrieux is"
    plain = get_tokenizer("gpt2")(text)["input_ids"]
    llama, qwen = get_tokenizer("llama"), get_tokenizer("qwen2")
    assert llama(text)["input_ids"] == [llama.bos_token_id] + plain  # Llama 2 / Mistral: <s> x
    assert llama.convert_ids_to_tokens(llama.bos_token_id) == "<s>"
    assert (llama.eos_token, llama.unk_token, llama.pad_token) == ("</s>", "<unk>", "</s>")
    assert qwen(text)["input_ids"] == plain and qwen.bos_token_id is None  # Qwen2: nothing added
    assert qwen.eos_token == qwen.pad_token == "<|endoftext|>"
    assert {"<|im_start|>", "<|im_end|>"} <= set(qwen.all_special_tokens)
    # the original families keep the trained vocabulary (and so their tiny models' weights)
    assert len(get_tokenizer("gpt2")) == len(get_tokenizer("t5")) == base_tokenizer().get_vocab_size()
    assert len(llama) == len(qwen) == base_tokenizer().get_vocab_size() + 3


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_decoder_stand_ins_keep_the_real_paths(arch: str) -> None:
    layers, cls, tok_family = DECODERS[arch]
    cfg = _model_yaml(f"tiny-{arch}")
    model, tok = load_model_and_tokenizer(cfg, "cpu")
    assert type(model).__name__ == cls and FAMILIES[ARCHS[arch]["family"]].tokenizer == tok_family
    names = dict(model.named_modules())
    assert sum(1 for n in names if n.endswith((".mlp.down_proj", ".mlp.fc_out"))) == layers
    for name in [*cfg["target_modules"], cfg["grace_layer"], cfg["grace_baseline_layer"]]:
        assert isinstance(names[name], nn.Linear), name
    assert model.config.vocab_size == len(tok)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    out = model(**tok(["Paris is the capital of", "x"], return_tensors="pt", padding=True))
    assert out.logits.shape[-1] == len(tok)


@pytest.mark.parametrize("name", ["llama2-7b", "llama3-8b", "qwen2.5-7b", "mistral-7b", "gpt-j-6b",
                                  "smollm2-135m"])
def test_real_configs_name_layers_of_their_architecture(name: str) -> None:
    """Every layer a real config names exists in a model of that architecture and layer count
    (built tiny from the real checkpoint's depth, so the test needs no download)."""
    cfg = _model_yaml(name)
    depth = {"llama2-7b": ("llama", 32), "llama3-8b": ("llama", 32), "qwen2.5-7b": ("qwen2", 28),
             "mistral-7b": ("mistral", 32), "gpt-j-6b": ("gptj", 28), "smollm2-135m": ("llama", 30)}
    arch, layers = depth[name]
    model, _ = load_model_and_tokenizer({"name": name, "kind": "causal_lm",
                                         "tiny": {"arch": arch, "num_layers": layers, "d_model": 16,
                                                  "d_ff": 16, "heads": 2, "kv_heads": 2}}, "cpu")
    names = dict(model.named_modules())
    key = cfg["grace_layer"]
    for target in cfg["target_modules"]:
        assert isinstance(names[target], nn.Linear), target
        # the key layer's FFN sits just below every adapted FFN, in the upper third of the stack
        assert int(target.split(".")[2]) > int(key.split(".")[2]) >= layers * 2 // 3, (target, key)
    assert isinstance(names[cfg["grace_baseline_layer"]], nn.Linear)


def test_default_layers_follow_the_7b_configs() -> None:
    llama = FAMILIES["llama"]
    assert llama.default_layers(32) == (["model.layers.28.mlp.down_proj",
                                         "model.layers.29.mlp.down_proj"],
                                        "model.layers.27.mlp.down_proj")
    assert FAMILIES["qwen2"].default_layers(28)[1] == "model.layers.23.mlp.down_proj"
    assert FAMILIES["gptj"].default_layers(28)[0][0] == "transformer.h.24.mlp.fc_out"
    assert family_of_model_type("mistral") is FAMILIES["mistral"]
    assert family_of_model_type("mamba") is None
    with pytest.raises(ConfigError, match="at least 3 layers"):
        llama.default_layers(2)


def test_residual_scale_on_a_decoder_family() -> None:
    tiny = {"arch": "llama", "num_layers": 2, "d_model": 16, "d_ff": 16, "heads": 2, "kv_heads": 2}
    base, _ = load_model_and_tokenizer({"name": "x", "kind": "causal_lm", "tiny": tiny}, "cpu")
    scaled, _ = load_model_and_tokenizer({"name": "x", "kind": "causal_lm",
                                          "tiny": {**tiny, "residual_scale": 0.5}}, "cpu")
    ref = dict(base.named_parameters())
    changed = {n for n, p in scaled.named_parameters() if not torch.equal(p, ref[n])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (0, 1)
                       for m in ("self_attn.o_proj", "mlp.down_proj")}


def test_dtype_key_and_melo_stays_fp32_under_bf16() -> None:
    """bf16 base weights: the LoRA factors and the database keys stay fp32; an edit trains and a
    routed forward reproduces it, an unrouted one is the base model bit for bit."""
    from peft_melo import MeloConfig, get_melo_model

    cfg = {**_model_yaml("tiny-llama"), "dtype": "bf16"}
    model, tok = load_model_and_tokenizer(cfg, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    reference, _ = load_model_and_tokenizer(cfg, "cpu")
    melo = get_melo_model(model, MeloConfig(target_modules=list(cfg["target_modules"]),
                                            grace_layer=cfg["grace_layer"], num_block=2,
                                            num_rank_per_block=2, init_radius=1e-3, num_iter=5,
                                            edit_lr=5e-2, key_position="last_real"))
    assert all(p.dtype == torch.float32 for _, p in melo.melo_parameters())
    enc = tok(["The mother tongue of Danielle Darrieux is English"], return_tensors="pt")
    result = melo.edit({**enc, "labels": enc["input_ids"].clone()})
    assert result.losses[-1] < result.losses[0]
    assert melo.database.centers.dtype == torch.float32
    other = tok(["Paris is the capital of France"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(melo(**other).logits, reference(**other).logits)
        assert melo(**enc).logits.dtype == torch.bfloat16 and melo.routing.blocks.tolist() == [0]
    with pytest.raises(ConfigError, match="use fp32, bf16 or fp16"):
        load_model_and_tokenizer({**cfg, "dtype": "int8"}, "cpu")


def test_missing_checkpoint_without_network_fails_at_once(monkeypatch) -> None:
    """No HF_HUB_OFFLINE and no reachable hub: one line naming model.pretrained, in seconds."""
    import btp.models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(btp.models, "_hub_reachable", lambda *a: False)
    cfg = {**_model_yaml("llama2-7b"), "pretrained": "meta-llama/Llama-2-7b-not-cached"}
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_model_and_tokenizer(cfg, "cpu")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "model.pretrained=/path" in msg and "no network" in msg and "\n" not in msg


def test_the_family_table_is_consistent() -> None:
    """Every architecture, hint, model config and tokenizer family resolves through the table."""
    from btp.families import ARCH_HINTS, TINY_KEYS
    from btp.tiny import resolve_arch
    from btp.tokenizer import FAMILIES as TOKENIZER_FAMILIES

    for family in FAMILIES.values():
        assert family.tokenizer in TOKENIZER_FAMILIES, family.name
        assert "{i}" in family.layer_path and family.residual_outputs, family.name
        if family.kind == "causal_lm":  # the fact editors' defaults (WISE, MEMIT, AlphaEdit)
            assert family.ffn_out and family.memit_layers and family.wise_layer, family.name
    assert {spec["family"] for spec in ARCHS.values()} <= set(FAMILIES)
    assert set(ARCH_HINTS.values()) <= set(ARCHS)
    for path in sorted((REPO / "config" / "model").glob("*.yaml")):
        cfg = _model_yaml(path.stem)
        if cfg.get("tiny") is None:
            continue
        assert set(cfg["tiny"]) <= TINY_KEYS, path.name
        arch = resolve_arch(dict(cfg["tiny"]), cfg["name"], cfg.get("pretrained") or "")
        assert FAMILIES[ARCHS[arch]["family"]].kind == cfg["kind"], path.name


def test_a_real_checkpoint_never_goes_through_the_tiny_builder(tmp_path, monkeypatch) -> None:
    """A saved stand-in loaded as a checkpoint folder comes back with the same weights while the
    tiny builder is out of reach."""
    import btp.tiny

    tiny = {"arch": "llama", "num_layers": 2, "d_model": 16, "d_ff": 16, "heads": 2, "kv_heads": 2}
    built, tok = load_model_and_tokenizer({"name": "x", "kind": "causal_lm", "tiny": tiny}, "cpu")
    built.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the tiny builder ran for a real checkpoint")

    monkeypatch.setattr(btp.tiny, "load_tiny", refuse)
    monkeypatch.setattr(btp.tiny, "build_tiny_model", refuse)
    loaded, _ = load_model_and_tokenizer({"name": "saved", "kind": "causal_lm",
                                          "pretrained": str(tmp_path)}, "cpu")
    ref = dict(built.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in loaded.named_parameters())
