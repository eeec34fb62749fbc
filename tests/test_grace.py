"""GRACE: the codebook rules on a hand-made layer, then the editor on tiny HF models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from btp.editors.base import EDITORS
from btp.editors.grace import ForwardContext, GraceCodebook, GraceEditor, _last_true, label_rows
from btp.errors import ConfigError
from tests.test_baselines_tiny import (  # noqa: F401 - one_thread is a fixture
    one_thread,
    causal_batch,
    cls_batch,
    seq2seq_batch,
    tiny_bert,
    tiny_gpt2,
    tiny_t5,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LBL_A = torch.tensor([5, 6])
LBL_B = torch.tensor([7])


def make_codebook(**kw) -> GraceCodebook:
    torch.manual_seed(0)
    layer = nn.Linear(2, 3)
    return GraceCodebook(layer, init_radius=kw.pop("init_radius", 1.0), **kw)


def key(x: float, y: float = 0.0) -> torch.Tensor:
    return torch.tensor([x, y])


# ------------------------------------------------------------------------------ codebook rules
def test_add_on_empty_and_far_keys() -> None:
    cb = make_codebook()
    assert cb.add_or_update(key(0.0), torch.zeros(3), LBL_A) == (0, "add")
    # distance 3 > radius 1 + init 1: a new entry even with the same label
    assert cb.add_or_update(key(3.0), torch.ones(3), LBL_A) == (1, "add")
    assert cb.size == 2
    assert torch.equal(cb.radii, torch.tensor([1.0, 1.0]))
    assert torch.equal(cb.keys, torch.stack([key(0.0), key(3.0)]))
    assert torch.equal(cb.values[1], torch.ones(3))


def test_expand_grows_radius_to_cover_the_key() -> None:
    cb = make_codebook()
    cb.add_or_update(key(0.0), torch.zeros(3), LBL_A)
    # distance 1.5 is within radius 1 + init 1 and the label agrees: expand, no new entry
    assert cb.add_or_update(key(1.5), torch.ones(3), LBL_A) == (0, "expand")
    assert cb.size == 1
    assert cb.radii[0].item() == pytest.approx(1.5)
    assert torch.equal(cb.keys[0], key(0.0))  # the key does not move
    # a key already inside the ball never shrinks it
    assert cb.add_or_update(key(0.5), torch.ones(3), LBL_A) == (0, "expand")
    assert cb.radii[0].item() == pytest.approx(1.5)
    assert cb.conflicts == 0


def test_split_halves_both_radii_and_adds() -> None:
    cb = make_codebook()
    cb.add_or_update(key(0.0), torch.zeros(3), LBL_A)
    assert cb.add_or_update(key(1.2), torch.ones(3), LBL_B) == (1, "split")
    assert cb.size == 2 and cb.conflicts == 1
    assert cb.radii.tolist() == pytest.approx([0.6, 0.6])
    assert torch.equal(cb.labels[1][cb.labels[1] != -100], LBL_B)
    assert torch.equal(cb.labels[0][cb.labels[0] != -100], LBL_A)


def test_label_match_exact_vs_sum() -> None:
    exact, summed = make_codebook(), make_codebook(label_match="sum")
    for cb in (exact, summed):
        cb.add_or_update(key(0.0), torch.zeros(3), torch.tensor([2, 9]))
    # same sum (11), different tokens: a conflict for "exact", a hash collision for "sum"
    assert exact.add_or_update(key(0.5), torch.zeros(3), torch.tensor([9, 2]))[1] == "split"
    assert summed.add_or_update(key(0.5), torch.zeros(3), torch.tensor([9, 2]))[1] == "expand"
    # different lengths never match exactly
    assert exact._labels_equal(0, torch.tensor([2, 9, 1])) is False


def test_replace_inside_ball_and_bit_exact_outside() -> None:
    cb = make_codebook()
    value = torch.tensor([10.0, 20.0, 30.0])
    cb.add_or_update(key(0.0), value, LBL_A)
    x = torch.randn(3, 4, 2)
    x[0, -1] = key(0.5)   # key token (position -1) inside the ball
    x[1, -1] = key(5.0)   # outside
    x[2, -1] = key(0.0, 1.0)  # exactly on the boundary: inside (d <= eps)
    base = cb.base_output(x)
    out = cb(x)
    # replace_last, no context: only the last position of the inside rows is replaced
    assert torch.equal(out[0, -1], value) and torch.equal(out[2, -1], value)
    assert torch.equal(out[0, :-1], base[0, :-1]) and torch.equal(out[2, :-1], base[2, :-1])
    assert torch.equal(out[1], base[1])  # bit-exact outside


def test_replace_prompt_uses_the_prompt_mask() -> None:
    cb = make_codebook(replacement="replace_prompt")
    value = torch.tensor([1.0, 2.0, 3.0])
    cb.add_or_update(key(0.0), value, LBL_A)
    x = torch.randn(1, 4, 2)
    x[0, -1] = key(0.1)
    cb.ctx = ForwardContext(prompt_mask=torch.tensor([[True, True, False, False]]))
    out, base = cb(x), cb.base_output(x)
    assert torch.equal(out[0, :2], value.expand(2, 3))
    assert torch.equal(out[0, 2:], base[0, 2:])
    # replace_last with the same mask replaces the last prompt position only
    cb.replacement = "replace_last"
    out = cb(x)
    assert torch.equal(out[0, 1], value)
    assert torch.equal(out[0, [0, 2, 3]], base[0, [0, 2, 3]])


def test_last_real_key_position() -> None:
    cb = make_codebook(key_position="last_real")
    cb.add_or_update(key(0.0), torch.zeros(3), LBL_A)
    x = torch.full((1, 3, 2), 9.0)
    x[0, 1] = key(0.0)  # the last real token; position 2 is a pad far away
    cb.ctx = ForwardContext(attention_mask=torch.tensor([[1, 1, 0]]))
    assert not torch.equal(cb(x), cb.base_output(x))
    cb.key_position = "padded"
    assert torch.equal(cb(x), cb.base_output(x))


def test_nearest_matches_cdist_and_empty_codebook_is_identity() -> None:
    cb = make_codebook()
    x = torch.randn(2, 3, 2)
    assert torch.equal(cb(x), cb.base_output(x))
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        cb._append(torch.randn(2, generator=g) * 4, torch.zeros(3), 1.0, LBL_A)
    q = torch.randn(7, 2, generator=g) * 4
    idx, dist = cb.nearest(q)
    ref = torch.cdist(q, cb.keys)
    assert torch.equal(idx, ref.argmin(1))
    assert torch.allclose(dist, ref.min(1).values, atol=1e-5)


def test_helpers() -> None:
    assert _last_true(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]]).bool()).tolist() == [1, 2, 2]
    rows = label_rows(torch.tensor([[3, 4, -100], [5, -100, -100]]))
    assert [r.tolist() for r in rows] == [[3, 4], [5]]
    assert [r.tolist() for r in label_rows(torch.tensor([2, 0]))] == [[2], [0]]
    with pytest.raises(ConfigError):
        make_codebook(replacement="replace_everything")


# ------------------------------------------------------------------------------ editor
def _cfg(**kw):
    base = {"layer": None, "init_radius": 1.0, "edit_lr": 1.0, "num_iter": 30,
            "replacement": "replace_last", "batch_size": 1, "label_match": "exact"}
    base.update(kw)
    return base


def test_registered() -> None:
    assert EDITORS["grace"] is GraceEditor


def test_default_layers() -> None:
    t5, t5cfg = tiny_t5()
    assert GraceEditor(t5, _cfg(), t5cfg).layer_name == "encoder.block.4.layer.1.DenseReluDense.wo"
    bert, bcfg = tiny_bert()
    assert GraceEditor(bert, _cfg(), bcfg).layer_name == "bert.encoder.layer.10.output.dense"
    gpt, gcfg = tiny_gpt2()
    assert GraceEditor(gpt, _cfg(), gcfg).layer_name == "transformer.h.35.mlp.c_fc"
    with pytest.raises(ConfigError):
        GraceEditor(tiny_t5()[0], _cfg(layer="encoder.block.99.nope"), t5cfg)


def test_t5_edit_learns_and_leaves_others_untouched(tmp_path) -> None:
    model, mcfg = tiny_t5()
    edit = seq2seq_batch(n=1, seed=1)
    other = seq2seq_batch(n=2, seed=7)
    with torch.no_grad():
        before_other = model(**other).logits.clone()
        before_edit = model(**edit).loss.item()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ed = GraceEditor(model, _cfg(num_iter=20, replacement="replace_prompt", edit_lr=10.0), mcfg)
    res = ed.edit(edit)
    assert len(res.losses) == 20 and res.time_s > 0
    # the first step runs with the initial value (the mean of the layer's outputs)
    assert res.losses[-1] < 0.5 * before_edit
    edited = ed.forward(**edit)
    assert edited.loss.item() < res.losses[0]
    assert ed.stats() == {"clusters": 1, "conflicts": 0, "forgotten": 0}
    # unrelated inputs: outside the ball, identical logits; base weights untouched
    assert torch.equal(ed.forward(**other).logits, before_other)
    after = model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    # generation reproduces the edited answer (encoder decides once for every decoder step)
    out = ed.generate(input_ids=edit["input_ids"], attention_mask=edit["attention_mask"],
                      max_length=4)
    assert out[0, 1].item() == edited.logits[0, 0].argmax().item()
    # state round trip into a fresh model/editor
    sd = ed.state_dict()
    model2, _ = tiny_t5()
    ed2 = GraceEditor(model2, _cfg(replacement="replace_prompt"), mcfg)
    ed2.load_state_dict(sd)
    assert torch.equal(ed2.forward(**edit).logits, ed.forward(**edit).logits)
    ed.save_pretrained(tmp_path)
    ed3 = GraceEditor.from_pretrained(tiny_t5()[0], tmp_path, mcfg)
    assert ed3.stats()["clusters"] == 1
    assert torch.equal(ed3.forward(**edit).logits, ed.forward(**edit).logits)


def test_t5_batched_edit_with_padding_and_conflict() -> None:
    model, mcfg = tiny_t5()
    ed = GraceEditor(model, _cfg(num_iter=5, init_radius=1e6), mcfg)
    b = seq2seq_batch(n=2, seed=3)
    ed.edit(b)
    # with a huge init radius the second (different-label) example conflicts with the first
    assert ed.stats()["clusters"] == 2 and ed.stats()["conflicts"] == 1
    radii = ed.codebook.radii
    assert radii[0].item() == pytest.approx(radii[1].item())


def test_bert_classification_edit() -> None:
    model, mcfg = tiny_bert()
    b = cls_batch(n=1, seed=2)
    with torch.no_grad():
        pred = model(**b).logits.argmax(-1)
    target = (pred + 1) % 3
    b["labels"] = target
    ed = GraceEditor(model, _cfg(num_iter=20, replacement="replace_prompt"), mcfg)
    ed.edit(b)
    assert ed.forward(**b).logits.argmax(-1).tolist() == target.tolist()
    far = cls_batch(n=2, seed=9)
    assert torch.equal(ed.forward(**far).logits,
                       _base_logits(model, ed, far))


def _base_logits(model, ed, batch):
    """Logits with the codebook emptied (what the unedited model gives)."""
    state = ed.codebook.codebook_state()
    ed.codebook.load_codebook_state({**state, "keys": state["keys"][:0], "values": state["values"][:0],
                                     "radii": state["radii"][:0], "labels": state["labels"][:0]})
    try:
        return ed.forward(**batch).logits
    finally:
        ed.codebook.load_codebook_state(state)


@pytest.mark.parametrize("replacement", ["replace_last", "replace_prompt"])
def test_gpt2_causal_edit(replacement) -> None:
    model, mcfg = tiny_gpt2()
    b = causal_batch(n=1, seed=4)
    with torch.no_grad():
        before = model(**b).loss.item()
    # small radius: in a random 48-layer GPT-2 the key (last token, eos) of another eos-ending
    # text lies only ~0.06 away, i.e. inside the default ball
    ed = GraceEditor(model, _cfg(num_iter=20, replacement=replacement, init_radius=0.01), mcfg)
    res = ed.edit(b)
    assert res.losses[-1] < before
    # perplexity forward with labels (same key) uses the trained value
    assert ed.forward(**b).loss.item() < res.losses[-1] + 1e-4
    # generation: prompt forward decides, cached decoding steps left as they are
    prompt = {"input_ids": b["input_ids"][:, :4], "attention_mask": b["attention_mask"][:, :4]}
    out = ed.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)
    assert ed.codebook.ctx is None and ed.codebook.mode == "infer"
    other = causal_batch(n=2, seed=11)
    assert torch.equal(ed.forward(**other).logits, _base_logits(model, ed, other))


def test_gpt2_generation_same_with_and_without_cache() -> None:
    model, mcfg = tiny_gpt2()
    b = causal_batch(n=1, seed=4)
    ed = GraceEditor(model, _cfg(num_iter=10, replacement="replace_prompt", init_radius=0.01), mcfg)
    ed.edit({k: v[:, :5] for k, v in b.items()})  # edit on the prompt-ish prefix
    prompt = {"input_ids": b["input_ids"][:, :5], "attention_mask": b["attention_mask"][:, :5]}
    assert ed.forward(**prompt).logits is not None
    cached = ed.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    uncached = ed.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0,
                           use_cache=False)
    assert torch.equal(cached, uncached)
    # the edit is in effect during generation: the first new token follows the edited logits
    assert cached[0, 5].item() == ed.forward(**prompt).logits[0, -1].argmax().item()
