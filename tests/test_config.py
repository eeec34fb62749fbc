"""The Hydra configuration: composition, original values, strictness, tiny stand-ins."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import btp.schema  # noqa: F401  (registers the schema and the repo_path resolver)
from btp.errors import ConfigError
from btp.runner import validate
from btp.schema import alg_section, check_known_keys

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config"


def _compose(*overrides: str, config_dir: Path = CONFIG):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# method.md's table: the original values per experiment.
ORIGINAL = {
    "qa": dict(num_edit_per_block=100, metric_period=200, num_block=20, num_rank_per_block=2,
               init_radius=75.0, edit_lr=1e-2, lr_step_size=20),
    "scotus": dict(num_edit_per_block=50, metric_period=200, num_block=100, num_rank_per_block=4,
                   init_radius=0.1, edit_lr=1e-2, lr_step_size=20),
    "hallucination": dict(num_edit_per_block=4, metric_period=400, num_block=350,
                          num_rank_per_block=2, init_radius=0.5, edit_lr=1e-3, lr_step_size=20),
}
MODELS = {"qa": ["t5small", "t5large"], "scotus": ["scotus-bert"], "hallucination": ["gpt2xl"]}


@pytest.mark.parametrize("task", sorted(ORIGINAL))
def test_experiments_hold_the_original_values(task: str) -> None:
    for model in MODELS[task]:
        cfg = _compose("+alg=lora", f"+experiment={task}", f"+model={model}")
        validate(cfg)
        want = ORIGINAL[task]
        assert cfg.task == task and cfg.alg.name == "melo"
        assert cfg.num_edit_per_block == want["num_edit_per_block"]
        assert cfg.metric_period == want["metric_period"]
        for key in ("num_block", "num_rank_per_block", "init_radius", "edit_lr", "lr_step_size"):
            assert cfg.melo[key] == want[key], (task, key)
        assert cfg.melo.num_iter == 50 and cfg.melo.key_id == -1 and cfg.melo.lr_gamma == 0.5
        assert cfg.melo.key_position == "padded" and cfg.melo.label_match == "sum"
        assert cfg.seed == 0 and cfg.device == "auto" and cfg.max_n_edits is None


def test_real_model_files() -> None:
    t5 = _compose("+alg=lora", "+experiment=qa", "+model=t5small").model
    assert t5.pretrained == "google/t5-small-ssm-nq"
    assert len(t5.target_modules) == 4 and all(m.endswith(".wo") for m in t5.target_modules)
    assert t5.grace_layer == "encoder.block.4.layer.1.DenseReluDense.wo"
    large = _compose("+alg=lora", "+experiment=qa", "+model=t5large").model
    assert len(large.target_modules) == 8
    assert large.grace_layer == "encoder.block.12.layer.1.DenseReluDense.wo"
    bert = _compose("+alg=lora", "+experiment=scotus", "+model=scotus-bert").model
    assert bert.target_modules == [f"bert.encoder.layer.{i}.output.dense" for i in (9, 10, 11)]
    assert bert.tokenizer == "bert-base-cased"
    assert bert.grace_layer == "bert.encoder.layer.4.output.dense"  # MELO's key layer
    assert bert.grace_baseline_layer == "bert.encoder.layer.10.output.dense"  # GRACE's own
    gpt = _compose("+alg=lora", "+experiment=hallucination", "+model=gpt2xl").model
    assert gpt.target_modules == ["transformer.h.36.mlp.c_fc", "transformer.h.37.mlp.c_fc"]
    assert gpt.grace_layer == "transformer.h.35.mlp.c_fc"


@pytest.mark.parametrize("task,tiny,real", [
    ("qa", "tiny-t5small", "t5small"), ("qa", "tiny-t5large", "t5large"),
    ("scotus", "tiny-scotus-bert", "scotus-bert"), ("hallucination", "tiny-gpt2xl", "gpt2xl")])
def test_tiny_models_keep_the_real_module_paths(task: str, tiny: str, real: str) -> None:
    from btp.models import load_model_and_tokenizer

    cfg = _compose("+alg=lora", f"+experiment={task}", f"+model={tiny}")
    validate(cfg)
    real_cfg = _compose("+alg=lora", f"+experiment={task}", f"+model={real}")
    assert list(cfg.model.target_modules) == list(real_cfg.model.target_modules)
    assert cfg.model.grace_layer == real_cfg.model.grace_layer
    assert cfg.model.grace_baseline_layer == real_cfg.model.grace_baseline_layer
    assert cfg.model.tiny is not None and cfg.model.kind == real_cfg.model.kind
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, enum_to_str=True))
    model, _ = load_model_and_tokenizer(model_cfg, "cpu")
    names = {n for n, _ in model.named_modules()}
    for module in [*cfg.model.target_modules, cfg.model.grace_layer,
                   *([cfg.model.grace_baseline_layer] if cfg.model.grace_baseline_layer else [])]:
        assert module in names, module


def test_data_dir_is_the_repo_data_folder_absolute() -> None:
    cfg = _compose("+alg=lora", "+experiment=qa", "+model=tiny-t5small")
    assert Path(cfg.data_dir) == REPO / "data" and Path(cfg.data_dir).is_absolute()


def test_typo_on_the_command_line_fails_at_compose() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="num_iters"):
        _compose("+alg=lora", "+experiment=qa", "+model=t5small", "melo.num_iters=3")
    with pytest.raises(ConfigCompositionException, match="max_n_edit"):
        _compose("+alg=lora", "+experiment=qa", "+model=t5small", "max_n_edit=3")
    with pytest.raises(ConfigCompositionException, match="task=translation") as bad_task:
        _compose("+alg=lora", "+experiment=qa", "+model=t5small", "task=translation")
    assert "Invalid value 'translation', expected one of [qa," in str(bad_task.value.__cause__)
    added = _compose("+alg=lora", "+experiment=qa", "+model=t5small", "+melo.num_iters=3")
    with pytest.raises(ConfigError, match="melo.num_iters"):
        check_known_keys(added)
    check_known_keys(_compose("+alg=lora", "+experiment=qa", "+model=t5small"))


def test_typo_in_a_yaml_file_fails_at_compose(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    shutil.copytree(CONFIG, config_dir)
    (config_dir / "experiment" / "typo.yaml").write_text(
        "# @package _global_\ntask: qa\nmelo:\n  num_iters: 3\n")
    with pytest.raises(Exception, match="num_iters"):
        _compose("+alg=lora", "+experiment=typo", "+model=t5small", config_dir=config_dir)


def _stems(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG / group).glob("*.yaml"))


def test_command_line_groups_set_only_their_own_keys() -> None:
    """What makes the order of +alg/+experiment/+model irrelevant: the files they select write
    disjoint keys; the values that interact live in values/ (merged by config.yaml in a fixed
    order)."""
    for group, own in (("alg", {"alg"}), ("experiment", {"task"})):
        for name in _stems(group):
            keys = set(OmegaConf.load(CONFIG / group / f"{name}.yaml")) - {"defaults"}
            assert keys <= own, (group, name, sorted(keys - own))
    for name in _stems("model"):
        text = (CONFIG / "model" / f"{name}.yaml").read_text()
        assert "@package" not in text, name  # the default package: everything under model.*
    for group, names in (("values/experiment", _stems("experiment")),
                         ("values/model", _stems("model"))):
        assert set(_stems(group)) <= set(names), group  # a values file nobody could select


#: Orders of the three command-line groups (indices into (alg, experiment, model)).
ORDERS = list(itertools.permutations(range(3)))


def test_any_order_of_the_groups_composes_the_same() -> None:
    """Every model, with an algorithm and an experiment of its kind (cycling through both), is
    composed in the seed command's order and in one other (each of the five others in turn); the
    first stand-in and SmolLM2 (models with values of their own) in all six orders. Each triple
    validates."""
    from btp.tasks import get_task

    algs, experiments, models = _stems("alg"), _stems("experiment"), _stems("model")
    task = {e: OmegaConf.load(CONFIG / "experiment" / f"{e}.yaml").task for e in experiments}
    all_orders = {"tiny-gpt2xl", "smollm2-135m"}
    assert all_orders <= set(models)
    with initialize_config_dir(config_dir=str(CONFIG), version_base="1.3"):
        for i, model in enumerate(models):
            kind = OmegaConf.load(CONFIG / "model" / f"{model}.yaml").kind
            fits = [e for e in experiments if kind in get_task(task[e]).model_kinds]
            groups = [f"+alg={algs[i % len(algs)]}", f"+experiment={fits[i % len(fits)]}",
                      f"+model={model}"]
            cfg = compose("config", overrides=groups)
            validate(cfg)
            seed_order = OmegaConf.to_yaml(cfg)
            orders = ORDERS[1:] if model in all_orders else [ORDERS[1 + i % (len(ORDERS) - 1)]]
            for order in orders:
                other = compose("config", overrides=[groups[k] for k in order])
                assert OmegaConf.to_yaml(other) == seed_order, [groups[k] for k in order]


def test_missing_groups_are_named() -> None:
    with pytest.raises(ConfigError, match=r"\+experiment="):
        validate(_compose("+alg=lora", "+model=t5small"))
    with pytest.raises(ConfigError, match=r"\+alg="):
        validate(_compose("+experiment=qa", "+model=t5small"))
    with pytest.raises(ConfigError, match=r"\+model="):
        validate(_compose("+alg=lora", "+experiment=qa"))


@pytest.mark.parametrize("alg,name", [("lora", "melo"), ("grace", "grace"), ("ft", "ft"),
                                      ("ft_ewc", "ft_ewc"), ("plain_lora", "plain_lora")])
def test_alg_files_select_registered_editors(alg: str, name: str) -> None:
    from btp.editors import EDITORS

    cfg = _compose(f"+alg={alg}", "+experiment=qa", "+model=t5small")
    assert cfg.alg.name == name and name in EDITORS
    section = alg_section(cfg)
    assert "num_iter" in section or "lambda_" in section


@pytest.mark.parametrize("alg,extra,want", [
    ("lora", [], 100),                       # MELO: num_edit_per_block
    ("grace", [], 1),                        # GRACE edits one record at a time
    ("grace", ["grace.batch_size=3"], 3),
    ("grace", ["grace.batch_size=null"], 100),
    ("ft", [], 1), ("ft", ["ft.batch_size=null"], 100), ("ft", ["ft.batch_size=7"], 7),
    ("ft_ewc", ["ft.batch_size=5"], 5),
    ("plain_lora", ["plain_lora.batch_size=2"], 2),
])
def test_edit_batch_size_per_algorithm(alg: str, extra: list[str], want: int) -> None:
    from btp.runner import edit_batch_size

    cfg = _compose(f"+alg={alg}", "+experiment=qa", "+model=t5small", *extra)
    assert edit_batch_size(cfg) == want


def test_edit_batch_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        validate(_compose("+alg=grace", "+experiment=qa", "+model=t5small", "grace.batch_size=0"))


@pytest.mark.parametrize("task,tiny,want", [
    ("qa", "tiny-t5small", dict(replacement="replace_prompt", edit_lr=1.0, key_id=-1,
                                init_radius=1.0)),
    ("scotus", "tiny-scotus-bert", dict(replacement="replace_prompt", edit_lr=1.0, key_id=-2,
                                        init_radius=0.05)),
])
def test_tiny_models_set_grace_demo_values(task: str, tiny: str, want: dict) -> None:
    cfg = alg_section(_compose("+alg=grace", f"+experiment={task}", f"+model={tiny}"))
    assert {k: cfg[k] for k in want} == want
    real = alg_section(_compose("+alg=grace", f"+experiment={task}", "+model=t5small"
                                if task == "qa" else "+model=scotus-bert"))
    assert (real.replacement, real.edit_lr, real.key_id) == ("replace_prompt", 1.0, -1)
