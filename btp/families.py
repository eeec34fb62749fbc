"""Model families: everything the runner knows about an architecture, in one table.

A *family* (:data:`FAMILIES`) is one transformers architecture: its config and model classes,
the model kind it is used as, its tokenizer family (:mod:`btp.tokenizer`), the name suffixes of
its residual branches' output projections, how a tiny config is built from small widths, the
layer MELO keys on and adapts when a model of the family comes without a config file of ours
(:meth:`Family.default_layers`, used by :mod:`btp.api` for any hub id or path), and the default
layers of the baselines (GRACE's own layer, MEMIT's and WISE's, read by :mod:`btp.editors`).

An *architecture* (:data:`ARCHS`) is one real checkpoint that a tiny stand-in copies: its family,
layer count and FFN type, with small widths. ``config/model/tiny-*.yaml`` select one by name.

Adding a family = one :class:`Family` entry (+ its tokenizer family when the real one uses other
special tokens) and one :data:`ARCHS` entry per checkpoint it stands for, then its configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from btp.errors import ConfigError

#: ``spec`` (the merged widths of :data:`ARCHS` and ``model.tiny``) and the tokenizer -> the
#: keyword arguments of the family's transformers config.
ConfigFields = Callable[[dict[str, Any], Any, "int | None"], dict[str, Any]]


def _t5_fields(spec: dict[str, Any], tok: Any, num_labels: int | None) -> dict[str, Any]:
    d_model, heads, layers = int(spec["d_model"]), int(spec["heads"]), int(spec["num_layers"])
    return dict(
        vocab_size=len(tok), d_model=d_model, d_kv=int(spec.get("d_kv", d_model // heads)),
        d_ff=int(spec["d_ff"]), num_layers=layers, num_decoder_layers=layers, num_heads=heads,
        feed_forward_proj=spec["feed_forward_proj"],
        tie_word_embeddings=spec["tie_word_embeddings"], dropout_rate=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        # T5's init scale is a multiplier (initializer_factor, default 1.0)
        initializer_factor=float(spec.get("initializer_range", 1.0)),
    )


def _bert_fields(spec: dict[str, Any], tok: Any, num_labels: int | None) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok), hidden_size=int(spec["d_model"]),
        num_hidden_layers=int(spec["num_layers"]), num_attention_heads=int(spec["heads"]),
        intermediate_size=int(spec["d_ff"]),
        max_position_embeddings=int(spec.get("max_positions", 512)),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        num_labels=int(spec.get("num_labels", num_labels or 14)),
        initializer_range=float(spec.get("initializer_range", 0.02)),
    )


def _gpt2_fields(spec: dict[str, Any], tok: Any, num_labels: int | None) -> dict[str, Any]:
    eos = tok.eos_token_id
    return dict(
        vocab_size=len(tok), n_positions=int(spec.get("max_positions", 1024)),
        n_embd=int(spec["d_model"]), n_layer=int(spec["num_layers"]), n_head=int(spec["heads"]),
        n_inner=int(spec["d_ff"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        summary_first_dropout=0.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        initializer_range=float(spec.get("initializer_range", 0.02)),
    )


def _llama_like_fields(spec: dict[str, Any], tok: Any, num_labels: int | None) -> dict[str, Any]:
    """Llama, Mistral and Qwen2 share these fields (gated SiLU FFN, RMSNorm, rotary, GQA)."""
    d_model, heads = int(spec["d_model"]), int(spec["heads"])
    fields = dict(
        vocab_size=len(tok), hidden_size=d_model, intermediate_size=int(spec["d_ff"]),
        num_hidden_layers=int(spec["num_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(spec.get("kv_heads", heads)), head_dim=d_model // heads,
        max_position_embeddings=int(spec.get("max_positions", 2048)), attention_dropout=0.0,
        tie_word_embeddings=bool(spec.get("tie_word_embeddings", False)),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=float(spec.get("initializer_range", 0.02)),
    )
    if "sliding_window" in spec:
        fields["sliding_window"] = int(spec["sliding_window"])
    return fields


def _gptj_fields(spec: dict[str, Any], tok: Any, num_labels: int | None) -> dict[str, Any]:
    d_model, heads = int(spec["d_model"]), int(spec["heads"])
    eos = tok.eos_token_id
    return dict(
        vocab_size=len(tok), n_positions=int(spec.get("max_positions", 2048)), n_embd=d_model,
        n_layer=int(spec["num_layers"]), n_head=heads, n_inner=int(spec["d_ff"]),
        # GPT-J-6B rotates 64 of each head's 256 dims: a quarter of the head
        rotary_dim=int(spec.get("rotary_dim", max(2, (d_model // heads) // 4))),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        initializer_range=float(spec.get("initializer_range", 0.02)),
    )


@dataclass(frozen=True)
class Family:
    """One architecture family.

    Attributes:
        name: the family's name (``llama``); also its key in :data:`FAMILIES`.
        kind: ``seq2seq`` | ``classification`` | ``causal_lm``: how the runner calls it.
        config_class / model_class: transformers class names (resolved lazily).
        tokenizer: the offline tokenizer family of its stand-ins (:func:`btp.tokenizer.get_tokenizer`).
        residual_outputs: name suffixes of every residual branch's output projection
            (self-attention out and FFN out), for ``model.tiny.residual_scale``.
        config_fields: builds the config's keyword arguments from the tiny widths.
        model_types: the ``config.model_type`` values of real checkpoints of the family.
        layer_path: the FFN module that MELO adapts and keys on, ``{i}`` = the layer index.
        layers_attr: the config attribute holding the number of layers.
        untied_head: build a separate ``lm_head`` (T5 v1.1: transformers always ties at init).
        ffn_out: the FFN output projection, ``{i}`` = the layer index: what MEMIT and AlphaEdit
            edit ("rewrite_module_tmp" of their configs); ``None``: they do not edit the family.
        memit_layers: MEMIT's layers ``((first, last), of)`` from the methods' own configs; a
            model of the family with another depth takes the same fraction of its layers.
        wise_layer: WISE's side-memory module ``(path, index, of)`` from the WISE authors'
            configs (EasyEdit's ``hparams/WISE``), scaled to the depth like ``memit_layers``.
        grace_layer: the layer GRACE's own experiments wrap where it differs from the model
            config's MELO ``grace_layer`` (GRACE's SCOTUS runs: BERT layer 10).
    """

    name: str
    kind: str
    config_class: str
    model_class: str
    tokenizer: str
    residual_outputs: tuple[str, ...]
    config_fields: ConfigFields
    model_types: tuple[str, ...]
    layer_path: str
    layers_attr: str = "num_hidden_layers"
    untied_head: bool = False
    ffn_out: str | None = None
    memit_layers: tuple[tuple[int, int], int] | None = None
    wise_layer: tuple[str, int, int] | None = None
    grace_layer: str | None = None

    def default_layers(self, num_layers: int) -> tuple[list[str], str]:
        """``(target_modules, grace_layer)`` for a model of ``num_layers`` layers of this family.

        The principle of the original's GPT-2 XL config (key ``h.35.mlp.c_fc``, targets
        ``h.36``/``h.37`` of the same module, in the upper third of 48 blocks), placed where the
        fact-editing methods on decoder LLMs edit: the key layer is ``num_layers - 5`` (layer 27
        of the 32-layer 7B models, the layer WISE and EasyEdit's GRACE edit; layer 23 of the
        28-layer Qwen2.5-7B, WISE's), the two layers above it are adapted. The shipped
        ``config/model/*.yaml`` files name their layers explicitly, with sources.
        """
        if num_layers < 3:
            raise ConfigError(f"a {self.name} model needs at least 3 layers for MELO's key layer "
                              f"and two adapted layers above it, this one has {num_layers}")
        key = max(0, num_layers - 5)
        return ([self.layer_path.format(i=key + 1), self.layer_path.format(i=key + 2)],
                self.layer_path.format(i=key))


#: Every family the runner can build or load. The fact editors' layers: MEMIT's files give
#: Llama 3 8B (AlphaEdit's MEMIT and AlphaEdit files) 4-8, GPT-J 3-8, GPT-2 XL 13-17; WISE's give
#: Llama-2-7B and Mistral-7B ``model.layers[27].mlp.down_proj`` of 32, Qwen2.5-7B ``[23]`` of 28,
#: GPT-J-6B ``transformer.h[21].mlp.fc_out`` of 28, GPT-2 XL ``transformer.h[8].mlp.c_fc`` of 48.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("t5", "seq2seq", "T5Config", "T5ForConditionalGeneration", "t5",
           ("SelfAttention.o", "DenseReluDense.wo"), _t5_fields, ("t5",),
           "encoder.block.{i}.layer.1.DenseReluDense.wo", layers_attr="num_layers",
           untied_head=True),
    Family("bert", "classification", "BertConfig", "BertForSequenceClassification", "bert",
           ("attention.output.dense", "output.dense"), _bert_fields, ("bert",),
           "bert.encoder.layer.{i}.output.dense",
           grace_layer="bert.encoder.layer.10.output.dense"),
    Family("gpt2", "causal_lm", "GPT2Config", "GPT2LMHeadModel", "gpt2",
           ("attn.c_proj", "mlp.c_proj"), _gpt2_fields, ("gpt2",), "transformer.h.{i}.mlp.c_fc",
           layers_attr="n_layer", ffn_out="transformer.h.{i}.mlp.c_proj",
           memit_layers=((13, 17), 48), wise_layer=("transformer.h.{i}.mlp.c_fc", 8, 48)),
    Family("llama", "causal_lm", "LlamaConfig", "LlamaForCausalLM", "llama",
           ("self_attn.o_proj", "mlp.down_proj"), _llama_like_fields, ("llama",),
           "model.layers.{i}.mlp.down_proj", ffn_out="model.layers.{i}.mlp.down_proj",
           memit_layers=((4, 8), 32), wise_layer=("model.layers.{i}.mlp.down_proj", 27, 32)),
    Family("mistral", "causal_lm", "MistralConfig", "MistralForCausalLM", "llama",
           ("self_attn.o_proj", "mlp.down_proj"), _llama_like_fields, ("mistral",),
           "model.layers.{i}.mlp.down_proj", ffn_out="model.layers.{i}.mlp.down_proj",
           memit_layers=((4, 8), 32), wise_layer=("model.layers.{i}.mlp.down_proj", 27, 32)),
    Family("qwen2", "causal_lm", "Qwen2Config", "Qwen2ForCausalLM", "qwen2",
           ("self_attn.o_proj", "mlp.down_proj"), _llama_like_fields, ("qwen2",),
           "model.layers.{i}.mlp.down_proj", ffn_out="model.layers.{i}.mlp.down_proj",
           memit_layers=((4, 8), 28), wise_layer=("model.layers.{i}.mlp.down_proj", 23, 28)),
    # GPT-J uses GPT-2's tokenizer (byte-level BPE, <|endoftext|> as bos/eos, nothing added)
    Family("gptj", "causal_lm", "GPTJConfig", "GPTJForCausalLM", "gpt2",
           ("attn.out_proj", "mlp.fc_out"), _gptj_fields, ("gptj",), "transformer.h.{i}.mlp.fc_out",
           layers_attr="n_layer", ffn_out="transformer.h.{i}.mlp.fc_out",
           memit_layers=((3, 8), 28), wise_layer=("transformer.h.{i}.mlp.fc_out", 21, 28)),
)}

#: The real checkpoints' architecture facts that a tiny stand-in keeps (layer counts, FFN type,
#: attention heads' grouping), with small widths.
ARCHS: dict[str, dict[str, Any]] = {
    # google/t5-small-ssm-nq: T5 v1.1 style, 8+8 blocks, gated-gelu FFN (wi_0, wi_1, wo), untied.
    "t5small": {"family": "t5", "num_layers": 8, "feed_forward_proj": "gated-gelu",
                "tie_word_embeddings": False, "d_model": 64, "d_ff": 128, "heads": 4},
    # google/t5-large-ssm-nq: 24+24 blocks, relu FFN (wi, wo); tied as in T5 v1.0 (unverified).
    "t5large": {"family": "t5", "num_layers": 24, "feed_forward_proj": "relu",
                "tie_word_embeddings": True, "d_model": 64, "d_ff": 256, "heads": 4},
    # tomh/scotus-bert: BERT base, 12 layers, sequence classification (module prefix "bert.").
    "scotus-bert": {"family": "bert", "num_layers": 12, "d_model": 64, "d_ff": 256, "heads": 4},
    # gpt2-xl / tomh/gpt2xl-grace: 48 blocks, Conv1D projections (fan_in_fan_out).
    "gpt2xl": {"family": "gpt2", "num_layers": 48, "d_model": 64, "d_ff": 256, "heads": 4},
    # meta-llama/Llama-2-7b-hf: 32 layers, gated SiLU FFN (gate/up/down_proj), 32 heads without
    # grouping (kv heads = heads), untied head.
    "llama": {"family": "llama", "num_layers": 32, "d_model": 64, "d_ff": 128, "heads": 4,
              "kv_heads": 4},
    # mistralai/Mistral-7B-v0.1: 32 layers, 32 heads over 8 kv heads (4:1), sliding window.
    "mistral": {"family": "mistral", "num_layers": 32, "d_model": 64, "d_ff": 128, "heads": 4,
                "kv_heads": 1, "sliding_window": 4096},
    # Qwen/Qwen2.5-7B: 28 layers, 28 heads over 4 kv heads (7:1; here 4 over 2), biased q/k/v,
    # untied head.
    "qwen2": {"family": "qwen2", "num_layers": 28, "d_model": 64, "d_ff": 128, "heads": 4,
              "kv_heads": 2},
    # EleutherAI/gpt-j-6b: 28 blocks, parallel attention + FFN (fc_in, fc_out with bias),
    # rotary on a quarter of each head, untied head with bias.
    "gptj": {"family": "gptj", "num_layers": 28, "d_model": 64, "d_ff": 256, "heads": 4},
}

#: Hub ids / name fragments that identify an architecture when ``tiny.arch`` is not given
#: (matched longest first on the lower-cased name, then on ``pretrained``).
ARCH_HINTS: dict[str, str] = {
    "t5-small-ssm-nq": "t5small", "t5small": "t5small", "t5-small": "t5small",
    "t5-large-ssm-nq": "t5large", "t5large": "t5large", "t5-large": "t5large",
    "scotus-bert": "scotus-bert", "bert": "scotus-bert",
    "gpt2xl": "gpt2xl", "gpt2-xl": "gpt2xl", "gpt2": "gpt2xl",
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen": "qwen2",
    "gpt-j": "gptj", "gptj": "gptj",
}

#: Keys a ``model.tiny`` dict may hold.
#: ``initializer_range`` is the init scale: the std of the normal init (default 0.02); for T5 it
#: is passed as ``initializer_factor`` (a multiplier, default 1.0). ``residual_scale`` multiplies
#: the init of every residual branch's output projection (:attr:`Family.residual_outputs`; T5's
#: cross-attention is left alone), the scaled-residual init of deep stacks (GPT-2, T-Fixup):
#: with it the residual stream keeps the input, where a deep random stack at the default init
#: maps every input to nearly one output. ``kv_heads``: key/value heads (grouped-query attention).
TINY_KEYS = frozenset({"arch", "d_model", "d_ff", "heads", "kv_heads", "d_kv", "num_layers", "seed",
                       "num_labels", "max_positions", "initializer_range", "residual_scale"})


def family_of_arch(arch: str) -> Family:
    """The :class:`Family` of a tiny architecture name."""
    return FAMILIES[ARCHS[arch]["family"]]


def family_of_model_type(model_type: str) -> Family | None:
    """The family whose real checkpoints have this ``config.model_type`` (None: unknown)."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None


def transformers_class(name: str) -> Any:
    """A transformers class by name (imported on first use: transformers is slow to import)."""
    import transformers

    return getattr(transformers, name)


__all__ = ["Family", "FAMILIES", "ARCHS", "ARCH_HINTS", "TINY_KEYS", "family_of_arch",
           "family_of_model_type", "transformers_class"]
