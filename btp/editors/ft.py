"""Fine-tuning baselines: ``ft`` (plain) and ``ft_ewc`` (with an EWC penalty).

``ft`` trains the weights of the model's ``target_modules`` (the modules MELO puts LoRA on) on
each edit batch: a fresh optimizer per batch (Adam by default, lr ``edit_lr``), exactly
``num_iter`` steps on the model's own loss. Every other weight stays frozen and bit-identical.

``ft_ewc`` adds ``lambda_/2 * sum F (w - w0)^2`` to the loss (:mod:`btp.editors.ewc`): the anchor
``w0`` is the target weights before the first edit and ``F`` the Fisher diagonal from
``ewc.fisher_n_batches`` upstream batches, computed once, just before the first edit.

Config: ``ft`` section (``num_iter``, ``edit_lr``, ``optimizer`` adam|sgd, ``batch_size`` used by
the runner); ``ft_ewc`` reads ``ft`` merged with ``ewc`` (``lambda_``, ``fisher_n_batches``).
Recorded losses are the model's loss (without the penalty), comparable with the other methods;
the penalty is logged at debug level.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from btp.editors.base import EditOutcome, Editor, register_editor
from btp.editors.common import (
    cfg_get,
    cfg_str,
    model_device,
    model_inputs,
    read_safetensors,
    resolve_target_modules,
    to_device,
    write_safetensors,
)
from btp.editors.ewc import EWCPenalty, fisher_diagonal
from btp.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHTS_NAME = "ft_weights.safetensors"
CONFIG_NAME = "ft_config.json"
EWC_NAME = "ewc_state.safetensors"


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer (``adam`` | ``sgd``); no weight decay, so untouched entries stay put."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ConfigError(f"optimizer must be adam or sgd, got {name!r}")


@register_editor("ft")
class FtEditor(Editor):
    """Fine-tune the target modules' own weights on every edit batch."""

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **_: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches)
        targets = resolve_target_modules(model, cfg_get(model_cfg, "target_modules"))
        self.target_names = sorted(targets)
        # The modules' direct parameters (weight, and bias where there is one).
        self.params: dict[str, nn.Parameter] = {
            f"{mname}.{pname}": p
            for mname in self.target_names
            for pname, p in targets[mname].named_parameters(recurse=False)
        }
        self.num_iter = int(cfg_get(alg_cfg, "num_iter", 50))
        self.edit_lr = float(cfg_get(alg_cfg, "edit_lr", 1e-4))
        self.optimizer = cfg_str(alg_cfg, "optimizer", "adam")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"ft.optimizer must be adam or sgd, got {self.optimizer!r}")
        log.info("%s trains %d tensors in %d target modules", self.name, len(self.params),
                 len(self.target_names))

    @contextmanager
    def _trainable(self) -> Iterator[None]:
        """Target weights require grad only while training: the base model stays frozen."""
        for p in self.params.values():
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in self.params.values():
                p.requires_grad_(False)
                p.grad = None

    def penalty(self) -> torch.Tensor | None:
        """Extra loss term (``ft_ewc``); None for plain fine-tuning."""
        return None

    def prepare(self) -> None:
        """Called at the start of every edit (``ft_ewc``: Fisher before the first one)."""

    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        t0 = time.perf_counter()
        batch = to_device(model_inputs(batch), model_device(self.base_model))
        self.prepare()
        losses: list[float] = []
        with self._trainable(), torch.enable_grad():
            opt = make_optimizer(self.optimizer, list(self.params.values()), self.edit_lr)
            for _ in range(self.num_iter):
                opt.zero_grad(set_to_none=True)
                loss = self.base_model(**batch).loss
                pen = self.penalty()
                total = loss if pen is None else loss + pen
                total.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if pen is not None:
                    log.debug("loss %.4f ewc penalty %.4g", losses[-1], float(pen.detach()))
        return EditOutcome(losses=losses, time_s=time.perf_counter() - t0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ft.{k}": p.detach().clone() for k, p in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.params if f"ft.{k}" not in state]
        if missing:
            raise ConfigError(f"{self.name} state lacks {missing[:3]}...: resume with the same "
                              "model.target_modules")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[f"ft.{k}"].to(p))

    def _meta(self) -> dict[str, Any]:
        return {"alg": self.name, "target_modules": self.target_names,
                "tensors": sorted(self.params), "num_iter": self.num_iter,
                "edit_lr": self.edit_lr, "optimizer": self.optimizer}

    def save_pretrained(self, directory: str | Path) -> None:
        """The edited target weights (names as in the model's state_dict) + ``ft_config.json``."""
        write_safetensors(directory, WEIGHTS_NAME, dict(self.params.items()), self._meta(),
                          CONFIG_NAME)

    @staticmethod
    def load_weights(model: nn.Module, directory: str | Path) -> list[str]:
        """Put saved edited weights into ``model`` (same architecture); returns their names."""
        tensors, _ = read_safetensors(directory, WEIGHTS_NAME, CONFIG_NAME)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(params[k]))
        return sorted(tensors)


@register_editor("ft_ewc")
class FtEwcEditor(FtEditor):
    """Fine-tuning with an EWC penalty around the pre-edit weights."""

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **kw: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches, **kw)
        self.lambda_ = float(cfg_get(alg_cfg, "lambda_", 100.0))
        self.fisher_n_batches = int(cfg_get(alg_cfg, "fisher_n_batches", 8))
        # Anchor now: the weights before any edit (a resume replaces it from the checkpoint).
        self._anchor = {k: p.detach().clone() for k, p in self.params.items()}
        self.ewc: EWCPenalty | None = None

    def prepare(self) -> None:
        if self.ewc is not None:
            return
        if self.upstream_batches is None:
            raise ConfigError("ft_ewc needs upstream batches for its Fisher; none were given")
        with self._trainable():
            fisher = fisher_diagonal(self.base_model, self.params, self.upstream_batches(),
                                     self.fisher_n_batches, model_device(self.base_model))
        self.ewc = EWCPenalty(fisher, self._anchor, self.lambda_)

    def penalty(self) -> torch.Tensor | None:
        return self.ewc(self.params) if self.ewc is not None else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.ewc is not None:
            state.update(self.ewc.state())
        else:  # before the first edit: keep the anchor so a resume penalises the right point
            state.update({f"ewc.anchor_only.{k}": v.clone() for k, v in self._anchor.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.ewc = EWCPenalty.from_state(state, self.lambda_)
        if self.ewc is not None:
            self._anchor = dict(self.ewc.anchor)
        else:
            pre = "ewc.anchor_only."
            anchor = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
            if anchor:
                self._anchor = anchor

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "lambda_": self.lambda_,
                "fisher_n_batches": self.fisher_n_batches}

    def save_pretrained(self, directory: str | Path) -> None:
        """As ``ft``, plus ``ewc_state.safetensors`` (Fisher and anchor) to continue editing."""
        super().save_pretrained(directory)
        if self.ewc is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().cpu() for k, v in self.ewc.state(prefix="").items()},
                      str(Path(directory) / EWC_NAME))
