"""``run(cfg)``: one sequential-editing run from a composed config to ``summary.json``.

Order of work (cheap checks first, so that bad input fails before a model is loaded):
validate the config (types at compose time, ranges in ``btp.schema.check_values``) -> lock the run
dir and remove temporary files of killed writers (``btp.rundir``) -> refuse a run dir holding a run
of another result-changing config; return a finished run's summary as is -> read and verify any
checkpoint -> then four steps, each given what it needs:

* :func:`build`: seed, load and check data, load model and tokenizer, build the editor (which
  checks the stream) and the task's evaluator (:class:`RunParts`);
* :func:`restore`: the checkpoint's editor, loop and RNG states (a fresh state otherwise);
  then the run dir is claimed (``run_config.json``);
* :func:`edit`: evaluate the unedited model (fresh run), then the editing loop, checkpointing
  after every edit batch (:func:`checkpoint_writer`);
* :func:`finish`: ``adapter/`` and ``summary.json``.

What a task contributes (model kinds, loader, evaluator, extra evaluation sets) is read from its
spec in :mod:`btp.tasks`.

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
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from btp import checkpoint as ckpt
from btp import sweep
from btp.errors import (ConfigError, DiskFullError, RunDirError, RunInterrupted, UserError,
                        is_disk_full)
from btp.asked_alone import AskedAlone
from btp.data.common import TaskData
from btp.editors.base import Editor
from btp.evaluation import TaskEvaluator
from btp.loop import EditingLoop, EvalSets, LoopState
from btp.outputs import SUMMARY_FILE, MetricsLog, summary_line, write_summary
from btp.rundir import RunDir
from btp.schema import alg_section, check_values
from btp.tasks import TaskSpec, get_task, names_phrase

log = logging.getLogger(__name__)

#: Keys of summary.json besides the task-specific extras.
SUMMARY_KEYS = ("task", "alg", "model", "seed", "n_edits", "ES", "ERR", "TRR", "locality",
                "clusters", "conflicts", "forgotten", "edit_time_s")


def plain(node: DictConfig) -> DictConfig:
    """A read-only copy of a config section with enum values as plain strings.

    The editors and the model loader compare values with strings and use them as dict keys; a
    struct copy still refuses unknown keys.
    """
    copy = OmegaConf.create(OmegaConf.to_container(node, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(copy, True)
    OmegaConf.set_readonly(copy, True)
    return copy


def validate(cfg: DictConfig) -> None:
    """Checks that need no data or model; each failure says which override to add."""
    from btp.editors import EDITORS

    check_values(cfg)

    if OmegaConf.is_missing(cfg, "task"):
        raise ConfigError(f"no experiment selected; add +experiment={names_phrase()}")
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
    spec, kind = get_task(cfg.task), str(cfg.model.kind)
    if kind not in spec.model_kinds:
        raise ConfigError(f"task '{spec.name}' needs a {spec.needs()} model but model "
                          f"'{cfg.model.name}' is {kind}; pick a matching +model")
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
        "task": str(cfg.task), "alg": cfg.alg.name, "model": cfg.model.name,
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


def run(cfg: DictConfig, run_dir: str | Path | None = None, progress: bool = True,
        sweep_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the configured sequential-editing experiment; returns the summary dict.

    Args:
        cfg: the composed config (``btp.schema.Config``).
        run_dir: where outputs go; default Hydra's run directory.
        progress: show the tqdm bar.
        sweep_dir: the sweep this run belongs to, which names its wandb group unless
            ``wandb.group`` is set; with ``run_dir`` None, Hydra's multirun sweep dir.

    Raises:
        UserError: bad input, a run dir that belongs to another run or process, a damaged
            checkpoint, a full disk (``DiskFullError``).
        RunInterrupted: SIGINT or SIGTERM arrived (the message says how to resume).
    """
    start = time.time()
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
        sweep_dir = sweep_dir if sweep_dir is not None else sweep.hydra_sweep_dir()
    rundir = RunDir(Path(run_dir))
    try:
        with _signals_raise():
            validate(cfg)
            with rundir:
                return _run_locked(cfg, rundir, progress, start, sweep_dir)
    except BaseException:
        rundir.restore_hydra()  # a command that did not run must not describe the directory
        raise


def _run_locked(cfg: DictConfig, rundir: RunDir, progress: bool, start: float,
                sweep_dir: str | Path | None) -> dict[str, Any]:
    """The body of :func:`run`, with the run dir locked."""
    run_dir = rundir.path
    rundir.remove_stale_tmp()
    task = str(cfg.task)
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
        return _run_work(cfg, rundir, config, saved, progress, start, last_ckpt, sweep_dir)
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


