"""The structured configuration: every key a run reads, with its type and default.

The dataclasses below are registered in Hydra's ConfigStore as ``schema`` and are the first entry
of ``config/config.yaml``'s defaults list. Every YAML file and command-line override is merged
onto them, so a key that is not declared here (a typo such as ``melo.num_iters=3`` or
``+melo.num_iters=3``) or a value of the wrong type fails when Hydra composes the config, before
any model or data is touched. Value ranges (sizes, lengths, rates, radii, steps, weights, seeds,
the device string) are in :data:`VALUE_RULES` at the end of this file (:func:`check_values`).

Defaults of the algorithm sections are the original MELO values for the qa experiment; the
``values/experiment/*.yaml`` files change only what differs per task ("experiments as deltas").

Which algorithm reads which section (see :func:`alg_section`):
``melo`` -> ``melo``; ``grace`` -> ``grace``; ``ft`` -> ``ft``; ``ft_ewc`` -> ``ft`` merged with
``ewc``; ``plain_lora`` -> ``melo`` merged with ``plain_lora``; ``wise``, ``memit`` and
``alphaedit`` -> their own sections. The edit stream is cut into batches of the
section's ``batch_size`` (GRACE, FT and FT+EWC: 1, as the GRACE repository edits); a null or
absent one (MELO) means ``num_edit_per_block``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, TypeVar, Union, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from btp.tasks import task_names

#: The repository root (the folder holding ``btp/`` and ``config/``).
REPO_ROOT = Path(__file__).resolve().parent.parent


def _repo_path(relative: str = "") -> str:
    """``${repo_path:data}`` -> the absolute path of ``data`` in this repository.

    Resolved absolutely so that ``cd btp && python run.py`` and Hydra's change of working
    directory do not move the data folder.
    """
    return str((REPO_ROOT / relative).resolve())


if not OmegaConf.has_resolver("repo_path"):
    OmegaConf.register_new_resolver("repo_path", _repo_path)


class Choice(str, Enum):
    """A str Enum of the schema whose ``str()`` and format are its value (``"padded"``, not
    ``KeyPosition.padded``), so that code and messages read a choice as the string it is."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


#: The registered tasks (:mod:`btp.tasks`, one module each): ``task`` must name one, which Hydra
#: checks when it composes the config.
Task = Choice("Task", {name: name for name in task_names()}, module=__name__, qualname="Task")


class ModelKind(Choice):
    """How the model is called: generation (T5), classification (BERT), causal LM (GPT-2)."""

    seq2seq = "seq2seq"
    classification = "classification"
    causal_lm = "causal_lm"


class KeyPosition(Choice):
    """Which token's activation is the key: the original's last padded position, or a switch."""

    padded = "padded"
    last_real = "last_real"
    last_prompt = "last_prompt"  # causal LM: the last prompt token (an edit and its prompt alone agree)


class LabelMatch(Choice):
    """Original label equality (sum of label ids, a hash with collisions) or exact comparison."""

    sum = "sum"
    exact = "exact"


class Optim(Choice):
    adam = "adam"
    sgd = "sgd"


class WandbMode(Choice):
    disabled = "disabled"
    offline = "offline"
    online = "online"


@dataclass
class AlgCfg:
    """Selected by ``+alg=...``: the registered editor name (``btp.editors.EDITORS``)."""

    name: str = MISSING


@dataclass
class DataCfg:
    """Passed to ``btp.data.load_task_data`` as ``data_cfg`` (meanings in ``btp/data/__init__.py``).

    File names are relative to ``data_dir`` unless absolute; null means the loader's default.
    ``max_length``/``label_max_length`` go to the ``Collator`` (tokenization lengths).
    """

    # qa (zsRE + NQ)
    zsre_format: str = "mend"  # mend (MELO's JSON-lines) | rome (JSON array)
    zsre_file: Optional[str] = None
    zsre_holdout_swap_bug: bool = False
    edit_permutation_seed: int = 42
    nq_file: Optional[str] = None
    # scotus
    scotus_source: Optional[str] = None  # auto | hub | csv | lexglue
    scotus_hub_id: Optional[str] = None
    scotus_lexglue_file: Optional[str] = None
    # hallucination
    hallucination_source: Optional[str] = None  # auto | hub | json
    hallucination_hub_id: Optional[str] = None
    hallucination_file: Optional[str] = None
    concepts_file: Optional[str] = None
    sentence_splitter: Optional[str] = None  # auto | nltk | regex
    upstream_source: Optional[str] = None  # auto | hub | jsonl | txt
    upstream_hub_id: Optional[str] = None
    openwebtext_dir: Optional[str] = None
    # every task
    n_upstream: Optional[int] = 1000
    max_length: Optional[int] = None  # null = the original's per kind: 20 / 512 / 1024
    label_max_length: Optional[int] = None  # seq2seq labels; null = max_length
    # counterfact (either form: the original's requested_rewrite records or EasyEdit's flat ones)
    counterfact_file: Optional[str] = None  # null = counterfact/counterfact_sample.json


