"""``run(cfg)``: one sequential-editing run from a composed config to ``summary.json``.

Order of work (cheap checks first, so that bad input fails before a model is loaded):
validate the config (types at compose time, ranges in ``btp.schema.check_values``) -> lock the run
dir and remove temporary files of killed writers (``btp.rundir``) -> refuse a run dir holding a run
of another result-changing config; return a finished run's summary as is -> read and verify any
checkpoint -> seed -> load and check data -> load model and tokenizer -> build the editor and let
it check the stream -> restore the checkpoint -> record the config (``run_config.json``) -> evaluate
the unedited model (fresh run) -> the editing loop -> ``adapter/`` and ``summary.json``.

Errors the user can fix are ``btp.errors.UserError``; ``run.py`` turns them into one line on stderr
and exit code 2, and no ``summary.json`` exists after a failed run. A full disk is a
``DiskFullError`` (a ``UserError``); SIGINT/SIGTERM become ``RunInterrupted`` (exit 128 + signal).
Both messages say that re-running the same command resumes from the last checkpoint. A command
that does not run leaves the run dir's ``.hydra/`` files as the run that did run wrote them.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from btp import checkpoint as ckpt
from btp import sweep
from btp.errors import (ConfigError, DiskFullError, RunDirError, RunInterrupted, UserError,
                        is_disk_full)
from btp.evaluation import batched, lazy_batches, make_evaluator
from btp.asked_alone import AskedAlone
from btp.loop import EditingLoop, EvalSets, LoopState
from btp.metrics import pack, unpack
from btp.outputs import SUMMARY_FILE, MetricsLog, summary_line, write_summary
from btp.rundir import RunDir
from btp.schema import TASK_KIND, alg_section, check_values

log = logging.getLogger(__name__)

#: Keys of summary.json besides the task-specific extras.
SUMMARY_KEYS = ("task", "alg", "model", "seed", "n_edits", "ES", "ERR", "TRR", "locality",
                "clusters", "conflicts", "forgotten", "edit_time_s")


def _value(x: Any) -> Any:
    """A str-Enum config value as its plain string."""
    return getattr(x, "value", x)


def plain(node: DictConfig) -> DictConfig:
    """A read-only copy of a config section with enum values as plain strings.

    The editors and the model loader compare values with strings and use them as dict keys; a
    struct copy still refuses unknown keys.
    """
    copy = OmegaConf.create(OmegaConf.to_container(node, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(copy, True)
    OmegaConf.set_readonly(copy, True)
    return copy


def check_override_order(overrides: Sequence[str], cfg: DictConfig) -> None:
    """Refuse ``+model=tiny-*`` placed before ``+experiment=...`` on the command line.

    A tiny model file sets demo hyperparameters (package ``_global_``); Hydra merges command-line
    groups in the order given, so an experiment listed after it would silently put the
    original's values back.
    """
    def index(group: str) -> int | None:
        for i, o in enumerate(overrides):
            key = o.split("=", 1)[0].lstrip("+~")
            if key == group:
                return i
        return None

    i_model, i_exp = index("model"), index("experiment")
    if cfg.model.get("tiny") is not None and i_model is not None and i_exp is not None \
            and i_model < i_exp:
        raise ConfigError(
            f"'{overrides[i_model]}' must come after '{overrides[i_exp]}' on the command line "
            "(a tiny model sets demo hyperparameters that the experiment would otherwise reset)")


def validate(cfg: DictConfig) -> None:
    """Checks that need no data or model; each failure says which override to add."""
    from btp.editors import EDITORS

    check_values(cfg)

    if OmegaConf.is_missing(cfg, "task"):
        raise ConfigError("no experiment selected; add +experiment=qa, scotus, hallucination, zsre "
                          "or counterfact")
    if OmegaConf.is_missing(cfg.alg, "name"):
        raise ConfigError("no algorithm selected; add +alg=lora (MELO), grace, ft, ft_ewc, "
                          "plain_lora, wise, memit or alphaedit")
    if OmegaConf.is_missing(cfg.model, "name"):
        raise ConfigError("no model selected; add +model=t5small (or tiny-t5small offline), ...")
    for key in ("kind", "target_modules", "grace_layer"):
        if OmegaConf.is_missing(cfg.model, key):
            raise ConfigError(f"model '{cfg.model.name}' does not set model.{key}")
    if cfg.alg.name not in EDITORS:
        raise ConfigError(f"unknown alg.name '{cfg.alg.name}'; registered: {sorted(EDITORS)}")
    task, kind = _value(cfg.task), _value(cfg.model.kind)
    want = _value(TASK_KIND[cfg.task])
    if kind != want:
        raise ConfigError(f"task '{task}' needs a {want} model but model '{cfg.model.name}' is "
                          f"{kind}; pick a matching +model")
    if edit_batch_size(cfg) < 1:  # sections outside VALUE_RULES (a newly registered editor)
        raise ConfigError(f"the edit batch size must be >= 1; check {cfg.alg.name}'s batch_size "
                          "(null = num_edit_per_block)")


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain data (what ``run_config.json`` and the checkpoint record),
    without a ``hydra`` node that a config composed with ``return_hydra_config`` carries."""
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def edit_batch_size(cfg: DictConfig) -> int:
    """Records per edit (one ``Editor.edit`` call): the algorithm section's ``batch_size`` when
    it has one that is not null (GRACE: 1, it edits one record at a time), else
    ``num_edit_per_block``. ``metric_period`` still counts edits (records), not batches."""
    size = alg_section(cfg).get("batch_size")
    return int(size) if size is not None else int(cfg.num_edit_per_block)


