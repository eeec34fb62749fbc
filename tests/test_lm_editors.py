"""WISE, MEMIT and AlphaEdit: each method's defining property, on small decoder stand-ins.

* WISE leaves the main memory (every weight of the model) bit-identical, and its routing sends
  inputs far from the edits (upstream text) to the main memory: their outputs are the unedited
  model's, bit for bit, while the edit itself is routed to the side memory.
* MEMIT's update maps each edit's key to its target value: after an edit the hidden state at the
  last edited layer reaches the target ``z`` found for it; the closed form solves the
  least-squares problem exactly when the statistics' weight goes to zero.
* AlphaEdit's update leaves the preserved keys' outputs unchanged (``||dW K0||`` tiny) where
  MEMIT's, for the same edit, does not; the keys of earlier edits are kept in its cache.
* TIES merging keeps agreeing changes and drops the minority sign.

The models are tiny Llama stand-ins (8 layers, widths 32/64) with the real module paths.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from btp.data.facts import fact, fact_batch
from btp.editors.alphaedit import AlphaEditEditor, alphaedit_delta, null_space_projection
from btp.editors.lm_edit import (Capture, block_of, decode_facts, default_memit_layers,
                                 default_wise_layer, last_prompt_positions, read_corpus,
                                 templated_batch)
from btp.editors.memit import MemitEditor, memit_delta
from btp.editors.wise import WiseEditor, ties_merge
from btp.models import load_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
#: A small Llama: 8 layers keep the tests fast; the residual scale keeps inputs apart in the
#: residual stream (a deep random stack at the default init maps every input to nearly one).
MODEL_CFG = {"name": "tiny-llama-test", "kind": "causal_lm",
             "tiny": {"arch": "llama", "num_layers": 8, "d_model": 32, "d_ff": 512, "heads": 4,
                      "kv_heads": 4, "initializer_range": 0.2, "residual_scale": 0.3}}
FACTS = [("The mother tongue of Danielle Darrieux is", "English"),
         ("The official religion of Edwin of Northumbria is", "Islam")]
UPSTREAM = ["nq question: who played desmond doss father in hacksaw ridge",
            "nq question: types of skiing in the winter olympics 2018",
            "nq question: where does aarp fall on the political spectrum",
            "nq question: who sang nice day for a white wedding"]


def _model():
    return load_model_and_tokenizer(MODEL_CFG, "cpu", seed=0)


def _batch(tok, pairs):
    return fact_batch(tok, [fact(p, t) for p, t in pairs], 64)


# --------------------------------------------------------------------------------- shared pieces
def test_default_layers_follow_the_authors_configs() -> None:
    model, _ = _model()
    assert default_wise_layer(model) == "model.layers.7.mlp.down_proj"  # 27 of 32 -> 7 of 8
    assert default_memit_layers(model) == [f"model.layers.{i}.mlp.down_proj" for i in (1, 2)]
    big, _ = load_model_and_tokenizer({"name": "tiny-llama", "kind": "causal_lm",
                                       "tiny": {"arch": "llama"}}, "cpu")
    assert default_wise_layer(big) == "model.layers.27.mlp.down_proj"
    assert default_memit_layers(big) == [f"model.layers.{i}.mlp.down_proj" for i in range(4, 9)]
    assert block_of("model.layers.8.mlp.down_proj") == "model.layers.8"
    assert block_of("transformer.h.17.mlp.c_proj") == "transformer.h.17"


def test_facts_round_trip_and_templates() -> None:
    _, tok = _model()
    batch = _batch(tok, FACTS)
    assert decode_facts(batch, tok) == FACTS
    rows, owner = templated_batch(tok, FACTS, ["{}", "Yes indeed. {}"])
    assert owner.tolist() == [0, 0, 1, 1] and rows["input_ids"].shape[0] == 4
    pos = last_prompt_positions(rows)
    # the key token is the last prompt token: the next one is the target's first
    for i in range(4):
        assert rows["labels"][i, pos[i]] == -100 and rows["labels"][i, pos[i] + 1] != -100
    assert len(read_corpus(DATA / "openwebtext")) == 4


def test_ties_merge_trims_elects_and_averages() -> None:
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, -1.0, 0.0])
    b = torch.tensor([3.0, -4.0, -1.0, 0.0])
    merged = ties_merge(base, [a, b], [0.5, 0.5], density=1.0)
    # entry 0: both +, mean 2; entry 1: sum -1 -> "-" elected, only b counts; 2: both -1; 3: 0
    assert merged.tolist() == [2.0, -4.0, -1.0, 0.0]
    c = torch.tensor([1.0, 3.0, -2.0, 0.5])
    trimmed = ties_merge(base, [c], [1.0], density=0.5)  # keeps the 2 largest changes
    assert trimmed.tolist() == [0.0, 3.0, -2.0, 0.0]


# ------------------------------------------------------------------------------------------ WISE
WISE_CFG = {"num_iter": 25, "context_templates": False, "save_freq": 2, "merge_freq": 2}


@pytest.fixture(scope="module")
def wise_run():
    """Two edits with WISE (a shard of 2 edits, merged after the second): the editor, the
    model's state before editing, and the upstream batch's logits before editing (one thread,
    as the tests compare them under: another thread count sums in another order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    up = _batch(tok, [(u, "yes") for u in UPSTREAM])
    with torch.no_grad():
        up_logits = model(input_ids=up["input_ids"], attention_mask=up["attention_mask"]).logits
    ed = WiseEditor(model, WISE_CFG, MODEL_CFG)
    ed.attach_tokenizer(tok, DATA)
    for pair in FACTS:
        ed.edit(_batch(tok, [pair]))
    yield ed, tok, before, up, up_logits
    torch.set_num_threads(threads)


def test_wise_leaves_the_main_memory_bit_identical(wise_run) -> None:
    ed, _, before, _, _ = wise_run
    after = ed.base_model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ed.count == 2 and len(ed.merged) == 1 and not ed.saved  # merged at merge_freq
    side = ed.merged[0][0]
    assert not torch.equal(side, ed.layer.weight.float())  # the side memory did change


def test_wise_routes_upstream_to_the_main_memory(wise_run) -> None:
    ed, tok, _, up, up_logits = wise_run
    route = ed.route_rows(input_ids=up["input_ids"], attention_mask=up["attention_mask"])
    assert route.tolist() == [-1] * len(UPSTREAM)
    out = ed.forward(input_ids=up["input_ids"], attention_mask=up["attention_mask"]).logits
    assert torch.equal(out, up_logits)  # the main memory's output, bit for bit
    edits = _batch(tok, FACTS)
    assert (ed.route_rows(input_ids=edits["input_ids"],
                          attention_mask=edits["attention_mask"]) == 0).all()


def test_wise_state_round_trip(wise_run, tmp_path: Path) -> None:
    ed, tok, _, up, _ = wise_run
    model2, _ = _model()  # the same seeded weights, a separate module tree (and hook)
    other = WiseEditor(model2, WISE_CFG, MODEL_CFG)
    other.attach_tokenizer(tok, DATA)
    other.load_state_dict(ed.state_dict())
    assert other.count == ed.count and other.templates == ed.templates
    for batch in (up, _batch(tok, FACTS)):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        assert torch.equal(ed.forward(**inputs).logits, other.forward(**inputs).logits)
    other.save_pretrained(tmp_path)
    assert (tmp_path / "wise_memory.safetensors").is_file()


# ----------------------------------------------------------------------------------------- MEMIT
def test_memit_closed_form_maps_keys_to_values() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 10, generator=g)
    resid = torch.randn(3, 6, generator=g)
    mom2 = torch.eye(10)
    delta = memit_delta(resid, keys, mom2, 1e-8)  # lambda -> 0: exact for n < d_in
    assert torch.allclose(keys @ delta.T, resid, atol=1e-4)
    # with the statistics' weight the update is the regularized solution, smaller in norm
    assert memit_delta(resid, keys, mom2, 10.0).norm() < delta.norm()


