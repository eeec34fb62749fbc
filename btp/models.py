"""Model loading: real checkpoints (hub id or local path), or a tiny stand-in (:mod:`btp.tiny`).

``load_model_and_tokenizer(model_cfg, device)`` reads these ``model_cfg`` fields (attribute
access; a DictConfig, dataclass or namespace):

* ``name``: e.g. ``t5small``, ``tiny-t5small``; also used to pick the tiny architecture.
* ``kind``: ``seq2seq`` | ``classification`` | ``causal_lm``.
* ``pretrained``: hub id or local path of the real checkpoint.
* ``tokenizer``: hub id or local path of its tokenizer (``None``: same as ``pretrained``);
  ignored for tiny models, which use :mod:`btp.tokenizer`.
* ``num_labels``: classes for ``classification`` (tiny only; a checkpoint keeps its own).
* ``tiny``: ``None`` for the real checkpoint, else a dict of small widths (keys in
  :data:`btp.families.TINY_KEYS`), e.g. ``{d_model: 64, d_ff: 128, heads: 4}``.
* ``dtype``: ``fp32`` (default) | ``bf16`` | ``fp16``: the base model's weights (MELO's LoRA
  factors and vector database stay in fp32, see ``peft_melo``).
* ``device_map``: ``None`` (the run's ``device``), or accelerate's placement, e.g. ``auto`` to
  spread a large checkpoint over every visible GPU (real checkpoints only).
* ``gguf_package`` / ``gguf_file`` / ``cache_dir``: a GGUF checkpoint shipped in an installed
  package (SmolLM2), cached as a plain safetensors copy (:mod:`btp.packaged_models`).
* ``target_modules`` / ``grace_layer``: not used here (the editors check them).

A tiny stand-in (built by :mod:`btp.tiny` from the family table, never on the real-checkpoint
path) keeps the real checkpoint's module paths, layer counts and FFN type
(:data:`btp.families.ARCHS`) with small widths and our offline vocabulary, so module names such as
``encoder.block.4.layer.1.DenseReluDense.wo`` resolve exactly as on the real model. Its weights
are random but seeded, hence identical from run to run.

Every model comes back with all dropout at 0 (config fields and modules), in eval mode, with
``requires_grad=False`` on every parameter, on ``device``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from btp.errors import ConfigError, ModelLoadError
from btp.families import FAMILIES
from btp.schema import cfg_get

log = logging.getLogger(__name__)

#: The model kinds of the family table, in its order (``seq2seq``, ``classification``,
#: ``causal_lm``).
KINDS: tuple[str, ...] = tuple(dict.fromkeys(family.kind for family in FAMILIES.values()))

#: How a real checkpoint of each kind is loaded (the transformers auto class reads its family
#: from the checkpoint's config).
_AUTO_CLASSES = {
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
}

#: ``model.dtype`` values -> torch dtypes (the LoRA factors and the database stay in fp32).
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def zero_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0: config fields, ``nn.Dropout`` modules, and float
    ``*dropout*`` attributes that some attention modules read at forward time (T5's ``dropout``).
    """
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)
    return model


