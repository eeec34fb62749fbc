"""Command-line entry: ``cd btp && python run.py +alg=lora +experiment=qa +model=t5small``.

A thin Hydra 1.3 entry: Hydra composes ``config/config.yaml`` on the structured schema
(``btp/schema.py``; unknown keys fail at compose time), changes nothing else, and calls
``btp.runner.run(cfg)``, which writes everything into Hydra's run directory. Errors the user can
fix (``btp.errors.UserError``) become one line on stderr and exit code 2; the full traceback goes
to the log file only. In a sweep (``-m``) such an error fails only its own job: it is logged and
re-raised, Hydra marks the job failed, the other jobs still run and the sweep exits non-zero.
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
        log.debug("user error", exc_info=True)
        log.error("%s", e)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # One job of a sweep: let Hydra mark this job failed; sys.exit would end the whole
            # sweep under the basic launcher (SystemExit is not caught per job).
            raise
        _exit_with_line(f"error: {e}", 2)
    except RunInterrupted as e:
        log.error("%s", e)
        _exit_with_line(f"interrupted: {e}", e.exit_code)  # a sweep stops too, as on Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C before the runner installed its handler
        RunDir(HydraConfig.get().runtime.output_dir).restore_hydra()
        _exit_with_line("interrupted: SIGINT received before the run started; nothing was "
                        "changed: re-run the same command", 130)


def _exit_with_line(message: str, code: int) -> None:
    """Write ``message`` as one line on stderr and exit with ``code``.

    Written directly: Hydra's console handler may not be attached (job_logging off), and an
    embedded exception text may hold line breaks.
    """
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()
    logging.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
