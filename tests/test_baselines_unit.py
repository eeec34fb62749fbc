"""FT, FT+EWC and plain LoRA editors on tiny models (no runner needed)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from btp.editors.base import EDITORS
from btp.editors.ft import FtEditor, FtEwcEditor
from btp.editors.plain_lora import PlainLoraEditor, lora_rank
from btp.errors import ConfigError
from tests.test_baselines_tiny import (  # noqa: F401 - one_thread is a fixture
    causal_batch,
    cls_batch,
    one_thread,
    seq2seq_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_t5,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FT = {"num_iter": 5, "edit_lr": 1e-2, "optimizer": "adam", "batch_size": None}
EWC = {**FT, "lambda_": 100.0, "fisher_n_batches": 2}
LORA = {"r": 4, "alpha": None, "num_iter": 10, "edit_lr": 1e-2, "batch_size": None}

BUILDS = {"t5": (tiny_t5, seq2seq_batch), "bert": (tiny_bert, cls_batch),
          "gpt2": (tiny_gpt2, causal_batch)}


def test_registered() -> None:
    assert EDITORS["ft"] is FtEditor and EDITORS["ft_ewc"] is FtEwcEditor
    assert EDITORS["plain_lora"] is PlainLoraEditor


# ------------------------------------------------------------------------------------- FT
@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_ft_changes_only_target_weights(kind, tmp_path) -> None:
    build, make = BUILDS[kind]
    model, mcfg = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed = FtEditor(model, FT, mcfg)
    b = make(n=2, seed=1)
    res = ed.edit(b)
    assert len(res.losses) == 5 and res.losses[-1] < res.losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(ed.params)
    assert all(t + ".weight" in changed for t in mcfg.target_modules)
    assert not any(p.requires_grad for p in model.parameters())  # frozen again after the edit
    # state round trip into a fresh copy of the unedited model
    model2, _ = build()
    ed2 = FtEditor(model2, FT, mcfg)
    ed2.load_state_dict(ed.state_dict())
    assert torch.equal(ed2.forward(**b).logits, ed.forward(**b).logits)
    ed.save_pretrained(tmp_path)
    model3, _ = build()
    assert FtEditor.load_weights(model3, tmp_path) == sorted(ed.params)
    assert torch.equal(model3(**b).logits, ed.forward(**b).logits)
    assert json.loads((tmp_path / "ft_config.json").read_text())["alg"] == "ft"


def test_ft_rejects_a_target_that_matches_nothing() -> None:
    model, mcfg = tiny_t5()
    mcfg.target_modules = mcfg.target_modules + ["encoder.block.5.layer.1.DenseReluDense.wi"]
    with pytest.raises(ConfigError, match="DenseReluDense.wi"):
        FtEditor(model, FT, mcfg)


def test_ft_generate_t5() -> None:
    model, mcfg = tiny_t5()
    ed = FtEditor(model, FT, mcfg)
    b = seq2seq_batch(n=2)
    out = ed.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_length=5)
    assert out.shape[0] == 2


# ------------------------------------------------------------------------------------- EWC
def _upstream(make, n=3):
    return lambda: iter([make(n=2, seed=100 + i) for i in range(n)])


def test_ft_ewc_fisher_anchor_and_pull_back() -> None:
    model, mcfg = tiny_t5()
    anchor = {k: v.clone() for k, v in FtEditor(model, FT, mcfg).params.items()}
    calls = []

    def upstream():
        calls.append(1)
        return _upstream(seq2seq_batch)()

    ed = FtEwcEditor(model, {**EWC, "lambda_": 1e6}, mcfg, upstream)
    b = seq2seq_batch(n=2, seed=1)
    ed.edit(b)
    ed.edit(b)
    assert len(calls) == 1  # Fisher computed once, before the first edit
    assert ed.ewc is not None and set(ed.ewc.fisher) == set(ed.params)
    assert all(torch.equal(ed.ewc.anchor[k], anchor[k]) for k in anchor)
    assert all((f >= 0).all() for f in ed.ewc.fisher.values())
    assert any((f > 0).any() for f in ed.ewc.fisher.values())
    # the penalty holds the weights nearer the anchor than plain FT does
    model_ft, _ = tiny_t5()
    ft = FtEditor(model_ft, FT, mcfg)
    ft.edit(b)
    ft.edit(b)

    def fisher_dist(e):
        return sum(float((ed.ewc.fisher[k] * (e.params[k] - anchor[k]) ** 2).sum()) for k in anchor)

    assert fisher_dist(ed) < fisher_dist(ft)


def test_ft_ewc_state_round_trip(tmp_path) -> None:
    model, mcfg = tiny_bert()
    ed = FtEwcEditor(model, EWC, mcfg, _upstream(cls_batch))
    pre = ed.state_dict()  # before the first edit: weights + anchor only
    assert any(k.startswith("ewc.anchor_only.") for k in pre)
    b = cls_batch(n=2)
    ed.edit(b)
    state = ed.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model2, _ = tiny_bert()
    ed2 = FtEwcEditor(model2, EWC, mcfg, lambda: pytest.fail("resume must not recompute Fisher"))
    ed2.load_state_dict(state)
    assert ed2.ewc is not None
    assert ed2.penalty().item() == pytest.approx(ed.penalty().item())
    ed2.edit(b)
    ed.edit(b)
    assert torch.equal(ed2.forward(**b).logits, ed.forward(**b).logits)
    ed.save_pretrained(tmp_path)
    assert (tmp_path / "ewc_state.safetensors").exists()


def test_ft_ewc_without_upstream_is_a_config_error() -> None:
    model, mcfg = tiny_t5()
    with pytest.raises(ConfigError, match="upstream"):
        FtEwcEditor(model, EWC, mcfg, None).edit(seq2seq_batch())


# ------------------------------------------------------------------------------ plain LoRA
def test_lora_rank_default_is_melo_total_rank() -> None:
    assert lora_rank({"r": None, "num_block": 20, "num_rank_per_block": 2}) == 40
    assert lora_rank({"r": 8}) == 8
    with pytest.raises(ConfigError, match="plain_lora.r"):
        lora_rank({"r": None})


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_plain_lora_is_peft_lora(kind, tmp_path) -> None:
    build, make = BUILDS[kind]
    model, mcfg = build()
    b = make(n=2, seed=1)
    with torch.no_grad():
        base = model(**b).logits.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ed = PlainLoraEditor(model, LORA, mcfg)
    assert ed.config.fan_in_fan_out is (kind == "gpt2")
    assert torch.equal(ed.forward(**b).logits, base)  # B = 0: identity before editing
    res = ed.edit(b)
    assert len(res.losses) == 10 and res.losses[-1] < res.losses[0]
    assert not torch.equal(ed.forward(**b).logits, base)
    # base weights untouched (names inside peft's wrappers gain ".base_layer")
    inner = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
             for k, v in ed.peft.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(inner[k], v) for k, v in weights.items())
    # the same as an upstream peft LoraModel with the same config and adapter weights
    ref_model, _ = build()
    ref = get_peft_model(ref_model, LoraConfig(r=4, lora_alpha=4, target_modules=mcfg.target_modules,
                                               lora_dropout=0.0, fan_in_fan_out=kind == "gpt2"))
    set_peft_model_state_dict(ref, ed.state_dict())
    with torch.no_grad():
        assert torch.allclose(ref(**b).logits, ed.forward(**b).logits, atol=1e-6)
    # state round trip, and peft's own save/load
    model2, _ = build()
    ed2 = PlainLoraEditor(model2, LORA, mcfg)
    ed2.load_state_dict(ed.state_dict())
    assert torch.equal(ed2.forward(**b).logits, ed.forward(**b).logits)
    ed.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(build()[0], str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, ed.forward(**b).logits)
