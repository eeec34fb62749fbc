"""GRACE as the GRACE repository runs it: the codebook rules on a hand-made layer (hand-computed
cases), then the editor on tiny HF models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from btp.editors.base import EDITORS
from btp.editors.common import records_to_edit, select_rows
from btp.editors.grace import (
    SPLIT_MARGIN,
    ForwardContext,
    GraceCodebook,
    GraceEditor,
    _last_true,
    label_means,
    label_rows,
)
from btp.errors import ConfigError
from tests.test_baselines_tiny import (
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
T5_LAYER = "encoder.block.4.layer.1.DenseReluDense.wo"


def make_codebook(**kw) -> GraceCodebook:
    torch.manual_seed(0)
    layer = nn.Linear(2, 3)
    return GraceCodebook(layer, init_radius=kw.pop("init_radius", 1.0), **kw)


def key(x: float, y: float = 0.0) -> torch.Tensor:
    return torch.tensor([x, y])


def val(v: float = 0.0):
    return lambda: torch.full((3,), v)


# ------------------------------------------------------------------------------ codebook rules
def test_add_on_empty_and_far_keys() -> None:
    cb = make_codebook()
    assert cb.add_or_update(key(0.0), LBL_A, val(0.0)) == (0, "add")
    # distance 3 > radius 1 + init 1: a new entry even with the same label
    assert cb.add_or_update(key(3.0), LBL_A, val(1.0)) == (1, "add")
    assert cb.size == 2
    assert torch.equal(cb.radii, torch.tensor([1.0, 1.0]))
    assert torch.equal(cb.keys, torch.stack([key(0.0), key(3.0)]))
    assert torch.equal(cb.values[1], torch.ones(3))


def test_expand_coverage_grows_radius_to_cover_the_key() -> None:
    cb = make_codebook()
    cb.add_or_update(key(0.0), LBL_A, val())
    # distance 1.5 is within radius 1 + init 1 and the label agrees: expand, no new entry
    assert cb.add_or_update(key(1.5), LBL_A, val(9.0)) == (0, "expand")
    assert cb.size == 1
    assert cb.radii[0].item() == pytest.approx(1.5)
    assert torch.equal(cb.keys[0], key(0.0))  # coverage: the key does not move
    assert torch.equal(cb.values[0], torch.zeros(3))  # the value is kept (and trained on)
    # a key already inside the ball never shrinks it
    assert cb.add_or_update(key(0.5), LBL_A, val()) == (0, "expand")
    assert cb.radii[0].item() == pytest.approx(1.5)
    assert cb.conflicts == 0


def test_expand_moving_average_moves_the_key_halfway() -> None:
    cb = make_codebook(eps_expand="moving_average")
    cb.add_or_update(key(0.0), LBL_A, val())
    assert cb.add_or_update(key(1.5, 1.0), LBL_A, val()) == (0, "expand")
    # key -> (0 + (1.5, 1)) / 2; epsilon = the distance to the OLD key, sqrt(1.5^2 + 1)
    assert torch.allclose(cb.keys[0], torch.tensor([0.75, 0.5]))
    assert cb.radii[0].item() == pytest.approx((1.5 ** 2 + 1.0) ** 0.5)
    # inside the ball: nothing moves
    assert cb.add_or_update(key(1.0, 0.5), LBL_A, val()) == (0, "expand")
    assert torch.allclose(cb.keys[0], torch.tensor([0.75, 0.5]))


def test_split_margins_old_minus_1e5_new_exactly_half() -> None:
    cb = make_codebook()
    cb.add_or_update(key(0.0), LBL_A, val(0.0))
    assert cb.add_or_update(key(1.2), LBL_B, val(2.0)) == (1, "split")
    assert cb.size == 2 and cb.conflicts == 1
    assert SPLIT_MARGIN == 1e-5
    assert cb.radii[0].item() == pytest.approx(0.6 - 1e-5, abs=1e-7)
    assert cb.radii[1].item() == pytest.approx(0.6, abs=1e-7)
    assert cb.radii[0].item() < cb.radii[1].item()
    assert torch.equal(cb.values[1], torch.full((3,), 2.0))
    assert torch.equal(cb.labels[1][cb.labels[1] != -100], LBL_B)
    assert torch.equal(cb.labels[0][cb.labels[0] != -100], LBL_A)
    # the midpoint now belongs to the new entry only
    mid = key(0.6)[None]
    idx, dist = cb.nearest(mid)
    assert dist.item() > cb.radii[0].item() or idx.item() == 1


def test_label_match_mean_is_the_originals_hash() -> None:
    mean, exact = make_codebook(), make_codebook(label_match="exact")
    for cb in (mean, exact):
        cb.add_or_update(key(0.0), torch.tensor([2, 9]), val())
    # means 5.5 == 5.5 with other tokens: the same label for "mean", a conflict for "exact"
    assert mean.add_or_update(key(0.5), torch.tensor([9, 2]), val())[1] == "expand"
    assert exact.add_or_update(key(0.5), torch.tensor([9, 2]), val())[1] == "split"
    # equal means from different lengths agree too: [3, 8] vs [5, 6] vs [4, 7] (all 5.5)
    assert mean.labels_agree(0, torch.tensor([4, 7]), 5.5)
    assert not mean.labels_agree(0, torch.tensor([2, 9, 1]), 4.0)
    assert not exact.labels_agree(0, torch.tensor([2, 9, 1]), 4.0)
    with pytest.raises(ConfigError, match="label_match"):
        make_codebook(label_match="sum")


def test_label_means_per_kind() -> None:
    # seq2seq: -100 is padding; causal LM: the prompt's -100 counts, padding (mask 0) does not
    s2s = {"labels": torch.tensor([[4, 6, 1], [3, -100, -100]])}
    assert label_means(s2s, "seq2seq").tolist() == pytest.approx([11 / 3, 3.0])
    causal = {"labels": torch.tensor([[-100, -100, 7, 1], [-100, 7, 1, -100]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    assert label_means(causal, "causal_lm").tolist() == pytest.approx([-192 / 4, -92 / 3])
    assert label_means({"labels": torch.tensor([2, 0])}, "classification").tolist() == [2.0, 0.0]


def test_replace_inside_ball_and_bit_exact_outside() -> None:
    cb = make_codebook(replacement="replace_last", key_position="padded")
    value = torch.tensor([10.0, 20.0, 30.0])
    cb.add_or_update(key(0.0), LBL_A, lambda: value)
    x = torch.randn(3, 4, 2)
    x[0, -1] = key(0.5)   # key token (position -1) inside the ball
    x[1, -1] = key(5.0)   # outside
    x[2, -1] = key(0.0, 1.0)  # exactly on the boundary: inside (d <= eps)
    base = cb.base_output(x)
    out = cb(x)
    # replace_last: only the key position of the inside rows is replaced
    assert torch.equal(out[0, -1], value) and torch.equal(out[2, -1], value)
    assert torch.equal(out[0, :-1], base[0, :-1]) and torch.equal(out[2, :-1], base[2, :-1])
    assert torch.equal(out[1], base[1])  # bit-exact outside


# A batch of two right-padded rows: row 0 has 3 real tokens of 5, row 1 has 5.
AM = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def _positions(cb: GraceCodebook, ctx: ForwardContext) -> list[list[int]]:
    """Which positions of each row the codebook replaces when every key is a hit."""
    cb.ctx = ctx
    kpos = cb.key_index(2, 5, torch.device("cpu"))
    mask = cb.replace_mask(kpos, 5)
    return [row.nonzero().flatten().tolist() for row in mask]


@pytest.mark.parametrize("kind,key_position,key_id,replacement,want", [
    # T5 (auto = the last real token, where the original's key falls at its batch of one):
    # replace_prompt is [:key], every real token but </s>
    ("seq2seq", "auto", -1, "replace_prompt", [[0, 1], [0, 1, 2, 3]]),
    ("seq2seq", "auto", -1, "replace_last", [[2], [4]]),
    ("seq2seq", "auto", -1, "replace_all", [[0, 1, 2, 3, 4]] * 2),
    ("seq2seq", "auto", -2, "replace_prompt", [[0], [0, 1, 2]]),
    # padded: position -1 of the padded batch, [:-1] then covers row 0's pads too
    ("seq2seq", "padded", -1, "replace_prompt", [[0, 1, 2, 3]] * 2),
    ("seq2seq", "padded", -1, "replace_last", [[4], [4]]),
    # BERT (auto = padded, the original pads SCOTUS to a fixed length)
    ("classification", "auto", -1, "replace_prompt", [[0, 1, 2, 3]] * 2),
    ("classification", "auto", -2, "replace_last", [[3], [3]]),
])
def test_which_positions_are_replaced(kind, key_position, key_id, replacement, want) -> None:
    cb = make_codebook(kind=kind, key_position=key_position, key_id=key_id, replacement=replacement)
    assert _positions(cb, ForwardContext(attention_mask=AM, prompt_mask=AM.bool())) == want


def test_causal_key_is_the_last_prompt_token() -> None:
    cb = make_codebook(kind="causal_lm")  # auto, replace_prompt
    # row 0: prompt 0-1, label 2, pads 3-4; row 1: no prompt (upstream text): its last real token
    prompt = torch.tensor([[True, True, False, False, False], [False] * 5])
    assert _positions(cb, ForwardContext(attention_mask=AM, prompt_mask=prompt)) == [[0], [0, 1, 2, 3]]
    cb.replacement = "replace_last"
    assert _positions(cb, ForwardContext(attention_mask=AM, prompt_mask=prompt)) == [[1], [4]]


def test_replace_prompt_end_to_end_on_the_layer() -> None:
    cb = make_codebook(kind="seq2seq")
    value = torch.tensor([1.0, 2.0, 3.0])
    cb.add_or_update(key(0.0), LBL_A, lambda: value)
    x = torch.randn(1, 4, 2)
    x[0, -1] = key(0.1)  # the key token (last real) is inside the ball
    cb.ctx = ForwardContext(attention_mask=torch.ones(1, 4, dtype=torch.long))
    out, base = cb(x), cb.base_output(x)
    assert torch.equal(out[0, :3], value.expand(3, 3))
    assert torch.equal(out[0, 3], base[0, 3])  # the key token itself keeps the layer output


def test_val_train_adv_perturbs_every_training_value_but_the_first() -> None:
    x = torch.randn(2, 3, 2)
    values = torch.tensor([[1.0, 2.0, 3.0]])
    outs = {}
    for mode in ("sgd", "adv"):
        cb = make_codebook(val_train=mode, replacement="replace_all")
        cb.mode, cb.train_values, cb.train_assign = "train", values, torch.tensor([0, 0])
        torch.manual_seed(0)
        outs[mode] = cb(x)
    assert torch.equal(outs["sgd"], values.expand(2, 3, 3))
    assert torch.equal(outs["adv"][0], values.expand(3, 3))  # row 0: the clean value
    noise = outs["adv"][1] - values
    assert not torch.allclose(noise, torch.zeros_like(noise))
    assert torch.equal(noise, noise[:1].expand(3, 3))  # one noise draw per example


def test_nearest_matches_cdist_and_empty_codebook_is_identity() -> None:
    cb = make_codebook()
    x = torch.randn(2, 3, 2)
    assert torch.equal(cb(x), cb.base_output(x))
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        cb._append(torch.randn(2, generator=g) * 4, torch.zeros(3), 1.0, LBL_A, 5.5)
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
    for bad in (dict(replacement="replace_everything"), dict(key_position="first"),
                dict(eps_expand="decay"), dict(val_train="pert")):
        with pytest.raises(ConfigError):
            make_codebook(**bad)


# ------------------------------------------------------------------------------ editor
def _cfg(**kw):
    base = {"layer": None, "init_radius": 1.0, "edit_lr": 1.0, "num_iter": 30, "batch_size": 1}
    base.update(kw)
    return base


def test_registered_and_defaults_are_the_repositorys() -> None:
    assert EDITORS["grace"] is GraceEditor
    model, mcfg = tiny_t5()
    ed = GraceEditor(model, {}, mcfg)
    cb = ed.codebook
    assert (cb.replacement, cb.key_position, cb.key_id, cb.label_match, cb.eps_expand,
            cb.val_train) == ("replace_prompt", "auto", -1, "mean", "coverage", "sgd")
    assert (ed.val_init, ed.error_filter, ed.edit_lr, ed.num_iter, cb.init_radius) == \
        ("cold", "original", 1.0, 100, 1.0)


def test_default_layers() -> None:
    t5, t5cfg = tiny_t5()
    assert GraceEditor(t5, _cfg(), t5cfg).layer_name == T5_LAYER
    bert, bcfg = tiny_bert()
    assert GraceEditor(bert, _cfg(), bcfg).layer_name == "bert.encoder.layer.10.output.dense"
    gpt, gcfg = tiny_gpt2()
    assert GraceEditor(gpt, _cfg(), gcfg).layer_name == "transformer.h.35.mlp.c_fc"
    with pytest.raises(ConfigError):
        GraceEditor(tiny_t5()[0], _cfg(layer="encoder.block.99.nope"), t5cfg)


def test_cold_init_is_uniform_0_1_and_warm_is_the_layer_output_at_the_key() -> None:
    model, mcfg = tiny_t5()
    b = seq2seq_batch(n=1, seed=1)
    ed = GraceEditor(model, _cfg(num_iter=0), mcfg)
    torch.manual_seed(123)
    ed.edit(b)
    torch.manual_seed(123)
    want = torch.rand(ed.codebook.out_dim)
    assert torch.equal(ed.codebook.values[0], want)
    assert (want >= 0).all() and (want < 1).all()
    # warm: the wrapped layer's own output at the key token (the last real token here)
    model2, _ = tiny_t5()
    warm = GraceEditor(model2, _cfg(num_iter=0, val_init="warm"), mcfg)
    seen = {}
    layer = model2.get_submodule(T5_LAYER)
    handle = layer.register_forward_hook(lambda m, a, o: seen.setdefault("out", o.detach().clone()))
    with torch.no_grad():
        model2(**b)
    handle.remove()
    warm.edit(b)
    assert torch.allclose(warm.codebook.values[0], seen["out"][0, -1])


def test_values_are_trained_with_adam_at_edit_lr() -> None:
    """Adam's first step moves every coordinate with a gradient by lr (g / (|g| + 1e-8));
    SGD would move it by lr * g."""
    model, mcfg = tiny_t5()
    b = seq2seq_batch(n=1, seed=1)
    ed = GraceEditor(model, _cfg(num_iter=1, edit_lr=0.25), mcfg)
    torch.manual_seed(7)
    ed.edit(b)
    torch.manual_seed(7)
    init = torch.rand(ed.codebook.out_dim)
    step = (ed.codebook.values[0] - init).abs()
    assert torch.allclose(step, torch.full_like(step, 0.25), atol=1e-5)
    # the same step on a fresh optimizer per edit: a second record's value also moves by lr
    b2 = seq2seq_batch(n=1, seed=5)
    torch.manual_seed(8)
    ed.edit(b2)
    torch.manual_seed(8)
    init2 = torch.rand(ed.codebook.out_dim)
    j = ed.codebook.size - 1
    assert torch.allclose((ed.codebook.values[j] - init2).abs(), torch.full_like(init2, 0.25), atol=1e-5)


def test_t5_edit_learns_and_leaves_others_untouched(tmp_path) -> None:
    model, mcfg = tiny_t5()
    edit = seq2seq_batch(n=1, seed=1)
    other = seq2seq_batch(n=2, seed=7)
    with torch.no_grad():
        before_other = model(**other).logits.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ed = GraceEditor(model, _cfg(num_iter=40), mcfg)
    res = ed.edit(edit)
    assert len(res.losses) == 40 and res.time_s > 0
    assert res.losses[-1] < 0.5 * res.losses[0]
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
    ed2 = GraceEditor(model2, _cfg(), mcfg)
    ed2.load_state_dict(sd)
    assert torch.equal(ed2.forward(**edit).logits, ed.forward(**edit).logits)
    assert torch.equal(ed2.codebook.label_means, ed.codebook.label_means)
    ed.save_pretrained(tmp_path)
    ed3 = GraceEditor.from_pretrained(tiny_t5()[0], tmp_path, mcfg)
    assert ed3.stats()["clusters"] == 1
    assert torch.equal(ed3.forward(**edit).logits, ed.forward(**edit).logits)


def test_padded_batch_keys_match_single_record_keys() -> None:
    """auto keys: a record's key is the same alone (the original's batch of one) and padded."""
    model, mcfg = tiny_t5()
    b = seq2seq_batch(n=2, seed=3)  # row 0 is right-padded
    ed = GraceEditor(model, _cfg(num_iter=0, init_radius=1e-6), mcfg)
    ed.edit(b)  # two entries, from the padded batch
    alone = select_rows(b, torch.tensor([True, False]), "seq2seq")
    assert alone["input_ids"].shape[1] < b["input_ids"].shape[1]
    model2, _ = tiny_t5()
    ed2 = GraceEditor(model2, _cfg(num_iter=0, init_radius=1e-6), mcfg)
    ed2.edit(alone)
    assert torch.allclose(ed2.codebook.keys[0], ed.codebook.keys[0], atol=1e-5)


def test_t5_batched_edit_with_conflict() -> None:
    model, mcfg = tiny_t5()
    ed = GraceEditor(model, _cfg(num_iter=5, init_radius=1e6), mcfg)
    b = seq2seq_batch(n=2, seed=3)
    ed.edit(b)
    # with a huge init radius the second (different-label) example conflicts with the first
    assert ed.stats()["clusters"] == 2 and ed.stats()["conflicts"] == 1
    radii = ed.codebook.radii
    assert radii[0].item() == pytest.approx(radii[1].item() - 1e-5, abs=1e-6)


def test_error_filter_classification_edits_only_wrong_records() -> None:
    model, mcfg = tiny_bert()
    b = cls_batch(n=2, seed=2)
    with torch.no_grad():
        pred = model(**b).logits.argmax(-1)
    b["labels"] = torch.stack([pred[0], (pred[1] + 1) % 3])  # row 0 right, row 1 wrong
    ed = GraceEditor(model, _cfg(num_iter=20), mcfg)
    assert records_to_edit(ed, b, "classification", "original").tolist() == [False, True]
    ed.edit(b)
    assert ed.stats()["clusters"] == 1 and ed.skipped == 1
    assert ed.forward(**b).logits.argmax(-1).tolist() == b["labels"].tolist()
    # a batch the model already gets right trains nothing
    right = {k: v[:1] for k, v in b.items()}
    res = ed.edit(right)
    assert res.losses == [] and ed.stats()["clusters"] == 1 and ed.skipped == 2
    # error_filter=none edits it anyway
    ed_all = GraceEditor(tiny_bert()[0], _cfg(num_iter=2, error_filter="none"), mcfg)
    ed_all.edit(right)
    assert ed_all.stats()["clusters"] == 1 and ed_all.skipped == 0


def test_error_filter_qa_original_edits_every_record_exact_checks_the_answer() -> None:
    model, mcfg = tiny_t5()
    b = seq2seq_batch(n=2, seed=1)
    ed = GraceEditor(model, _cfg(), mcfg)
    with torch.no_grad():
        gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             max_length=4)
    b["labels"][0] = gen[0, 1:4]  # row 0 is labelled with the model's own greedy answer
    assert records_to_edit(ed, b, "seq2seq", "original").tolist() == [True, True]
    assert records_to_edit(ed, b, "seq2seq", "exact").tolist() == [False, True]
    assert records_to_edit(ed, b, "seq2seq", "none").tolist() == [True, True]


def test_bert_classification_edit() -> None:
    model, mcfg = tiny_bert()
    b = cls_batch(n=1, seed=2)
    with torch.no_grad():
        pred = model(**b).logits.argmax(-1)
    target = (pred + 1) % 3
    b["labels"] = target
    ed = GraceEditor(model, _cfg(num_iter=20), mcfg)
    ed.edit(b)
    assert ed.forward(**b).logits.argmax(-1).tolist() == target.tolist()
    far = cls_batch(n=2, seed=9)
    assert torch.equal(ed.forward(**far).logits, _base_logits(model, ed, far))


def _base_logits(model, ed, batch):
    """Logits with the codebook emptied (what the unedited model gives)."""
    state = ed.codebook.codebook_state()
    empty = {k: (v[:0] if k != "conflicts" else v) for k, v in state.items()}
    ed.codebook.load_codebook_state(empty)
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
    # small radius: keys of a random 48-layer GPT-2 lie close together
    ed = GraceEditor(model, _cfg(num_iter=20, replacement=replacement, init_radius=0.01), mcfg)
    res = ed.edit(b)
    assert res.losses[-1] < before
    # perplexity forward with labels (same key: the last prompt token) uses the trained value
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
    ed = GraceEditor(model, _cfg(num_iter=10, init_radius=0.01), mcfg)
    prompt = {"input_ids": b["input_ids"][:, :5], "attention_mask": b["attention_mask"][:, :5]}
    ed.edit({**prompt, "labels": prompt["input_ids"].clone()})  # key: the last token
    assert ed.codebook.size == 1
    cached = ed.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    uncached = ed.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0,
                           use_cache=False)
    assert torch.equal(cached, uncached)
    # the edit is in effect during generation: the first new token follows the edited logits
    edited = ed.forward(**prompt).logits[0, -1]
    assert cached[0, 5].item() == edited.argmax().item()
    assert not torch.equal(edited, _base_logits(model, ed, prompt)[0, -1])