def _memit_cfg(tmp_path: Path, **extra):
    return {"layers": ["model.layers.3.mlp.down_proj"], "context_templates": False,
            "v_num_grad_steps": 25, "stats_dir": str(tmp_path / "stats"), **extra}


def test_memit_edit_reaches_its_target_hidden_state(tmp_path: Path) -> None:
    """One edited layer: the hidden state after that layer at the key token moves to z."""
    model, tok = _model()
    ed = MemitEditor(model, _memit_cfg(tmp_path, mom2_update_weight=1e-4), MODEL_CFG)
    ed.attach_tokenizer(tok, DATA)
    before = ed.hidden_at_z(FACTS)
    z = torch.stack([ed.target(f)[0] for f in FACTS])
    assert (z - before).norm(dim=1).min() > 1e-2  # there is something to write
    ed.edit(_batch(tok, FACTS))
    after = ed.hidden_at_z(FACTS)
    err = (after - z).norm(dim=1) / (z - before).norm(dim=1)
    assert err.max() < 0.05, err
    # the statistics were cached and are reused by the next editor
    files = list((tmp_path / "stats").rglob("*.safetensors"))
    assert len(files) == 1
    again = MemitEditor(model, _memit_cfg(tmp_path), MODEL_CFG)
    again.attach_tokenizer(tok, DATA)
    assert torch.equal(again.mom2["model.layers.3.mlp.down_proj"].cpu(),
                       ed.mom2["model.layers.3.mlp.down_proj"].cpu())


