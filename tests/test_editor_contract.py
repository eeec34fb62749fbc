"""The contract every registered editor keeps, on each model kind it edits.

After one edit of a two-record batch (few steps, tiny models):

* **state round trip**: ``state_dict()`` loaded into a fresh editor on a fresh copy of the base
  model gives a bit-identical forward;
* **the base weights**: bit-identical where the method promises it (MELO, GRACE, plain LoRA and
  WISE add their own parameters), and otherwise changed only in the weights the editor names
  (FT: its layer; MEMIT/AlphaEdit: their layers);
* **stats**: the database columns the loop reads (``clusters``, ``conflicts``, ``forgotten``);
* **padding**: a row's output is the same in a padded batch and alone (MELO and GRACE with their
  ``last_real`` key; the original ``padded`` key is a pad for a shorter row by design).

A newly registered editor fails :func:`test_every_registered_editor_is_covered` until it has a
row in :data:`SETTINGS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from btp.data.facts import fact, fact_batch
from btp.editors.base import EDITORS, Editor
from btp.models import load_model_and_tokenizer
from tests.test_baselines_tiny import cls_batch, seq2seq_batch, tiny_bert, tiny_t5

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parent.parent / "data"
#: An 8-layer Llama with small widths (as tests/test_lm_editors.py) and MELO's layers on it.
LLAMA_CFG = {"name": "tiny-llama-contract", "kind": "causal_lm",
             "tiny": {"arch": "llama", "num_layers": 8, "d_model": 32, "d_ff": 512, "heads": 4,
                      "kv_heads": 4, "initializer_range": 0.2, "residual_scale": 0.3},
             "target_modules": ["model.layers.6.mlp.down_proj", "model.layers.7.mlp.down_proj"],
             "grace_layer": "model.layers.5.mlp.down_proj"}
FACTS = [("The capital of Norway is", "Oslo"),
         ("The mother tongue of Danielle Darrieux is", "English")]

#: Few steps per method; MELO and GRACE key on the last real token (see the module docstring);
#: GRACE and FT edit every record (the default edits only those the model gets wrong).
SETTINGS: dict[str, dict[str, Any]] = {
    "melo": {"num_block": 4, "num_iter": 3, "key_position": "last_real", "init_radius": 1.0},
    "grace": {"num_iter": 3, "key_position": "last_real", "error_filter": "none",
              "batch_size": None},
    "ft": {"num_iter": 3, "error_filter": "none", "early_stop": "none", "batch_size": None},
    "ft_ewc": {"num_iter": 3, "error_filter": "none", "early_stop": "none", "batch_size": None,
               "fisher_n_batches": 2},
    "plain_lora": {"r": 4, "num_iter": 3},
    "wise": {"num_iter": 3, "context_templates": False, "save_freq": 1, "merge_freq": 1},
    "memit": {"layers": ["model.layers.3.mlp.down_proj"], "context_templates": False,
              "v_num_grad_steps": 3},
    # the tiny model's key statistics have no eigenvalue below AlphaEdit's 2e-2: no update
    "alphaedit": {"layers": ["model.layers.3.mlp.down_proj"], "context_templates": False,
                  "v_num_grad_steps": 3, "nullspace_threshold": 0.5},
}
#: Editors whose base model stays bit-identical; the others change only the weights named by
#: this function of the editor.
KEEPS_BASE = {"melo", "grace", "plain_lora", "wise"}
CHANGES: dict[str, Callable[[Any], set[str]]] = {
    "ft": lambda ed: set(ed.params),
    "ft_ewc": lambda ed: set(ed.params),
    "memit": lambda ed: {f"{layer}.weight" for layer in ed.layers},
    "alphaedit": lambda ed: {f"{layer}.weight" for layer in ed.layers},
}
#: The fact editors run on decoder LLMs only (+experiment=zsre, counterfact).
FACT_EDITORS = {"wise", "memit", "alphaedit"}
KINDS = ("seq2seq", "classification", "causal_lm")
CASES = [(name, kind) for name in sorted(SETTINGS) for kind in KINDS
         if kind == "causal_lm" or name not in FACT_EDITORS]


@dataclass
class Kind:
    """A model kind: a fresh base model, its model section, a padded two-row batch whose first
    row is the shorter, and that first row alone without padding."""

    build: Callable[[], tuple[torch.nn.Module, Any]]
    model_cfg: Any
    batch: Callable[[Any], dict[str, torch.Tensor]]
    first_row: Callable[[Any], dict[str, torch.Tensor]]
    tokenizer: bool = False  # the editor gets attach_tokenizer (the fact editors need it)


def _llama() -> tuple[torch.nn.Module, Any]:
    return load_model_and_tokenizer(LLAMA_CFG, "cpu", seed=0)


def _facts(tok: Any, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    return fact_batch(tok, [fact(p, t) for p, t in pairs], 64)


def _strip(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row 0 without its right padding (labels of seq2seq keep their own length)."""
    n = int(batch["attention_mask"][0].sum())
    return {k: (v[:1, :n] if k != "labels" or v.shape == batch["input_ids"].shape else v[:1])
            for k, v in batch.items()}