@dataclass
class RunParts:
    """What :func:`build` makes from a config: everything the later steps use.

    Attributes:
        task: the task's spec (:mod:`btp.tasks`).
        device: where the model runs.
        data: the task's records.
        tokenizer: the model's tokenizer.
        collate: records -> tensors for the model.
        stream: the edit stream in edit batches (one ``Editor.edit`` call each).
        sets: upstream and the task's extra evaluation sets, in evaluation batches.
        editor: the algorithm around the frozen base model (not yet restored).
        evaluator: the task's evaluator.
    """

    task: TaskSpec
    device: torch.device
    data: TaskData
    tokenizer: Any
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    stream: list[list[dict]]
    sets: EvalSets
    editor: Editor
    evaluator: TaskEvaluator


def build(cfg: DictConfig, run_dir: Path) -> RunParts:
    """Seed, then load data and model and build the editor and evaluator (nothing written).

    Sets torch's threads (``threads``) and seeds every generator with ``seed`` first, so that the
    tiny model's init and the editor's draws are those of a fresh run.
    """
    from btp.data import Collator, batched, check_labels, lazy_batches, load_task_data
    from btp.editors import EDITORS
    from btp.evaluation import make_evaluator
    from btp.models import load_model_and_tokenizer

    spec = get_task(cfg.task)
    device = pick_device(cfg.device)
    torch.set_num_threads(pick_threads(cfg.get("threads")))
    seed_everything(cfg.seed)
    log.info("run dir %s; task %s, alg %s, model %s, device %s, %d CPU threads", run_dir,
             spec.name, cfg.alg.name, cfg.model.name, device, torch.get_num_threads())

    data = load_task_data(spec.name, plain(cfg.data), Path(cfg.data_dir), cfg.max_n_edits,
                          cfg.model.num_labels)
    model_cfg = plain(cfg.model)
    model, tokenizer = load_model_and_tokenizer(model_cfg, device, seed=cfg.seed)
    if str(cfg.model.kind) == "classification":
        check_labels(data, int(model.config.num_labels), str(cfg.model.name))
    collate = Collator(tokenizer, spec.name, cfg.data.max_length, cfg.data.label_max_length)
    eval_bs = cfg.eval.batch_size or cfg.num_edit_per_block
    stream = batched(data.edits, edit_batch_size(cfg))
    extra = {s.name: batched(getattr(data, s.records), eval_bs) for s in spec.eval_sets
             if getattr(data, s.records) is not None}
    alone = spec.alone_set
    sets = EvalSets(upstream=batched(data.upstream, eval_bs), extra=extra,
                    alone=alone.name if alone is not None else None)

    editor = EDITORS[cfg.alg.name](model, plain(alg_section(cfg)), model_cfg,
                                   lambda: lazy_batches(sets.upstream, collate))
    editor.check_stream(len(stream))
    editor.attach_tokenizer(tokenizer, Path(cfg.data_dir))
    evaluator = make_evaluator(spec.name, tokenizer, device, cfg.eval.max_length)
    return RunParts(task=spec, device=device, data=data, tokenizer=tokenizer, collate=collate,
                    stream=stream, sets=sets, editor=editor, evaluator=evaluator)


def restore(parts: RunParts, saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
            ckpt_dir: Path) -> tuple[LoopState, str | None]:
    """The loop state to continue from, and the wandb run id to continue.

    A fresh run (``saved`` is ``None``) starts from an empty state. Otherwise the editor, the
    loop state and every random generator are put back as the checkpoint holds them.

    Raises:
        ConfigError: the checkpoint covers a stream of another length.
        RunDirError: the checkpoint's tensors do not fit this editor or state.
    """
    if saved is None:
        return LoopState(), None
    tensors, js = saved
    n_batches = len(parts.stream)
    if js["n_batches"] != n_batches:
        raise ConfigError(f"the checkpoint in {ckpt_dir} covers a stream of "
                          f"{js['n_batches']} batches, the data now gives {n_batches}; "
                          "use the same data or another hydra.run.dir")
    try:
        parts.editor.load_state_dict({k[len("editor."):]: v for k, v in tensors.items()
                                      if k.startswith("editor.")})
        refs = ckpt.unpack(tensors["refs.flat"], tensors["refs.offsets"])
        state = LoopState.from_json(js, refs)
        ckpt.set_rng_state(js["rng"], tensors)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise RunDirError(
            f"checkpoint {ckpt_dir / ckpt.FILE_NAME} does not fit this run "
            f"({type(e).__name__}: {e}); delete it to start the run over, or use another "
            "hydra.run.dir") from e
    log.info("resuming from %s: %d of %d batches done", ckpt_dir, state.batches_done, n_batches)
    return state, js.get("wandb_id")


