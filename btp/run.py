"""Command-line entry: ``cd btp && python run.py +alg=lora +experiment=qa +model=t5small``.

A thin Hydra 1.3 entry: Hydra composes ``config/config.yaml`` on the structured schema
(``btp/schema.py``; unknown keys fail at compose time), changes nothing else, and calls
``btp.runner.run(cfg)``, which writes everything into Hydra's run directory. Errors the user can
fix (``btp.errors.UserError``) become one line on stderr (printed once: the console log handler
does not repeat it) and exit code 2; the full traceback goes to the log file only. In a sweep
(``-m``) such an error fails only its own job: it is logged and re-raised, Hydra marks the job
failed, the other jobs still run and the sweep exits non-zero.
SIGINT (Ctrl-C) and SIGTERM end the run (and a sweep) with one line saying where the run stands
and how it resumes, exit code 128 + the signal's number (130, 143).

Hydra writes ``.hydra/`` into the run directory before ``main`` runs; a command that is refused
puts back the files of the run the directory holds (``btp.rundir``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    # ``python run.py`` run from btp/ (README's command form): make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import btp.schema  # noqa: E402,F401  (registers the schema and the repo_path resolver)
from btp.errors import RunInterrupted, UserError  # noqa: E402

log = logging.getLogger("btp.run")


@hydra.main(version_base="1.3", config_path="../config", config_name="config")
def main(cfg: DictConfig) -> dict:
    """Compose, run, return the final metrics (Hydra's return value for sweeps)."""
    from btp import runner
    from btp.rundir import RunDir

    try:
        try:
            btp.schema.check_known_keys(cfg)
        except UserError:
            RunDir(HydraConfig.get().runtime.output_dir).restore_hydra()
            raise
        return runner.run(cfg)
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # One job of a sweep: let Hydra mark this job failed; sys.exit would end the whole
            # sweep under the basic launcher (SystemExit is not caught per job).
            log.error("%s", e)
            raise
        _log_to_files(f"{e}", with_traceback=True)
        _exit_with_line(f"error: {e}", 2)
    except RunInterrupted as e:
        _log_to_files(f"{e}")
        _exit_with_line(f"interrupted: {e}", e.exit_code)  # a sweep stops too, as on Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C before the runner installed its handler
        RunDir(HydraConfig.get().runtime.output_dir).restore_hydra()
        _exit_with_line("interrupted: SIGINT received before the run started; nothing was "
                        "changed: re-run the same command", 130)


def _log_to_files(message: str, with_traceback: bool = False) -> None:
    """Record an error in the log files only (Hydra's run.log), with the traceback if asked.

    The terminal gets the one line of :func:`_exit_with_line`; logging the error as usual would
    print it a second time through Hydra's console handler.
    """
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (),
                            sys.exc_info() if with_traceback else None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def _exit_with_line(message: str, code: int) -> None:
    """Write ``message`` as one line on stderr and exit with ``code``.

    Written directly: Hydra's console handler may not be attached (job_logging off), and an
    embedded exception text may hold line breaks.
    """
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()
    logging.shutdown()
    sys.exit(code)


def check_command_line(args: list[str]) -> None:
    """Refuse a config-key override the schema does not declare, before Hydra composes.

    Hydra's own message for ``melo.num_iters=3`` suggests appending the key with ``+`` (which
    then fails too); this one names the closest declared key. Group choices (``+alg=...``),
    ``hydra.*`` keys, flags and what Hydra cannot parse are left to Hydra.

    Raises:
        btp.errors.ConfigError: one line naming the key and the closest declared keys.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from btp.errors import ConfigError

    candidates = [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # noqa: BLE001 - a malformed override: Hydra reports it
        return
    for override in overrides:
        key = override.key_or_group
        if key.split(".")[0] == "hydra" or (btp.schema.REPO_ROOT / "config" / key).is_dir():
            continue
        if not btp.schema.is_declared(key):
            raise ConfigError(btp.schema.unknown_key_message(key))


def cli() -> None:
    """``python run.py ...``: the command line checked, then Hydra's entry."""
    try:
        check_command_line(sys.argv[1:])
    except UserError as e:
        _exit_with_line(f"error: {e}", 2)
    main()


if __name__ == "__main__":
    cli()
