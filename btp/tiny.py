"""Tiny stand-ins: seeded random models with a real checkpoint's module paths, built offline.

Everything here is read from the family table (:mod:`btp.families`): an architecture
(:data:`~btp.families.ARCHS`) gives the family, layer count and FFN type; the family gives the
transformers classes, the config fields, the offline tokenizer family and the residual output
projections. Real checkpoints never pass through this module (:func:`btp.models.load_pretrained`).

A stand-in keeps the real module paths (``encoder.block.4.layer.1.DenseReluDense.wo`` resolves
exactly as on the real model) with small widths and the shipped offline vocabulary; its weights
are random but seeded, hence identical from run to run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from btp.errors import ConfigError
from btp.families import (ARCH_HINTS, ARCHS, FAMILIES, TINY_KEYS, family_of_arch,
                          transformers_class)
from btp.tokenizer import get_tokenizer


def as_dict(obj: Any) -> dict[str, Any]:
    """A plain dict from a dict, DictConfig or dataclass-like ``tiny`` section."""
    if obj is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            return dict(OmegaConf.to_container(obj, resolve=True))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if hasattr(obj, "items"):
        return dict(obj.items())
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if v is not None}
    raise ConfigError(f"model.tiny must be a mapping of widths, got {type(obj).__name__}")


def resolve_arch(tiny: dict[str, Any], name: str, pretrained: str = "") -> str:
    """The tiny architecture: ``tiny.arch``, else recognised from the model's ``name``, else from
    its ``pretrained`` id (:data:`~btp.families.ARCH_HINTS`)."""
    if tiny.get("arch"):
        arch = str(tiny["arch"])
        if arch not in ARCHS:
            raise ConfigError(f"model.tiny.arch '{arch}' unknown; expected one of {sorted(ARCHS)}")
        return arch
    for source in (name, pretrained):
        text = str(source).lower()
        text = text[5:] if text.startswith(("tiny-", "tiny_")) else text
        # Longest hint first so "t5-small-ssm-nq" wins over "t5-small" and "gpt2-xl" over "gpt2".
        for hint in sorted(ARCH_HINTS, key=len, reverse=True):
            if hint in text:
                return ARCH_HINTS[hint]
    raise ConfigError(
        f"cannot tell which architecture tiny model '{name or '?'}' stands "
        f"for; set model.tiny.arch to one of {sorted(ARCHS)}"
    )


def build_tiny_config(arch: str, tiny: dict[str, Any], num_labels: int | None) -> Any:
    """The ``transformers`` config of the tiny stand-in for ``arch`` (dropout already 0)."""
    unknown = set(tiny) - TINY_KEYS
    if unknown:
        raise ConfigError(f"model.tiny: unknown key(s) {sorted(unknown)}; allowed {sorted(TINY_KEYS)}")
    family = family_of_arch(arch)
    spec = {**ARCHS[arch], **{k: v for k, v in tiny.items() if v is not None}}
    d_model, heads = int(spec["d_model"]), int(spec["heads"])
    if d_model % heads:
        raise ConfigError(f"model.tiny: d_model {d_model} is not divisible by heads {heads}")
    if heads % int(spec.get("kv_heads", heads)):
        raise ConfigError(f"model.tiny: heads {heads} is not a multiple of kv_heads "
                          f"{spec['kv_heads']}")
    tokenizer = get_tokenizer(family.tokenizer)
    return transformers_class(family.config_class)(**family.config_fields(spec, tokenizer,
                                                                          num_labels))


def build_tiny_model(arch: str, tiny: dict[str, Any], num_labels: int | None = None,
                     seed: int = 0) -> tuple[nn.Module, Any]:
    """A seeded random tiny stand-in for ``arch`` and its family's offline tokenizer.

    The global torch RNG is forked, so building a model does not shift the run's random stream.
    """
    config = build_tiny_config(arch, tiny, num_labels)
    family = family_of_arch(arch)
    cls = transformers_class(family.model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny.get("seed", seed)))
        model = cls(config)
        if family.untied_head and not ARCHS[arch].get("tie_word_embeddings", True):
            _untie_t5_lm_head(model)
    if tiny.get("residual_scale") is not None:
        scale_residual_branches(model, family.name, float(tiny["residual_scale"]))
    return model, get_tokenizer(family.tokenizer)


def scale_residual_branches(model: nn.Module, family: str, scale: float) -> int:
    """Multiply the weights of every residual-branch output projection of ``model`` by ``scale``.

    Returns how many projections were scaled (bias untouched). See :data:`TINY_KEYS`.
    """
    if not scale > 0:
        raise ConfigError(f"model.tiny.residual_scale must be > 0, got {scale}")
    suffixes = FAMILIES[family].residual_outputs
    scaled = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(suffixes) and hasattr(module, "weight"):
                module.weight.mul_(scale)
                scaled += 1
    if not scaled:  # pragma: no cover - the suffix table is tested per family
        raise ConfigError(f"model.tiny.residual_scale: no residual output projection in {family}")
    return scaled


def _untie_t5_lm_head(model: nn.Module) -> None:
    """Give a T5 v1.1-style stand-in its own ``lm_head`` like the real checkpoint.

    transformers 5 always ties T5's ``lm_head`` to ``shared`` at init and only unties when a
    checkpoint holds two different tensors; ``tie_word_embeddings=False`` in the config only
    turns off the decoder-output scaling. So build the separate head here (T5's init:
    N(0, initializer_factor)).
    """
    head = model.lm_head
    factor = float(getattr(model.config, "initializer_factor", 1.0))
    head.weight = nn.Parameter(torch.randn_like(head.weight) * factor)
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)  # so a later tie_weights() keeps them apart
    model.config.tie_word_embeddings = False


def load_tiny(tiny_section: Any, name: str, pretrained: str, kind: str,
              num_labels: int | None, seed: int) -> tuple[nn.Module, Any, str]:
    """The stand-in for a model config's ``tiny`` section: ``(model, tokenizer, arch)``.

    Raises:
        ConfigError: no known architecture, an unknown ``tiny`` key, widths that do not divide,
            or an architecture of another model kind than ``kind``.
    """
    tiny = as_dict(tiny_section)
    arch = resolve_arch(tiny, name, pretrained)
    arch_kind = family_of_arch(arch).kind
    if arch_kind != kind:
        raise ConfigError(f"tiny architecture '{arch}' is {arch_kind}, not {kind}")
    model, tokenizer = build_tiny_model(arch, tiny, num_labels, seed)
    return model, tokenizer, arch


__all__ = ["load_tiny", "build_tiny_model", "build_tiny_config", "resolve_arch",
           "scale_residual_branches"]
