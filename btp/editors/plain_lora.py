"""Plain LoRA baseline (the paper's "LoRA" row): one static adapter, no routing.

Upstream peft's ``LoraConfig`` on the model's ``target_modules`` with rank ``r`` (default: the
same total rank as MELO, ``melo.num_block * melo.num_rank_per_block``), ``lora_alpha = r``
(default, as MELO's alpha = r), dropout 0 and ``fan_in_fan_out`` for GPT-2's Conv1D targets.
Every edit batch trains all LoRA parameters: a fresh Adam (lr ``edit_lr``) per batch, exactly
``num_iter`` steps on the model's own loss; the base model stays frozen (for BERT the classifier
head too). Every input goes through the adapter: there is no database and no routing.

Config (section ``plain_lora``): ``r``, ``alpha``, ``num_iter``, ``edit_lr``, ``batch_size``
(used by the runner). When ``r`` is null the section must also carry ``num_block`` and
``num_rank_per_block`` (the runner's merged ``melo`` values); otherwise a ConfigError says to set
``plain_lora.r``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from btp.editors.base import EditOutcome, Editor, register_editor
from btp.editors.common import (cfg_get, frozen_prefix, is_conv1d, model_device, model_inputs,
                                resolve_target_modules, to_device)
from btp.editors.optim import Step, make_optimizer, run_steps
from btp.errors import ConfigError
from btp.schema import MeloCfg, PlainLoraCfg, read_section

log = logging.getLogger(__name__)

META_NAME = "plain_lora.json"


def lora_rank(alg_cfg: Any) -> int:
    """``r``, else MELO's total rank ``num_block * num_rank_per_block`` (``alg_cfg`` is the merged
    ``melo`` + ``plain_lora`` section; keys it lacks take the schema's defaults)."""
    r = read_section(PlainLoraCfg, alg_cfg).r
    if r is None:
        melo = read_section(MeloCfg, alg_cfg)
        r = melo.num_block * melo.num_rank_per_block
    if r < 1:
        raise ConfigError(f"plain_lora.r must be >= 1, got {r}")
    return r


def lora_config(model: nn.Module, alg_cfg: Any, model_cfg: Any) -> LoraConfig:
    """The peft ``LoraConfig`` for this model and config section."""
    targets = resolve_target_modules(model, cfg_get(model_cfg, "target_modules"))
    conv = {name: is_conv1d(m) for name, m in targets.items()}
    if len(set(conv.values())) > 1:
        raise ConfigError("plain_lora: target_modules mix Conv1D and Linear layers; "
                          "peft needs one fan_in_fan_out setting")
    r = lora_rank(alg_cfg)
    alpha = read_section(PlainLoraCfg, alg_cfg).alpha
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else float(r),
        target_modules=sorted(targets),  # full paths: peft matches them exactly
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=next(iter(conv.values())),
    )


@register_editor("plain_lora")
class PlainLoraEditor(Editor):
    """One peft LoRA adapter trained sequentially on every edit batch."""

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **_: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches)
        self.config = lora_config(model, alg_cfg, model_cfg)
        # Injects LoRA layers into ``model`` in place; its other weights keep requires_grad=False.
        self.peft = get_peft_model(model, self.config)
        self.lora_params = [p for n, p in self.peft.named_parameters() if "lora_" in n]
        for p in self.lora_params:
            p.requires_grad_(True)
        params = read_section(PlainLoraCfg, alg_cfg)
        self.num_iter = params.num_iter
        self.cache_frozen_prefix = params.cache_frozen_prefix
        self.edit_lr = params.edit_lr
        log.info("plain LoRA: r=%d alpha=%g on %d modules (%d trainable tensors)", self.config.r,
                 self.config.lora_alpha, len(self.config.target_modules), len(self.lora_params))

    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        t0 = time.perf_counter()
        batch = to_device(model_inputs(batch), model_device(self.base_model))
        opt = make_optimizer("adam", self.lora_params, self.edit_lr)  # fresh per batch, like MELO
        with torch.enable_grad(), frozen_prefix(self.base_model, self.cache_frozen_prefix) as prefix:
            losses = run_steps(opt, self.num_iter, lambda _: Step(self.base_model(**batch).loss),
                               prefix=prefix)
        for p in self.lora_params:
            p.grad = None
        return EditOutcome(losses=losses, time_s=time.perf_counter() - t0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        res = set_peft_model_state_dict(self.peft, state)
        missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
        if missing:
            raise ConfigError(f"plain_lora state lacks {missing[:3]}...: resume with the same "
                              "model and plain_lora.r")

    def save_pretrained(self, directory: str | Path) -> None:
        """peft's own adapter format (adapter_config.json + adapter_model.safetensors)."""
        out = Path(directory)
        self.peft.save_pretrained(str(out))
        (out / META_NAME).write_text(json.dumps(
            {"alg": "plain_lora", "r": self.config.r, "lora_alpha": self.config.lora_alpha,
             "target_modules": sorted(self.config.target_modules), "num_iter": self.num_iter,
             "edit_lr": self.edit_lr}, indent=2) + "\n")