@dataclass
class EvalCfg:
    """Evaluation settings."""

    max_length: int = 20  # greedy generation length (qa), as the original
    batch_size: Optional[int] = None  # upstream/holdout/accurate batches; null = num_edit_per_block
    # Edited (and holdout) records asked alone, each in a batch of its own (ES_alone, ERR_alone,
    # holdout_alone): at most this many per evaluation, a fixed subset seeded by ``seed``; a
    # stream of at most this many records is asked whole. 0 turns these metrics off.
    alone_records: int = 500


@dataclass
class MeloCfg:
    """MELO hyperparameters (-> ``peft_melo.MeloConfig``); defaults = the original qa values."""

    num_block: int = 20
    num_rank_per_block: int = 2
    init_radius: float = 75.0
    key_id: int = -1
    key_position: KeyPosition = KeyPosition.padded
    label_match: LabelMatch = LabelMatch.sum
    lora_dropout: float = 0.0
    num_iter: int = 50
    edit_lr: float = 1e-2
    optimizer: Optim = Optim.adam
    lr_step_size: int = 20
    lr_gamma: float = 0.5
    cache_frozen_prefix: bool = True  # frozen blocks below the lowest adapted one run once per edit


@dataclass
class GraceCfg:
    """GRACE baseline as the GRACE repository runs it (``btp/editors/grace.py``): codebook at
    ``model.grace_baseline_layer`` unless ``layer`` is set; one record per edit, only records the
    model gets wrong."""

    layer: Optional[str] = None
    init_radius: float = 1.0
    edit_lr: float = 1.0  # Adam
    num_iter: int = 100
    replacement: str = "replace_prompt"  # replace_prompt | replace_last | replace_all
    batch_size: Optional[int] = 1  # records per edit; null = num_edit_per_block
    error_filter: str = "original"  # original | exact | none (btp.editors.common.records_to_edit)
    label_match: str = "mean"  # mean (the original's hash) | exact
    key_id: int = -1  # key token position (as melo.key_id)
    key_position: str = "auto"  # auto (where the original's key falls) | padded | last_real
    val_init: str = "cold"  # cold (uniform [0, 1)) | warm (the layer output at the key token)
    eps_expand: str = "coverage"  # coverage | moving_average
    val_train: str = "sgd"  # sgd (plain training) | adv (noise on the batch's other values)
    cache_frozen_prefix: bool = True  # blocks below the wrapped layer's block run once per edit


@dataclass
class FtCfg:
    """Fine-tuning baseline as the GRACE repository runs it (also the base of ``ft_ewc``): the
    weight of one layer, Adam, early stop, one record per edit, only records the model gets
    wrong (``btp/editors/ft.py``)."""

    layer: Optional[str] = None  # null: GRACE's layer (model.grace_baseline_layer, ...)
    num_iter: int = 100  # at most; early_stop ends sooner
    edit_lr: float = 1e-2
    optimizer: Optim = Optim.adam
    early_stop: str = "original"  # original | shifted (causal LM next-token) | none
    error_filter: str = "original"  # original | exact | none
    batch_size: Optional[int] = 1  # records per edit; null = num_edit_per_block
    cache_frozen_prefix: bool = True  # blocks below the trained layer run once per edit


@dataclass
class EwcCfg:
    """EWC penalty for ``ft_ewc`` (merged onto ``ft``): lambda_ * sum F (w - w0)^2 with F and
    w0 from the last ``fisher_n_batches`` edits, recomputed at every edit (``btp/editors/ewc.py``)."""

    lambda_: float = 0.1
    fisher_n_batches: int = 10  # the window: the last N edit batches (the original's fisher_mem)
    fisher_cumulative: bool = True  # the original's gradients accumulate over the window
    anchor_sum_bug: bool = False  # true: the original's anchor (window sum of weights / N)