# ------------------------------------------------------------------------------------- AlphaEdit
def test_alphaedit_update_spares_the_preserved_keys_memit_moves() -> None:
    """The update rules alone. Preserved keys K0 span 8 of 16 directions (graded variances);
    the statistics add a small isotropic part (the rest of a corpus), so MEMIT's are full rank
    and the other 8 directions are AlphaEdit's null space. Two edit keys near K0. Both updates
    write most of the residual; MEMIT's moves the preserved keys' outputs, AlphaEdit's does not."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    k0 = (torch.randn(500, 8, generator=g) * torch.logspace(-1, 0.5, 8)) @ basis[:, :8].T
    mom2 = k0.T @ k0 / 500 + 1e-2 * torch.eye(16)
    proj, rank = null_space_projection(mom2, 1.5e-2)
    assert rank == 8 and (k0 @ proj).norm() < 1e-5 * k0.norm()
    keys = k0[:2] + 0.1 * torch.randn(2, 16, generator=g)
    resid = torch.randn(2, 5, generator=g)
    memit = memit_delta(resid, keys, mom2, 1.0)
    alpha = alphaedit_delta(resid, keys, proj, torch.zeros(16, 16), 1e-2)

    def moved(delta: torch.Tensor) -> float:  # ||dW K0|| relative to ||dW|| ||K0||
        return float((k0 @ delta.T).norm() / (delta.norm() * k0.norm()))

    def write_error(delta: torch.Tensor) -> float:
        return float((keys @ delta.T - resid).norm() / resid.norm())

    assert moved(alpha) < 1e-5 and moved(memit) > 1e-2
    assert write_error(memit) < 0.2 and write_error(alpha) < 0.2


def test_alphaedit_edit_stays_in_the_null_space(tmp_path: Path) -> None:
    """Through the editor: statistics of a short text (its keys K0 leave most directions free).
    AlphaEdit's update of the layer lies in the null space, ``||dW K0||`` ~ 0, and is kept in its
    key cache; MEMIT (statistics of the OpenWebText sample) moves those keys' outputs."""
    corpus = tmp_path / "preserved.txt"
    corpus.write_text("The capital of France is Paris.\nWater boils at one hundred degrees.\n")
    layer = "model.layers.3.mlp.down_proj"
    deltas, eds = {}, {}
    for cls, stats in ((MemitEditor, str(DATA / "openwebtext")), (AlphaEditEditor, str(corpus))):
        model, tok = _model()
        ed = cls(model, _memit_cfg(tmp_path, stats_corpus=stats), MODEL_CFG)
        ed.attach_tokenizer(tok, DATA)
        w = model.get_submodule(layer).weight.detach().clone()
        ed.edit(_batch(tok, FACTS[:1]))
        deltas[cls.name] = model.get_submodule(layer).weight.detach() - w
        eds[cls.name] = ed
    enc = tok(read_corpus(corpus), padding=True, return_tensors="pt")
    model = eds["memit"].base_model
    with torch.no_grad(), Capture(model, [layer], "input") as cap:
        model(**enc)  # the edit changed no layer below this one: these are the preserved keys
    k0 = cap.values[layer][enc["attention_mask"].bool()]  # [tokens, d_in]

    def moved(delta: torch.Tensor) -> float:
        return float((k0 @ delta.T).norm() / (delta.norm() * k0.norm()))

    ae = eds["alphaedit"]
    assert deltas["alphaedit"].norm() > 0 and deltas["memit"].norm() > 0
    assert moved(deltas["alphaedit"]) < 1e-4 < 1e-2 < moved(deltas["memit"])
    assert torch.allclose(deltas["alphaedit"] @ ae.proj[layer], deltas["alphaedit"], atol=1e-5)
    cache = ae.cache[layer]
    assert cache.norm() > 0 and torch.allclose(cache, cache.T, atol=1e-4)  # K1 K1^T kept


