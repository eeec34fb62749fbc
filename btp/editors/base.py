"""The editor interface: every algorithm (MELO and the baselines) is an ``Editor``.

The editing loop only talks to this interface, so that one loop serves every algorithm and task:
it calls ``edit`` once per edit batch, evaluates with ``forward``/``generate``, reads ``stats``
for the database columns, and checkpoints with ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class EditOutcome:
    """What one edit batch did: training losses (one per iteration) and wall time in seconds."""

    losses: list[float] = field(default_factory=list)
    time_s: float = 0.0


class Editor(abc.ABC):
    """One editing algorithm wrapped around a frozen base model.

    Args:
        model: the frozen base model (a transformers model, dropout 0, eval mode).
        alg_cfg: this algorithm's config section (e.g. ``cfg.melo`` or ``cfg.grace``).
        model_cfg: the model section (``target_modules``, ``grace_layer``, ...).
        upstream_batches: a callable returning an iterator of upstream batches (tensors); only
            the algorithms that need upstream data (EWC's Fisher) call it.
    """

    name: str = "base"

    def __init__(
        self,
        model: nn.Module,
        alg_cfg: Any,
        model_cfg: Any,
        upstream_batches: Callable[[], Any] | None = None,
    ) -> None:
        self.base_model = model
        self.alg_cfg = alg_cfg
        self.model_cfg = model_cfg
        self.upstream_batches = upstream_batches

    @abc.abstractmethod
    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        """Edit the model on one tokenized batch that carries ``labels``."""

    def _on_model_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        device = next(self.base_model.parameters()).device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def forward(self, **inputs: torch.Tensor) -> Any:
        """Inference forward of the edited model (HF ModelOutput with ``logits``/``loss``).

        The default runs ``base_model`` itself, which suits editors that change it in place
        (fine-tuning, injected LoRA); routed editors override it.
        """
        with torch.no_grad():
            return self.base_model(**self._on_model_device(inputs))

    def generate(self, **inputs: Any) -> torch.Tensor:
        """Greedy generation with the edited model (seq2seq/causal LM only); default as ``forward``."""
        with torch.no_grad():
            return self.base_model.generate(**self._on_model_device(inputs))

    def stats(self) -> dict[str, int]:
        """Database statistics; algorithms without a database report zeros."""
        return {"clusters": 0, "conflicts": 0, "forgotten": 0}

    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume editing, as tensors only (saved with safetensors)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""

    @abc.abstractmethod
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the edited adapter (or edited weights) in a reloadable form."""

    def check_stream(self, n_batches: int) -> None:
        """Refuse before the first edit when the stream cannot be edited (e.g. too few blocks)."""

    def attach_tokenizer(self, tokenizer: Any, data_dir: Path) -> None:
        """Called once by the runner before the stream, on the unedited model: editors that read
        text beyond the edit stream (MEMIT's layer statistics, context templates) get the
        tokenizer and the data folder here. Nothing by default."""


EDITORS: dict[str, type[Editor]] = {}


def register_editor(name: str) -> Callable[[type[Editor]], type[Editor]]:
    """Class decorator: make an editor selectable as ``alg.name``."""

    def wrap(cls: type[Editor]) -> type[Editor]:
        cls.name = name
        EDITORS[name] = cls
        return cls

    return wrap
