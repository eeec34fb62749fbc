"""Small helpers shared by the baseline editors (GRACE, FT, FT+EWC, plain LoRA).

Kept free of any algorithm logic: config access that works for dataclasses, dicts and
OmegaConf nodes alike, device handling, module lookup by dotted path, target-module resolution
with the same matching rule as peft (exact name or ``.``-suffix; a string is a full regex),
small safetensors + JSON writers for ``save_pretrained``, and the GRACE repository's edit stream
shared by its baselines (which records of an edit batch to edit, :func:`records_to_edit`, and the
batch cut down to them, :func:`select_rows`).
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
from btp.schema import cfg_get  # noqa: F401  (the editors read model sections with it)

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------ the GRACE repository's stream
#: How an editor decides which records of an edit batch to edit (see :func:`records_to_edit`).
ERROR_FILTERS = ("original", "exact", "none")
MODEL_KINDS = ("seq2seq", "classification", "causal_lm")


def model_kind(model: nn.Module) -> str:
    """``seq2seq`` (T5), ``classification`` (a ``*ForSequenceClassification``) or ``causal_lm``."""
    if bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)):
        return "seq2seq"
    if type(model).__name__.endswith("ForSequenceClassification"):
        return "classification"
    return "causal_lm"


def check_choice(section: str, key: str, value: str, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices``, else a ConfigError naming the override to fix."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{section}.{key} must be one of {choices}, got {value!r}")
    return value


def records_to_edit(editor: Any, batch: Mapping[str, torch.Tensor], kind: str,
                    rule: str) -> torch.Tensor:
    """[n] bool: the records of ``batch`` the editor edits, judged on the model as edited so far.

    The GRACE repository edits a record only when its ``is_error`` says the model gets it wrong:

    * ``original`` (its rule per task): classification, the argmax class differs from the label;
      seq2seq, every record (its QA test compares the squeezed 1-D generation with the ``[1, L]``
      label tensor by ``len``, which never matches, so every zsRE record counts as an error);
      causal LM, every record (hallucination edits are errors by construction).
    * ``exact``: as ``original``, except that a seq2seq record counts as wrong only when greedy
      decoding does not reproduce its label tokens.
    * ``none``: every record (MELO's stream).

    ``editor`` supplies ``forward``/``generate`` (the edited model); nothing is trained here.
    """
    n = int(batch["input_ids"].shape[0])
    dev = batch["input_ids"].device
    every = torch.ones(n, dtype=torch.bool, device=dev)
    if rule == "none" or kind == "causal_lm":
        return every
    labels = batch["labels"]
    if kind == "classification":
        logits = editor.forward(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return (logits.argmax(-1) != labels.to(logits.device)).to(dev)
    if rule == "original":
        return every
    # Greedy answer vs label ids: position 0 of a T5 generation is the decoder start token, so
    # 1 + label width tokens decide whether the label (ending in </s>) is reproduced.
    gen = editor.generate(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          max_length=int(labels.shape[1]) + 1).to(dev)
    wrong = []
    for row, gold in zip(gen, labels):
        gold = gold[gold != -100]
        pred = row[1 : 1 + gold.numel()]
        wrong.append(pred.shape != gold.shape or not bool(torch.equal(pred, gold)))
    return torch.tensor(wrong, dtype=torch.bool, device=dev)


def select_rows(batch: Mapping[str, torch.Tensor], rows: torch.Tensor,
                kind: str) -> dict[str, torch.Tensor]:
    """The records ``rows`` ([n] bool) of a batch, as if collated alone.

    Trailing columns that are padding in every kept row are cut for the kinds the collator pads
    to the longest row (seq2seq, causal LM); classification inputs keep their fixed length.
    """
    out = {k: v[rows] for k, v in batch.items()}
    if kind == "classification" or bool(rows.all()):
        return out
    am = out.get("attention_mask")
    if am is not None and am.dim() == 2 and am.shape[0] > 0:
        width = int(am.any(0).nonzero().max()) + 1
        for k in ("input_ids", "attention_mask"):
            out[k] = out[k][:, :width]
        if kind == "causal_lm" and "labels" in out:
            out["labels"] = out["labels"][:, :width]
    if kind == "seq2seq" and "labels" in out and out["labels"].shape[0] > 0:
        lab = out["labels"]
        width = int((lab != -100).any(0).nonzero().max()) + 1
        out["labels"] = lab[:, :width]
    return out


class _NoPrefixCache:
    """Stands in for ``FrozenPrefixCache`` when the cache is off: every step runs in full."""

    def __enter__(self) -> "_NoPrefixCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def step_done(self) -> None:
        """Nothing recorded, nothing to replay."""


def frozen_prefix(model: nn.Module, enabled: bool, adapted: list[str] | None = None) -> Any:
    """The frozen-prefix cache below ``adapted`` (module names; default: the modules ``model``
    trains now, so call it inside the edit, once the trained weights require grad), or a no-op
    when ``enabled`` is false."""
    from peft_melo import FrozenPrefixCache, trainable_modules

    if not enabled:
        return _NoPrefixCache()
    return FrozenPrefixCache(model, trainable_modules(model) if adapted is None else adapted)
