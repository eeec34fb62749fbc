"""Elastic weight consolidation (Kirkpatrick et al., 2017) for the ``ft_ewc`` baseline.

penalty(w) = lambda / 2 * sum_i F_i * (w_i - w0_i)^2

with ``w0`` the anchor (the weights before the first edit) and ``F`` the diagonal of the Fisher
information, estimated on upstream data as the mean over batches of the squared gradient of the
model's loss (the "empirical Fisher" at batch level). A parameter with Fisher 0 is free to move;
one the upstream loss is sensitive to is held near its anchor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from btp.editors.common import model_inputs, to_device
from btp.errors import ConfigError

log = logging.getLogger(__name__)


class EWCPenalty:
    """The quadratic EWC penalty around fixed anchor weights.

    Args:
        fisher: per-parameter Fisher diagonal (same shapes as the parameters).
        anchor: per-parameter anchor weights w0.
        lambda_: the penalty's strength (``ewc.lambda_``).
    """

    def __init__(self, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                 lambda_: float) -> None:
        if fisher.keys() != anchor.keys():
            raise ValueError("EWC fisher and anchor must cover the same parameters")
        for name in fisher:
            if fisher[name].shape != anchor[name].shape:
                raise ValueError(f"EWC fisher/anchor shapes differ for {name}")
        self.fisher = {k: v.detach() for k, v in fisher.items()}
        self.anchor = {k: v.detach().clone() for k, v in anchor.items()}
        self.lambda_ = float(lambda_)

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The penalty for the current ``params`` (differentiable w.r.t. them)."""
        total: torch.Tensor | None = None
        for name, w in params.items():
            term = (self.fisher[name].to(w) * (w - self.anchor[name].to(w)) ** 2).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return 0.5 * self.lambda_ * total

    def state(self, prefix: str = "ewc.") -> dict[str, torch.Tensor]:
        """Fisher and anchor as tensors (for checkpoints)."""
        out = {f"{prefix}fisher.{k}": v.detach().clone() for k, v in self.fisher.items()}
        out.update({f"{prefix}anchor.{k}": v.detach().clone() for k, v in self.anchor.items()})
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], lambda_: float,
                   prefix: str = "ewc.") -> "EWCPenalty | None":
        """Inverse of :meth:`state`; None when the state holds no EWC tensors."""
        fp, ap = f"{prefix}fisher.", f"{prefix}anchor."
        fisher = {k[len(fp):]: v for k, v in state.items() if k.startswith(fp)}
        anchor = {k[len(ap):]: v for k, v in state.items() if k.startswith(ap)}
        if not fisher:
            return None
        return cls(fisher, anchor, lambda_)


def fisher_diagonal(model: nn.Module, params: Mapping[str, nn.Parameter],
                    batches: Iterable[Mapping[str, torch.Tensor]], n_batches: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Mean over up to ``n_batches`` batches of the squared gradient of the loss, per parameter.

    ``params`` must require grad; every other parameter of ``model`` is left as it is (frozen).
    Gradients are cleared afterwards so they cannot leak into the first edit.
    """
    if n_batches < 1:
        raise ConfigError("ewc.fisher_n_batches must be >= 1")
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    seen = 0
    with torch.enable_grad():
        for batch in batches:
            if seen >= n_batches:
                break
            for p in params.values():
                p.grad = None
            loss = model(**to_device(model_inputs(batch), device)).loss
            loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    fisher[k] += p.grad.detach().float() ** 2
            seen += 1
    for p in params.values():
        p.grad = None
    if seen == 0:
        raise ConfigError("EWC needs upstream data for its Fisher, but the upstream set is empty")
    log.info("EWC Fisher from %d upstream batches", seen)
    return {k: v / seen for k, v in fisher.items()}
