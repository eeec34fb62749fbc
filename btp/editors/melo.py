"""MELO as an ``Editor``: a thin adapter from the runner's interface to ``peft_melo``.

All of the method lives in ``peft_melo`` (dynamic LoRA blocks, vector database, routing); this
file only maps the config (``cfg.melo`` + the model's ``target_modules`` and ``grace_layer``) to
a ``MeloConfig``, moves batches to the model's device, and refuses a stream that needs more
edit batches than there are blocks before the first edit (the original crashed mid-run).
"""

from __future__ import annotations

from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from btp.editors.base import EditOutcome, Editor, register_editor
from btp.errors import ConfigError
from btp.schema import MeloCfg, cfg_get, read_section
from peft_melo import MeloConfig, MeloModel, get_melo_model


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def melo_config(alg_cfg: Any, model_cfg: Any) -> MeloConfig:
    """``MeloConfig`` from the ``melo`` section (every field of ``schema.MeloCfg``, choices as
    plain strings) and the model section (``target_modules``, ``grace_layer``).

    ``fan_in_fan_out`` is left to peft_melo, which detects GPT-2's Conv1D targets itself.

    Raises:
        ConfigError: a value MeloConfig rejects (its message says which and what to use).
    """
    section = read_section(MeloCfg, alg_cfg)
    values = {f.name: getattr(section, f.name) for f in fields(MeloCfg)}
    values = {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}
    try:
        targets = cfg_get(model_cfg, "target_modules")
        return MeloConfig(target_modules=list(targets) if targets is not None else None,
                          grace_layer=cfg_get(model_cfg, "grace_layer"),
                          base_model_name_or_path=base_model_name(model_cfg), **values)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"melo: {e}") from e


def base_model_name(model_cfg: Any) -> str | None:
    """What the adapter's ``base_model_name_or_path`` records: the real checkpoint (hub id or
    path), or the stand-in's name for a tiny model (its ``pretrained`` only names what it
    stands for)."""
    if cfg_get(model_cfg, "tiny") is not None:
        return str(cfg_get(model_cfg, "name", "")) or None
    return str(cfg_get(model_cfg, "pretrained") or cfg_get(model_cfg, "name", "")) or None


@register_editor("melo")
class MeloEditor(Editor):
    """MELO: one LoRA block per edit batch, routed per example by the vector database."""

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches)
        self.config = melo_config(alg_cfg, model_cfg)
        try:
            self.melo = get_melo_model(model, self.config)
        except (ValueError, TypeError) as e:
            # A target or grace layer that matches no module (the original skipped it silently).
            raise ConfigError(f"model '{model_cfg.name}': {e}") from e
        self.device = _device(model)

    @classmethod
    def from_pretrained(cls, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                        directory: str | Path) -> "MeloEditor":
        """The editor of an adapter that :meth:`save_pretrained` wrote (files verified by
        ``peft_melo``'s loader before ``model`` is touched); ready to route and edit further."""
        editor = cls.__new__(cls)
        Editor.__init__(editor, model, alg_cfg, model_cfg, None)
        editor.melo = MeloModel.from_pretrained(model, directory)
        editor.config = editor.melo.config_
        editor.device = _device(model)
        return editor

    def _to(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in inputs.items()}

    def check_stream(self, n_batches: int) -> None:
        """Refuse a stream longer than the blocks left, with the numbers."""
        left = self.melo.num_blocks_left
        if n_batches > left:
            raise ConfigError(
                f"the edit stream has {n_batches} batches (one LoRA block each) but melo.num_block "
                f"is {self.config.num_block} ({left} left); raise melo.num_block to at least "
                f"{n_batches + self.config.num_block - left} or lower max_n_edits")

    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        res = self.melo.edit(self._to(batch))
        return EditOutcome(losses=list(res.losses), time_s=float(res.time_s))

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.melo(**self._to(inputs))

    def generate(self, **inputs: Any) -> torch.Tensor:
        return self.melo.generate(**self._to(inputs))

    def stats(self) -> dict[str, int]:
        s = self.melo.database.stats()
        return {"clusters": int(s["clusters"]), "conflicts": int(s["conflicts"]),
                "forgotten": int(s["forgotten"])}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.melo.checkpoint_state()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.melo.load_checkpoint_state(state)

    def save_pretrained(self, directory: str | Path) -> None:
        self.melo.save_pretrained(str(directory))