def test_alphaedit_state_round_trip(tmp_path: Path) -> None:
    model, tok = _model()
    cfg = {**_memit_cfg(tmp_path), "v_num_grad_steps": 3}
    ed = AlphaEditEditor(model, cfg, MODEL_CFG)
    ed.attach_tokenizer(tok, DATA)
    ed.edit(_batch(tok, FACTS[:1]))
    state = ed.state_dict()
    model2, _ = _model()
    ed2 = AlphaEditEditor(model2, cfg, MODEL_CFG)
    ed2.attach_tokenizer(tok, DATA)
    ed2.load_state_dict(state)
    layer = "model.layers.3.mlp.down_proj"
    assert torch.equal(model2.get_submodule(layer).weight, model.get_submodule(layer).weight)
    assert torch.equal(ed2.cache[layer], ed.cache[layer]) and ed2.templates == ed.templates
    assert not math.isnan(float(ed2.cache[layer].sum()))


@pytest.mark.parametrize("cls", [WiseEditor, MemitEditor, AlphaEditEditor])
def test_bf16_base_model(cls, tmp_path: Path) -> None:
    """A bf16 base model: the edit runs, statistics and side memory stay fp32, the edited
    weights stay bf16 (WISE: untouched)."""
    cfg = {**MODEL_CFG, "dtype": "bf16"}
    model, tok = load_model_and_tokenizer(cfg, "cpu", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # AlphaEdit: this random model's keys have no eigenvalue below the paper's 2e-2
    alg = {"num_iter": 3, "context_templates": False} if cls is WiseEditor else \
        {**_memit_cfg(tmp_path), "v_num_grad_steps": 3, "nullspace_threshold": 0.1}
    ed = cls(model, alg, cfg)
    ed.attach_tokenizer(tok, DATA)
    ed.edit(_batch(tok, FACTS[:1]))
    after = model.state_dict()
    assert all(v.dtype == torch.bfloat16 for k, v in after.items() if v.is_floating_point())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if cls is WiseEditor:
        assert changed == [] and ed.shard.dtype == torch.float32
        assert not torch.equal(ed.shard, ed.layer.weight.float())
    else:
        assert changed == ["model.layers.3.mlp.down_proj.weight"]
        assert ed.mom2["model.layers.3.mlp.down_proj"].dtype == torch.float32
    out = ed.forward(**{k: v for k, v in _batch(tok, FACTS).items() if k != "labels"})
    assert torch.isfinite(out.logits.float()).all()


class _NoCache:
    """Stands in for FrozenPrefixCache: every block runs at every step."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> "_NoCache":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def step_done(self) -> None:
        pass


def test_frozen_prefix_cache_changes_nothing(tmp_path: Path, monkeypatch) -> None:
    """WISE's shard and MEMIT's target are bit-identical with the blocks below them run once
    per edit and run at every step."""
    import btp.editors.memit as memit_mod
    import btp.editors.wise as wise_mod

    results = []
    for cache in (True, False):
        if not cache:
            monkeypatch.setattr(wise_mod, "FrozenPrefixCache", _NoCache)
            monkeypatch.setattr(memit_mod, "FrozenPrefixCache", _NoCache)
        model, tok = _model()
        wise = WiseEditor(model, {"num_iter": 4, "context_templates": False}, MODEL_CFG)
        wise.attach_tokenizer(tok, DATA)
        wise.edit(_batch(tok, FACTS[:1]))
        wise.side.remove()
        memit = MemitEditor(model, {**_memit_cfg(tmp_path), "v_num_grad_steps": 4}, MODEL_CFG)
        memit.attach_tokenizer(tok, DATA)
        results.append((wise.shard, memit.target(FACTS[0])[0]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