KIND = {
    "seq2seq": Kind(lambda: tiny_t5(seed=0), tiny_t5()[1], lambda _: seq2seq_batch(),
                    lambda _: _strip(seq2seq_batch())),
    "classification": Kind(lambda: tiny_bert(seed=0), tiny_bert()[1], lambda _: cls_batch(),
                           lambda _: _strip(cls_batch())),
    "causal_lm": Kind(_llama, LLAMA_CFG, lambda tok: _facts(tok, FACTS),
                      lambda tok: _facts(tok, FACTS[:1]), tokenizer=True),
}


@dataclass
class Edited:
    """One editor after its edit, with what the checks compare against."""

    editor: Editor
    kind: Kind
    tokenizer: Any
    base_before: dict[str, torch.Tensor]  # every base parameter, cloned before the editor
    base_params: dict[str, torch.nn.Parameter]  # the same parameters (objects) by name


def _make(name: str, kind: Kind, stats_dir: Path,
          base: tuple[torch.nn.Module, Any] | None = None) -> tuple[Editor, Any]:
    """The editor on ``base`` (default: a fresh base model) and the tokenizer."""
    model, tok = base if base is not None else kind.build()
    settings = dict(SETTINGS[name])
    if name in ("memit", "alphaedit"):
        settings["stats_dir"] = str(stats_dir)  # the key statistics computed once, then read
    batch = kind.batch(tok)
    editor = EDITORS[name](model, settings, kind.model_cfg, lambda: iter([batch]))
    if kind.tokenizer:
        editor.attach_tokenizer(tok, DATA)
    return editor, tok


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layer_stats")


@pytest.fixture(scope="module")
def edited(stats_dir: Path) -> Callable[[str, str], Edited]:
    """``edited(name, kind)``: built and edited once per module."""
    cache: dict[tuple[str, str], Edited] = {}

    def get(name: str, kind_name: str) -> Edited:
        if (name, kind_name) not in cache:
            kind = KIND[kind_name]
            torch.manual_seed(0)
            model, tok = kind.build()
            params = dict(model.named_parameters())  # before an editor adds its own
            before = {n: p.detach().clone() for n, p in params.items()}
            editor, _ = _make(name, kind, stats_dir, (model, tok))
            torch.manual_seed(1)
            editor.edit(kind.batch(tok))
            cache[name, kind_name] = Edited(editor, kind, tok, before, params)
        return cache[name, kind_name]

    return get


def _logits(editor: Editor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return editor.forward(**batch).logits


def test_every_registered_editor_is_covered() -> None:
    assert set(SETTINGS) == set(EDITORS), "add the new editor's row to SETTINGS"
    assert set(KEEPS_BASE) | set(CHANGES) == set(EDITORS)


@pytest.mark.parametrize("name,kind", CASES)
def test_state_round_trip_gives_the_same_forward(edited, stats_dir: Path, name: str,
                                                 kind: str) -> None:
    done = edited(name, kind)
    state = {k: v.clone() for k, v in done.editor.state_dict().items()}
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors holds them
    torch.manual_seed(0)
    fresh, tok = _make(name, done.kind, stats_dir)
    batch = done.kind.batch(tok)
    unedited = _logits(fresh, batch)
    fresh.load_state_dict(state)
    restored = _logits(fresh, batch)
    assert torch.equal(restored, _logits(done.editor, batch))
    assert not torch.equal(restored, unedited), "the edit changed nothing to compare"


@pytest.mark.parametrize("name,kind", CASES)
def test_base_weights_change_only_as_promised(edited, name: str, kind: str) -> None:
    done = edited(name, kind)
    changed = {n for n, p in done.base_params.items()
               if not torch.equal(p.detach(), done.base_before[n])}
    if name in KEEPS_BASE:
        assert not changed, f"{name} changed base weights: {sorted(changed)}"
    else:
        allowed = CHANGES[name](done.editor)
        assert changed and changed <= allowed, (sorted(changed), sorted(allowed))


@pytest.mark.parametrize("name,kind", CASES)
def test_stats_has_the_database_columns(edited, name: str, kind: str) -> None:
    stats = edited(name, kind).editor.stats()
    assert {"clusters", "conflicts", "forgotten"} <= set(stats)
    assert all(isinstance(v, int) and v >= 0 for v in stats.values()), stats


@pytest.mark.parametrize("name,kind", CASES)
def test_padding_does_not_change_a_row(edited, name: str, kind: str) -> None:
    done = edited(name, kind)
    batch, alone = done.kind.batch(done.tokenizer), done.kind.first_row(done.tokenizer)
    assert int(batch["attention_mask"][0].sum()) < batch["attention_mask"].shape[1]  # padded
    padded = _logits(done.editor, batch)[0]
    single = _logits(done.editor, alone)[0]
    n = single.shape[0] if single.dim() > 1 else None  # positions of the row alone
    torch.testing.assert_close(padded[:n] if n is not None else padded, single,
                               rtol=1e-4, atol=1e-5)


def test_contract_models_are_what_the_cases_need() -> None:
    """The shared tiny models carry MELO's layers (a missing one would fail every case)."""
    for kind in KIND.values():
        model, _ = kind.build()
        names = dict(model.named_modules())
        cfg = kind.model_cfg
        targets = cfg["target_modules"] if isinstance(cfg, dict) else cfg.target_modules
        grace = cfg["grace_layer"] if isinstance(cfg, dict) else cfg.grace_layer
        assert set(targets) | {grace} <= set(names)

