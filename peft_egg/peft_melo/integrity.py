"""Integrity of a MELO adapter: checksums of saved tensors, validation of loaded ones.

``MeloModel.save_pretrained`` stores, in each safetensors file's metadata, a SHA-256 of every
tensor (dtype, shape and bytes) and the configuration values that give the tensors their meaning
(target modules, key layer and position, blocks, radius, label rule, key dimension).
``MeloModel.from_pretrained`` then refuses, with the file named:

* an ``adapter_config.json`` that is not readable JSON or not a MELO config;
* a tensor whose bytes no longer match its checksum, a missing or extra tensor;
* a config (edited file or ``from_pretrained`` override) that differs from the one the tensors
  were saved with (``grace_layer``, ``key_id``, ... named);
* a state that cannot be routed correctly (:func:`validate_adapter`, :func:`validate_database`):
  shapes that do not fit the model, NaN or infinite values, a next block outside
  ``0..num_block``, point block ids outside ``-1..next_block - 1``, cluster ids outside the
  database, a cluster without points, a key dimension other than the key layer's output.

Everything is checked before the base model is wrapped, so a refused directory leaves the model
untouched. A directory saved before checksums existed loads with a logged warning.
``MeloModel.load_checkpoint_state`` runs the same two validations on a resumed state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

import torch
from safetensors import safe_open
from torch import nn

from peft.tuners.tuners_utils import _get_in_out_features
from peft.utils import CONFIG_NAME

from .config import MeloConfig

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "melo_tensor_sha256"
IDENTITY_KEY = "melo_identity"
#: Config values the saved tensors depend on: a loaded config must agree on all of them.
IDENTITY_FIELDS = ("target_modules", "grace_layer", "num_block", "num_rank_per_block", "key_id",
                   "key_position", "init_radius", "label_match")
DATABASE_KEYS = ("centers", "radii", "labels", "point_keys", "point_blocks", "point_clusters",
                 "counters")
NEXT_BLOCK = "melo_next_block"


class AdapterIntegrityError(ValueError):
    """A saved or loaded MELO adapter/database that cannot be trusted; the message names the file
    (or the state) and what is wrong."""


# ---------------------------------------------------------------------------------- save side
def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's dtype, shape and bytes."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def identity(config: MeloConfig, key_dim: int | None) -> dict[str, Any]:
    """The values of :data:`IDENTITY_FIELDS` (plus the key dimension) as JSON-ready data."""
    out: dict[str, Any] = {}
    for name in IDENTITY_FIELDS:
        value = getattr(config, name)
        out[name] = sorted(value) if isinstance(value, (list, tuple, set)) else value
    out["key_dim"] = key_dim
    return out


def save_metadata(tensors: Mapping[str, torch.Tensor], config: MeloConfig, key_dim: int | None,
                  **extra: str) -> dict[str, str]:
    """safetensors metadata for ``tensors``: their checksums, the config identity and ``extra``."""
    return {**extra,
            CHECKSUM_KEY: json.dumps({k: tensor_digest(v) for k, v in tensors.items()}),
            IDENTITY_KEY: json.dumps(identity(config, key_dim))}


def key_dim_of(model: nn.Module, grace_layer: str) -> int | None:
    """Output width of the key layer (the key dimension), None when it is not Linear/Conv1D."""
    from .model import resolve_module_name  # model.py imports this module

    module = model.get_submodule(resolve_module_name(model, grace_layer, "grace_layer"))
    if hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    _, out_features = _get_in_out_features(module)
    return out_features


# ---------------------------------------------------------------------------------- load side
def read_config(directory: str, **overrides: Any) -> MeloConfig:
    """``MeloConfig.from_pretrained(directory, **overrides)`` with the file named in any error."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        return MeloConfig.from_pretrained(directory, **overrides)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterIntegrityError(f"{path} is not readable JSON ({e})") from e
    except (TypeError, ValueError, AttributeError) as e:
        text = str(e)
        raise AdapterIntegrityError(text if path in text else f"{path}: {text}") from e


