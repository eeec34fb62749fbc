"""MeloModel: the MELO tuner on peft's ``BaseTuner`` - injection, routed inference, edits, save/load."""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from peft.tuners.tuners_utils import BaseTuner

from . import integrity
from .config import MeloConfig
from .layer import Conv1D, Linear, MeloLayer
from .prefix_cache import FrozenPrefixCache
from .routing import KeyHook, RoutingState
from .vector_database import VectorDatabase

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
DATABASE_NAME = "vector_database.safetensors"
ADAPTER_NAME = "default"


class NoBlockLeftError(RuntimeError):
    """Every LoRA block has been used: the model cannot take another edit batch."""


@dataclass
class EditResult:
    """Outcome of one ``MeloModel.edit``: per-iteration losses, wall time, the block trained."""

    losses: list[float] = field(default_factory=list)
    time_s: float = 0.0
    block: int = -1
    cached_blocks: dict[str, int] = field(default_factory=dict)  # frozen-prefix blocks per stack


def _close_names(name: str, candidates: list[str], n: int = 5) -> list[str]:
    """Module names that look like ``name``: same ending first, then difflib's closest."""
    tail = name.split(".")[-1]
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    same_tail = [c for c in candidates if c.split(".")[-1] == tail and c not in close]
    return (close + same_tail)[:n]


