"""WISE learns an edit and answers it, as the runner runs it on the tiny Llama stand-in.

The unit tests of ``test_lm_editors.py`` pin WISE's defining properties (main memory bit-identical,
upstream routed to it); this one pins that an edit is learned at all: three CounterFact facts of
the shipped sample, edited one at a time with the settings ``+alg=wise +model=tiny-llama``
composes (the schema's defaults under ``config/values/model/tiny-llama.yaml``'s ``wise:``), are
each answered right after their edit (teacher-forced target tokens through ``forward``, routed to
the side memory also when the prompt is asked alone), while NQ questions far from the edits keep
the unedited model's logits bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from btp.data.counterfact import load_counterfact
from btp.data.facts import fact, fact_batch, target_token_predictions
from btp.editors.wise import WiseEditor
from btp.models import load_model_and_tokenizer

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = ["nq question: who played desmond doss father in hacksaw ridge",
            "nq question: types of skiing in the winter olympics 2018",
            "nq question: where does aarp fall on the political spectrum"]


def _token_accuracy(editor: WiseEditor, batch: dict[str, torch.Tensor]) -> float:
    preds, golds = target_token_predictions(editor.forward(**batch).logits, batch["labels"])
    return float(torch.cat([p == g for p, g in zip(preds, golds)]).float().mean())


@pytest.mark.usefixtures("one_thread")  # the bit-identical comparison below sums in one order
def test_wise_answers_each_edit_on_tiny_llama() -> None:
    model_cfg = yaml.safe_load((REPO / "config/model/tiny-llama.yaml").read_text())
    values = yaml.safe_load((REPO / "config/values/model/tiny-llama.yaml").read_text())
    model, tok = load_model_and_tokenizer(model_cfg, "cpu", seed=0)
    facts = load_counterfact(REPO / "data", 3, None, lambda key, default: default).edits
    up = fact_batch(tok, [fact(q, "yes") for q in UPSTREAM], 64)
    up_inputs = {k: up[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        up_before = model(**up_inputs).logits
    editor = WiseEditor(model, values.get("wise", {}), model_cfg)
    editor.attach_tokenizer(tok, REPO / "data")
    unedited = []
    for record in facts:
        batch = fact_batch(tok, [record], 64)
        unedited.append(_token_accuracy(editor, batch))
        editor.edit(batch)
        assert _token_accuracy(editor, batch) >= 0.9, record  # ES of this edit
        alone = tok(record["text"], return_tensors="pt")
        assert editor.route_rows(**alone).tolist() == [0]  # asked alone: the side memory
    assert max(unedited) < 0.5  # the targets were not already the model's answers
    assert editor.route_rows(**up_inputs).tolist() == [-1] * len(UPSTREAM)
    assert torch.equal(editor.forward(**up_inputs).logits, up_before)