def load_verified(path: str, config: MeloConfig, key_dim: int | None, device: str
                  ) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` after checking their checksums and the config they were saved with.

    Raises:
        AdapterIntegrityError: unreadable file, checksum mismatch, missing/extra tensors, or a
            config (or key dimension) that differs from the saved one.
    """
    try:
        with safe_open(path, framework="pt", device=device) as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise AdapterIntegrityError(f"cannot read {path} ({type(e).__name__}: {e})") from e
    if CHECKSUM_KEY not in metadata:
        logger.warning("%s carries no checksums (saved by an older peft_melo); loading it unverified",
                       path)
        return tensors
    try:
        expected = json.loads(metadata[CHECKSUM_KEY])
        saved_identity = json.loads(metadata[IDENTITY_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise AdapterIntegrityError(f"{path}: its checksum metadata is unreadable ({e})") from e
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        missing = sorted(set(expected) - set(tensors)) if isinstance(expected, dict) else []
        raise AdapterIntegrityError(f"{path}: its tensors differ from those it was saved with "
                                    f"(missing {missing[:3]})")
    bad = sorted(k for k, t in tensors.items() if tensor_digest(t) != expected[k])
    if bad:
        raise AdapterIntegrityError(f"{path} is corrupt: tensor(s) {bad[:3]} do not match their "
                                    "checksums")
    current = identity(config, key_dim)
    differ = [f"{k}: saved {saved_identity.get(k)!r}, now {current[k]!r}" for k in current
              if k in saved_identity and saved_identity[k] != current[k]]
    if differ:
        raise AdapterIntegrityError(
            f"{path} was saved for another configuration or model ({'; '.join(differ)}); load it "
            f"with the {CONFIG_NAME} it was saved with, on the model it was trained on")
    return tensors


def expected_adapter_shapes(model: nn.Module, config: MeloConfig) -> dict[str, tuple[int, ...]]:
    """``{"<module>.melo_A": (in, r), "<module>.melo_B": (r, out)}`` for every target module of
    the (unwrapped or wrapped) ``model``, as ``MeloModel.melo_parameters`` names them."""
    from .model import resolve_module_name  # model.py imports this module

    targets = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    shapes: dict[str, tuple[int, ...]] = {}
    for target in targets:
        name = resolve_module_name(model, target, "target module")
        module = model.get_submodule(name)
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        in_features, out_features = _get_in_out_features(module)
        shapes[f"{name}.melo_A"] = (in_features, config.r)
        shapes[f"{name}.melo_B"] = (config.r, out_features)
    return shapes


def _fail(where: str, what: str) -> None:
    raise AdapterIntegrityError(f"{where}: {what}")


def _finite(where: str, name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        _fail(where, f"{name} must be a float tensor, got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        _fail(where, f"{name} holds NaN or infinite values")


def _integer(where: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...] | None) -> None:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        _fail(where, f"{name} must be an integer tensor, got {tensor.dtype}")
    if shape is not None and tuple(tensor.shape) != shape:
        _fail(where, f"{name} has shape {tuple(tensor.shape)}, expected {shape}")


def validate_adapter(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                     config: MeloConfig, where: str) -> int:
    """Check the LoRA factors and the block counter; returns the next block.

    Args:
        state: ``MeloModel.adapter_state_dict()`` form.
        shapes: :func:`expected_adapter_shapes` of the model it is for.
        config: the adapter's config (``num_block``).
        where: the file (or "checkpoint state") for messages.
    """
    names = set(state) - {NEXT_BLOCK}
    missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))
    if missing or extra:
        _fail(where, f"LoRA tensors do not fit the model's target modules (missing {missing[:3]}, "
                     f"unexpected {extra[:3]})")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != tuple(shape):
            _fail(where, f"{name} has shape {tuple(state[name].shape)}, the model needs {tuple(shape)}")
        _finite(where, name, state[name])
    if NEXT_BLOCK not in state:
        _fail(where, f"{NEXT_BLOCK} is missing")
    _integer(where, NEXT_BLOCK, state[NEXT_BLOCK], (1,))
    next_block = int(state[NEXT_BLOCK][0])
    if not 0 <= next_block <= config.num_block:
        _fail(where, f"{NEXT_BLOCK}={next_block} is outside 0..{config.num_block} (num_block)")
    return next_block


def validate_database(state: Mapping[str, torch.Tensor], config: MeloConfig, next_block: int,
                      key_dim: int | None, where: str) -> None:
    """Check a ``VectorDatabase.state_dict()`` for shapes, finite values and ids in range.

    C clusters, P points, d key dimension: centers [C, d], radii [C], labels [C, L],
    point_keys [P, d], point_blocks [P] in -1..next_block - 1, point_clusters [P] in 0..C - 1
    (every cluster has a point), counters [2] >= 0.
    """
    missing = [k for k in DATABASE_KEYS if k not in state]
    if missing:
        _fail(where, f"vector database tensors missing: {missing}")
    centers, radii, labels = state["centers"], state["radii"], state["labels"]
    keys, blocks, clusters = state["point_keys"], state["point_blocks"], state["point_clusters"]
    n_clusters, n_points = int(centers.shape[0]) if centers.dim() else -1, int(keys.shape[0]) if keys.dim() else -1
    if centers.dim() != 2 or keys.dim() != 2:
        _fail(where, f"centers and point_keys must be 2-D, got {tuple(centers.shape)} and {tuple(keys.shape)}")
    _finite(where, "centers", centers)
    _finite(where, "radii", radii)
    _finite(where, "point_keys", keys)
    if tuple(radii.shape) != (n_clusters,) or labels.dim() != 2 or labels.shape[0] != n_clusters:
        _fail(where, f"{n_clusters} centers but radii {tuple(radii.shape)} and labels {tuple(labels.shape)}")
    _integer(where, "labels", labels, None)
    _integer(where, "point_blocks", blocks, (n_points,))
    _integer(where, "point_clusters", clusters, (n_points,))
    _integer(where, "counters", state["counters"], (2,))
    if bool((state["counters"] < 0).any()):
        _fail(where, f"counters {state['counters'].tolist()} must be >= 0")
    if n_clusters:
        dims = {int(centers.shape[1])} | ({int(keys.shape[1])} if n_points else set())
        if len(dims) != 1:
            _fail(where, f"centers have dimension {int(centers.shape[1])}, point_keys {int(keys.shape[1])}")
        if key_dim is not None and dims != {key_dim}:
            _fail(where, f"keys have dimension {dims.pop()} but the key layer {config.grace_layer!r} "
                         f"outputs {key_dim}")
        if n_points == 0:
            _fail(where, f"{n_clusters} clusters without any point")
    elif n_points:
        _fail(where, f"{n_points} points but no cluster")
    if n_points:
        lo, hi = int(blocks.min()), int(blocks.max())
        if lo < -1 or hi >= next_block:
            _fail(where, f"point block ids span {lo}..{hi}; they must lie in -1..{next_block - 1} "
                         f"(blocks trained so far: {next_block})")
        lo, hi = int(clusters.min()), int(clusters.max())
        if lo < 0 or hi >= n_clusters:
            _fail(where, f"point cluster ids span {lo}..{hi}; there are {n_clusters} clusters")
        if bool((torch.bincount(clusters.long().cpu(), minlength=n_clusters) == 0).any()):
            _fail(where, "a cluster has no point (routing needs at least one per cluster)")
    if "init_radius" in state and float(state["init_radius"].reshape(-1)[0]) != float(config.init_radius):
        _fail(where, f"saved with init_radius={float(state['init_radius'].reshape(-1)[0])}, the config "
                     f"has {config.init_radius}")


__all__ = ["AdapterIntegrityError", "tensor_digest", "save_metadata", "read_config", "load_verified",
           "expected_adapter_shapes", "validate_adapter", "validate_database", "key_dim_of"]
