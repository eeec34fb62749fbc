"""Small helpers shared by the baseline editors (GRACE, FT, FT+EWC, plain LoRA).

Kept free of any algorithm logic: config access that works for dataclasses, dicts and
OmegaConf nodes alike, device handling, module lookup by dotted path, target-module resolution
with the same matching rule as peft (exact name or ``.``-suffix; a string is a full regex), and
small safetensors + JSON writers for ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from btp.errors import ConfigError

log = logging.getLogger(__name__)


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a dataclass, dict or OmegaConf node; ``default`` when absent or None."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        try:
            value = getattr(cfg, key)
        except (AttributeError, KeyError):  # OmegaConf struct nodes raise on unknown keys
            value = default
        except Exception:  # noqa: BLE001 - omegaconf.errors.ConfigAttributeError and friends
            value = default
    return default if value is None else value


def cfg_str(cfg: Any, key: str, default: str) -> str:
    """A string setting; str Enums (the schema's choices) give their value, not ``Cls.member``."""
    value = cfg_get(cfg, key, default)
    return str(getattr(value, "value", value))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (non-tensors pass through)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without keys a HF forward would reject (anything that is not a tensor)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Module at dotted path ``name``; ConfigError naming the path when it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ConfigError(
            f"module '{name}' does not exist in {type(model).__name__}; "
            "set the layer to a path printed by model.named_modules()"
        ) from exc


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    # Same rule as peft's target_modules: a str is a regex that must match the full name,
    # a list matches a name exactly or as a '.'-separated suffix.
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_target_modules(model: nn.Module, targets: Any) -> dict[str, nn.Module]:
    """Map each target name to its module; refuse targets that match nothing.

    The original MELO silently skipped unmatched names (``...wi`` on a gated T5 FFN); here a name
    that matches no module is a ConfigError, so a typo cannot turn an edit into a no-op.
    """
    if targets is None:
        raise ConfigError("model.target_modules is empty; list the modules to edit")
    if not isinstance(targets, str):
        targets = [str(t) for t in targets]
        if not targets:
            raise ConfigError("model.target_modules is empty; list the modules to edit")
    found = {n: m for n, m in model.named_modules() if n and _matches(n, targets)}
    if not found:
        raise ConfigError(f"target_modules {targets} match no module of {type(model).__name__}")
    if not isinstance(targets, str):
        for t in targets:
            if not any(n == t or n.endswith("." + t) for n in found):
                raise ConfigError(
                    f"target module '{t}' matches no module of {type(model).__name__}; "
                    "fix model.target_modules"
                )
    return found


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D (weight stored as [in, out])."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency of the runner
        return False
    return isinstance(module, Conv1D)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a Linear or Conv1D layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    raise ConfigError(
        f"cannot wrap {type(module).__name__}: only Linear and Conv1D layers are supported"
    )


def write_safetensors(directory: str | Path, filename: str, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any], meta_name: str) -> Path:
    """Write ``tensors`` (contiguous CPU copies) and a small JSON next to them; returns the dir."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / filename))
    (out / meta_name).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def read_safetensors(directory: str | Path, filename: str, meta_name: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`write_safetensors`."""
    d = Path(directory)
    return load_file(str(d / filename)), json.loads((d / meta_name).read_text())