def pick_threads(threads: int | None) -> int:
    """Torch intra-op threads: ``threads`` when set, else the cores not busy now (>= 1).

    The busy cores are the 1-minute load average (``os.getloadavg``), where the platform has it.
    """
    if threads is not None:
        return int(threads)
    cores = os.cpu_count() or 1
    try:
        busy = int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, cores - busy))


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name!r} is not a torch device; use auto, cpu, cuda or "
                          "cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) "
                          "are visible; use device=cuda:0 or auto")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices), as the original does with seed 0."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_summary(cfg: DictConfig, state: LoopState) -> dict[str, Any]:
    """Final values: the last evaluation record, with run identity and the pre-edit record."""
    final = state.records[-1]
    summary: dict[str, Any] = {
        "task": _value(cfg.task), "alg": cfg.alg.name, "model": cfg.model.name,
        "seed": cfg.seed, "n_edits": state.n_edits}
    for key in SUMMARY_KEYS[5:]:
        summary[key] = final.get(key)
    for key, value in final.items():  # holdout, ARR, *_em extras
        if key not in summary and key not in ("batches",):
            summary[key] = value
    summary["edit_time_s"] = state.edit_time_s
    summary["n_batches"] = state.batches_done
    summary["pre_edit"] = {k: v for k, v in state.records[0].items() if k != "n_edits"}
    return summary


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``RunInterrupted`` for the duration of a run.

    Only where the handler is still Python's default: a launcher that installed its own (submitit
    on SLURM handles SIGTERM for pre-emption and re-queueing) keeps it. Signal handlers can only
    be set from the main thread; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise RunInterrupted(signum)

    previous = {}
    for sig, default in ((signal.SIGINT, signal.default_int_handler),
                         (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) is default:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(cfg: DictConfig, run_dir: str | Path | None = None, progress: bool = True
        ) -> dict[str, Any]:
    """Run the configured sequential-editing experiment; returns the summary dict.

    Args:
        cfg: the composed config (``btp.schema.Config``).
        run_dir: where outputs go; default Hydra's run directory.
        progress: show the tqdm bar.

    Raises:
        UserError: bad input, a run dir that belongs to another run or process, a damaged
            checkpoint, a full disk (``DiskFullError``).
        RunInterrupted: SIGINT or SIGTERM arrived (the message says how to resume).
    """
    start = time.time()
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    rundir = RunDir(Path(run_dir))
    try:
        with _signals_raise():
            validate(cfg)
            with rundir:
                return _run_locked(cfg, rundir, progress, start)
    except BaseException:
        rundir.restore_hydra()  # a command that did not run must not describe the directory
        raise


def _run_locked(cfg: DictConfig, rundir: RunDir, progress: bool, start: float) -> dict[str, Any]:
    """The body of :func:`run`, with the run dir locked."""
    run_dir = rundir.path
    rundir.remove_stale_tmp()
    task = _value(cfg.task)
    config = resolved_config(cfg)
    identity = {"task": task, "alg": cfg.alg.name, "model": cfg.model.name, "seed": cfg.seed}
    ckpt_dir = run_dir / "checkpoint"
    # A finished run needs no checkpoint; a partial one is verified before anything else.
    done = sweep.finished_summary(run_dir)
    saved = ckpt.load(ckpt_dir) if done is None and cfg.checkpoint.enabled else None
    rundir.check(config, identity, saved[1]["config"] if saved is not None else None)
    if done is not None:
        log.info("run dir %s: already finished, skipping (summary.json kept)", run_dir)
        rundir.restore_hydra()
        return done
    if saved is not None:
        ckpt.check_same_config(saved[1]["config"], config, ckpt_dir)

    last_ckpt = _Checkpointed(saved[1]["batches_done"] if saved is not None else None,
                              saved[1]["n_batches"] if saved is not None else None)
    try:
        return _run_work(cfg, rundir, config, saved, progress, start, last_ckpt)
    except RunInterrupted as e:
        raise RunInterrupted(e.signum, f"{e.signal_name} received: the run stopped; "
                             f"{last_ckpt.resume_hint(run_dir)}") from None
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(f"no space left on the disk of {run_dir} ({e}); free some space "
                                f"and {last_ckpt.resume_hint(run_dir)}") from e
        raise


@dataclass
class _Checkpointed:
    """What the last checkpoint of this run holds (None: no checkpoint yet)."""

    batches_done: int | None = None
    n_batches: int | None = None

    def resume_hint(self, run_dir: Path) -> str:
        """How the run continues: from its last checkpoint, or from the start if it has none."""
        if self.batches_done is None:
            return (f"no checkpoint was written yet: re-running the same command "
                    f"(hydra.run.dir={run_dir}) starts the run over")
        return (f"re-run the same command (hydra.run.dir={run_dir}) to resume from its last "
                f"checkpoint ({self.batches_done} of {self.n_batches} edit batches done)")


def _run_work(cfg: DictConfig, rundir: RunDir, config: dict[str, Any],
              saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None, progress: bool,
              start: float, checkpointed: _Checkpointed) -> dict[str, Any]:
    """Load data and model, restore or start, claim the run dir, edit, write the outputs.

    The run dir is claimed (``run_config.json``) only once everything is loaded and verified, just
    before the first result file is written: a command that fails earlier leaves it as it was.
    """
    run_dir = rundir.path
    from btp.data import Collator, check_labels, load_task_data
    from btp.editors import EDITORS
    from btp.models import load_model_and_tokenizer

    task = _value(cfg.task)
    device = pick_device(cfg.device)
    torch.set_num_threads(pick_threads(cfg.get("threads")))
    seed_everything(cfg.seed)
    log.info("run dir %s; task %s, alg %s, model %s, device %s, %d CPU threads", run_dir, task,
             cfg.alg.name, cfg.model.name, device, torch.get_num_threads())
    ckpt_dir = run_dir / "checkpoint"

    data = load_task_data(task, plain(cfg.data), Path(cfg.data_dir), cfg.max_n_edits,
                          cfg.model.num_labels)
    model_cfg = plain(cfg.model)
    model, tokenizer = load_model_and_tokenizer(model_cfg, device, seed=cfg.seed)
    if _value(cfg.model.kind) == "classification":
        check_labels(data, int(model.config.num_labels), str(cfg.model.name))
    collate = Collator(tokenizer, task, cfg.data.max_length, cfg.data.label_max_length)
    eval_bs = cfg.eval.batch_size or cfg.num_edit_per_block
    stream = batched(data.edits, edit_batch_size(cfg))
    checkpointed.n_batches = len(stream)
    sets = EvalSets(upstream=batched(data.upstream, eval_bs),
                    holdout=batched(data.holdout, eval_bs) if data.holdout is not None else None,
                    accurate=batched(data.accurate, eval_bs) if data.accurate is not None else None,
                    truth=batched(data.truth, eval_bs) if data.truth is not None else None)

    editor = EDITORS[cfg.alg.name](model, plain(alg_section(cfg)), model_cfg,
                                   lambda: lazy_batches(sets.upstream, collate))
    editor.check_stream(len(stream))
    editor.attach_tokenizer(tokenizer, Path(cfg.data_dir))
    evaluator = make_evaluator(task, tokenizer, device, cfg.eval.max_length)

    state = LoopState()
    wandb_id = None
    if saved is not None:
        tensors, js = saved
        if js["n_batches"] != len(stream):
            raise ConfigError(f"the checkpoint in {ckpt_dir} covers a stream of "
                              f"{js['n_batches']} batches, the data now gives {len(stream)}; "
                              "use the same data or another hydra.run.dir")
        try:
            editor.load_state_dict({k[len("editor."):]: v for k, v in tensors.items()
                                    if k.startswith("editor.")})
            refs = unpack(tensors["refs.flat"], tensors["refs.offsets"])
            state = LoopState.from_json(js, refs)
            ckpt.set_rng_state(js["rng"], tensors)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise RunDirError(
                f"checkpoint {ckpt_dir / ckpt.FILE_NAME} does not fit this run "
                f"({type(e).__name__}: {e}); delete it to start the run over, or use another "
                "hydra.run.dir") from e
        wandb_id = js.get("wandb_id")
        log.info("resuming from %s: %d of %d batches done", ckpt_dir, state.batches_done,
                 len(stream))

    rundir.claim(config)
    (run_dir / SUMMARY_FILE).unlink(missing_ok=True)  # only a finished run has a summary
    metrics_log = MetricsLog(run_dir, cfg.wandb, config,
                             f"{task}-{cfg.alg.name}-{cfg.model.name}", wandb_id)
    metrics_log.reset(state.records)

    def save_checkpoint(st: LoopState) -> None:
        if not cfg.checkpoint.enabled:
            return
        tensors = {f"editor.{k}": v for k, v in editor.state_dict().items()}
        tensors["refs.flat"], tensors["refs.offsets"] = pack(st.refs or [])
        rng_js, rng_tensors = ckpt.rng_state()
        tensors.update(rng_tensors)
        ckpt.save(ckpt_dir, tensors, {**st.to_json(), "rng": rng_js, "config": config,
                                      "n_batches": len(stream), "wandb_id": metrics_log.wandb_id})
        checkpointed.batches_done = st.batches_done

    alone = AskedAlone(stream, data.holdout, cfg.eval.alone_records, cfg.seed)
    loop = EditingLoop(editor, evaluator, collate, stream, sets, cfg.metric_period, metrics_log,
                       save_checkpoint, progress=progress, alone=alone)
    summary = None
    try:
        state = loop.run(state)
        editor.save_pretrained(run_dir / "adapter")
        summary = build_summary(cfg, state)
        write_summary(run_dir, summary)
    finally:
        metrics_log.finish(summary)
    log.info("summary: %s", summary_line(summary))
    log.info("done in %.1f s (edit time %.1f s)", time.time() - start, state.edit_time_s)
    return summary


__all__ = ["run", "validate", "edit_batch_size", "check_override_order", "pick_device", "UserError"]