def resolve_module_name(model: nn.Module, name: str, what: str) -> str:
    """Full path of the module called ``name`` (exact path or unique dotted suffix).

    A name that matches nothing, or several modules, is an error that lists the closest names.
    """
    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return name
    matches = [n for n in names if n.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(f"{what} {name!r} matches several modules {matches[:5]}: give the full path")
    raise ValueError(
        f"{what} {name!r} matches no module of {type(model).__name__}; closest names: "
        f"{_close_names(name, names)}"
    )


class MeloModel(BaseTuner):
    """A transformers model with MELO's dynamic LoRA, its vector database and its key hook.

    Build it with :func:`get_melo_model`. Calling it (or ``generate``) routes each example to one
    block or none; :meth:`edit` trains the next block on a labelled batch.
    """

    prefix: str = "melo_"
    tuner_layer_cls = MeloLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, config: MeloConfig, adapter_name: str = ADAPTER_NAME) -> None:
        if not isinstance(config, MeloConfig):
            raise TypeError(f"MeloModel needs a MeloConfig, got {type(config).__name__}")
        super().__init__(model, config, adapter_name)
        self.next_block = 0

    # ------------------------------------------------------------------ injection (BaseTuner hooks)
    def _pre_injection_hook(self, model: nn.Module, config: MeloConfig, adapter_name: str) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("a MeloModel holds one adapter; build another MeloModel for another one")
        targets = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
        for target in targets:
            resolve_module_name(model, target, "target module")
        grace = resolve_module_name(model, config.grace_layer, "grace_layer")
        if grace in [resolve_module_name(model, t, "target module") for t in targets]:
            raise ValueError(f"grace_layer {grace!r} is also a target module: the key must come from an unadapted layer")
        self.routing = RoutingState()
        self.database = VectorDatabase(config.init_radius, config.label_match)
        self._grace_name = grace

    def _prepare_adapter_config(self, peft_config: MeloConfig, model_config: dict) -> MeloConfig:
        return peft_config

    def _create_and_replace(
        self,
        peft_config: MeloConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, MeloLayer):
            raise ValueError(f"{current_key} already carries a MELO adapter")
        if isinstance(target, HFConv1D):
            new_module = Conv1D(target, adapter_name, peft_config, self.routing)
        elif isinstance(target, nn.Linear):
            new_module = Linear(target, adapter_name, peft_config, self.routing)
        else:
            raise TypeError(
                f"target module {current_key} is a {type(target).__name__}; MELO supports nn.Linear and Conv1D"
            )
        new_module._layer_name = current_key
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: MeloConfig, adapter_name: str) -> None:
        grace_module = model.get_submodule(self._grace_name)
        self._key_hook = KeyHook(self.routing, self.database, config.key_id, config.key_position)
        self._hook_handle = grace_module.register_forward_hook(self._key_hook)
        device = next(model.parameters()).device
        self.database.to(device)

    # ------------------------------------------------------------------ properties
    @property
    def config_(self) -> MeloConfig:
        """This model's MeloConfig."""
        return self.peft_config[ADAPTER_NAME]

    @property
    def num_blocks_left(self) -> int:
        return self.config_.num_block - self.next_block

    def melo_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of every LoRA factor, names without the adapter name."""
        for name, param in self.model.named_parameters():
            if ".melo_A." in name or ".melo_B." in name:
                yield name.replace(f".{ADAPTER_NAME}", ""), param

    # ------------------------------------------------------------------ inference
    def _begin(self, kwargs: dict) -> None:
        self.routing.begin_forward(kwargs.get("attention_mask"), kwargs.get("labels"))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Routed forward: each example uses its block, or is exactly the base model."""
        self._begin(kwargs)
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Routed generation; the prompt's routing decision serves every generated token."""
        self._begin(kwargs)
        with self._sticky():
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def _sticky(self) -> Iterator[None]:
        self.routing.sticky = True
        try:
            yield
        finally:
            self.routing.sticky = False

    # ------------------------------------------------------------------ editing
    def edit(self, batch: dict[str, torch.Tensor]) -> EditResult:
        """One MELO edit: train the next block on ``batch`` (which must carry ``labels``).

        Every example is forced to the new block; a fresh optimizer over the LoRA factors runs
        ``num_iter`` steps with StepLR; the base model and every other block stay bit-identical;
        the database takes the batch's keys at the first iteration. The forwards run under bf16
        autocast when the base model is bf16 (see :meth:`_edit_autocast`).
        """
        cfg = self.config_
        if "labels" not in batch:
            raise ValueError("MeloModel.edit needs a batch with 'labels'")
        if self.next_block >= cfg.num_block:
            raise NoBlockLeftError(
                f"all {cfg.num_block} LoRA blocks are used: this model cannot take edit batch "
                f"{self.next_block + 1}; raise num_block or edit fewer batches"
            )
        block = self.next_block
        params = [p for _, p in self.melo_parameters()]
        if cfg.optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.edit_lr)
        else:
            optimizer = torch.optim.SGD(params, lr=cfg.edit_lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_size, gamma=cfg.lr_gamma)
        # Only the block in training can change: the others get no gradient, and their entries are
        # also masked so that no optimizer quirk could ever move them.
        masks = self._block_masks(block)
        was_training = self.model.training
        self.model.train()
        losses = []
        inputs = dict(batch)
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            inputs["use_cache"] = False  # a training forward needs no key/value cache
        prefix = FrozenPrefixCache(self.model, self._adapted_names()) if cfg.cache_frozen_prefix \
            else contextlib.nullcontext()
        start = time.perf_counter()
        self.routing.force(block)
        try:
            with prefix:
                for iteration in range(cfg.num_iter):
                    self.routing.begin_forward(batch.get("attention_mask"), batch.get("labels"))
                    with self._edit_autocast():
                        loss = self.model(**inputs).loss
                    if iteration == 0:
                        self.database.update(self.routing.last_keys, batch["labels"], block)
                        if cfg.cache_frozen_prefix:
                            prefix.step_done()
                    optimizer.zero_grad(set_to_none=False)
                    loss.backward()
                    for param, mask in masks:
                        param.grad.mul_(mask)
                    optimizer.step()
                    scheduler.step()
                    losses.append(loss.detach())
        finally:
            self.routing.release()
            self.model.train(was_training)
            optimizer.zero_grad(set_to_none=True)
        if losses and losses[0].is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        self.next_block += 1
        cached = prefix.cached_blocks if cfg.cache_frozen_prefix else {}
        return EditResult(losses=torch.stack(losses).tolist(), time_s=elapsed, block=block,
                          cached_blocks=cached)

    def _edit_autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for an edit's forwards when the base model is bf16 (on CUDA or CPU):
        its matmuls, the LoRA ones included, run in bf16 instead of casting the bf16 activations
        up to the fp32 factors; the factors, their gradients, the optimizer state and the
        database stay fp32. Any other base dtype: no autocast (the forwards as at inference)."""
        base = next((p for n, p in self.model.named_parameters()
                     if ".melo_A." not in n and ".melo_B." not in n and p.is_floating_point()), None)
        if base is None or base.dtype != torch.bfloat16 or base.device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=base.device.type, dtype=torch.bfloat16)

    def _adapted_names(self) -> list[str]:
        """Full module names of the MELO layers."""
        return [name for name, module in self.model.named_modules() if isinstance(module, MeloLayer)]

    def _block_masks(self, block: int) -> list[tuple[nn.Parameter, torch.Tensor]]:
        p = self.config_.num_rank_per_block
        masks = []
        for name, param in self.melo_parameters():
            mask = torch.zeros_like(param)
            if name.endswith("melo_A"):
                mask[:, block * p : (block + 1) * p] = 1
            else:
                mask[block * p : (block + 1) * p] = 1
            masks.append((param, mask))
        return masks

    # ------------------------------------------------------------------ persistence
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA factors and the block counter, tensors only."""
        state = {name: param.detach().contiguous() for name, param in self.melo_parameters()}
        state["melo_next_block"] = torch.tensor([self.next_block], dtype=torch.long)
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`adapter_state_dict` returned (shapes must match this model)."""
        own = dict(self.melo_parameters())
        missing = sorted(set(own) - set(state))
        if missing:
            raise KeyError(f"adapter weights missing for {missing[:3]}{'...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            for name, param in own.items():
                if state[name].shape != param.shape:
                    raise ValueError(f"{name}: saved shape {tuple(state[name].shape)} != model's {tuple(param.shape)}")
                param.copy_(state[name].to(param.device, param.dtype))
        self.next_block = int(state["melo_next_block"][0])

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume editing: adapter + database (prefixed ``db.``)."""
        state = self.adapter_state_dict()
        state.update({f"db.{k}": v.detach().cpu() for k, v in self.database.state_dict().items()})
        return {k: v.cpu() for k, v in state.items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`checkpoint_state` returned, after validating it (``integrity``)."""
        adapter = {k: v for k, v in state.items() if not k.startswith("db.")}
        database = {k[3:]: v for k, v in state.items() if k.startswith("db.")}
        shapes = {name: tuple(param.shape) for name, param in self.melo_parameters()}
        next_block = integrity.validate_adapter(adapter, shapes, self.config_, "checkpoint state")
        integrity.validate_database(database, self.config_, next_block,
                                    integrity.key_dim_of(self.model, self._grace_name), "checkpoint state")
        self.load_adapter_state_dict(adapter)
        device = next(self.model.parameters()).device
        self.database.load_state_dict({k: v.to(device) for k, v in database.items()})

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write adapter_config.json, the LoRA factors and the vector database (safetensors, with
        the checksums and config identity that :meth:`from_pretrained` verifies)."""
        os.makedirs(save_directory, exist_ok=True)
        self.config_.save_pretrained(str(save_directory))
        key_dim = integrity.key_dim_of(self.model, self._grace_name)
        adapter = {k: v.cpu() for k, v in self.adapter_state_dict().items()}
        save_file(adapter, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME),
                  metadata=integrity.save_metadata(adapter, self.config_, key_dim, format="pt", peft_type="MELO"))
        database = {k: v.detach().cpu() for k, v in self.database.state_dict().items()}
        save_file(database, os.path.join(save_directory, DATABASE_NAME),
                  metadata=integrity.save_metadata(database, self.config_, key_dim, format="pt"))
        with open(os.path.join(save_directory, "melo_stats.json"), "w", encoding="utf-8") as handle:
            json.dump({**self.database.stats(), "blocks_used": self.next_block}, handle, indent=2)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, **config_overrides: Any) -> "MeloModel":
        """Wrap ``model`` with the MELO adapter saved in ``directory`` by :meth:`save_pretrained`.

        The files are verified (checksums, saved config, shapes, finite values, ids in range: see
        ``peft_melo.integrity``) before ``model`` is touched.

        Raises:
            integrity.AdapterIntegrityError: naming the file and what is wrong with it.
        """
        directory = str(directory)
        config = integrity.read_config(directory, **config_overrides)
        key_dim = integrity.key_dim_of(model, config.grace_layer)
        device = str(next(model.parameters()).device)
        paths = [os.path.join(directory, name) for name in (ADAPTER_WEIGHTS_NAME, DATABASE_NAME)]
        adapter, database = (integrity.load_verified(path, config, key_dim, device) for path in paths)
        shapes = integrity.expected_adapter_shapes(model, config)
        next_block = integrity.validate_adapter(adapter, shapes, config, paths[0])
        integrity.validate_database(database, config, next_block, key_dim, paths[1])
        melo = cls(model, config)
        melo.load_adapter_state_dict(adapter)
        melo.database.load_state_dict(database)
        return melo


def get_melo_model(model: nn.Module, config: MeloConfig) -> MeloModel:
    """Freeze ``model`` and wrap it with MELO's dynamic LoRA, vector database and key hook."""
    for param in model.parameters():
        param.requires_grad_(False)
    return MeloModel(model, config)
