"""Frozen-prefix caching for the edit loop: the blocks below the lowest adapted block run once.

An edit runs ``num_iter`` optimizer steps on the same batch. Every block of a layer stack
(a ``nn.ModuleList`` of transformer blocks: ``transformer.h``, ``model.layers``,
``encoder.block``, ``bert.encoder.layer``) below the lowest adapted block is frozen and sees the
same input at every step, so its output is the same at every step. This module runs the first
step normally, keeps the output of the highest such block, and in later steps returns that output
from every block of the prefix without computing it. Autograd never reached those blocks anyway
(nothing in them requires grad), so the losses, gradients and LoRA values are those of the
uncached loop.

Which blocks qualify is decided from what actually happens in the first step, so no model family
needs code of its own: a block qualifies when it has no trainable parameter, no active dropout,
none of its tensor inputs requires grad, and every block before it in its stack qualified and ran
once, in order. A stack whose blocks read an adapted part of the model (T5's decoder reads the
encoder output, which the adapted encoder blocks change) is found not to qualify and runs in full.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _requires_grad(value: Any) -> bool:
    """Whether any tensor in a (nested) argument requires grad."""
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v) for v in value.values())
    return False


def _clone(value: Any) -> Any:
    """A copy of a block output whose tensors a later in-place op cannot alter in the cache."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_clone(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _frozen(block: nn.Module) -> bool:
    """No trainable parameter and no dropout that draws random numbers."""
    if any(p.requires_grad for p in block.parameters()):
        return False
    return not any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in block.modules())


class _Stack:
    """One layer stack: its prefix blocks, and what the first step recorded."""

    def __init__(self, name: str, blocks: list[nn.Module]) -> None:
        self.name = name
        self.blocks = blocks  # the blocks below the lowest adapted one, in order
        self.recording = True
        self.broken = False  # a block of the prefix ran out of order or did not qualify
        self.last = -1  # highest block of the qualifying run from block 0
        self.output: Any = None
        self.input_shape: Optional[torch.Size] = None

    def call(self, index: int, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if not self.recording and index <= self.last:
            if index == 0:
                first = _first_tensor(args, kwargs)
                if first is None or first.shape != self.input_shape:
                    raise RuntimeError(
                        f"frozen-prefix cache of {self.name}: the input changed between steps of "
                        "one edit; edit with cache_frozen_prefix=False")
            # Blocks below the last cached one feed only skipped blocks: no copy needed there.
            return _clone(self.output) if index == self.last else self.output
        out = forward(*args, **kwargs)
        if self.recording and not self.broken:
            if index != self.last + 1 or _requires_grad(args) or _requires_grad(kwargs) \
                    or not _frozen(self.blocks[index]):
                self.broken = True
            else:
                if index == 0:
                    first = _first_tensor(args, kwargs)
                    self.input_shape = first.shape if first is not None else None
                self.last = index
                self.output = _clone(out)
        return out


class FrozenPrefixCache:
    """Context manager for one edit: call :meth:`step_done` after each optimizer step.

    Args:
        model: the wrapped transformers model.
        adapted: full module names of the adapted (LoRA) layers.
    """

    def __init__(self, model: nn.Module, adapted: list[str]) -> None:
        self.stacks = [_Stack(name, blocks) for name, blocks in find_prefixes(model, adapted)]
        self._patched: list[nn.Module] = []

    def __enter__(self) -> "FrozenPrefixCache":
        for stack in self.stacks:
            for index, block in enumerate(stack.blocks):
                forward = block.forward

                def cached(*args: Any, _s: _Stack = stack, _i: int = index,
                           _f: Callable[..., Any] = forward, **kwargs: Any) -> Any:
                    return _s.call(_i, _f, args, kwargs)

                block.forward = cached  # instance attribute: nn.Module.__call__ finds it first
                self._patched.append(block)
        return self

    def step_done(self) -> None:
        """After the first step: later steps replay the recorded prefix outputs."""
        for stack in self.stacks:
            if stack.recording:
                stack.recording = False
                if stack.broken:
                    stack.last = -1
                    stack.output = None
                logger.debug("frozen prefix of %s: %d of %d blocks cached", stack.name,
                             stack.last + 1, len(stack.blocks))

    @property
    def cached_blocks(self) -> dict[str, int]:
        """Blocks served from the cache per stack (after the first step)."""
        return {s.name: s.last + 1 for s in self.stacks}

    def __exit__(self, *exc: Any) -> None:
        for block in self._patched:
            del block.forward
        self._patched.clear()
        for stack in self.stacks:
            stack.output = None


def find_prefixes(model: nn.Module, adapted: list[str]) -> list[tuple[str, list[nn.Module]]]:
    """(stack name, blocks below its lowest adapted block) for each outermost layer stack that
    holds an adapted layer."""
    found: list[tuple[str, nn.ModuleList, int]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not name:
            continue
        indices = []
        for target in adapted:
            rest = target[len(name) + 1:].split(".", 1)[0] if target.startswith(name + ".") else ""
            if rest.isdigit():
                indices.append(int(rest))
        if indices:
            found.append((name, module, min(indices)))
    outer = [f for f in found if not any(f[0].startswith(o[0] + ".") for o in found if o is not f)]
    return [(name, list(stack)[:lowest]) for name, stack, lowest in outer if lowest > 0]


def trainable_modules(model: nn.Module) -> list[str]:
    """Names of the modules that own a parameter requiring grad (the ones an edit trains)."""
    return [name for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))]
