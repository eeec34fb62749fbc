"""Dynamic LoRA layers: rank r split into blocks, one block (or none) per example.

Block k owns rank slice [k*p, (k+1)*p) of A (in x r) and B (r x out), p = num_rank_per_block.
Each factor's slice is scaled by sqrt(r/p) and alpha/r = 1 (the original), so block k adds
``num_block * (x A_k) B_k``. An example routed to no block gets exactly the base output.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features

from .config import MeloConfig
from .routing import RoutingState


class MeloLayer(BaseTunerLayer):
    """Adapter state shared by the Linear and Conv1D wrappers (one adapter per layer)."""

    adapter_layer_names = ("melo_A", "melo_B")
    other_param_names = ("num_block", "num_rank_per_block", "scale", "melo_dropout")

    def __init__(self, base_layer: nn.Module, routing: RoutingState, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.routing = routing
        self._layer_name = type(base_layer).__name__  # the module path, set by MeloModel
        self.melo_A = nn.ParameterDict({})  # [in, r]
        self.melo_B = nn.ParameterDict({})  # [r, out]
        self.melo_dropout = nn.ModuleDict({})
        self.num_block: dict[str, int] = {}
        self.num_rank_per_block: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"MELO supports nn.Linear and transformers' Conv1D, not {type(base_layer).__name__}")
        self.in_features = in_features
        self.out_features = out_features
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, config: MeloConfig) -> None:
        """Create the adapter's A and B with the original's initialisation."""
        r, p = config.r, config.num_rank_per_block
        weight = self.get_base_layer().weight
        a = torch.empty(self.in_features, r, device=weight.device, dtype=torch.float32)
        # kaiming-uniform on the (in, r) tensor: torch takes fan_in = size(1) = r, so the
        # bound is 1/sqrt(r) rather than 1/sqrt(in) (faithful to the original).
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.melo_A[adapter_name] = nn.Parameter(a)
        self.melo_B[adapter_name] = nn.Parameter(
            torch.zeros(r, self.out_features, device=weight.device, dtype=torch.float32)
        )
        self.melo_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.num_block[adapter_name] = config.num_block
        self.num_rank_per_block[adapter_name] = p
        # sqrt(r/p) on each factor and alpha/r = 1: the block's product is scaled by r/p.
        self.scale[adapter_name] = float(r // p)
        self.set_adapter([adapter_name])

    def block_delta(self, adapter: str, x: torch.Tensor, block: int) -> torch.Tensor:
        """Update of one block for the whole batch: scale * (x A_k) B_k, x [..., in] -> [..., out]."""
        p = self.num_rank_per_block[adapter]
        a = self.melo_A[adapter][:, block * p : (block + 1) * p]
        b = self.melo_B[adapter][block * p : (block + 1) * p]
        x = self.melo_dropout[adapter](x.to(a.dtype))
        return (x @ a) @ b * self.scale[adapter]

    def routed_delta(self, adapter: str, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Per-example update, x [n, s, in] and blocks [n] -> [n, s, out] (rows with -1 are junk).

        Gathers each example's (in x p) and (p x out) slices and runs two batched matmuls: no
        Python loop over examples or blocks.
        """
        p, nb = self.num_rank_per_block[adapter], self.num_block[adapter]
        a = self.melo_A[adapter].view(self.in_features, nb, p).permute(1, 0, 2)  # [nb, in, p]
        b = self.melo_B[adapter].view(nb, p, self.out_features)  # [nb, p, out]
        idx = blocks.clamp_min(0).to(a.device)
        x = self.melo_dropout[adapter](x.to(a.dtype))
        squeeze = x.dim() == 2
        if squeeze:
            x = x[:, None, :]
        delta = torch.bmm(torch.bmm(x, a[idx]), b[idx]) * self.scale[adapter]
        return delta[:, 0] if squeeze else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise RuntimeError(
            "MELO adapters cannot be merged into the base weights: each example uses a different "
            "block (or none), so there is no single weight to merge"
        )

    def unmerge(self) -> None:
        """Nothing to undo: MELO never merges."""


class Linear(nn.Module, MeloLayer):
    """Dynamic LoRA around ``nn.Linear`` (or a transposed-weight linear with fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MeloConfig, routing: RoutingState, **kwargs: Any) -> None:
        super().__init__()
        MeloLayer.__init__(self, base_layer, routing, **kwargs)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        state = self.routing
        adapter = self.active_adapters[0]
        if self.disable_adapters or adapter not in self.melo_A:
            return result
        if state.forced_block is not None:
            return result + self.block_delta(adapter, x, state.forced_block).to(result.dtype)
        state.check_decided(self._layer_name)
        if not state.any_routed:
            return result
        blocks = state.blocks
        if blocks is None or blocks.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"MELO routing decision is for {None if blocks is None else blocks.shape[0]} examples "
                f"but this layer sees a batch of {x.shape[0]}: the grace layer must run in the same forward"
            )
        delta = self.routed_delta(adapter, x, blocks).to(result.dtype)
        routed = (blocks >= 0).view(-1, *([1] * (result.dim() - 1)))
        # where(): an unrouted row is the base output itself, bit for bit (not base + 0).
        return torch.where(routed, result + delta, result)

    def __repr__(self) -> str:
        return "melo." + super().__repr__()


class Conv1D(Linear):
    """Dynamic LoRA around transformers' ``Conv1D`` (GPT-2): weight stored (in, out)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MeloConfig, routing: RoutingState, **kwargs: Any) -> None:
        config_copy = config
        if not config.fan_in_fan_out:
            # Conv1D keeps its weight as (in, out); the flag only matters for merging, which MELO
            # never does, so it is set silently instead of warning on every GPT-2 layer.
            config_copy = MeloConfig(**{**config.to_dict(), "fan_in_fan_out": True})
        super().__init__(base_layer, adapter_name, config_copy, routing, **kwargs)
