"""Records ``{"text", "label"}`` -> a dict of tensors for one model kind.

* ``seq2seq`` (task ``qa``): ``input_ids``/``attention_mask`` padded to the longest input
  (truncated to ``max_length``, 20 in the original); ``labels`` = tokenized answers (with the
  tokenizer's special tokens, e.g. T5's ``</s>``) truncated to ``label_max_length`` (20) and
  padded with -100.
* ``classification`` (task ``scotus``): padded and truncated to exactly ``max_length`` (512);
  ``labels`` = LongTensor ``[n]``.
* fact editing (tasks ``zsre``, ``counterfact``; a causal LM): ``prompt + " " + target`` as
  EasyEdit tokenizes it, labels on the target tokens only (:func:`btp.data.facts.fact_batch`).
* ``causal_lm`` (task ``hallucination``): text = ``prompt + " " + label + eos`` truncated on the
  right to ``max_length`` (1024) tokens; ``labels`` = ``input_ids`` with -100 on the prompt
  tokens and on pads; right padding with the pad id (= eos for GPT-2). A record with an empty
  label (upstream WebText) is ``prompt + eos`` with every real token a label, i.e. plain LM
  perplexity. Prompt and label are tokenized separately and concatenated, so the prompt/label
  boundary is exact (GPT-2's pre-tokenizer starts a new word at the space anyway).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from btp.errors import ConfigError
from btp.tasks import COLLATE_KINDS, find_task

#: The original's lengths per model kind (inputs, labels); ``facts`` batches are causal LM input.
DEFAULT_MAX_LENGTH = {"seq2seq": 20, "classification": 512, "causal_lm": 1024, "facts": 1024}

IGNORE_INDEX = -100


class Collator:
    """Tokenize a list of records into a batch for ``kind`` (or a task name mapped to its kind).

    Args:
        tokenizer: a ``transformers`` tokenizer (ours from :mod:`btp.tokenizer`, or a real one).
        kind: ``seq2seq`` | ``classification`` | ``causal_lm`` | ``facts``
            (:data:`btp.tasks.COLLATE_KINDS`), or a registered task name (its ``collate``).
        max_length: input length cap; ``None`` uses the original's value for the kind.
        label_max_length: seq2seq label length cap; ``None`` means ``max_length``.
    """

    def __init__(
        self,
        tokenizer: Any,
        kind: str,
        max_length: int | None = None,
        label_max_length: int | None = None,
    ) -> None:
        kind = str(kind)  # a name, or the schema's ModelKind (whose str() is its value)
        spec = find_task(kind)
        kind = spec.collate if spec is not None else kind
        if kind not in COLLATE_KINDS:
            raise ConfigError(f"unknown collator kind '{kind}'; expected one of {COLLATE_KINDS}")
        self.facts = kind == "facts"
        self.tokenizer = tokenizer
        self.kind = "causal_lm" if self.facts else kind  # the model kind the batch is for
        self.max_length = int(max_length or DEFAULT_MAX_LENGTH[kind])
        self.label_max_length = int(label_max_length or self.max_length)
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set pad = eos for causal LMs")

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenize ``records`` into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
        if not records:
            raise ValueError("Collator got an empty batch")
        if self.facts:
            from btp.data.facts import fact_batch

            return fact_batch(self.tokenizer, records, self.max_length)
        if self.kind == "seq2seq":
            return self._seq2seq(records)
        if self.kind == "classification":
            return self._classification(records)
        return self._causal(records)

    def _seq2seq(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        enc = tok([r["text"] for r in records], padding="longest", truncation=True,
                  max_length=self.max_length, return_tensors="pt")
        lab = tok([str(r["label"]) for r in records], padding="longest", truncation=True,
                  max_length=self.label_max_length, return_tensors="pt")
        # Mask by the attention mask, not by pad id: T5's pad id 0 is also decoder_start.
        labels = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, IGNORE_INDEX)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels}

    def _classification(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer([r["text"] for r in records], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        labels = torch.tensor([int(r["label"]) for r in records], dtype=torch.long)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels}

    def _causal(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        eos = tok.eos_token_id
        if eos is None:
            raise ConfigError("a causal LM tokenizer needs an eos token")
        rows: list[tuple[list[int], list[int]]] = []
        for r in records:
            # Truncating each piece to max_length only avoids long-sequence warnings; the
            # concatenation is cut to max_length below anyway.
            prompt_ids = tok(r["text"], add_special_tokens=False, truncation=True,
                             max_length=self.max_length)["input_ids"]
            label = str(r["label"])
            if label:
                tail = tok(" " + label, add_special_tokens=False, truncation=True,
                           max_length=self.max_length)["input_ids"] + [eos]
                ids = (prompt_ids + tail)[: self.max_length]
                n_prompt = min(len(prompt_ids), len(ids))
            else:
                ids = (prompt_ids + [eos])[: self.max_length]
                n_prompt = 0
            lab = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
            rows.append((ids, lab))
        width = max(len(ids) for ids, _ in rows)
        pad = tok.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batched(records: list[dict], size: int) -> list[list[dict]]:
    """Split records into consecutive chunks of ``size`` (the last may be shorter)."""
    return [records[i: i + size] for i in range(0, len(records), size)]


def lazy_batches(chunks: list[list[dict]], collate: Callable[[list[dict]], dict]
                 ) -> Iterable[dict[str, torch.Tensor]]:
    """Tokenize chunks one at a time (keeps memory flat for long streams)."""
    for chunk in chunks:
        yield collate(chunk)