def freeze(model: nn.Module, device: torch.device | str | None) -> nn.Module:
    """Dropout 0, eval mode, no gradients anywhere, on ``device`` (``None``: where it is, e.g.
    spread over several GPUs by a ``device_map``)."""
    zero_dropout(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model if device is None else model.to(device)


def _offline() -> bool:
    # Read at call time (huggingface_hub reads HF_HUB_OFFLINE once, at import).
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint, so that a machine without network fails at once
    instead of after minutes of download retries."""
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _load_error(what: str, ident: str, err: Exception) -> ModelLoadError:
    if Path(ident).expanduser().exists():
        return ModelLoadError(
            f"could not load {what} from local path '{ident}' ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the folder holds a "
            "transformers checkpoint"
        )
    return ModelLoadError(
        f"could not load {what} '{ident}': no network or the Hugging Face hub was unreachable "
        f"({type(err).__name__}); use a tiny-* model or set model.pretrained=/path/to/checkpoint "
        "(a local folder)"
    )


def torch_dtype(name: str | None) -> torch.dtype:
    """``model.dtype`` (``fp32``/``bf16``/``fp16``, or the torch names) as a torch dtype."""
    key = str(name or "fp32").lower()
    if key not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not a dtype this runner loads; use fp32, "
                          "bf16 or fp16")
    return DTYPES[key]


def checkpoint_source(model_cfg: Any) -> tuple[str, str]:
    """``(model ident, tokenizer ident)`` of a real checkpoint: ``pretrained`` (hub id or
    folder), or the plain copy of the GGUF file that ``gguf_package`` ships (built on first use,
    :mod:`btp.packaged_models`)."""
    package = cfg_get(model_cfg, "gguf_package")
    if package:
        from btp.packaged_models import gguf_checkpoint

        gguf_file = cfg_get(model_cfg, "gguf_file")
        if not gguf_file:
            raise ConfigError(f"model '{cfg_get(model_cfg, 'name', '?')}': gguf_package is set but "
                              "gguf_file is not; name the GGUF file the package ships")
        folder = str(gguf_checkpoint(str(package), str(gguf_file), cfg_get(model_cfg, "cache_dir")))
        return folder, str(cfg_get(model_cfg, "tokenizer", folder))
    ident = str(cfg_get(model_cfg, "pretrained", "") or "")
    if not ident:
        raise ConfigError(f"model '{cfg_get(model_cfg, 'name', '?')}': no 'pretrained' and no 'tiny'")
    return ident, str(cfg_get(model_cfg, "tokenizer", ident))


def load_pretrained(model_cfg: Any, seed: int = 0) -> tuple[nn.Module, Any]:
    """The real checkpoint and tokenizer via the ``AutoModelFor*``/``AutoTokenizer`` classes,
    in ``model.dtype`` and, when ``model.device_map`` is set, placed by accelerate.

    Without network (``HF_HUB_OFFLINE=1``, or the hub's endpoint not reachable) a hub id is
    looked up in the local cache only, so a missing checkpoint fails at once.

    Raises:
        ModelLoadError: the hub could not be reached (or the path/id is wrong), in one line.
    """
    import transformers

    kind = str(cfg_get(model_cfg, "kind", ""))  # the schema's ModelKind, or a plain name
    ident, tok_ident = checkpoint_source(model_cfg)
    local = Path(ident).expanduser().exists()
    local_only = _offline() or (not local and not _hub_reachable())
    auto_cls = getattr(transformers, _AUTO_CLASSES[kind])
    dtype = torch_dtype(cfg_get(model_cfg, "dtype"))
    device_map = cfg_get(model_cfg, "device_map")
    try:
        config = transformers.AutoConfig.from_pretrained(ident, local_files_only=local_only)
    except Exception as e:  # noqa: BLE001 - any hub/IO failure means the same to the user
        raise _load_error("model", ident, e) from e
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)  # before init: some modules copy these floats at build time
    num_labels = cfg_get(model_cfg, "num_labels")
    new_head = kind == "classification" and bool(num_labels) and not any(
        str(a).endswith("ForSequenceClassification") for a in (config.architectures or []))
    if new_head:
        # An encoder without a classification head (e.g. a sentence-embedding BERT): the new
        # head gets the task's labels, initialised from ``seed`` (the same head at every load).
        config.num_labels = int(num_labels)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map:
        kwargs["device_map"] = str(device_map)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = auto_cls.from_pretrained(ident, config=config, local_files_only=local_only,
                                             **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _load_error("model", ident, e) from e
    if new_head:
        log.info("%s has no classification head: a new one for %d labels (seed %d)", ident,
                 int(num_labels), int(seed))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_ident,
                                                               local_files_only=local_only)
    except Exception as e:  # noqa: BLE001
        raise _load_error("tokenizer", tok_ident, e) from e
    if kind == "causal_lm":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad; the original pads with eos
        tokenizer.padding_side = "right"
        model.config.pad_token_id = tokenizer.pad_token_id
    if kind == "classification" and num_labels and int(num_labels) != model.config.num_labels:
        log.warning("model.num_labels=%s but checkpoint %s has %d labels; using the checkpoint's",
                    num_labels, ident, model.config.num_labels)
    return model, tokenizer


def load_model_and_tokenizer(
    model_cfg: Any, device: torch.device | str = "cpu", seed: int = 0
) -> tuple[nn.Module, Any]:
    """The frozen base model and its tokenizer for ``model_cfg`` (see the module docstring).

    Args:
        model_cfg: the model section.
        device: where to put the model.
        seed: init seed of a tiny stand-in (``model_cfg.tiny.seed`` wins when set) and of a
            classification head that a real checkpoint lacks.

    Raises:
        ConfigError: unknown kind, or a tiny section that names no known architecture.
        ModelLoadError: a real checkpoint that cannot be loaded (e.g. no network).
    """
    kind = str(cfg_get(model_cfg, "kind", ""))  # the schema's ModelKind, or a plain name
    if kind not in KINDS:
        raise ConfigError(f"model.kind must be one of {KINDS}, got '{kind}'")
    tiny_section = cfg_get(model_cfg, "tiny")
    if tiny_section is not None:
        from btp.tiny import load_tiny

        model, tokenizer, arch = load_tiny(
            tiny_section, str(cfg_get(model_cfg, "name", "")),
            str(cfg_get(model_cfg, "pretrained", "")), kind, cfg_get(model_cfg, "num_labels"), seed)
        log.info("built tiny %s stand-in (%d parameters)", arch,
                 sum(p.numel() for p in model.parameters()))
    else:
        model, tokenizer = load_pretrained(model_cfg, seed)
        if cfg_get(model_cfg, "device_map"):
            return freeze(model, None), tokenizer  # accelerate placed it
        return freeze(model, device), tokenizer
    dtype = torch_dtype(cfg_get(model_cfg, "dtype"))
    return freeze(model.to(dtype), device), tokenizer
