"""Bad input, table-driven: every case ends with one line on stderr that says what was wrong,
exit code 2, no ``summary.json``, and every file the run dir held before is byte-identical after
(results, checkpoint, ``run_config.json`` and Hydra's ``.hydra/`` files).

Cases run ``btp/run.py`` in this process the way ``python run.py ...`` does (``runpy`` as
``__main__``: Hydra composes and writes ``.hydra/`` before the runner starts), which costs a
second per case instead of a fresh interpreter; so do the signal (SIGTERM, SIGINT: exit codes 143
and 130) and full disk tests after the table. One test runs a real subprocess: a hub model
without network, with a hub cache of its own (``HF_HOME`` is read once, at import).

Prepared run dirs (built once per module): ``finished`` (a complete tiny run) and ``partial``
(the same without ``summary.json`` and ``adapter/``, i.e. a checkpoint to resume from).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from btp import checkpoint
from tests.test_runner_helpers import REPO_ROOT, cli_env, explain, run_cli, run_main

QA = ("+alg=lora", "+experiment=qa", "+model=tiny-t5small")
SCOTUS = ("+alg=lora", "+experiment=scotus", "+model=tiny-scotus-bert")
HALLU = ("+alg=lora", "+experiment=hallucination", "+model=tiny-gpt2xl")
#: Small enough that the prepared run takes a few seconds.
FAST = ("max_n_edits=20", "melo.num_iter=2", "data.n_upstream=10", "eval.batch_size=10",
        "eval.alone_records=0")
#: Files a failed command may change: the log it appends to and the lock it takes.
VOLATILE = {"run.log", ".lock"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the subprocess runs use: the same numbers and no oversubscription."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def message_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress bar (written there too, one line per refresh)."""
    return [line for line in stderr.splitlines() if line.strip() and "editing:" not in line]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` but the volatile ones, by relative path."""
    if not run_dir.is_dir():
        return {}
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in VOLATILE}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished and a partial tiny qa run (see the module docstring)."""
    root = tmp_path_factory.mktemp("prepared")
    finished = root / "finished"
    assert run_main(finished, *QA, *FAST) == 0
    assert (finished / "summary.json").is_file() and (finished / "run_config.json").is_file()
    partial = root / "partial"
    shutil.copytree(finished, partial)
    (partial / "summary.json").unlink()
    shutil.rmtree(partial / "adapter")
    return {"finished": finished, "partial": partial}


# -- data damage: each takes the copied data folder -------------------------------------------
def append(rel: str, raw: bytes) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        with open(data / rel, "ab") as f:
            f.write(raw)
    return damage


def replace(rel: str, old: bytes, new: bytes) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        raw = (data / rel).read_bytes()
        assert old in raw, (rel, old)
        (data / rel).write_bytes(raw.replace(old, new, 1))
    return damage


def edit_json(rel: str, change: Callable) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        obj = json.loads((data / rel).read_text(encoding="utf-8"))
        change(obj)
        (data / rel).write_text(json.dumps(obj), encoding="utf-8")
    return damage


def edit_jsonl_line(rel: str, lineno: int, **values) -> Callable[[Path], None]:
    def damage(data: Path) -> None:
        lines = (data / rel).read_text(encoding="utf-8").splitlines()
        rec = json.loads(lines[lineno - 1])
        rec.update(values)
        lines[lineno - 1] = json.dumps(rec)
        (data / rel).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return damage


MEND_LINE = json.dumps({"input": "q?", "filtered_rephrases": ["r1", "r2"],
                        "output": [{"answer": "a"}]})


def mend_line(**values) -> bytes:
    rec = json.loads(MEND_LINE)
    rec.update(values)
    return (json.dumps(rec) + "\n").encode()


# -- run dir damage: each takes the copied run dir ------------------------------------------------
def flip_tensor_byte(suffix: str) -> Callable[[Path], None]:
    """Flip a byte inside the data of the first checkpoint tensor whose name ends with ``suffix``."""
    def damage(run_dir: Path) -> None:
        path = run_dir / "checkpoint" / checkpoint.FILE_NAME
        raw = bytearray(path.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        name = next(k for k in header if k.endswith(suffix))
        raw[8 + n + header[name]["data_offsets"][0] + 3] ^= 0xFF
        path.write_bytes(bytes(raw))
    return damage


def resave_checkpoint(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite the checkpoint through ``checkpoint.save`` (valid checksums) after ``change``."""
    def damage(run_dir: Path) -> None:
        tensors, state = checkpoint.load(run_dir / "checkpoint")
        change(state)
        state.pop("format_version")
        checkpoint.save(run_dir / "checkpoint", tensors, state)
    return damage


def edit_state_text(run_dir: Path) -> None:
    """Change the checkpoint's JSON document without updating its checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = run_dir / "checkpoint" / checkpoint.FILE_NAME
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta["state"] = meta["state"].replace('"batches_done": 2', '"batches_done": 1')
    save_file(tensors, str(path), metadata=meta)


def hold_lock(run_dir: Path) -> None:
    """Take the run dir's lock as a running process would (released when the test ends)."""
    import fcntl

    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, b"pid 4242 on node7")
    _HELD.append(fd)


_HELD: list[int] = []


@dataclass
class Case:
    """One bad input: the command line, what the one line must say, and the setup."""

    id: str
    args: tuple[str, ...]
    says: tuple[str, ...]
    data: Callable[[Path], None] | None = None  # damages a copy of data/ (then data_dir=...)
    prior: str | None = None  # run the command in a copy of this prepared run dir
    run_dir: Callable[[Path], None] | None = None  # damages that copy first
    #: False where the damage is to run_config.json itself: without it Hydra's rewrite of
    #: .hydra/ cannot be undone (the refusal still names the file).
    hydra_kept: bool = True


CASES = [
    # -- configuration values (checked before anything is read) ----------------------------------
    Case("eval.batch_size<1", (*QA, "eval.batch_size=-1"), ("eval.batch_size=-1 is out of range",)),
    Case("data.n_upstream<1", (*QA, "data.n_upstream=-3"), ("data.n_upstream=-3",)),
    Case("data.max_length<1", (*QA, "data.max_length=-1"), ("data.max_length=-1",)),
    Case("data.label_max_length=0", (*QA, "data.label_max_length=0"), ("data.label_max_length=0",)),
    Case("eval.max_length=0", (*QA, "eval.max_length=0"), ("eval.max_length=0",)),
    Case("max_n_edits=0", (*QA, "max_n_edits=0"), ("max_n_edits=0", ">= 1")),
    Case("seed<0", (*QA, "seed=-1"), ("seed=-1", "2**32")),
    Case("device=tpu0", (*QA, "device=tpu0"), ("device='tpu0'", "auto, cpu, cuda")),
    Case("melo.edit_lr<0", (*QA, "melo.edit_lr=-1"), ("melo.edit_lr=-1",)),
    Case("melo.edit_lr=nan", (*QA, "melo.edit_lr=nan"), ("melo.edit_lr=nan", "finite")),
    Case("melo.init_radius=0", (*QA, "melo.init_radius=0"), ("melo.init_radius=0",)),
    Case("melo.lora_dropout=1.5", (*QA, "melo.lora_dropout=1.5"), ("melo.lora_dropout=1.5", "[0, 1)")),
    Case("grace.init_radius<0", ("+alg=grace", *QA[1:], "grace.init_radius=-1"), ("grace.init_radius=-1",)),
    Case("grace.num_iter=0", ("+alg=grace", *QA[1:], "grace.num_iter=0"), ("grace.num_iter=0",)),
    Case("grace.edit_lr<0", ("+alg=grace", *QA[1:], "grace.edit_lr=-1"), ("grace.edit_lr=-1",)),
    Case("ft.num_iter<0", ("+alg=ft", *QA[1:], "ft.num_iter=-1"), ("ft.num_iter=-1",)),
    Case("ft.edit_lr<0", ("+alg=ft", *QA[1:], "ft.edit_lr=-1"), ("ft.edit_lr=-1",)),
    Case("ewc.lambda_<0", ("+alg=ft_ewc", *QA[1:], "ewc.lambda_=-1"), ("ewc.lambda_=-1",)),
    Case("ewc.fisher_n_batches=0", ("+alg=ft_ewc", *QA[1:], "ewc.fisher_n_batches=0"),
         ("ewc.fisher_n_batches=0",)),
    Case("plain_lora.r=0", ("+alg=plain_lora", *QA[1:], "plain_lora.r=0"), ("plain_lora.r=0",)),
    Case("added unknown key", (*QA, "+melo.num_iters=3"), ("unknown config key", "melo.num_iters")),
    Case("task/model kind mismatch", ("+alg=lora", "+experiment=scotus", "+model=tiny-t5small"),
         ("scotus", "classification")),
    Case("more batches than blocks", (*QA, "max_n_edits=20", "melo.num_block=1"),
         ("2 batches", "num_block is 1")),
    # -- data files (each a damaged copy of data/) ---------------------------------------------
    Case("missing data file", (*QA,), ("zsre_mend_eval.json", "download.sh"),
         data=lambda d: (d / "zsre_mend_eval.json").unlink()),
    Case("broken JSON line", (*QA, "data.zsre_format=mend"), ("zsre_train.jsonl, line 2", "not valid JSON"),
         data=append("zsre_train.jsonl", b'{"input": "a question", "filtered_rephrases": [\n')),
    Case("non-UTF-8 zsRE (mend)", (*QA, "data.zsre_format=mend"), ("zsre_train.jsonl, line 2", "not UTF-8"),
         data=append("zsre_train.jsonl", mend_line(input="caf\u00e9").replace("\\u00e9".encode(), b"\xe9"))),
    Case("non-UTF-8 zsRE (rome)", (*QA,), ("zsre_mend_eval.json, line 1", "not UTF-8", "0xff"),
         data=replace("zsre_mend_eval.json", b"Watts Humphrey", b"Watts Hum\xffphrey")),
    Case("non-UTF-8 NQ", (*QA,), ("nq_train.json, line 1", "not UTF-8"),
         data=replace("nq_train.json", b"hacksaw", b"hack\xfesaw")),
    Case("null question (mend)", (*QA, "data.zsre_format=mend"),
         ("zsre_train.jsonl, line 2", "'input' must be a non-empty string, got null"),
         data=append("zsre_train.jsonl", mend_line(input=None))),
    Case("number as answer (mend)", (*QA, "data.zsre_format=mend"),
         ("line 2", "'output[0].answer' must be a non-empty string, got int 7"),
         data=append("zsre_train.jsonl", mend_line(output=[{"answer": 7}]))),
    Case("null rephrase (mend)", (*QA, "data.zsre_format=mend"), ("line 2", "'filtered_rephrases'[1]"),
         data=append("zsre_train.jsonl", mend_line(filtered_rephrases=["ok", None]))),
    Case("empty question (mend)", (*QA, "data.zsre_format=mend"), ("line 2", "'input'", "an empty string"),
         data=append("zsre_train.jsonl", mend_line(input="  "))),
    Case("null src (rome)", (*QA,),
         ("zsre_mend_eval.json, record 3", "'src' must be a non-empty string, got null"),
         data=edit_json("zsre_mend_eval.json", lambda o: o[3].update(src=None))),
    Case("answers not a list (rome)", (*QA,), ("record 0", "'answers' must be a list"),
         data=edit_json("zsre_mend_eval.json", lambda o: o[0].update(answers="Paris"))),
    Case("empty rephrase (rome)", (*QA,), ("record 5", "'rephrase'", "an empty string"),
         data=edit_json("zsre_mend_eval.json", lambda o: o[5].update(rephrase=""))),
    Case("NQ questions a number", (*QA,), ("nq_train.json", "'questions' must be a list", "int"),
         data=edit_json("nq_train.json", lambda o: o.update(questions=5))),
    Case("NQ null question", (*QA,),
         ("nq_train.json", "'questions'[2] must be a non-empty string, got null"),
         data=edit_json("nq_train.json", lambda o: o["questions"].__setitem__(2, None))),
    Case("NQ number as answer", (*QA,), ("nq_train.json", "'answers'[0]", "float 1.5"),
         data=edit_json("nq_train.json", lambda o: o["answers"].__setitem__(0, 1.5))),
    Case("SCOTUS label outside the set (edit stream)", SCOTUS,
         ("scotus.jsonl, line 5", "'issueArea' '15' is outside", "1..14"),
         data=edit_jsonl_line("scotus/scotus.jsonl", 5, issueArea="15")),
    Case("SCOTUS label outside the set (upstream)", SCOTUS, ("scotus.jsonl, line 1", "'issueArea' '0'"),
         data=edit_jsonl_line("scotus/scotus.jsonl", 1, issueArea="0")),
    Case("SCOTUS label beyond model.num_labels", (*SCOTUS, "model.num_labels=5"),
         ("scotus.jsonl, line 1", "label 7 (issueArea '8') is outside the label set (0..4)"),),
    Case("SCOTUS non-integer label", SCOTUS, ("scotus.jsonl, line 3", "'issueArea' 'civil'"),
         data=edit_jsonl_line("scotus/scotus.jsonl", 3, issueArea="civil")),
    Case("SCOTUS empty text", SCOTUS, ("scotus.jsonl, line 4", "'text'", "an empty string"),
         data=edit_jsonl_line("scotus/scotus.jsonl", 4, text="")),
    Case("non-UTF-8 SCOTUS", SCOTUS, ("scotus.jsonl, line 2", "not UTF-8"),
         data=lambda d: _corrupt_line(d / "scotus" / "scotus.jsonl", 2)),
    Case("hallucination annotation outside the set", HALLU,
         ("wikibio_gpt3_hallucination.json 'evaluation', row 1", "'annotation'[0] is 'wrong'"),
         data=edit_json("hallucination/wikibio_gpt3_hallucination.json",
                        lambda o: o["evaluation"][1]["annotation"].__setitem__(0, "wrong"))),
    Case("hallucination null sentences", HALLU, ("row 0", "'gpt3_sentences' must be a list, got NoneType"),
         data=edit_json("hallucination/wikibio_gpt3_hallucination.json",
                        lambda o: o["evaluation"][0].update(gpt3_sentences=None))),
    Case("non-UTF-8 concepts", HALLU, ("wiki_bio_concepts.txt, line 3", "not UTF-8"),
         data=lambda d: _corrupt_line(d / "hallucination" / "wiki_bio_concepts.txt", 3)),
    Case("non-UTF-8 WebText document", HALLU, ("openwebtext", ".txt, line 1", "not UTF-8"),
         data=lambda d: _corrupt_line(sorted((d / "openwebtext").glob("*.txt"))[0], 1)),
    # -- a run dir that holds another run (finished or partial) -------------------------------------
    Case("finished run, other edit_lr", (*QA, *FAST, "melo.edit_lr=0.05"),
         ("holds a finished run made with a different config", "melo.edit_lr: 0.03 -> 0.05"),
         prior="finished"),
    Case("finished run, other num_iter", (*QA, *FAST, "melo.num_iter=3"), ("melo.num_iter: 2 -> 3",),
         prior="finished"),
    Case("finished run, other max_n_edits", (*QA, *FAST, "max_n_edits=10"), ("max_n_edits: 20 -> 10",),
         prior="finished"),
    Case("finished run, other algorithm", ("+alg=grace", *QA[1:], *FAST), ("alg.name: 'melo' -> 'grace'",),
         prior="finished"),
    Case("partial run, other num_iter", (*QA, *FAST, "melo.num_iter=3"),
         ("holds a partial run", "melo.num_iter: 2 -> 3", "to resume it"), prior="partial"),
    Case("finished run, bad value", (*QA, *FAST, "eval.batch_size=-1"), ("eval.batch_size=-1",),
         prior="finished"),
    Case("finished run, unknown key", (*QA, *FAST, "+melo.num_iters=3"), ("melo.num_iters",),
         prior="finished"),
    Case("another process holds the run dir", (*QA, *FAST),
         ("another process (pid 4242 on node7) is running in",), prior="partial", run_dir=hold_lock),
    Case("flipped byte in a melo_A tensor", (*QA, *FAST),
         ("checkpoint", "state.safetensors is corrupt", "melo_A", "do not match their checksums"),
         prior="partial", run_dir=flip_tensor_byte("melo_A")),
    Case("edited checkpoint document", (*QA, *FAST), ("state document does not match its checksum",),
         prior="partial", run_dir=edit_state_text),
    Case("checkpoint metadata lacks a key", (*QA, *FAST),
         ("state.safetensors: its metadata lacks 'n_batches'",),
         prior="partial", run_dir=resave_checkpoint(lambda s: s.pop("n_batches"))),
    Case("checkpoint database with NaN", (*QA, *FAST), ("does not fit this run", "centers holds NaN"),
         prior="partial", run_dir=lambda d: _nan_centers(d)),
    Case("unreadable run_config.json", (*QA, *FAST), ("run_config.json is unreadable",), prior="partial",
         run_dir=lambda d: (d / "run_config.json").write_text("{"), hydra_kept=False),
]


def _corrupt_line(path: Path, lineno: int) -> None:
    """Put a byte that is not UTF-8 into line ``lineno`` of a text file."""
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = lines[lineno - 1][:1] + b"\xff" + lines[lineno - 1][1:]
    path.write_bytes(b"\n".join(lines))


def _nan_centers(run_dir: Path) -> None:
    def change(tensors: dict) -> None:
        tensors["editor.db.centers"].fill_(float("nan"))

    tensors, state = checkpoint.load(run_dir / "checkpoint")
    change(tensors)
    state.pop("format_version")
    checkpoint.save(run_dir / "checkpoint", tensors, state)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, prepared: dict[str, Path], tmp_path: Path, capsys) -> None:
    args = list(case.args)
    if case.data is not None:
        data = tmp_path / "data"
        shutil.copytree(REPO_ROOT / "data", data)
        case.data(data)
        args.append(f"data_dir={data}")
    run_dir = tmp_path / "run"
    if case.prior:
        shutil.copytree(prepared[case.prior], run_dir)
        if case.run_dir is not None:
            case.run_dir(run_dir)
    before = snapshot(run_dir)
    capsys.readouterr()
    try:
        code = run_main(run_dir, *args)
    finally:
        while _HELD:
            os.close(_HELD.pop())
    captured = capsys.readouterr()
    err = captured.err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert lines[0][len("error: "):] not in captured.out  # printed once, not logged again
    for text in case.says:
        assert text in lines[0], (text, lines[0])
    after = snapshot(run_dir)
    if not case.hydra_kept:
        before = {k: v for k, v in before.items() if not k.startswith(".hydra")}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing lost or rewritten
    assert ("summary.json" in after) == ("summary.json" in before)
    assert not list(run_dir.rglob("*.tmp-*"))


def test_mistyped_key_names_the_closest_declared_one(tmp_path: Path, capsys) -> None:
    """``melo.num_iters=3``: one line naming ``melo.num_iter``, before Hydra composes (no run
    dir, no advice to add ``+``)."""
    capsys.readouterr()
    assert run_main(tmp_path / "run", *QA, "melo.num_iters=3") == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: unknown config key 'melo.num_iters': not declared in "
                            "btp/schema.py; did you mean 'melo.num_iter'?\n")
    assert captured.out == "" and not (tmp_path / "run").exists()


def test_every_case_fails_for_its_own_reason() -> None:
    """Guards the table: case ids are unique and every case names what it expects."""
    assert len({c.id for c in CASES}) == len(CASES)
    assert all(c.says for c in CASES)


# -- what a run dir still accepts ---------------------------------------------------------------
def test_finished_run_skips_with_other_device_and_wandb(prepared: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """Keys that cannot change results may differ: the finished run is returned, and its files
    (``.hydra/`` included) still describe the run that produced it."""
    run_dir = tmp_path / "run"
    shutil.copytree(prepared["finished"], run_dir)
    before = snapshot(run_dir)
    assert run_main(run_dir, *QA, *FAST, "device=cpu", "wandb.project=other",
                    "checkpoint.enabled=false") == 0
    assert snapshot(run_dir) == before
    assert "already finished, skipping" in (run_dir / "run.log").read_text()


def test_stale_temporary_files_are_removed_on_the_next_start(prepared: dict[str, Path],
                                                            tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(prepared["partial"], run_dir)
    stale = [run_dir / "checkpoint" / f".{checkpoint.FILE_NAME}.tmp-99999",
             run_dir / ".summary.json.tmp-99998", run_dir / ".metrics.jsonl.tmp-12"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    assert run_main(run_dir, *QA, *FAST) == 0  # resumes the last (already edited) batch: summary
    assert not any(p.exists() for p in stale)
    assert json.loads((run_dir / "summary.json").read_text()) == \
        json.loads((prepared["finished"] / "summary.json").read_text())


# -- a hub model without network: a subprocess with an empty hub cache -------------------------------
def test_hub_model_without_network(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = cli_env(HF_HOME=str(tmp_path / "empty-hf-home"))  # nothing cached, hub offline
    proc = run_cli(run_dir, "+alg=lora", "+experiment=qa", "+model=t5small", "max_n_edits=20",
                   env=env)
    assert proc.returncode == 2, explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(t in lines[0] for t in ("google/t5-small-ssm-nq", "no network",
                                                           "tiny-")), explain(proc)
    assert not (run_dir / "summary.json").exists()


# -- signals and a full disk: one line, the checkpoint kept, the run resumes ----------------------------
def test_sigterm_ends_with_one_line_and_the_run_resumes(prepared: dict[str, Path],
                                                        tmp_path: Path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (a scheduler's stop) after a checkpoint: exit 143, one line, resumable."""
    import signal

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM has a handler in this process; the run would leave it alone")
    run_dir = tmp_path / "run"
    monkeypatch.setenv("BTP_TEST_KILL_AT", "1:after_checkpoint:SIGTERM")
    capsys.readouterr()
    assert run_main(run_dir, *QA, *FAST) == 128 + 15
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("interrupted: SIGTERM received") and \
        "resume from its last checkpoint (1 of 2 edit batches done)" in lines[0], lines[0]
    assert not (run_dir / "summary.json").exists()
    assert checkpoint.load(run_dir / "checkpoint")[1]["batches_done"] == 1
    monkeypatch.delenv("BTP_TEST_KILL_AT")
    assert run_main(run_dir, *QA, *FAST) == 0
    assert _without_times(run_dir) == _without_times(prepared["finished"])


def test_sigint_in_process(prepared: dict[str, Path], tmp_path: Path, capsys,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the stream is edited: exit 130, one line, resumable."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a custom handler in this process; the run would leave it alone")
    run_dir = tmp_path / "run"
    monkeypatch.setenv("BTP_TEST_KILL_AT", "1:after_edit:SIGINT")
    capsys.readouterr()
    assert run_main(run_dir, *QA, *FAST) == 130
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("interrupted: SIGINT received"), lines
    assert "(0 of 2 edit batches done)" in lines[0]  # batch 1 was edited, not checkpointed
    assert not (run_dir / "summary.json").exists()
    monkeypatch.delenv("BTP_TEST_KILL_AT")
    assert run_main(run_dir, *QA, *FAST) == 0
    assert _without_times(run_dir) == _without_times(prepared["finished"])


def test_full_disk_in_process(prepared: dict[str, Path], tmp_path: Path, capsys,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The second checkpoint write finds the disk full: exit 2, one line, the first checkpoint
    intact and no partial file left; the run then resumes."""
    from btp import checkpoint as ckpt_module

    real = ckpt_module.save_file
    calls = []

    def full_after_one(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:  # a partial file, as a real full disk leaves
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_module, "save_file", full_after_one)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert run_main(run_dir, *QA, *FAST) == 2
    lines = message_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: no space left on the disk of"), lines
    assert "resume from its last checkpoint (0 of 2 edit batches done)" in lines[0]
    assert checkpoint.load(run_dir / "checkpoint")[1]["batches_done"] == 0
    assert not list(run_dir.rglob("*.tmp-*")) and not (run_dir / "summary.json").exists()
    monkeypatch.setattr(ckpt_module, "save_file", real)
    assert run_main(run_dir, *QA, *FAST) == 0
    assert _without_times(run_dir) == _without_times(prepared["finished"])


def _without_times(run_dir: Path) -> tuple[dict, list]:
    """summary.json and metrics.jsonl without wall-clock values."""
    def drop(obj):
        if isinstance(obj, dict):
            return {k: drop(v) for k, v in obj.items() if k != "edit_time_s"}
        return obj

    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return drop(summary), [drop(m) for m in metrics]
