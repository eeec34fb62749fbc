"""The data layer on the shipped sample and on small crafted files (no network)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from btp.data import Collator, TaskData, load_task_data
from btp.data.hallucination import split_passages
from btp.data.sentences import get_splitter, regex_split
from btp.data.zsre import permute, select_mend
from btp.errors import DataError
from btp.tokenizer import get_tokenizer


def legacy_permutation(n: int, seed: int = 42) -> list[int]:
    """What the original does: ``np.random.seed(42); np.random.permutation(n)`` (state restored)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(n).tolist()
    finally:
        np.random.set_state(state)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def mend(q: str, answer: str, n_reph: int) -> dict:
    return {"input": q, "filtered_rephrases": [f"{q} r{i}" for i in range(n_reph)],
            "output": [{"answer": answer, "provenance": []}]}


# --------------------------------------------------------------------------- zsRE / NQ


def test_qa_mend_sample(sample_dir: Path) -> None:
    rec = json.loads((sample_dir / "zsre_train.jsonl").read_text().splitlines()[0])
    reph, ans = rec["filtered_rephrases"], rec["output"][0]["answer"]
    assert len(reph) == 11  # k = 11, k // 2 = 5
    data = load_task_data("qa", None, sample_dir, None)
    cands = [rec["input"]] + reph[:5]
    assert [e["text"] for e in data.edits] == [cands[i] for i in legacy_permutation(6)]
    assert all(e["label"] == ans for e in data.edits)
    assert data.holdout == [{"text": r, "label": ans} for r in reph[5:12]]
    assert len(data.upstream) == 80 and data.accurate is None
    assert data.upstream[0] == {"text": "nq question: who played desmond doss father in hacksaw ridge",
                                "label": "Hugo Weaving"}


def test_mend_selection_rule(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "z.jsonl", [
        mend("q1", "A", 4),    # k=4: edits q1 + r0,r1; holdout r2,r3
        mend("q2", "B", 0),    # no rephrases: skipped, and B stays unseen
        mend("q3", "A", 5),    # answer A already kept: skipped
        mend("q4", "B", 20),   # k=16: edits q4 + r0..r7 (9); holdout r8..r16 (9)
        mend("q5", "C", 2),    # not reached when n_edits=10 (12 candidates >= 10 after q4)
    ])
    edits, holdout = select_mend(path, n_edits=10)
    cands = ["q1", "q1 r0", "q1 r1", "q4"] + [f"q4 r{i}" for i in range(8)]
    assert [e["text"] for e in edits] == [cands[:10][i] for i in legacy_permutation(10)]
    assert [h["text"] for h in holdout] == ["q1 r2", "q1 r3"] + [f"q4 r{i}" for i in range(8, 17)]
    assert {h["label"] for h in holdout[:2]} == {"A"} and holdout[2]["label"] == "B"
    # Without a cap (1000): everything, q5 included (k=2: edit q5 + r0, holdout r1).
    edits, holdout = select_mend(path, n_edits=1000)
    assert len(edits) == 14 and {"q5", "q5 r0"} <= {e["text"] for e in edits}
    assert holdout[-1] == {"text": "q5 r1", "label": "C"}


def test_permutation_matches_global_seed() -> None:
    recs = [{"text": str(i), "label": ""} for i in range(50)]
    assert [int(r["text"]) for r in permute(recs, 42)] == legacy_permutation(50)
    assert [int(r["text"]) for r in permute(recs, 42)] != list(range(50))


def test_holdout_swap_switch(sample_dir: Path) -> None:
    fixed = load_task_data("qa", {"zsre_format": "rome"}, sample_dir, 5)
    buggy = load_task_data("qa", {"zsre_format": "rome", "zsre_holdout_swap_bug": True},
                           sample_dir, 5)
    assert [(h["label"], h["text"]) for h in fixed.holdout] == [
        (h["text"], h["label"]) for h in buggy.holdout]
    assert fixed.holdout[0]["text"] == "What university did Watts Humphrey take part in?"
    assert buggy.holdout[0]["text"] == "Illinois Institute of Technology"
    assert fixed.edits == buggy.edits


