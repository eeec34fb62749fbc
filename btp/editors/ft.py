"""Fine-tuning baselines as the GRACE repository runs them: ``ft`` and ``ft_ewc``.

``ft`` trains the weight of one layer, the one GRACE edits (``ft.layer``, else
``model.grace_baseline_layer``, ...; :func:`btp.editors.grace.default_grace_layer`: T5 encoder
block 4 ``wo``, BERT layer 10 ``output.dense``, GPT-2 ``h.35.mlp.c_fc``, the repository's
``inner_params``); its bias and every other weight stay frozen and bit-identical. Per edit: a
fresh optimizer (Adam by default, lr ``edit_lr`` = 1e-2), at most ``num_iter`` (100) steps on the
model's own loss, stopping before a step as soon as the model's argmax at every label position
equals the label (``early_stop``):

* ``original``: argmax of the logits at each position whose label is not -100 against that
  label, unshifted (for a causal LM the repository compares the prediction of the *next* token
  with the current one, so the stop rarely fires there);
* ``shifted``: as ``original``, but a causal LM's logits at t are compared with the label at t+1;
* ``none``: exactly ``num_iter`` steps.

As in the repository, the stream comes one record per edit (``batch_size`` 1) and only records
the edited model gets wrong are edited (``error_filter``,
:func:`btp.editors.common.records_to_edit`); ``batch_size: null`` and ``error_filter: none`` edit
every record in chunks of ``num_edit_per_block``, as MELO's stream.

``ft_ewc`` adds the EWC penalty of :mod:`btp.editors.ewc` (``lambda_``, a Fisher and anchor from
the last ``fisher_n_batches`` edited batches, recomputed at the start of every edit). The
repository checks the early stop before adding the penalty; so does this. Recorded losses are the
model's loss (without the penalty), comparable with the other methods; the penalty is logged at
debug level.

Config: ``ft`` section (``layer``, ``num_iter``, ``edit_lr``, ``optimizer`` adam|sgd,
``early_stop``, ``error_filter``, ``batch_size`` used by the runner); ``ft_ewc`` reads ``ft``
merged with ``ewc`` (``lambda_``, ``fisher_n_batches``, ``fisher_cumulative``,
``anchor_sum_bug``).
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
    ERROR_FILTERS,
    check_choice,
    frozen_prefix,
    get_module,
    model_device,
    model_inputs,
    model_kind,
    read_safetensors,
    records_to_edit,
    select_rows,
    to_device,
    write_safetensors,
)
from btp.editors.ewc import EWCPenalty, fisher_and_anchor
from btp.editors.grace import default_grace_layer
from btp.editors.optim import OPTIMIZERS, Step, make_optimizer, run_steps
from btp.errors import ConfigError
from btp.schema import EwcCfg, FtCfg, read_section

log = logging.getLogger(__name__)

WEIGHTS_NAME = "ft_weights.safetensors"
CONFIG_NAME = "ft_config.json"
EWC_NAME = "ewc_state.safetensors"
EARLY_STOPS = ("original", "shifted", "none")


def labels_predicted(logits: torch.Tensor, labels: torch.Tensor, shift: bool = False) -> bool:
    """Whether the argmax equals the label at every labelled position (the early-stop test).

    logits [n, C] with labels [n] (classification), or logits [n, L, V] with labels [n, L]
    (-100 = not a label). ``shift``: compare logits at t with labels at t+1 (causal LM).
    """
    labels = labels.to(logits.device)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    pred = logits.argmax(-1)
    mask = labels != -100
    return bool(torch.equal(pred[mask], labels[mask]))


@register_editor("ft")
class FtEditor(Editor):
    """Fine-tune the weight of GRACE's layer on each record the model gets wrong."""

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **_: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches)
        self.layer_name = default_grace_layer(model, alg_cfg, model_cfg)
        layer = get_module(model, self.layer_name)
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise ConfigError(f"ft.layer '{self.layer_name}' has no weight to fine-tune; "
                              "point ft.layer at a Linear/Conv1D layer")
        # Only the weight (the repository's inner_params name ``<layer>.weight``), not the bias.
        self.params: dict[str, nn.Parameter] = {f"{self.layer_name}.weight": weight}
        self.kind = model_kind(model)
        self.settings = s = read_section(FtCfg, alg_cfg)
        self.num_iter = s.num_iter
        self.cache_frozen_prefix = s.cache_frozen_prefix
        self.edit_lr = s.edit_lr
        self.optimizer = check_choice("ft", "optimizer", str(s.optimizer), OPTIMIZERS)
        self.early_stop = check_choice("ft", "early_stop", s.early_stop, EARLY_STOPS)
        self.error_filter = check_choice("ft", "error_filter", s.error_filter, ERROR_FILTERS)
        self.skipped = 0  # records the filter left unedited (the model already got them right)
        log.info("%s trains %s (Adam lr %g, at most %d steps, early_stop=%s, error_filter=%s)",
                 self.name, ", ".join(self.params), self.edit_lr, self.num_iter, self.early_stop,
                 self.error_filter)

    @contextmanager
    def _trainable(self) -> Iterator[None]:
        """Trained weights require grad only while training: the base model stays frozen."""
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

    def prepare(self, batch: dict[str, torch.Tensor]) -> None:
        """Called with trainable weights before each edit's steps (``ft_ewc``: its Fisher)."""

    def _done(self, logits: torch.Tensor, labels: torch.Tensor) -> bool:
        if self.early_stop == "none":
            return False
        shift = self.early_stop == "shifted" and self.kind == "causal_lm"
        return labels_predicted(logits, labels, shift)

    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        batch = to_device(model_inputs(batch), model_device(self.base_model))
        rows = records_to_edit(self, batch, self.kind, self.error_filter)
        self.skipped += int((~rows).sum())
        if not bool(rows.any()):
            log.debug("%s: the model already gets these %d record(s) right; nothing edited",
                      self.name, int(rows.numel()))
            return EditOutcome()
        batch = select_rows(batch, rows, self.kind)
        t0 = time.perf_counter()
        with self._trainable(), torch.enable_grad():
            self.prepare(batch)
            opt = make_optimizer(self.optimizer, list(self.params.values()), self.edit_lr)
            prefix = frozen_prefix(self.base_model, self.cache_frozen_prefix)
            with prefix:
                losses = self._steps(batch, opt, prefix)
        return EditOutcome(losses=losses, time_s=time.perf_counter() - t0)

    def _steps(self, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
               prefix: Any) -> list[float]:
        """At most ``num_iter`` steps, stopping once the labels are predicted -> the losses."""

        def forward(step: int) -> Step | None:
            out = self.base_model(**batch)
            if self._done(out.logits.detach(), batch["labels"]):
                return None
            pen = self.penalty()
            if pen is None:
                return Step(out.loss)
            value = float(out.loss.detach())
            log.debug("loss %.4f ewc penalty %.4g", value, float(pen.detach()))
            return Step(out.loss + pen, value=value)

        return run_steps(opt, self.num_iter, forward, prefix=prefix)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"ft.{k}": p.detach().clone() for k, p in self.params.items()}
        state["ft_skipped"] = torch.tensor(self.skipped, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.params if f"ft.{k}" not in state]
        if missing:
            raise ConfigError(f"{self.name} state lacks {missing[:3]}: resume with the same "
                              "model and ft.layer")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[f"ft.{k}"].to(p))
        self.skipped = int(state.get("ft_skipped", torch.tensor(0)))

    def _meta(self) -> dict[str, Any]:
        return {"alg": self.name, "layer": self.layer_name, "tensors": sorted(self.params),
                "num_iter": self.num_iter, "edit_lr": self.edit_lr, "optimizer": self.optimizer,
                "early_stop": self.early_stop, "error_filter": self.error_filter,
                "skipped": self.skipped}

    def save_pretrained(self, directory: str | Path) -> None:
        """The edited weight (named as in the model's state_dict) + ``ft_config.json``."""
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
    """Fine-tuning with the GRACE repository's EWC penalty (window of recent edits)."""

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **kw: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches, **kw)
        ewc = read_section(EwcCfg, alg_cfg)
        self.lambda_ = ewc.lambda_
        self.fisher_n_batches = ewc.fisher_n_batches
        if self.fisher_n_batches < 1:
            raise ConfigError("ewc.fisher_n_batches must be >= 1")
        self.fisher_cumulative = ewc.fisher_cumulative
        self.anchor_sum_bug = ewc.anchor_sum_bug
        # The edited batches, oldest first; only the last fisher_n_batches are kept.
        self.history: list[dict[str, torch.Tensor]] = []
        self.ewc: EWCPenalty | None = None

    def prepare(self, batch: dict[str, torch.Tensor]) -> None:
        self.history = (self.history + [{k: v.detach() for k, v in batch.items()}])[
            -self.fisher_n_batches:]
        fisher, anchor = fisher_and_anchor(
            self.base_model, self.params, self.history[::-1], self.fisher_n_batches,
            model_device(self.base_model), cumulative=self.fisher_cumulative,
            anchor_sum_bug=self.anchor_sum_bug)
        self.ewc = EWCPenalty(fisher, anchor, self.lambda_)

    def penalty(self) -> torch.Tensor | None:
        return self.ewc(self.params) if self.ewc is not None else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """As ``ft``, plus the window of edited batches (``ewc.hist.<i>.<input name>``)."""
        state = super().state_dict()
        for i, b in enumerate(self.history):
            state.update({f"ewc.hist.{i}.{k}": v.detach().clone() for k, v in b.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        hist: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in state.items():
            if key.startswith("ewc.hist."):
                i, name = key[len("ewc.hist."):].split(".", 1)
                hist.setdefault(int(i), {})[name] = v
        dev = model_device(self.base_model)
        self.history = [to_device(hist[i], dev) for i in sorted(hist)]
        self.ewc = None

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "lambda_": self.lambda_,
                "fisher_n_batches": self.fisher_n_batches,
                "fisher_cumulative": self.fisher_cumulative,
                "anchor_sum_bug": self.anchor_sum_bug}

    def save_pretrained(self, directory: str | Path) -> None:
        """As ``ft``, plus ``ewc_state.safetensors`` (the window of edited batches) to continue."""
        super().save_pretrained(directory)
        if self.history:
            from safetensors.torch import save_file

            save_file({f"hist.{i}.{k}": v.contiguous().cpu()
                       for i, b in enumerate(self.history) for k, v in b.items()},
                      str(Path(directory) / EWC_NAME))
