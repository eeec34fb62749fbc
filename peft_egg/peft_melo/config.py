"""MeloConfig: the MELO adapter's configuration, a dataclass on upstream peft's ``PeftConfig``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

# peft's PeftType enum has no MELO member and ``register_peft_method`` refuses names outside it,
# so MELO is not registered with peft; the string is written into adapter_config.json so that a
# reader can tell what the directory holds (see README, "How this relates to peft").
MELO_PEFT_TYPE = "MELO"


def _fail(name: str, value: object, fix: str) -> None:
    raise ValueError(f"MeloConfig.{name}={value!r} is invalid: {fix}")


@dataclass
class MeloConfig(PeftConfig):
    """Configuration of a MELO (neuron-indexed dynamic LoRA) adapter.

    The LoRA rank is ``r = num_block * num_rank_per_block`` and ``lora_alpha = r`` (as the
    original), so each block's update is scaled by ``num_block`` (see ``MeloLayer``).
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (full paths or unique suffixes) that get dynamic LoRA."},
    )
    grace_layer: Optional[str] = field(
        default=None,
        metadata={"help": "Module whose output at token key_id is the routing key; must run before every target."},
    )
    num_block: int = field(default=20, metadata={"help": "LoRA blocks; one is trained per edit batch."})
    num_rank_per_block: int = field(default=2, metadata={"help": "Rank of each block."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input (original: 0)."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Base weight stored (in, out), as GPT-2's Conv1D; detected automatically for Conv1D."},
    )
    init_radius: float = field(default=75.0, metadata={"help": "Radius of a new cluster in key space."})
    key_id: int = field(default=-1, metadata={"help": "Token position of the key (original: -1)."})
    key_position: Literal["padded", "last_real", "last_prompt"] = field(
        default="padded",
        metadata={
            "help": "'padded': key_id indexes the padded batch (original; often a pad token). "
            "'last_real': the last non-pad token of each example (a deviation switch). "
            "'last_prompt': for a causal LM, the last real token before the labels (-100 in "
            "'labels' of the input's shape), the last real token without labels, e.g. in "
            "generate (a deviation switch: an edit and a question asked alone share their key)."
        },
    )
    label_match: Literal["sum", "exact"] = field(
        default="sum",
        metadata={"help": "'sum': labels agree when their id sums agree (original hash); 'exact': same sequence."},
    )
    num_iter: int = field(default=50, metadata={"help": "Training steps per edit batch."})
    edit_lr: float = field(default=1e-2, metadata={"help": "Learning rate of an edit."})
    optimizer: Literal["adam", "sgd"] = field(default="adam", metadata={"help": "Optimizer of an edit."})
    lr_step_size: int = field(default=20, metadata={"help": "StepLR step size (iterations)."})
    lr_gamma: float = field(default=0.5, metadata={"help": "StepLR decay factor."})
    cache_frozen_prefix: bool = field(
        default=True,
        metadata={"help": "Run the frozen blocks below the lowest adapted block once per edit, not at "
                          "every step (same losses and LoRA values; False runs the whole model each step)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MELO_PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            _fail("target_modules", self.target_modules, "give the module names that get LoRA, "
                  "e.g. ['encoder.block.5.layer.1.DenseReluDense.wo']")
        if not self.grace_layer or not isinstance(self.grace_layer, str):
            _fail("grace_layer", self.grace_layer, "give the module whose output is the key, "
                  "e.g. 'encoder.block.4.layer.1.DenseReluDense.wo'")
        for name in ("num_block", "num_rank_per_block", "num_iter", "lr_step_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "use a positive integer")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            _fail("lora_dropout", self.lora_dropout, "use a probability in [0, 1)")
        if not float(self.init_radius) > 0.0:
            _fail("init_radius", self.init_radius, "use a positive distance (original: 75 qa, 0.1 scotus, 0.5 hallucination)")
        if not isinstance(self.key_id, int) or isinstance(self.key_id, bool):
            _fail("key_id", self.key_id, "use an integer token position (original: -1)")
        if self.key_position not in ("padded", "last_real", "last_prompt"):
            _fail("key_position", self.key_position, "use 'padded' (original), 'last_real' or 'last_prompt'")
        if self.key_position != "padded" and self.key_id != -1:
            _fail("key_id", self.key_id, f"key_position='{self.key_position}' takes one token of its own; leave key_id at -1")
        if self.label_match not in ("sum", "exact"):
            _fail("label_match", self.label_match, "use 'sum' (original) or 'exact'")
        if not float(self.edit_lr) > 0.0:
            _fail("edit_lr", self.edit_lr, "use a positive learning rate")
        if self.optimizer not in ("adam", "sgd"):
            _fail("optimizer", self.optimizer, "use 'adam' (original) or 'sgd'")
        if not isinstance(self.cache_frozen_prefix, bool):
            _fail("cache_frozen_prefix", self.cache_frozen_prefix, "use true or false")
        if not 0.0 < float(self.lr_gamma) <= 1.0:
            _fail("lr_gamma", self.lr_gamma, "use a decay factor in (0, 1]")

    @property
    def r(self) -> int:
        """Total LoRA rank: num_block * num_rank_per_block."""
        return self.num_block * self.num_rank_per_block

    @property
    def lora_alpha(self) -> int:
        """alpha = r, as the original (so alpha / r = 1)."""
        return self.r

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs) -> "MeloConfig":
        """Read ``adapter_config.json`` from a local directory written by ``save_pretrained``.

        peft's own ``PeftConfig.from_pretrained`` cannot read it, since MELO is not in peft's
        ``PeftType`` registry; this reader checks ``peft_type`` and builds a ``MeloConfig``.
        """
        path = os.path.join(pretrained_model_name_or_path, subfolder or "", CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {pretrained_model_name_or_path!r}: is it a MELO adapter directory?")
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
        if loaded.get("peft_type") != MELO_PEFT_TYPE:
            raise ValueError(f"{path} holds a {loaded.get('peft_type')!r} adapter, not {MELO_PEFT_TYPE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{path} has keys this version of peft_melo does not know: {unknown}")
        loaded.update(kwargs)
        return cls(**loaded)
