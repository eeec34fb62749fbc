"""The per-forward routing decision, shared by reference between the key hook and every layer.

The original keeps this decision in a module-level global list; here it lives on an object that
the ``MeloModel`` owns and hands to each of its layers, so two MELO models never interfere.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .vector_database import NO_BLOCK, VectorDatabase


class RoutingState:
    """Which LoRA block each example of the current batch uses.

    ``blocks`` is a LongTensor [n] (-1 = no block) set by the key hook once per forward of the
    grace layer; for T5 the encoder runs once per ``generate`` and its decision serves every
    decoder step. During an edit, ``forced_block`` sends every example to the block in training
    and the hook records the batch's keys instead of routing.
    """

    def __init__(self) -> None:
        self.blocks: Optional[torch.Tensor] = None
        self.any_routed = False  # host-side flag: lets layers skip LoRA work without a device sync
        self.forced_block: Optional[int] = None
        self.last_keys: Optional[torch.Tensor] = None
        self.attention_mask: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.sticky = False  # during generation: keep the first decision for later steps
        self._decided = False

    def force(self, block: int) -> None:
        """Send every example to ``block`` (editing)."""
        self.forced_block = block

    def release(self) -> None:
        """Back to routing by the database."""
        self.forced_block = None
        self.blocks = None
        self.any_routed = False

    def begin_forward(self, attention_mask: Optional[torch.Tensor],
                      labels: Optional[torch.Tensor] = None) -> None:
        """Called by the model before each top-level forward/generate: forget the last decision.

        A decision never outlives its forward; a layer that runs before the grace layer made a
        new one refuses to guess (see :meth:`check_decided`). ``labels`` (of a causal LM, the
        input's shape) mark the prompt for ``key_position='last_prompt'``.
        """
        self.attention_mask = attention_mask
        self.labels = labels
        self.blocks = None
        self.any_routed = False
        self._decided = False

    def check_decided(self, layer: str) -> None:
        """Raise unless the grace layer has routed the current forward."""
        if not self._decided:
            raise RuntimeError(
                f"MELO has no routing decision for this forward at {layer}: the grace layer did not "
                "run before it (for example T5 called with encoder_outputs=..., or a decoder step "
                "on cached states outside generate()). Call the model with input_ids so the key "
                "layer runs, or use MeloModel.generate(), which keeps the prompt's decision for "
                "every generated token."
            )

    def set_blocks(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks
        self.any_routed = bool((blocks != NO_BLOCK).any())
        self._decided = True


def select_keys(
    output: torch.Tensor, key_id: int, key_position: str, attention_mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The key of each example: the layer output [n, s, d] at one token -> [n, d].

    ``padded``: token ``key_id`` of the padded batch (original), clamped to the last position
    as the original does (``min(key_id, L - 1)``). ``last_real``: the last token whose attention
    mask is 1 (needs the mask of the same sequence length). ``last_prompt``: the last real token
    whose label is -100 when ``labels`` [n, s] are given (a row without one: its last real
    token), else as ``last_real``: a causal LM's edit ``prompt target`` and the prompt asked
    alone share their key.
    """
    if output.dim() != 3:
        raise ValueError(f"grace layer output must be [batch, seq, dim], got {tuple(output.shape)}")
    if key_position == "padded" or attention_mask is None or attention_mask.shape[1] != output.shape[1]:
        position = min(key_id, output.shape[1] - 1)
        if position < -output.shape[1]:
            raise ValueError(f"key_id={key_id} is before the first of {output.shape[1]} tokens")
        return output[:, position, :]
    mask = attention_mask.bool()
    if key_position == "last_prompt" and labels is not None and labels.shape == mask.shape:
        prompt = mask & (labels.to(mask.device) == -100)
        mask = torch.where(prompt.any(1, keepdim=True), prompt, mask)
    last = mask.long().cumsum(1).argmax(1)  # index of the last 1 per row
    return output[torch.arange(output.shape[0], device=output.device), last.to(output.device)]


class KeyHook:
    """Forward hook on the grace layer: takes the key and routes (or records it during an edit)."""

    def __init__(
        self, state: RoutingState, database: VectorDatabase, key_id: int, key_position: str
    ) -> None:
        self.state = state
        self.database = database
        self.key_id = key_id
        self.key_position = key_position

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        state = self.state
        if state.sticky and state._decided:
            return  # a later generation step: the prompt's decision stands
        keys = select_keys(output.detach(), self.key_id, self.key_position, state.attention_mask,
                           state.labels)
        if state.forced_block is not None:
            state.last_keys = keys
            blocks = torch.full((keys.shape[0],), state.forced_block, dtype=torch.long, device=keys.device)
            state.blocks = blocks
            state.any_routed = True
            state._decided = True
            return
        state.set_blocks(self.database.route(keys).to(keys.device))
