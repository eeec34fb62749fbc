"""Every range in ``btp.schema.VALUE_RULES`` names a declared key, every shipped configuration is in
range, and each rule refuses the values just outside it (compose only: nothing runs)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from btp.errors import ConfigError
from btp.schema import VALUE_RULES, Config, check_values

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
MODELS = {"qa": ("t5small", "t5large", "tiny-t5small", "tiny-t5large"),
          "scotus": ("scotus-bert", "tiny-scotus-bert"),
          "hallucination": ("gpt2xl", "tiny-gpt2xl")}
ALGS = ("lora", "grace", "ft", "ft_ewc", "plain_lora")


@pytest.fixture(scope="module")
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield lambda *overrides: hydra_compose("config", overrides=list(overrides))


def test_every_rule_names_a_declared_key() -> None:
    schema = OmegaConf.structured(Config)
    for section, rules in VALUE_RULES.items():
        node = schema if not section else schema[section]
        for key in rules:
            assert key in node, f"VALUE_RULES names {section}.{key}, which btp/schema.py lacks"


def test_shipped_configurations_are_in_range(compose) -> None:
    for (task, models), alg in itertools.product(MODELS.items(), ALGS):
        for model in models:
            check_values(compose(f"+alg={alg}", f"+experiment={task}", f"+model={model}"))


@pytest.mark.parametrize("override,ok", [
    ("melo.num_block=0", False), ("melo.num_block=1", True),
    ("melo.lr_gamma=0", False), ("melo.lr_gamma=1", True),
    ("melo.lora_dropout=0", True), ("melo.lora_dropout=1", False),
    ("melo.init_radius=inf", False), ("grace.init_radius=1e-9", True),
    ("ewc.lambda_=0", True), ("ewc.lambda_=-0.1", False),
    ("plain_lora.alpha=null", True), ("plain_lora.alpha=0", False),
    ("eval.alone_records=0", True), ("eval.alone_records=-1", False),
    ("seed=4294967295", True), ("seed=4294967296", False),
    ("data.edit_permutation_seed=-1", False), ("model.num_labels=1", False),
    ("device=cuda:1", True), ("device=cuda1", False), ("device=mps", True),
])
def test_rule_boundaries(compose, override: str, ok: bool) -> None:
    cfg = compose("+alg=lora", "+experiment=qa", "+model=tiny-t5small", override)
    if ok:
        check_values(cfg)
    else:
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_values(cfg)