def test_qa_rome_sample(sample_dir: Path) -> None:
    rows = json.loads((sample_dir / "zsre_mend_eval.json").read_text())
    data = load_task_data("qa", {"zsre_format": "rome", "n_upstream": 7}, sample_dir, None)
    assert len(data.edits) == len(data.holdout) == 81 and len(data.upstream) == 7
    perm = legacy_permutation(81)
    assert data.edits[0] == {"text": rows[perm[0]]["src"], "label": rows[perm[0]]["answers"][0]}
    assert data.holdout[3] == {"text": rows[3]["rephrase"], "label": rows[3]["answers"][0]}
    capped = load_task_data("qa", {"zsre_format": "rome"}, sample_dir, 10)
    assert len(capped.edits) == 10
    assert {e["text"] for e in capped.edits} == {r["src"] for r in rows[:10]}


def test_small_file_used_whole_and_logged(sample_dir: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="btp.data"):
        data = load_task_data("qa", {"zsre_format": "rome"}, sample_dir, 500)
    assert len(data.edits) == 81
    assert "only 81 records available (asked for 500)" in caplog.text


def test_missing_file_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_task_data("qa", None, tmp_path, None)
    msg = str(err.value)
    assert str(tmp_path / "zsre_train.jsonl") in msg and "download.sh" in msg
    with pytest.raises(DataError, match="download.sh"):
        load_task_data("hallucination", None, tmp_path, None)
    with pytest.raises(DataError, match="download.sh"):
        load_task_data("scotus", None, tmp_path, None)


