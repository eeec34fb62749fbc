"""MELO as an ``Editor``: a thin adapter from the runner's interface to ``peft_melo``.

All of the method lives in ``peft_melo`` (dynamic LoRA blocks, vector database, routing); this
file only maps the config (``cfg.melo`` + the model's ``target_modules`` and ``grace_layer``) to
a ``MeloConfig``, moves batches to the model's device, and refuses a stream that needs more
edit batches than there are blocks before the first edit (the original crashed mid-run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from btp.editors.base import EditOutcome, Editor, register_editor
from btp.errors import ConfigError
from peft_melo import MeloConfig, MeloModel, get_melo_model


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _str(x: Any) -> str:
    return str(getattr(x, "value", x))


def melo_config(alg_cfg: Any, model_cfg: Any) -> MeloConfig:
    """``MeloConfig`` from the ``melo`` section and the model section.

    ``fan_in_fan_out`` is left to peft_melo, which detects GPT-2's Conv1D targets itself.

    Raises:
        ConfigError: a value MeloConfig rejects (its message says which and what to use).
    """
    try:
        return MeloConfig(
            target_modules=list(model_cfg.target_modules),
            grace_layer=str(model_cfg.grace_layer),
            num_block=int(alg_cfg.num_block),
            num_rank_per_block=int(alg_cfg.num_rank_per_block),
            init_radius=float(alg_cfg.init_radius),
            key_id=int(alg_cfg.key_id),
            key_position=_str(alg_cfg.key_position),
            label_match=_str(alg_cfg.label_match),
            lora_dropout=float(alg_cfg.lora_dropout),
            num_iter=int(alg_cfg.num_iter),
            edit_lr=float(alg_cfg.edit_lr),
            optimizer=_str(alg_cfg.optimizer),
            lr_step_size=int(alg_cfg.lr_step_size),
            lr_gamma=float(alg_cfg.lr_gamma),
            cache_frozen_prefix=bool(alg_cfg.cache_frozen_prefix),
            base_model_name_or_path=base_model_name(model_cfg),
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"melo: {e}") from e


def base_model_name(model_cfg: Any) -> str | None:
    """What the adapter's ``base_model_name_or_path`` records: the real checkpoint (hub id or
    path), or the stand-in's name for a tiny model (its ``pretrained`` only names what it
    stands for)."""
    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)
    if get("tiny", None) is not None:
        return str(get("name", None) or "") or None
    return str(get("pretrained", None) or get("name", None) or "") or None


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
