"""Elastic weight consolidation (Kirkpatrick et al., 2017) as the GRACE repository's ``ft_ewc``.

penalty(w) = lambda * sum_i F_i * (w_i - w0_i)^2        (no 1/2, as the repository)

``F`` and the anchor ``w0`` are recomputed at the start of every edit from a window of the last
``fisher_n_batches`` (N, the repository's ``fisher_mem``, 10) edited batches, the current one
included, taken most recent first, at the weights as they are before the edit:

* the Fisher diagonal is the sum over the window of squared gradients of each batch's loss,
  divided by N even when fewer than N batches have been edited yet. The repository does not
  clear the gradient between the window's batches, so the k-th square is that of the gradient
  summed over the k most recent batches (``cumulative=True``, the default); ``cumulative=False``
  squares each batch's own gradient (the textbook empirical Fisher).
* the anchor is the weights before the edit. The repository sums the current weights once per
  window batch and divides by N, which scales the anchor by (window size)/N during the first N-1
  edits and pulls the weights towards zero; ``anchor_sum_bug=True`` reproduces that.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from btp.editors.common import model_inputs, to_device
from btp.errors import ConfigError

log = logging.getLogger(__name__)


class EWCPenalty:
    """The quadratic EWC penalty ``lambda_ * sum F (w - w0)^2`` around fixed anchor weights.

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
        return self.lambda_ * total


def fisher_and_anchor(model: nn.Module, params: Mapping[str, nn.Parameter],
                      window: Sequence[Mapping[str, torch.Tensor]], n_batches: int,
                      device: torch.device, cumulative: bool = True,
                      anchor_sum_bug: bool = False
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fisher diagonal and anchor from the edit ``window`` (most recent batch first).

    Only the first ``n_batches`` batches of ``window`` are used. ``params`` must require grad;
    every other parameter of ``model`` is left as it is (frozen). Gradients are cleared
    afterwards so they cannot leak into the edit.

    Returns:
        (fisher, anchor), each a dict of tensors shaped like ``params``.
    """
    if n_batches < 1:
        raise ConfigError("ewc.fisher_n_batches must be >= 1")
    batches = list(window)[:n_batches]
    if not batches:
        raise ConfigError("EWC needs at least the current edit batch for its Fisher")
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    for p in params.values():
        p.grad = None
    with torch.enable_grad():
        for batch in batches:
            if not cumulative:
                for p in params.values():
                    p.grad = None
            loss = model(**to_device(model_inputs(batch), device)).loss
            loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    fisher[k] += p.grad.detach().float() ** 2
    for p in params.values():
        p.grad = None
    m = len(batches)
    with torch.no_grad():
        if anchor_sum_bug:
            anchor = {k: p.detach().clone() * m / n_batches for k, p in params.items()}
        else:
            anchor = {k: p.detach().clone() for k, p in params.items()}
    log.debug("EWC Fisher from the last %d edit batch(es)", m)
    return {k: (v / n_batches).to(params[k].dtype) for k, v in fisher.items()}, anchor