def test_malformed_lines_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "zsre_train.jsonl"
    path.write_text(json.dumps(mend("q1", "A", 2)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"zsre_train.jsonl, line 2: not valid JSON"):
        select_mend(path, 100)
    path.write_text(json.dumps(mend("q1", "A", 2)) + "\n\n" + json.dumps({"input": "q"}) + "\n")
    with pytest.raises(DataError, match=r"line 3: not a MEND zsRE record"):
        select_mend(path, 100)


def test_unknown_task_and_format(sample_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown task"):
        load_task_data("squad", None, sample_dir, None)
    with pytest.raises(DataError, match="zsre_format"):
        load_task_data("qa", {"zsre_format": "kilt"}, sample_dir, None)


# --------------------------------------------------------------------------- SCOTUS


def test_scotus_lexglue_sample(sample_dir: Path) -> None:
    lines = [json.loads(x) for x in (sample_dir / "scotus/scotus.jsonl").read_text().splitlines()]
    data = load_task_data("scotus", None, sample_dir, None)
    # issueArea 8, 8 (train) | 1, 8 (dev), 1, 4 (test) -> label = issueArea - 1
    assert [r["label"] for r in data.upstream] == [7, 7]
    assert [r["label"] for r in data.edits] == [0, 7, 0, 3]
    assert data.edits[0]["text"] == lines[2]["text"]  # the first dev record, file order
    assert data.holdout is None and data.accurate is None
    assert len(load_task_data("scotus", None, sample_dir, 3).edits) == 3


def test_scotus_csv_source(tmp_path: Path) -> None:
    (tmp_path / "scotus").mkdir()
    (tmp_path / "scotus/train.csv").write_text('text,label\n"a, b\nc",3\nplain,0\n')
    (tmp_path / "scotus/test.csv").write_text('text,label\nx,5\ny,1\nz,2\n')
    data = load_task_data("scotus", {"scotus_source": "auto"}, tmp_path, None)
    assert data.upstream == [{"text": "a, b\nc", "label": 3}, {"text": "plain", "label": 0}]
    assert [r["label"] for r in data.edits] == [5, 1, 2]


def test_scotus_bad_source(sample_dir: Path) -> None:
    with pytest.raises(DataError, match="scotus_source"):
        load_task_data("scotus", {"scotus_source": "zenodo"}, sample_dir, None)


# --------------------------------------------------------------------------- hallucination


def test_hallucination_sample(sample_dir: Path) -> None:
    rows = json.loads((sample_dir / "hallucination/wikibio_gpt3_hallucination.json").read_text())
    rows = rows["evaluation"]
    data = load_task_data("hallucination", {"sentence_splitter": "regex"}, sample_dir, None)
    assert (len(data.edits), len(data.accurate), len(data.upstream)) == (40, 5, 4)
    assert data.holdout is None
    head = "This is a Wikipedia passage about john russell reynolds."
    assert data.edits[0]["text"] == head + " "
    assert data.edits[1]["text"] == head + " " + rows[0]["gpt3_sentences"][0]
    wiki0 = regex_split(rows[0]["wiki_bio_text"])
    assert [e["label"] for e in data.edits[:9]] == wiki0[:9]
    # Passage 3 (rick mahler), sentence 2 is the first "accurate" one.
    g = rows[2]["gpt3_sentences"]
    assert data.accurate[0] == {
        "text": "This is a Wikipedia passage about rick mahler. " + " ".join(g[:2]), "label": g[2]}
    assert all(r["label"] == "" for r in data.upstream)
    names = sorted(p.name for p in (sample_dir / "openwebtext").glob("*.txt"))
    assert data.upstream[0]["text"] == (sample_dir / "openwebtext" / names[0]).read_text()


def test_hallucination_label_index_clamped() -> None:
    row = {"gpt3_sentences": ["G0.", "G1.", "G2."],
           "annotation": ["major_inaccurate", "accurate", "minor_inaccurate"],
           "wiki_bio_text": "W0 is here. W1 is there. W2 is far. W3 is extra."}
    edits, accurate = split_passages([row], ["x"], regex_split)
    assert [e["label"] for e in edits] == ["W0 is here.", "W2 is far."]
    assert accurate == [{"text": "This is a Wikipedia passage about x. G0.", "label": "G1."}]
    short = dict(row, wiki_bio_text="Only one sentence here.")
    edits, _ = split_passages([short], ["x"], regex_split)
    assert [e["label"] for e in edits] == ["Only one sentence here."] * 2


def test_regex_splitter() -> None:
    text = ("Reynolds was the grandson of Dr. Henry Reynolds. In 1851, he graduated M.B. in London."
            " Timothy W. Finchem (born 1947) is here! Born in 1953? Yes.")
    assert regex_split(text) == [
        "Reynolds was the grandson of Dr. Henry Reynolds.",
        "In 1851, he graduated M.B. in London.",
        "Timothy W. Finchem (born 1947) is here!",
        "Born in 1953?",
        "Yes.",
    ]
    assert get_splitter("regex") is regex_split
    with pytest.raises(DataError, match="sentence_splitter"):
        get_splitter("spacy")


def test_nltk_splitter_without_data_is_clear() -> None:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        pytest.skip("nltk punkt data is installed here")
    except LookupError:
        pass
    try:
        nltk.data.find("tokenizers/punkt")
        pytest.skip("nltk punkt data is installed here")
    except LookupError:
        pass
    with pytest.raises(DataError, match="data.sentence_splitter=regex"):
        get_splitter("nltk")
    assert get_splitter("auto") is regex_split


def test_concepts_shorter_than_rows(sample_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("only one\n")
    with pytest.raises(DataError, match="1 concepts for 5 passages"):
        load_task_data("hallucination", {"concepts_file": str(tmp_path / "c.txt")}, sample_dir,
                       None)


def test_openwebtext_jsonl_preferred(sample_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "openwebtext").mkdir()
    (tmp_path / "openwebtext/b.txt").write_text("doc b")
    (tmp_path / "openwebtext/a.txt").write_text("doc a")
    cfg = {"openwebtext_dir": str(tmp_path / "openwebtext"), "n_upstream": 5}
    data = load_task_data("hallucination", cfg, sample_dir, None)
    assert [r["text"] for r in data.upstream] == ["doc a", "doc b"]
    write_jsonl(tmp_path / "openwebtext/openwebtext-10k.jsonl",
                [{"text": f"j{i}"} for i in range(9)])
    data = load_task_data("hallucination", cfg, sample_dir, None)
    assert [r["text"] for r in data.upstream] == [f"j{i}" for i in range(5)]


# --------------------------------------------------------------------------- collator


def test_collate_seq2seq() -> None:
    tok = get_tokenizer("t5")
    recs = [{"text": "Who wrote Hamlet?", "label": "Shakespeare"},
            {"text": "What university did Watts Humphrey attend? " * 5,
             "label": "Illinois Institute of Technology"}]
    b = Collator(tok, "qa", 20, 20)(recs)
    assert b["input_ids"].shape == b["attention_mask"].shape
    assert b["input_ids"].shape[1] == 20  # the long question is cut to max_length
    assert b["attention_mask"][0].sum() < 20 and (b["input_ids"][0][b["attention_mask"][0] == 0] == 0).all()
    lab = b["labels"]
    n_real = [(row != -100).sum().item() for row in lab]
    assert lab.shape == (2, max(n_real)) and min(n_real) < max(n_real)
    for row, n in zip(lab, n_real):
        assert row[n - 1] == 1 and (row[n:] == -100).all()  # ends with </s>, then -100
    assert tok.decode(lab[0][lab[0] != -100], skip_special_tokens=True) == "Shakespeare"


def test_collate_classification() -> None:
    b = Collator(get_tokenizer("bert"), "scotus", 32, None)([{"text": "a b c", "label": 3},
                                                             {"text": "x " * 100, "label": 0}])
    assert b["input_ids"].shape == (2, 32) and b["labels"].dtype == torch.long
    assert b["labels"].tolist() == [3, 0]
    assert b["input_ids"][0, 0] == 5 and b["input_ids"][1, -1] == 6  # [CLS] ... [SEP] (cut)
    assert b["attention_mask"][1].all() and not b["attention_mask"][0].all()


def test_collate_causal_masks() -> None:
    tok = get_tokenizer("gpt2")
    edit = {"text": "This is a Wikipedia passage about rick mahler.", "label": "He was a pitcher."}
    up = {"text": "Plain web text document.", "label": ""}
    b = Collator(tok, "causal_lm", 1024, None)([edit, up])
    ids, lab, att = b["input_ids"], b["labels"], b["attention_mask"]
    n_prompt = len(tok(edit["text"], add_special_tokens=False)["input_ids"])
    n_up = len(tok(up["text"], add_special_tokens=False)["input_ids"]) + 1
    assert (lab[0, :n_prompt] == -100).all() and (lab[0, n_prompt:][att[0, n_prompt:] == 1] != -100).all()
    assert tok.decode(lab[0][lab[0] != -100]) == " He was a pitcher.<|endoftext|>"
    assert (lab[1] != -100).sum() == n_up == att[1].sum()  # every real upstream token is a label
    assert (ids[1][att[1] == 0] == tok.eos_token_id).all() and (lab[1][att[1] == 0] == -100).all()
    assert torch.equal(ids[att == 1], torch.where(lab[att == 1] == -100, ids[att == 1], lab[att == 1]))
    short = Collator(tok, "causal_lm", 8, None)([edit])
    assert short["input_ids"].shape == (1, 8)


def test_collate_on_task_data(sample_dir: Path) -> None:
    data: TaskData = load_task_data("hallucination", {"sentence_splitter": "regex"}, sample_dir, 4)
    b = Collator(get_tokenizer("gpt2"), "hallucination", None, None)(data.edits)
    assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] <= 1024
    assert ((b["labels"] != -100).sum(1) > 0).all()