@dataclass
class PlainLoraCfg:
    """Plain LoRA baseline (one adapter for all edits; null r/alpha = MELO's r = blocks x ranks)."""

    r: Optional[int] = None
    alpha: Optional[float] = None
    num_iter: int = 50
    edit_lr: float = 1e-2
    batch_size: Optional[int] = None
    cache_frozen_prefix: bool = True  # blocks below the lowest adapted one run once per edit


@dataclass
class WiseCfg:
    """WISE (``btp/editors/wise.py``): side memory with activation routing, knowledge shards
    merged with TIES. Defaults: the paper's settings (EasyEdit hparams/WISE/llama-7b.yaml, by the
    WISE authors); config/alg/wise.yaml gives each source."""

    layer: Optional[str] = None  # null: model.wise_layer, else the family's (Llama: layers.27)
    mask_ratio: float = 0.2  # fraction of side-memory entries a shard trains
    edit_lr: float = 1.0  # SGD
    num_iter: int = 70
    norm_constraint: Optional[float] = 1.0  # side memory kept within main +- this, entrywise
    act_margin: List[float] = field(default_factory=lambda: [5.0, 20.0, 10.0])  # alpha,beta,gamma
    act_ratio: float = 0.88  # routing threshold = act_ratio * smallest edit activation
    save_freq: int = 500  # edits per knowledge shard
    merge_freq: int = 1000  # shards merged (TIES) every this many edits
    densities: float = 0.53  # TIES: fraction of each shard's change kept
    weights: float = 1.0  # TIES: total weight of the shards merged
    weight_decay: float = 1.0e-5  # on the shard's trained entries
    retrieve: bool = False  # WISE-Retrieve: keep each merged group as its own memory
    context_templates: bool = True  # train under the authors' 10 generated prefixes too
    irrelevant_corpus: str = "openwebtext"  # irrelevant inputs (relative: under data_dir)
    batch_size: Optional[int] = 1  # facts per edit; null = num_edit_per_block


@dataclass
class MemitCfg:
    """MEMIT (``btp/editors/memit.py``). Defaults: MEMIT's GPT-J settings (its authors'
    hparams/MEMIT/EleutherAI_gpt-j-6B.json); config/alg/memit.yaml gives each source."""

    layers: Optional[List[str]] = None  # null: model.memit_layers, else the family's (Llama: 4-8)
    v_num_grad_steps: int = 25
    v_lr: float = 0.5  # Adam, the search for each fact's target hidden state
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 15000.0  # lambda: weight of the preserved keys' statistics
    stats_corpus: str = "openwebtext"  # text for the key statistics (relative: under data_dir)
    stats_n_samples: int = 100000  # documents (MEMIT: 100,000 Wikipedia articles)
    stats_max_length: Optional[int] = None  # tokens per document; null = the model's context
    stats_dir: Optional[str] = None  # statistics cache; null = $MESGD_CACHE/layer_stats
    context_templates: bool = True  # keys and targets under MEMIT's 5 generated prefixes too
    batch_size: Optional[int] = None  # facts per MEMIT call; null = num_edit_per_block


@dataclass
class AlphaEditCfg(MemitCfg):
    """AlphaEdit (``btp/editors/alphaedit.py``): MEMIT's steps and keys, the update projected on
    the preserved keys' null space. Defaults: its authors' hparams/AlphaEdit/EleutherAI_gpt-j-6B.json
    (MEMIT's values plus the two below)."""

    nullspace_threshold: float = 2.0e-2  # eigenvalues of E[k k^T] below this span the null space
    L2: float = 10.0  # ridge term of the update


@dataclass
class ModelCfg:
    """Selected by ``+model=...``; read by ``btp.models.load_model_and_tokenizer``."""

    name: str = MISSING
    kind: ModelKind = MISSING
    pretrained: Optional[str] = None  # hub id or local path (the real checkpoint)
    tokenizer: Optional[str] = None  # hub id or local path; null = pretrained / offline tokenizer
    num_labels: Optional[int] = None  # classification only
    tiny: Optional[Dict[str, Any]] = None  # not null: build a small random model (offline)
    target_modules: List[str] = MISSING
    grace_layer: str = MISSING  # MELO's key layer
    grace_baseline_layer: Optional[str] = None  # GRACE baseline's edited layer
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the base model (LoRA factors and database stay fp32)
    device_map: Optional[str] = None  # null = `device`; e.g. auto: accelerate spreads the model
    gguf_package: Optional[str] = None  # an installed package that ships a GGUF checkpoint
    gguf_file: Optional[str] = None  # the GGUF file inside that package
    cache_dir: Optional[str] = None  # the plain copy of a GGUF checkpoint; null = ~/.cache/mesgd
    wise_layer: Optional[str] = None  # WISE's side-memory layer; null = the family's
    memit_layers: Optional[List[str]] = None  # MEMIT/AlphaEdit's layers; null = the family's


