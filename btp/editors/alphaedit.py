"""AlphaEdit (Fang et al., "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models", ICLR 2025) as an editor.

Written from the paper (Section 3, Eq. 14) and the behaviour of its authors' code (read, not
copied). The steps are MEMIT's (:mod:`btp.editors.memit`: target hidden states at the last layer,
residual spread over the layers, keys and layer statistics from the same corpus and cache); only
the per-layer update differs:

* **Null-space projection** ``P`` per layer, once: the eigenvectors of the preserved keys'
  second moment ``E[k k^T]`` (the MEMIT statistics) whose eigenvalues are below
  ``nullspace_threshold`` span (approximately) the null space of the preserved keys ``K0``;
  ``P = U_small U_small^T``, so that ``P K0 ~ 0``.
* **Update** of a layer for keys ``K1`` and residual ``R``, with ``Kp Kp^T`` the sum of the keys
  of every earlier edit batch at this layer (``cache``, kept so that sequential batches do not
  undo each other):

      Delta = R K1^T P (Kp Kp^T P + K1 K1^T P + L2 I)^{-1}

  computed as the solution ``X`` of ``(P (K1 K1^T + Kp Kp^T) + L2 I) X = P K1 R^T`` and
  ``Delta = X^T`` (float64). ``X`` lies in the range of ``P``, hence ``Delta K0 ~ 0``: the
  preserved keys' outputs do not move.
* After a batch has updated every layer, each layer's keys of the batch (read again from the
  updated model) are added to ``cache``.

Checkpoints hold MEMIT's state plus each layer's ``cache`` (``[d_in, d_in]`` float32); the
projections are rebuilt from the cached statistics.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from btp.editors.base import register_editor
from btp.editors.memit import MemitEditor
from btp.errors import ConfigError
from btp.schema import AlphaEditCfg

log = logging.getLogger(__name__)


def null_space_projection(mom2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """``(P, rank)``: the projection onto the eigenvectors of ``mom2`` (``[d, d]``, symmetric)
    whose eigenvalues are below ``threshold``, and their number."""
    evals, evecs = torch.linalg.eigh(mom2.double())
    small = evecs[:, evals < threshold]
    return (small @ small.T).float(), int(small.shape[1])


def alphaedit_delta(resid: torch.Tensor, keys: torch.Tensor, proj: torch.Tensor,
                    cache: torch.Tensor, l2: float) -> torch.Tensor:
    """AlphaEdit's update of one layer.

    Args:
        resid: ``[n, d_out]``; keys: ``[n, d_in]`` (this batch's ``K1``, one row per fact).
        proj: ``[d_in, d_in]``, the null-space projection ``P``.
        cache: ``[d_in, d_in]``, ``Kp Kp^T`` of the earlier batches.
        l2: the ridge term.

    Returns:
        ``[d_out, d_in]`` float32 (see the module docstring).
    """
    p = proj.double()
    k = keys.double().T  # [d_in, n]
    a = p @ (k @ k.T + cache.double()) + l2 * torch.eye(p.shape[0], dtype=p.dtype,
                                                        device=p.device)
    x = torch.linalg.solve(a, p @ k @ resid.double())  # [d_in, d_out]
    return x.T.float()


@register_editor("alphaedit")
class AlphaEditEditor(MemitEditor):
    """MEMIT's update projected onto the null space of the preserved keys."""

    section = "alphaedit"
    section_cls = AlphaEditCfg

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **kw: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches, **kw)
        self.threshold = self.settings.nullspace_threshold
        self.l2 = self.settings.L2
        self.proj: dict[str, torch.Tensor] = {}
        self.cache: dict[str, torch.Tensor] = {}

    def on_stats(self) -> None:
        for layer in self.layers:
            self.proj[layer], rank = null_space_projection(self.mom2[layer], self.threshold)
            d = self.mom2[layer].shape[0]
            if layer not in self.cache:
                self.cache[layer] = torch.zeros(d, d, device=self.mom2[layer].device)
            log.info("alphaedit %s: null space of the preserved keys has dimension %d of %d "
                     "(eigenvalues below %g)", layer, rank, d, self.threshold)
            if rank == 0:
                log.warning("alphaedit %s: no eigenvalue of the key statistics is below "
                            "nullspace_threshold=%g, so every update is zero; raise the "
                            "threshold for this model", layer, self.threshold)

    def layer_delta(self, j: int, layer: str, keys: torch.Tensor,
                    resid: torch.Tensor) -> torch.Tensor:
        return alphaedit_delta(resid, keys, self.proj[layer], self.cache[layer], self.l2)

    def after_batch(self, facts: list[tuple[str, str]]) -> None:
        keys = self.keys_at(facts, self.layers)  # [n, d_in] each, from the updated model
        for layer in self.layers:
            self.cache[layer] = self.cache[layer] + keys[layer].T @ keys[layer]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        state.update({f"cache.{n}": c.detach().clone() for n, c in self.cache.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        missing = [n for n in self.layers if f"cache.{n}" not in state]
        if missing:
            raise ConfigError(f"alphaedit state lacks the key cache of {missing[:3]}: resume "
                              "with the same model and alphaedit.layers")
        for n in self.layers:
            device = self.mom2[n].device if n in self.mom2 else state[f"cache.{n}"].device
            self.cache[n] = state[f"cache.{n}"].float().to(device)

    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "nullspace_threshold": self.threshold, "L2": self.l2}


__all__ = ["AlphaEditEditor", "alphaedit_delta", "null_space_projection"]
