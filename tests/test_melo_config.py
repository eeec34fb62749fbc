"""Every MeloConfig error message names the field, the value and the fix."""

from __future__ import annotations

import pytest

from peft_melo import MeloConfig, get_melo_model
from tests.tiny_checkpoints import CASES

T5 = CASES[0]
GOOD = dict(target_modules=list(T5.targets), grace_layer=T5.grace_layer)


@pytest.mark.parametrize(
    ("field", "value", "fix"),
    [
        ("target_modules", None, "give the module names"),
        ("target_modules", [], "give the module names"),
        ("grace_layer", None, "give the module whose output is the key"),
        ("num_block", 0, "positive integer"),
        ("num_rank_per_block", -2, "positive integer"),
        ("num_iter", 1.5, "positive integer"),
        ("lr_step_size", 0, "positive integer"),
        ("lora_dropout", 1.0, r"probability in \[0, 1\)"),
        ("init_radius", 0.0, "positive distance"),
        ("key_id", "last", "integer token position"),
        ("key_position", "first", "'padded' \\(original\\), 'last_real' or 'last_prompt'"),
        ("label_match", "hash", "'sum' \\(original\\) or 'exact'"),
        ("edit_lr", 0.0, "positive learning rate"),
        ("optimizer", "adamw", "'adam' \\(original\\) or 'sgd'"),
        ("lr_gamma", 1.5, r"decay factor in \(0, 1\]"),
    ],
)
def test_bad_value_names_field_value_and_fix(field: str, value: object, fix: str) -> None:
    with pytest.raises(ValueError, match=rf"MeloConfig\.{field}={value!r}".replace("[", r"\[").replace("]", r"\]")) as err:
        MeloConfig(**{**GOOD, field: value})
    assert err.match(fix)


def test_last_real_key_position_rejects_a_key_id() -> None:
    with pytest.raises(ValueError, match="MeloConfig.key_id=3 .*leave key_id at -1"):
        MeloConfig(**GOOD, key_position="last_real", key_id=3)


def test_rank_and_alpha_follow_the_blocks() -> None:
    cfg = MeloConfig(**GOOD, num_block=20, num_rank_per_block=2)
    assert cfg.r == 40 and cfg.lora_alpha == 40 and cfg.peft_type == "MELO"


def test_unknown_target_lists_the_closest_module_names() -> None:
    cfg = MeloConfig(target_modules=["encoder.block.5.layer.1.DenseReluDense.wi"], grace_layer=T5.grace_layer)
    with pytest.raises(ValueError, match=r"target module 'encoder.block.5.layer.1.DenseReluDense.wi' matches no module") as err:
        get_melo_model(T5.build(), cfg)
    # the gated FFN has wi_0/wi_1: they are offered as the closest names
    assert err.match("encoder.block.5.layer.1.DenseReluDense.wi_0")


def test_unknown_grace_layer_lists_the_closest_module_names() -> None:
    cfg = MeloConfig(target_modules=list(T5.targets), grace_layer="encoder.block.4.layer.1.DenseReluDense.w0")
    with pytest.raises(ValueError, match="grace_layer 'encoder.block.4.layer.1.DenseReluDense.w0' matches no module") as err:
        get_melo_model(T5.build(), cfg)
    assert err.match("encoder.block.4.layer.1.DenseReluDense.wo")


def test_grace_layer_cannot_be_a_target() -> None:
    cfg = MeloConfig(target_modules=[T5.grace_layer], grace_layer=T5.grace_layer)
    with pytest.raises(ValueError, match="is also a target module"):
        get_melo_model(T5.build(), cfg)


def test_ambiguous_suffix_asks_for_the_full_path() -> None:
    cfg = MeloConfig(target_modules=list(T5.targets), grace_layer="DenseReluDense.wo")
    with pytest.raises(ValueError, match="matches several modules"):
        get_melo_model(T5.build(), cfg)


def test_non_linear_target_is_refused() -> None:
    cfg = MeloConfig(target_modules=["encoder.block.5.layer.1.layer_norm"], grace_layer=T5.grace_layer)
    with pytest.raises(TypeError, match="MELO supports nn.Linear and Conv1D"):
        get_melo_model(T5.build(), cfg)


#: MeloConfig fields the runner does not take from the ``melo`` section, and why.
ADAPTER_ONLY = {
    "target_modules": "the model section's target_modules (per model, not per method)",
    "grace_layer": "the model section's grace_layer (per model, not per method)",
    "fan_in_fan_out": "detected by peft_melo from the target layers (GPT-2's Conv1D)",
}
#: ``melo`` section keys MeloConfig does not have (read by the runner only), and why.
RUNNER_ONLY: dict[str, str] = {}


def test_schema_melo_section_and_melo_config_agree() -> None:
    """``btp.schema.MeloCfg`` (the ``melo`` section) and ``peft_melo.MeloConfig`` declare the same
    hyperparameters with the same defaults, so that neither can drift from the other."""
    from dataclasses import fields
    from enum import Enum

    from peft.config import PeftConfig

    from btp.schema import MeloCfg

    base = {f.name for f in fields(PeftConfig)}
    adapter = {f.name: f.default for f in fields(MeloConfig) if f.name not in base}
    schema = {f.name: f.default for f in fields(MeloCfg)}
    assert set(ADAPTER_ONLY) <= set(adapter) - set(schema)  # the lists above are current
    assert set(RUNNER_ONLY) <= set(schema) - set(adapter)
    assert set(schema) - set(RUNNER_ONLY) == set(adapter) - set(ADAPTER_ONLY)
    for name in set(schema) - set(RUNNER_ONLY):
        default = schema[name].value if isinstance(schema[name], Enum) else schema[name]
        assert adapter[name] == default, (name, adapter[name], default)


def test_melo_editor_config_is_the_section_with_schema_defaults() -> None:
    """A partial ``melo`` section is completed with the schema's defaults, and every section key
    reaches MeloConfig (choices as plain strings)."""
    from btp.editors.melo import melo_config
    from btp.schema import MeloCfg

    config = melo_config({"num_iter": 7, "key_position": "last_real"}, GOOD)
    assert config.num_iter == 7 and config.key_position == "last_real"
    assert type(config.key_position) is str and type(config.optimizer) is str
    assert config.init_radius == MeloCfg.init_radius and config.num_block == MeloCfg.num_block