@dataclass
class WandbCfg:
    mode: WandbMode = WandbMode.disabled
    project: str = "mesgd"
    group: Optional[str] = None
    entity: Optional[str] = None


@dataclass
class CheckpointCfg:
    enabled: bool = True


@dataclass
class Config:
    """The whole run configuration (see config/config.yaml and README)."""

    task: Task = MISSING
    alg: AlgCfg = field(default_factory=AlgCfg)
    data_dir: str = "${repo_path:data}"
    max_n_edits: Optional[int] = None  # null = the task's whole stream
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # torch intra-op CPU threads; null = the cores not busy with other work now (at least 1):
    # on a loaded machine more threads than free cores slow a run down many times over.
    threads: Optional[int] = None
    num_edit_per_block: int = 100
    metric_period: int = 200
    data: DataCfg = field(default_factory=DataCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    melo: MeloCfg = field(default_factory=MeloCfg)
    grace: GraceCfg = field(default_factory=GraceCfg)
    ft: FtCfg = field(default_factory=FtCfg)
    ewc: EwcCfg = field(default_factory=EwcCfg)
    plain_lora: PlainLoraCfg = field(default_factory=PlainLoraCfg)
    wise: WiseCfg = field(default_factory=WiseCfg)
    memit: MemitCfg = field(default_factory=MemitCfg)
    alphaedit: AlphaEditCfg = field(default_factory=AlphaEditCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    wandb: WandbCfg = field(default_factory=WandbCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)


def register() -> None:
    """Store the schema as ``schema`` (idempotent; called on import)."""
    ConfigStore.instance().store(name="schema", node=Config)


register()


#: Which config section(s) each algorithm reads.
ALG_SECTIONS: dict[str, tuple[str, ...]] = {
    "melo": ("melo",),
    "grace": ("grace",),
    "ft": ("ft",),
    "ft_ewc": ("ft", "ewc"),
    # MELO's section first: its num_block * num_rank_per_block is plain LoRA's default rank;
    # plain_lora's own keys (num_iter, edit_lr, ...) override MELO's in the merge.
    "plain_lora": ("melo", "plain_lora"),
}


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a dataclass, dict or OmegaConf node; ``default`` when absent or None.

    For keys whose null means "the reader's own choice" (``model.wise_layer``, a loader's file
    name); a section with schema defaults is read with :func:`read_section`.
    """
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        try:
            value = getattr(cfg, key)
        except Exception:  # noqa: BLE001 - AttributeError, or OmegaConf's struct-key errors
            value = default
    return default if value is None else value


S = TypeVar("S")


def read_section(cls: type[S], cfg: Any = None) -> S:
    """A section of the config as its schema dataclass: ``cfg``'s values over ``cls``'s defaults.

    The schema is the one place that holds each default; editors and loaders read their section
    through this instead of writing a fallback of their own.

    Args:
        cls: the section's dataclass (``MeloCfg``, ``WiseCfg``, ``DataCfg``, ...).
        cfg: the composed section (a ``DictConfig``), a plain mapping with some of its keys, an
            instance of ``cls``, or ``None`` (every default). Keys that are not fields of ``cls``
            are left out: an algorithm's merged section (:func:`alg_section`; plain LoRA's holds
            MELO's keys too) is read by each dataclass it combines.

    Returns:
        A ``cls`` instance; values are converted and checked as at compose time (choice fields
        hold :class:`Choice` members, which compare equal to their strings).

    Raises:
        btp.errors.ConfigError: a value of the wrong type (naming the key).
    """
    from omegaconf.errors import ValidationError

    from btp.errors import ConfigError

    if isinstance(cfg, cls):
        return cfg
    if cfg is None:
        given: dict[str, Any] = {}
    elif isinstance(cfg, DictConfig):
        given = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    elif is_dataclass(cfg):
        given = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    else:
        given = dict(cfg)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls),
                                 {k: v for k, v in given.items() if k in names})
    except ValidationError as e:
        raise ConfigError(f"bad value for '{e.full_key}': {e.msg.splitlines()[0]}") from e
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def alg_section(cfg: DictConfig) -> DictConfig:
    """The config section the selected algorithm reads (``ft_ewc``: ``ft`` merged with ``ewc``).

    Unknown names fall back to the section of the same name when there is one, so that a newly
    registered editor works without editing this table.
    """
    name = cfg.alg.name
    sections = ALG_SECTIONS.get(name, (name,) if name in cfg else ())
    if not sections:
        return OmegaConf.create({})
    # Merge plain containers: OmegaConf refuses to merge two different structured types
    # (e.g. EwcCfg onto FtCfg).
    merged = OmegaConf.merge(*[OmegaConf.to_container(cfg[s], resolve=True, enum_to_str=True)
                               for s in sections])
    return merged


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not declare, including ones added with ``+key=value``.

    Hydra lets ``+`` add a key even to a structured config, so a typo such as
    ``+melo.num_iters=3`` composes; re-merging the composed config onto a fresh schema catches it
    before anything runs.

    Raises:
        btp.errors.ConfigError: naming the unknown key.
    """
    from omegaconf.errors import ConfigKeyError, ValidationError

    from btp.errors import ConfigError

    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg, resolve=False))
    except ConfigKeyError as e:
        raise ConfigError(unknown_key_message(str(e.full_key))) from e
    except ValidationError as e:
        raise ConfigError(f"bad value for '{e.full_key}': {e.msg.splitlines()[0]}") from e