def checkpoint_writer(cfg: DictConfig, parts: RunParts, config: dict[str, Any], ckpt_dir: Path,
                      metrics_log: MetricsLog, checkpointed: "_Checkpointed"
                      ) -> Callable[[LoopState], None]:
    """The loop's ``checkpoint`` callback: the editor's state, the locality references, the RNG
    states, the loop state and the config, written atomically (nothing with
    ``checkpoint.enabled=false``)."""
    def save_checkpoint(state: LoopState) -> None:
        if not cfg.checkpoint.enabled:
            return
        tensors = {f"editor.{k}": v for k, v in parts.editor.state_dict().items()}
        tensors["refs.flat"], tensors["refs.offsets"] = ckpt.pack(state.refs or [])
        rng_js, rng_tensors = ckpt.rng_state()
        tensors.update(rng_tensors)
        ckpt.save(ckpt_dir, tensors, {**state.to_json(), "rng": rng_js, "config": config,
                                      "n_batches": len(parts.stream),
                                      "wandb_id": metrics_log.wandb_id})
        checkpointed.batches_done = state.batches_done

    return save_checkpoint


def edit(cfg: DictConfig, parts: RunParts, state: LoopState, metrics_log: MetricsLog,
         checkpoint: Callable[[LoopState], None], progress: bool) -> LoopState:
    """Run the editing loop from ``state`` to the end of the stream (evaluating the unedited
    model first on a fresh run); ``checkpoint`` is called after every edit batch."""
    alone_set = parts.task.alone_set
    alone_records = getattr(parts.data, alone_set.records) if alone_set is not None else None
    alone = AskedAlone(parts.stream, alone_records, cfg.eval.alone_records, cfg.seed)
    loop = EditingLoop(parts.editor, parts.evaluator, parts.collate, parts.stream, parts.sets,
                       cfg.metric_period, metrics_log, checkpoint, progress=progress, alone=alone)
    return loop.run(state)


def finish(cfg: DictConfig, parts: RunParts, state: LoopState, run_dir: Path) -> dict[str, Any]:
    """Save the edited adapter (``adapter/``) and write ``summary.json``; returns the summary."""
    parts.editor.save_pretrained(run_dir / "adapter")
    summary = build_summary(cfg, state)
    write_summary(run_dir, summary)
    return summary


def _run_work(cfg: DictConfig, rundir: RunDir, config: dict[str, Any],
              saved: tuple[dict[str, torch.Tensor], dict[str, Any]] | None, progress: bool,
              start: float, checkpointed: _Checkpointed, sweep_dir: str | Path | None
              ) -> dict[str, Any]:
    """Build, restore, claim the run dir, edit, finish.

    The run dir is claimed (``run_config.json``) only once everything is loaded and verified, just
    before the first result file is written: a command that fails earlier leaves it as it was.
    """
    run_dir = rundir.path
    ckpt_dir = run_dir / "checkpoint"
    parts = build(cfg, run_dir)
    checkpointed.n_batches = len(parts.stream)
    state, wandb_id = restore(parts, saved, ckpt_dir)

    rundir.claim(config)
    (run_dir / SUMMARY_FILE).unlink(missing_ok=True)  # only a finished run has a summary
    metrics_log = MetricsLog(run_dir, cfg.wandb, config,
                             f"{parts.task.name}-{cfg.alg.name}-{cfg.model.name}", wandb_id,
                             group=sweep.wandb_group(cfg.wandb.group, sweep_dir))
    metrics_log.reset(state.records)
    summary = None
    try:
        state = edit(cfg, parts, state, metrics_log,
                     checkpoint_writer(cfg, parts, config, ckpt_dir, metrics_log, checkpointed),
                     progress)
        summary = finish(cfg, parts, state, run_dir)
    finally:
        metrics_log.finish(summary)
    log.info("summary: %s", summary_line(summary))
    log.info("done in %.1f s (edit time %.1f s)", time.time() - start, state.edit_time_s)
    return summary


__all__ = ["run", "validate", "build", "restore", "edit", "finish", "RunParts", "edit_batch_size",
           "pick_device", "UserError"]
