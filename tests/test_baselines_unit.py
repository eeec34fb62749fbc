"""FT and FT+EWC as the GRACE repository runs them, and plain LoRA, on tiny models (no runner
needed)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from btp.editors.base import EDITORS
from btp.editors.ewc import fisher_and_anchor
from btp.editors.ft import FtEditor, FtEwcEditor, labels_predicted
from btp.editors.grace import GraceEditor
from btp.editors.plain_lora import PlainLoraEditor, lora_rank
from btp.errors import ConfigError
from btp.schema import MeloCfg
from tests.test_baselines_tiny import (
    causal_batch,
    cls_batch,
    seq2seq_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_t5,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FT = {"num_iter": 5, "edit_lr": 1e-2, "optimizer": "adam", "batch_size": 1,
      "early_stop": "none"}
EWC = {**FT, "lambda_": 0.1, "fisher_n_batches": 2}
LORA = {"r": 4, "alpha": None, "num_iter": 10, "edit_lr": 1e-2, "batch_size": None}

BUILDS = {"t5": (tiny_t5, seq2seq_batch), "bert": (tiny_bert, cls_batch),
          "gpt2": (tiny_gpt2, causal_batch)}
GRACE_LAYERS = {"t5": "encoder.block.4.layer.1.DenseReluDense.wo",
                "bert": "bert.encoder.layer.10.output.dense",
                "gpt2": "transformer.h.35.mlp.c_fc"}


def _wrong(kind: str, model, batch: dict) -> dict:
    """``batch`` with classification labels the model gets wrong (the others always count)."""
    if kind == "bert":
        with torch.no_grad():
            batch["labels"] = (model(**batch).logits.argmax(-1) + 1) % 3
    return batch


def test_registered() -> None:
    assert EDITORS["ft"] is FtEditor and EDITORS["ft_ewc"] is FtEwcEditor
    assert EDITORS["plain_lora"] is PlainLoraEditor


def test_ft_defaults_are_the_repositorys() -> None:
    model, mcfg = tiny_t5()
    ed = FtEditor(model, {}, mcfg)
    assert (ed.edit_lr, ed.num_iter, ed.optimizer, ed.early_stop, ed.error_filter) == \
        (1e-2, 100, "adam", "original", "original")
    ew = FtEwcEditor(tiny_t5()[0], {}, mcfg)
    assert (ew.lambda_, ew.fisher_n_batches, ew.fisher_cumulative, ew.anchor_sum_bug) == \
        (0.1, 10, True, False)


# ------------------------------------------------------------------------------------- FT
@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_ft_trains_only_the_grace_layer_weight(kind, tmp_path) -> None:
    build, make = BUILDS[kind]
    model, mcfg = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ed = FtEditor(model, FT, mcfg)
    weight = f"{GRACE_LAYERS[kind]}.weight"
    assert list(ed.params) == [weight]
    b = _wrong(kind, model, make(n=1, seed=1))
    res = ed.edit(b)
    assert len(res.losses) == 5 and res.losses[-1] < res.losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {weight}  # the bias (BERT) and every other weight are bit-identical
    assert not any(p.requires_grad for p in model.parameters())  # frozen again after the edit
    # state round trip into a fresh copy of the unedited model
    model2, _ = build()
    ed2 = FtEditor(model2, FT, mcfg)
    ed2.load_state_dict(ed.state_dict())
    assert torch.equal(ed2.forward(**b).logits, ed.forward(**b).logits)
    ed.save_pretrained(tmp_path)
    model3, _ = build()
    assert FtEditor.load_weights(model3, tmp_path) == [weight]
    assert torch.equal(model3(**b).logits, ed.forward(**b).logits)
    assert json.loads((tmp_path / "ft_config.json").read_text())["alg"] == "ft"


def test_ft_layer_override_and_bad_layer() -> None:
    model, mcfg = tiny_t5()
    ed = FtEditor(model, {**FT, "layer": "decoder.block.6.layer.2.DenseReluDense.wo"}, mcfg)
    assert list(ed.params) == ["decoder.block.6.layer.2.DenseReluDense.wo.weight"]
    with pytest.raises(ConfigError, match="does not exist"):
        FtEditor(model, {**FT, "layer": "encoder.block.5.layer.1.DenseReluDense.wi"}, mcfg)
    with pytest.raises(ConfigError, match="early_stop"):
        FtEditor(model, {**FT, "early_stop": "sometimes"}, mcfg)


def test_labels_predicted_by_hand() -> None:
    # logits [1, 3, 4]: argmax per position 2, 0, 3
    logits = torch.tensor([[[0, 1, 5, 0], [9, 0, 0, 0], [0, 0, 0, 1.0]]])
    assert labels_predicted(logits, torch.tensor([[2, 0, 3]]))
    assert labels_predicted(logits, torch.tensor([[2, -100, 3]]))  # -100 is no label
    assert not labels_predicted(logits, torch.tensor([[2, 1, 3]]))
    # shifted (causal LM): logits at t against the label at t+1
    assert labels_predicted(logits, torch.tensor([[-100, 2, 0]]), shift=True)
    assert not labels_predicted(logits, torch.tensor([[-100, 2, 0]]))
    # classification: [n, C] against [n]
    assert labels_predicted(torch.tensor([[0.1, 0.9], [2.0, 1.0]]), torch.tensor([1, 0]))
    assert not labels_predicted(torch.tensor([[0.1, 0.9], [2.0, 1.0]]), torch.tensor([1, 1]))


def test_ft_early_stop() -> None:
    model, mcfg = tiny_t5()
    b = seq2seq_batch(n=1, seed=1)
    # labelled with the model's own greedy answer (a fixed point of teacher forcing): it stops
    # before the first step
    with torch.no_grad():
        own = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             max_length=4)[:, 1:]
    assert (own != 1).all()  # no early </s>: every position is a real prediction
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ed = FtEditor(model, {**FT, "num_iter": 100, "early_stop": "original"}, mcfg)
    res = ed.edit({**b, "labels": own})
    assert res.losses == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    # a new label: it trains until every label token is the argmax, then stops (< 100 steps)
    res = ed.edit(b)
    assert 0 < len(res.losses) < 100
    assert labels_predicted(ed.forward(**b).logits, b["labels"])
    # without the early stop: exactly num_iter steps
    ed_none = FtEditor(tiny_t5()[0], {**FT, "num_iter": 7}, mcfg)
    assert len(ed_none.edit(b).losses) == 7


def test_ft_skips_records_the_model_gets_right() -> None:
    model, mcfg = tiny_bert()
    b = cls_batch(n=1, seed=2)
    with torch.no_grad():
        b["labels"] = model(**b).logits.argmax(-1)
    ed = FtEditor(model, FT, mcfg)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert ed.edit(b).losses == [] and ed.skipped == 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    ed_all = FtEditor(model, {**FT, "error_filter": "none"}, mcfg)
    assert len(ed_all.edit(b).losses) == 5


def test_ft_generate_t5() -> None:
    model, mcfg = tiny_t5()
    ed = FtEditor(model, FT, mcfg)
    b = seq2seq_batch(n=2)
    out = ed.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_length=5)
    assert out.shape[0] == 2


# ------------------------------------------------------------------------------------- EWC
def test_ft_ewc_fisher_window_recomputed_at_every_edit() -> None:
    model, mcfg = tiny_t5()
    ed = FtEwcEditor(model, EWC, mcfg)  # no upstream data needed
    name = next(iter(ed.params))
    batches = [seq2seq_batch(n=1, seed=s) for s in (1, 2, 3)]
    for i, b in enumerate(batches):
        w_before = ed.params[name].detach().clone()
        ed.edit(b)
        # the window: the last fisher_n_batches (2) edited batches, the current one included
        assert len(ed.history) == min(i + 1, 2)
        assert torch.equal(ed.history[-1]["labels"], b["labels"])
        # anchor = the weights before this edit; Fisher = the window's at those weights
        assert torch.equal(ed.ewc.anchor[name], w_before)
        probe, _ = tiny_t5()
        with torch.no_grad():
            probe.get_submodule(GRACE_LAYERS["t5"]).weight.copy_(w_before)
        pw = probe.get_submodule(GRACE_LAYERS["t5"]).weight
        pw.requires_grad_(True)
        want, _ = fisher_and_anchor(probe, {name: pw}, ed.history[::-1], 2, torch.device("cpu"))
        assert torch.allclose(ed.ewc.fisher[name], want[name])
    assert torch.equal(ed.history[0]["labels"], batches[1]["labels"])


def test_ft_ewc_pulls_back_towards_the_anchor() -> None:
    model, mcfg = tiny_t5()
    ed = FtEwcEditor(model, {**EWC, "lambda_": 1e6}, mcfg)
    ft = FtEditor(tiny_t5()[0], FT, mcfg)
    anchor = {k: v.detach().clone() for k, v in ed.params.items()}
    b1, b2 = seq2seq_batch(n=1, seed=1), seq2seq_batch(n=1, seed=2)
    for e in (ed, ft):
        e.edit(b1)
    fisher_b2 = None
    for e in (ed, ft):
        e.edit(b2)
        fisher_b2 = ed.ewc.fisher
    assert any((f > 0).any() for f in fisher_b2.values())

    def fisher_dist(e):
        return sum(float((fisher_b2[k] * (e.params[k] - anchor[k]) ** 2).sum()) for k in anchor)

    assert fisher_dist(ed) < fisher_dist(ft)


def test_ft_ewc_state_round_trip(tmp_path) -> None:
    model, mcfg = tiny_bert()
    ed = FtEwcEditor(model, EWC, mcfg)
    b1 = _wrong("bert", model, cls_batch(n=1, seed=2))
    ed.edit(b1)
    state = ed.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.startswith("ewc.hist.0.") for k in state)
    model2, _ = tiny_bert()
    ed2 = FtEwcEditor(model2, EWC, mcfg)
    ed2.load_state_dict(state)
    assert len(ed2.history) == 1 and torch.equal(ed2.history[0]["labels"], b1["labels"])
    b2 = _wrong("bert", model, cls_batch(n=1, seed=5))
    ed2.edit(b2)
    ed.edit(b2)
    assert torch.equal(ed2.forward(**b2).logits, ed.forward(**b2).logits)
    ed.save_pretrained(tmp_path)
    assert (tmp_path / "ewc_state.safetensors").exists()


# ------------------------------------------------------------------------------ plain LoRA
def test_lora_rank_default_is_melo_total_rank() -> None:
    assert lora_rank({"r": None, "num_block": 10, "num_rank_per_block": 3}) == 30
    assert lora_rank({"r": 8}) == 8
    assert lora_rank({"r": None}) == MeloCfg.num_block * MeloCfg.num_rank_per_block  # schema's
    with pytest.raises(ConfigError, match="plain_lora.r"):
        lora_rank({"r": 0})


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


@pytest.mark.parametrize("kind", sorted(BUILDS))
@pytest.mark.parametrize("editor", ["ft", "plain_lora", "grace"])
def test_frozen_prefix_cache_gives_the_uncached_baseline_edit(kind: str, editor: str, caplog) -> None:
    """FT (GRACE's layer), plain LoRA and GRACE's values with the blocks below their trained
    layers cached: the same losses (fp32, relative 1e-5) and weights / codebook as the uncached
    steps."""
    caplog.set_level(logging.DEBUG, logger="peft_melo.prefix_cache")
    build, make = BUILDS[kind]
    configs = {"ft": (FtEditor, FT), "plain_lora": (PlainLoraEditor, LORA),
               "grace": (GraceEditor, {"num_iter": 5, "edit_lr": 1.0})}
    results = {}
    for cached in (True, False):
        torch.manual_seed(0)
        model, mcfg = build()
        b = _wrong(kind, model, make(n=2, seed=1))
        cls, cfg = configs[editor]
        ed = cls(model, {**cfg, "cache_frozen_prefix": cached}, mcfg)
        results[cached] = (ed.edit(b).losses, ed.state_dict())
    cached_blocks = [r.getMessage() for r in caplog.records if "blocks cached" in r.getMessage()]
    assert cached_blocks and " 0 of " not in cached_blocks[0]  # the cached edit skipped blocks
    (on, on_state), (off, off_state) = results[True], results[False]
    assert len(on) == len(off) > 1 and on[-1] < on[0]
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-5, atol=0)
    for key, value in on_state.items():
        torch.testing.assert_close(value, off_state[key], rtol=1e-4, atol=1e-6)
