"""Model loading: tiny stand-ins (offline) and real checkpoints (hub id or local path).

``load_model_and_tokenizer(model_cfg, device)`` reads these ``model_cfg`` fields (attribute
access; a DictConfig, dataclass or namespace):

* ``name``: e.g. ``t5small``, ``tiny-t5small``; also used to pick the tiny architecture.
* ``kind``: ``seq2seq`` | ``classification`` | ``causal_lm``.
* ``pretrained``: hub id or local path of the real checkpoint.
* ``tokenizer``: hub id or local path of its tokenizer (``None``: same as ``pretrained``);
  ignored for tiny models, which use :mod:`btp.tokenizer`.
* ``num_labels``: classes for ``classification`` (tiny only; a checkpoint keeps its own).
* ``tiny``: ``None`` for the real checkpoint, else a dict of small widths (keys in
  :data:`TINY_KEYS`), e.g. ``{d_model: 64, d_ff: 128, heads: 4}``.
* ``target_modules`` / ``grace_layer``: not used here (the editors check them).

A tiny stand-in keeps the real checkpoint's module paths, layer counts and FFN type
(:data:`ARCHS`) with small widths and our offline vocabulary, so module names such as
``encoder.block.4.layer.1.DenseReluDense.wo`` resolve exactly as on the real model. Its weights
are random but seeded, hence identical from run to run.

Every model comes back with all dropout at 0 (config fields and modules), in eval mode, with
``requires_grad=False`` on every parameter, on ``device``.
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from btp.errors import ConfigError, ModelLoadError
from btp.tokenizer import SPECIAL_IDS, get_tokenizer

log = logging.getLogger(__name__)

KINDS = ("seq2seq", "classification", "causal_lm")

#: The real checkpoints' architecture facts that a tiny stand-in keeps (method.md's table).
ARCHS: dict[str, dict[str, Any]] = {
    # google/t5-small-ssm-nq: T5 v1.1 style, 8+8 blocks, gated-gelu FFN (wi_0, wi_1, wo), untied.
    "t5small": {"family": "t5", "kind": "seq2seq", "num_layers": 8,
                "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                "d_model": 64, "d_ff": 128, "heads": 4},
    # google/t5-large-ssm-nq: 24+24 blocks, relu FFN (wi, wo); tied as in T5 v1.0 (unverified).
    "t5large": {"family": "t5", "kind": "seq2seq", "num_layers": 24,
                "feed_forward_proj": "relu", "tie_word_embeddings": True,
                "d_model": 64, "d_ff": 256, "heads": 4},
    # tomh/scotus-bert: BERT base, 12 layers, sequence classification (module prefix "bert.").
    "scotus-bert": {"family": "bert", "kind": "classification", "num_layers": 12,
                    "d_model": 64, "d_ff": 256, "heads": 4},
    # gpt2-xl / tomh/gpt2xl-grace: 48 blocks, Conv1D projections (fan_in_fan_out).
    "gpt2xl": {"family": "gpt2", "kind": "causal_lm", "num_layers": 48,
               "d_model": 64, "d_ff": 256, "heads": 4},
}

#: Hub ids / name fragments that identify an architecture when ``tiny.arch`` is not given.
_ARCH_HINTS = {
    "t5-small-ssm-nq": "t5small", "t5small": "t5small", "t5-small": "t5small",
    "t5-large-ssm-nq": "t5large", "t5large": "t5large", "t5-large": "t5large",
    "scotus-bert": "scotus-bert", "bert": "scotus-bert",
    "gpt2xl": "gpt2xl", "gpt2-xl": "gpt2xl", "gpt2": "gpt2xl",
}

#: Keys a ``tiny`` dict may hold.
#: ``initializer_range`` is the init scale: BERT/GPT-2 ``initializer_range`` (std of the normal
#: init, default 0.02); for T5 it is passed as ``initializer_factor`` (a multiplier, default 1.0).
#: ``residual_scale`` multiplies the init of every residual branch's output projection (self-
#: attention out and FFN out, :data:`RESIDUAL_OUTPUTS`; T5's cross-attention is left alone), the
#: scaled-residual init of deep stacks (GPT-2, T-Fixup): with it the residual stream keeps the
#: input, where a deep random stack at the default init maps every input to nearly one output.
TINY_KEYS = frozenset({"arch", "d_model", "d_ff", "heads", "d_kv", "num_layers", "seed",
                       "num_labels", "max_positions", "initializer_range", "residual_scale"})

#: Name suffixes of the residual branches' output projections, per family (``residual_scale``).
RESIDUAL_OUTPUTS: dict[str, tuple[str, ...]] = {
    "t5": ("SelfAttention.o", "DenseReluDense.wo"),
    "bert": ("attention.output.dense", "output.dense"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}

_AUTO_CLASSES = {
    "seq2seq": "AutoModelForSeq2SeqLM",
    "classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",
}


def _field(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    if isinstance(value, Enum):  # the schema's str Enums (ModelKind) -> plain strings
        value = value.value
    return default if value is None else value


def _as_dict(obj: Any) -> dict[str, Any]:
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


def resolve_arch(model_cfg: Any, tiny: dict[str, Any]) -> str:
    """The tiny architecture: ``tiny.arch``, else recognised from ``name``, else ``pretrained``."""
    if tiny.get("arch"):
        arch = str(tiny["arch"])
        if arch not in ARCHS:
            raise ConfigError(f"model.tiny.arch '{arch}' unknown; expected one of {sorted(ARCHS)}")
        return arch
    for source in (_field(model_cfg, "name", ""), _field(model_cfg, "pretrained", "")):
        text = str(source).lower()
        text = text[5:] if text.startswith(("tiny-", "tiny_")) else text
        # Longest hint first so "t5-small-ssm-nq" wins over "t5-small" and "gpt2-xl" over "gpt2".
        for hint in sorted(_ARCH_HINTS, key=len, reverse=True):
            if hint in text:
                return _ARCH_HINTS[hint]
    raise ConfigError(
        f"cannot tell which architecture tiny model '{_field(model_cfg, 'name', '?')}' stands "
        f"for; set model.tiny.arch to one of {sorted(ARCHS)}"
    )


def build_tiny_config(arch: str, tiny: dict[str, Any], num_labels: int | None) -> Any:
    """The ``transformers`` config of the tiny stand-in for ``arch`` (dropout already 0)."""
    unknown = set(tiny) - TINY_KEYS
    if unknown:
        raise ConfigError(f"model.tiny: unknown key(s) {sorted(unknown)}; allowed {sorted(TINY_KEYS)}")
    spec = {**ARCHS[arch], **{k: v for k, v in tiny.items() if v is not None}}
    d_model, d_ff, heads = int(spec["d_model"]), int(spec["d_ff"]), int(spec["heads"])
    layers = int(spec["num_layers"])
    if d_model % heads:
        raise ConfigError(f"model.tiny: d_model {d_model} is not divisible by heads {heads}")
    vocab = len(get_tokenizer(spec["family"]))
    if spec["family"] == "t5":
        from transformers import T5Config

        return T5Config(
            vocab_size=vocab, d_model=d_model, d_kv=int(spec.get("d_kv", d_model // heads)),
            d_ff=d_ff, num_layers=layers, num_decoder_layers=layers, num_heads=heads,
            feed_forward_proj=spec["feed_forward_proj"],
            tie_word_embeddings=spec["tie_word_embeddings"], dropout_rate=0.0,
            pad_token_id=SPECIAL_IDS["<pad>"], eos_token_id=SPECIAL_IDS["</s>"],
            decoder_start_token_id=SPECIAL_IDS["<pad>"],
            initializer_factor=float(spec.get("initializer_range", 1.0)),
        )
    if spec["family"] == "bert":
        from transformers import BertConfig

        return BertConfig(
            vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=d_ff,
            max_position_embeddings=int(spec.get("max_positions", 512)),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
            pad_token_id=SPECIAL_IDS["[PAD]"],
            num_labels=int(spec.get("num_labels", num_labels or 14)),
            initializer_range=float(spec.get("initializer_range", 0.02)),
        )
    from transformers import GPT2Config

    eos = SPECIAL_IDS["<|endoftext|>"]
    return GPT2Config(
        vocab_size=vocab, n_positions=int(spec.get("max_positions", 1024)), n_embd=d_model,
        n_layer=layers, n_head=heads, n_inner=d_ff, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=eos, initializer_range=float(spec.get("initializer_range", 0.02)),
    )


def build_tiny_model(arch: str, tiny: dict[str, Any], num_labels: int | None = None,
                     seed: int = 0) -> tuple[nn.Module, Any]:
    """A seeded random tiny stand-in for ``arch`` and its offline tokenizer.

    The global torch RNG is forked, so building a model does not shift the run's random stream.
    """
    from transformers import BertForSequenceClassification, GPT2LMHeadModel, T5ForConditionalGeneration

    config = build_tiny_config(arch, tiny, num_labels)
    family = ARCHS[arch]["family"]
    cls = {"t5": T5ForConditionalGeneration, "bert": BertForSequenceClassification,
           "gpt2": GPT2LMHeadModel}[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny.get("seed", seed)))
        model = cls(config)
        if family == "t5" and not ARCHS[arch].get("tie_word_embeddings", True):
            _untie_t5_lm_head(model)
    if tiny.get("residual_scale") is not None:
        scale_residual_branches(model, family, float(tiny["residual_scale"]))
    return model, get_tokenizer(family)


def scale_residual_branches(model: nn.Module, family: str, scale: float) -> int:
    """Multiply the weights of every residual-branch output projection of ``model`` by ``scale``.

    Returns how many projections were scaled (bias untouched). See :data:`TINY_KEYS`.
    """
    if not scale > 0:
        raise ConfigError(f"model.tiny.residual_scale must be > 0, got {scale}")
    suffixes = RESIDUAL_OUTPUTS[family]
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


def freeze(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Dropout 0, eval mode, no gradients anywhere, on ``device``."""
    zero_dropout(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def _offline() -> bool:
    # Read at call time (huggingface_hub reads HF_HUB_OFFLINE once, at import).
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _load_error(what: str, ident: str, err: Exception) -> ModelLoadError:
    if Path(ident).expanduser().exists():
        return ModelLoadError(
            f"could not load {what} from local path '{ident}' ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the folder holds a "
            "transformers checkpoint"
        )
    return ModelLoadError(
        f"could not load {what} '{ident}': no network or the Hugging Face hub was unreachable "
        f"({type(err).__name__}); use a tiny-* model or set the path to a local checkpoint"
    )


def load_pretrained(model_cfg: Any) -> tuple[nn.Module, Any]:
    """The real checkpoint and tokenizer via the ``AutoModelFor*``/``AutoTokenizer`` classes.

    Raises:
        ModelLoadError: the hub could not be reached (or the path/id is wrong), in one line.
    """
    import transformers

    kind = _field(model_cfg, "kind")
    ident = str(_field(model_cfg, "pretrained", "") or "")
    if not ident:
        raise ConfigError(f"model '{_field(model_cfg, 'name', '?')}': no 'pretrained' and no 'tiny'")
    tok_ident = str(_field(model_cfg, "tokenizer", ident))
    local_only = _offline()
    auto_cls = getattr(transformers, _AUTO_CLASSES[kind])
    try:
        config = transformers.AutoConfig.from_pretrained(ident, local_files_only=local_only)
    except Exception as e:  # noqa: BLE001 - any hub/IO failure means the same to the user
        raise _load_error("model", ident, e) from e
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)  # before init: some modules copy these floats at build time
    try:
        model = auto_cls.from_pretrained(ident, config=config, local_files_only=local_only)
    except Exception as e:  # noqa: BLE001
        raise _load_error("model", ident, e) from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_ident, local_files_only=local_only)
    except Exception as e:  # noqa: BLE001
        raise _load_error("tokenizer", tok_ident, e) from e
    if kind == "causal_lm":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad; the original pads with eos
        tokenizer.padding_side = "right"
        model.config.pad_token_id = tokenizer.pad_token_id
    num_labels = _field(model_cfg, "num_labels")
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
        seed: init seed of a tiny stand-in (``model_cfg.tiny.seed`` wins when set).

    Raises:
        ConfigError: unknown kind, or a tiny section that names no known architecture.
        ModelLoadError: a real checkpoint that cannot be loaded (e.g. no network).
    """
    kind = _field(model_cfg, "kind")
    if kind not in KINDS:
        raise ConfigError(f"model.kind must be one of {KINDS}, got '{kind}'")
    tiny_section = _field(model_cfg, "tiny")
    if tiny_section is not None:
        tiny = _as_dict(tiny_section)
        arch = resolve_arch(model_cfg, tiny)
        if ARCHS[arch]["kind"] != kind:
            raise ConfigError(f"tiny architecture '{arch}' is {ARCHS[arch]['kind']}, not {kind}")
        model, tokenizer = build_tiny_model(arch, tiny, _field(model_cfg, "num_labels"), seed)
        log.info("built tiny %s stand-in (%d parameters)", arch,
                 sum(p.numel() for p in model.parameters()))
    else:
        model, tokenizer = load_pretrained(model_cfg)
    return freeze(model, device), tokenizer
