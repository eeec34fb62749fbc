"""The optimizer loop shared by the baseline editors.

FT and FT+EWC (the layer's weight), plain LoRA (the adapter), GRACE (the touched codebook
values), WISE (the side-memory shard) and MEMIT/AlphaEdit (each fact's target hidden state) all
run the same loop: a fresh optimizer per edit, then at most ``num_iter`` steps of zero_grad,
forward, loss, backward, update. What differs between them is passed in: the forward and its
loss (and whether to stop early) as a callable returning a :class:`Step`, a gradient edit
before the update, a projection after it, and the frozen-prefix cache to tell once the first
forward has run. ``peft_melo`` keeps its own loop (it does not import the runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch

from btp.errors import ConfigError

#: The optimizers an editor's ``optimizer`` key may name.
OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """A fresh optimizer (``adam`` | ``sgd``); no weight decay, so untouched entries stay put."""
    if name == "adam":
        return torch.optim.Adam(list(params), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(list(params), lr=lr)
    raise ConfigError(f"optimizer must be adam or sgd, got {name!r}")


@dataclass
class Step:
    """What one forward pass gives :func:`run_steps`.

    Attributes:
        loss: the scalar to minimise; ``backward`` runs on it.
        value: the loss recorded for this step; None records ``float(loss)``. FT+EWC records the
            model's loss without its penalty, so that its losses compare with the other methods'.
        stop: record ``value``, then end the loop before the backward (an early stop judged on
            this step's loss, as WISE's and MEMIT's).
    """

    loss: torch.Tensor
    value: float | None = None
    stop: bool = False


class PrefixCache(Protocol):
    """The part of ``peft_melo.FrozenPrefixCache`` the loop uses."""

    def step_done(self) -> None:
        """Called once the first forward has run: later forwards replay the frozen blocks."""


def run_steps(opt: torch.optim.Optimizer, num_iter: int,
              forward: Callable[[int], Step | None], *,
              prefix: PrefixCache | None = None,
              before_update: Callable[[], None] | None = None,
              after_update: Callable[[], None] | None = None) -> list[float]:
    """At most ``num_iter`` optimizer steps; returns the recorded loss of each step run.

    Each step: ``opt.zero_grad``, ``forward(step)``; a None from it stops the loop before this
    step records anything (FT's early stop, judged on the step's logits). Otherwise the step's
    value is recorded, and unless the step says ``stop``: ``backward``, ``before_update()``
    (gradient edits, e.g. WISE's mask and weight decay), ``opt.step()``, ``after_update()``
    (projections, e.g. WISE's norm constraint or MEMIT's norm clamp).

    Args:
        opt: the optimizer over the trained tensors (fresh per edit).
        num_iter: the most steps to run (0 runs none).
        forward: step index -> :class:`Step`, or None to stop.
        prefix: the frozen-prefix cache the forwards run under, told after the first forward.
        before_update: called between ``backward`` and ``opt.step``, under ``torch.no_grad``.
        after_update: called after ``opt.step``, under ``torch.no_grad``.
    """
    losses: list[float] = []
    with torch.enable_grad():
        for step in range(num_iter):
            opt.zero_grad(set_to_none=True)
            out = forward(step)
            if step == 0 and prefix is not None:
                prefix.step_done()
            if out is None:
                break
            losses.append(float(out.loss.detach()) if out.value is None else out.value)
            if out.stop:
                break
            out.loss.backward()
            if before_update is not None:
                with torch.no_grad():
                    before_update()
            opt.step()
            if after_update is not None:
                with torch.no_grad():
                    after_update()
    return losses