def _unwrap(tp: Any) -> Any:
    """``Optional[X]`` -> ``X``; other types as they are."""
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    return args[0] if getattr(tp, "__origin__", None) is Union and len(args) == 1 else tp


def _field_types(cls: type) -> dict[str, Any]:
    return {name: _unwrap(tp) for name, tp in get_type_hints(cls).items()}


def declared_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares (sections and their keys): ``melo``,
    ``melo.num_iter``, ... The free-form ``model.tiny`` counts as one key."""
    keys = []
    for name, tp in _field_types(cls).items():
        keys.append(prefix + name)
        if is_dataclass(tp):
            keys.extend(declared_keys(tp, f"{prefix}{name}."))
    return keys


def is_declared(key: str) -> bool:
    """Whether the schema declares the dotted ``key`` (anything below a free-form mapping or
    list such as ``model.tiny`` is)."""
    tp: Any = Config
    for part in key.split("."):
        if not is_dataclass(tp):
            return True
        types = _field_types(tp)
        if part not in types:
            return False
        tp = types[part]
    return True


def unknown_key_message(key: str) -> str:
    """One line for an undeclared ``key``, naming the closest declared keys (difflib)."""
    import difflib

    close = difflib.get_close_matches(key, declared_keys(), n=2, cutoff=0.75)
    if close:
        hint = "did you mean " + " or ".join(f"'{k}'" for k in close) + "?"
    else:
        hint = "check the spelling; see config/config.yaml"
    return f"unknown config key '{key}': not declared in btp/schema.py; {hint}"


# -- value ranges -------------------------------------------------------------------------------
# The dataclasses above fix each key's type; the table below fixes the range of the keys that have
# one, per section ("" = top level). Checked before anything is loaded (``btp.runner.validate``).


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optional(rule: Any) -> Any:
    return lambda v: v is None or rule(v)


_POS_INT = (lambda v: _is_int(v) and v >= 1, "use an integer >= 1")
_OPT_POS_INT = (_optional(_POS_INT[0]), "use an integer >= 1 (or null for the default)")
_POS_REAL = (lambda v: _is_real(v) and v > 0, "use a finite number > 0")
_OPT_POS_REAL = (_optional(_POS_REAL[0]), "use a finite number > 0 (or null for the default)")
_NONNEG_REAL = (lambda v: _is_real(v) and v >= 0, "use a finite number >= 0")
_SEED = (lambda v: _is_int(v) and 0 <= v < 2**32, "use an integer in [0, 2**32 - 1] (numpy's seeds)")

#: ``section -> key -> (check, what to use)``; a key absent from the composed config is skipped
#: (tests assert that every key named here exists in the schema).
VALUE_RULES: dict[str, dict[str, tuple[Any, str]]] = {
    "": {"max_n_edits": (_optional(_POS_INT[0]), "use an integer >= 1 (or null for the whole "
                                                 "stream)"),
         "seed": _SEED, "num_edit_per_block": _POS_INT, "metric_period": _POS_INT,
         "threads": (_OPT_POS_INT[0], "use an integer >= 1 (or null: the free cores)")},
    "data": {"n_upstream": (_OPT_POS_INT[0], "use an integer >= 1 (or null for every record)"),
             "max_length": _OPT_POS_INT, "label_max_length": _OPT_POS_INT,
             "edit_permutation_seed": _SEED},
    "eval": {"max_length": _POS_INT, "batch_size": _OPT_POS_INT,
             "alone_records": (lambda v: _is_int(v) and v >= 0, "use an integer >= 0 (0: off)")},
    "melo": {"num_block": _POS_INT, "num_rank_per_block": _POS_INT, "init_radius": _POS_REAL,
             "lora_dropout": (lambda v: _is_real(v) and 0 <= v < 1, "use a probability in [0, 1)"),
             "num_iter": _POS_INT, "edit_lr": _POS_REAL, "lr_step_size": _POS_INT,
             "lr_gamma": (lambda v: _is_real(v) and 0 < v <= 1, "use a decay factor in (0, 1]")},
    "grace": {"init_radius": _POS_REAL, "edit_lr": _POS_REAL, "num_iter": _POS_INT,
              "batch_size": _OPT_POS_INT},
    "ft": {"num_iter": _POS_INT, "edit_lr": _POS_REAL, "batch_size": _OPT_POS_INT},
    "ewc": {"lambda_": _NONNEG_REAL, "fisher_n_batches": _POS_INT},
    "plain_lora": {"r": _OPT_POS_INT, "alpha": _OPT_POS_REAL, "num_iter": _POS_INT,
                   "edit_lr": _POS_REAL, "batch_size": _OPT_POS_INT},
    "wise": {"mask_ratio": (lambda v: _is_real(v) and 0 < v <= 1, "use a fraction in (0, 1]"),
             "edit_lr": _POS_REAL, "num_iter": _POS_INT, "norm_constraint": _OPT_POS_REAL,
             "act_margin": (lambda v: len(v) == 3 and all(_is_real(x) and x >= 0 for x in v),
                            "use three finite numbers >= 0: [alpha, beta, gamma]"),
             "act_ratio": (lambda v: _is_real(v) and 0 < v <= 1, "use a fraction in (0, 1]"),
             "save_freq": _POS_INT, "merge_freq": _POS_INT,
             "densities": (lambda v: _is_real(v) and 0 < v <= 1, "use a fraction in (0, 1]"),
             "weights": _POS_REAL, "weight_decay": _NONNEG_REAL, "batch_size": _OPT_POS_INT},
    **{section: {"v_num_grad_steps": _POS_INT, "v_lr": _POS_REAL, "v_weight_decay": _NONNEG_REAL,
                 "clamp_norm_factor": _POS_REAL, "mom2_update_weight": _NONNEG_REAL,
                 "stats_n_samples": _POS_INT, "stats_max_length": _OPT_POS_INT,
                 "batch_size": _OPT_POS_INT}
       for section in ("memit", "alphaedit")},
    "model": {"num_labels": (_optional(lambda v: _is_int(v) and v >= 2),
                             "use an integer >= 2 (or null: the checkpoint's own)"),
              "dtype": (lambda v: str(v).lower() in ("fp32", "float32", "bf16", "bfloat16",
                                                     "fp16", "float16"),
                        "use fp32, bf16 or fp16")},
}

#: ``device`` values: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"


def check_values(cfg: DictConfig) -> None:
    """Refuse values outside their range (:data:`VALUE_RULES`) and unknown device strings.

    Raises:
        btp.errors.ConfigError: one line naming the key, the value and what to use.
    """
    import re

    from btp.errors import ConfigError

    for section, rules in VALUE_RULES.items():
        node = cfg if not section else cfg.get(section)
        if node is None:
            continue
        for key, (ok, fix) in rules.items():
            if key not in node or OmegaConf.is_missing(node, key):
                continue
            value = node[key]
            if not ok(value):
                name = f"{section}.{key}" if section else key
                raise ConfigError(f"{name}={value!r} is out of range: {fix}")
    device = str(cfg.get("device", "auto"))
    if re.fullmatch(DEVICE_PATTERN, device) is None:
        raise ConfigError(f"device={device!r} is not a device this runner can use: use auto, cpu, "
                          "cuda, cuda:N or mps")
