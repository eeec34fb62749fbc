"""Fact editing on decoder-only LLMs: the record form and the batches, shared by ``zsre`` and
``counterfact`` (their loaders are :mod:`btp.data.zsre_lm` and :mod:`btp.data.counterfact`).

A fact is ``{"text": prompt, "label": target}``, as EasyEdit and WISE edit them: the model reads
``prompt + " " + target`` and learns (and is scored on) the target tokens only.

Every task returns its records in a :class:`btp.data.common.TaskData`:

* ``edits``: the edit prompts with their new targets (rewrite: ES, ERR);
* ``holdout``: rephrasings of the edit prompts with the new targets (generalization);
* ``upstream``: the locality prompts (zsRE's ``loc``, CounterFact's neighbourhood prompts) with
  their true answers: TRR is the model's accuracy on them, ``locality`` the agreement of its
  tokens with the unedited model's;
* ``truth``: the edit prompts with their *true* targets: the pre-edit accuracy shows what the
  model knew; after editing it falls as the new targets replace them.
"""

from __future__ import annotations

from typing import Any

import torch

from btp.data.common import Record

IGNORE_INDEX = -100


def fact(prompt: str, target: str) -> Record:
    """One fact record."""
    return {"text": prompt, "label": target}


def fact_batch(tokenizer: Any, records: list[Record], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize facts as EasyEdit does: ``prompt + " " + target`` with the tokenizer's own special
    tokens (a Llama tokenizer prepends ``<s>``, GPT-2's and Qwen2's add nothing), no eos.

    The prompt's length is that of the prompt tokenized alone (EasyEdit's rule; a SentencePiece
    tokenizer may merge across the boundary, then the boundary is where the prompt alone ends).
    ``labels`` are the target tokens, -100 on the prompt and on padding; right padding with the
    pad id; rows are cut to ``max_length`` tokens.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``[n, longest row]``.
    """
    rows: list[tuple[list[int], int]] = []
    for r in records:
        prompt, target = str(r["text"]), str(r["label"])
        full = tokenizer(f"{prompt} {target}", truncation=True, max_length=max_length)["input_ids"]
        n_prompt = len(tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"])
        rows.append((full, min(n_prompt, len(full))))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def target_token_predictions(logits: torch.Tensor, labels: torch.Tensor
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher-forced predictions of the target tokens: per example, the argmax at t - 1 for
    every label position t, and the labels there.

    Args:
        logits: ``[n, L, V]``; labels: ``[n, L]`` with -100 outside the target.

    Returns:
        ``(predictions, targets)``: two lists of 1-D integer tensors (CPU), one per example.
    """
    pred = logits[:, :-1].argmax(-1).cpu()
    gold = labels[:, 1:].cpu()
    mask = gold != IGNORE_INDEX
    return [p[m] for p, m in zip(pred, mask)], [g[m] for g, m in zip(gold, mask)]


__all__ = ["fact", "fact_batch", "target_token_predictions", "IGNORE_INDEX"]
