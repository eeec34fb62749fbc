"""A run directory belongs to one run: one resolved configuration, one process at a time.

What the runner guarantees through :class:`RunDir` (README, "Outputs" and "Resume"):

* **One process.** ``.lock`` is held with ``flock`` for the whole run; a second process started
  into the same directory gets a one-line error naming the holder's pid. The kernel drops the
  lock when its holder dies (also on SIGKILL), so a stale lock never blocks a resume.
* **One configuration.** ``run_config.json`` keeps the resolved config of the run that produced
  the results in the directory (``summary.json`` or ``checkpoint/``), plus a copy of Hydra's
  ``.hydra/*.yaml`` of the command that ran it. A later command whose result-changing keys differ
  (anything but ``wandb.*``, ``device`` and ``checkpoint.*``, see
  ``btp.checkpoint.RESUME_IGNORED``) is refused with the differing keys named, whether the run is
  finished or partial; an equal one resumes a partial run or returns the finished summary.
* **No false description.** Hydra writes ``.hydra/`` before the runner starts. When a command
  does not run (refused, failed before claiming the directory, or skipped because the run is
  finished), :meth:`RunDir.restore_hydra` puts back the files of the command that did run, so
  ``.hydra/`` never describes a run that did not happen.
* **No debris.** Temporary files of writers that were killed (``.<name>.tmp-<pid>``) are removed
  on the next start.

A directory written before ``run_config.json`` existed is checked against its checkpoint's
config (or, with only a ``summary.json``, against task/alg/model/seed) and says so in the log.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Mapping

from btp import checkpoint as ckpt
from btp.errors import RunDirError

try:  # POSIX; the runner targets Linux workstations and SLURM nodes
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locking, documented in README
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

RECORD_FILE = "run_config.json"
LOCK_FILE = ".lock"
SUMMARY_FILE = "summary.json"
RECORD_VERSION = 1


def _hydra_subdir() -> str | None:
    """Hydra's ``output_subdir`` of the current run (``.hydra``), None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return HydraConfig.get().output_subdir
    except (ImportError, ValueError, AttributeError):
        pass
    return None


class RunDir:
    """The run directory's lock, its configuration record and the Hydra files it describes.

    Args:
        path: the run directory.
        hydra_subdir: Hydra's metadata folder inside it (``.hydra``); None for a run without
            Hydra (``btp.runner.run`` called directly). Default: the current Hydra run's.
    """

    def __init__(self, path: str | Path, hydra_subdir: str | None | bool = True) -> None:
        self.path = Path(path)
        sub = _hydra_subdir() if hydra_subdir is True else hydra_subdir
        self.hydra_dir = self.path / sub if sub else None
        self._lock_fd: int | None = None

    # -- files --------------------------------------------------------------------------------
    @property
    def record_path(self) -> Path:
        return self.path / RECORD_FILE

    @property
    def checkpoint_file(self) -> Path:
        return self.path / "checkpoint" / ckpt.FILE_NAME

    def holds_results(self) -> bool:
        """True when a run produced something here (a summary or a checkpoint)."""
        return (self.path / SUMMARY_FILE).is_file() or self.checkpoint_file.is_file()

    def read_record(self) -> dict[str, Any] | None:
        """The record of the run in this directory, or None when there is none.

        Raises:
            RunDirError: the file exists but is not a readable record.
        """
        path = self.record_path
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunDirError(f"{path} is unreadable ({e}); it identifies the run in {self.path}: "
                              "restore it, or use another hydra.run.dir") from e
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise RunDirError(f"{path} is not a run record (no 'config' object); restore it, or "
                              "use another hydra.run.dir")
        return record

    def _hydra_files(self) -> dict[str, str]:
        if self.hydra_dir is None or not self.hydra_dir.is_dir():
            return {}
        return {p.name: p.read_text(encoding="utf-8")
                for p in sorted(self.hydra_dir.glob("*.yaml"))}

    # -- lock ---------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Create the directory and take its lock.

        Raises:
            RunDirError: another process holds the lock (its pid is in the message).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"another process ({holder}) is running in {self.path}; wait for it "
                              "to finish (a re-run then resumes or skips it) or use another "
                              "hydra.run.dir") from None
        except OSError as e:  # a file system without flock (some FUSE mounts): run unlocked
            os.close(fd)
            log.warning("%s: cannot lock the run dir (%s); two runs started into it would not "
                        "be stopped", self.path, e)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays; it is empty of meaning without a holder)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- identity -----------------------------------------------------------------------------
    def check(self, config: Mapping[str, Any], identity: Mapping[str, Any],
              checkpoint_config: Mapping[str, Any] | None = None) -> None:
        """Refuse a run whose result-changing config differs from the run already here.

        Args:
            config: the resolved config about to run (``OmegaConf.to_container`` form).
            identity: task/alg/model/seed as in ``summary.json`` (for directories without a
                record or checkpoint).
            checkpoint_config: the config stored in the directory's checkpoint when the caller
                has already loaded it (else it is read here when needed).

        Raises:
            RunDirError: naming the differing keys and what to do.
        """
        if not self.holds_results():
            return
        finished = (self.path / SUMMARY_FILE).is_file()
        what = "a finished run" if finished else "a partial run (a checkpoint, no summary.json)"
        action = "skip it" if finished else "resume it"
        record = self.read_record()
        saved = record["config"] if record is not None else None
        source = RECORD_FILE
        if saved is None and self.checkpoint_file.is_file():
            if checkpoint_config is None:
                loaded = ckpt.load(self.checkpoint_file.parent)
                checkpoint_config = loaded[1]["config"] if loaded is not None else None
            saved = checkpoint_config
            source = f"checkpoint/{ckpt.FILE_NAME}"
        if saved is not None:
            diff = ckpt.config_diff(saved, dict(config))
        else:  # only a summary.json, from before run records existed
            log.warning("%s: no %s or checkpoint; only task/alg/model/seed can be compared",
                        self.path, RECORD_FILE)
            summary = _read_summary(self.path / SUMMARY_FILE)
            diff = [f"{k}: {summary.get(k)!r} -> {v!r}" for k, v in identity.items()
                    if str(summary.get(k)) != str(v)] if summary is not None else []
            source = SUMMARY_FILE
        if diff:
            raise RunDirError(
                f"{self.path} holds {what} made with a different config ({ckpt.format_diff(diff)}; "
                f"from its {source}); re-run with the same overrides to {action} (only wandb.*, "
                "device and checkpoint.* may differ), or use another hydra.run.dir")

    def claim(self, config: Mapping[str, Any]) -> None:
        """Record ``config`` and the current Hydra files as the run of this directory."""
        record = {"format": RECORD_VERSION, "config": dict(config), "hydra": self._hydra_files()}
        ckpt.atomic_write_text(self.record_path, json.dumps(record, indent=1) + "\n")

    def restore_hydra(self) -> list[str]:
        """Put back the Hydra files of the recorded run when another command rewrote them.

        Does nothing when the directory holds no results or no record (nothing to protect).
        Returns the names of the files rewritten or removed.
        """
        if self.hydra_dir is None or not self.holds_results():
            return []
        try:
            record = self.read_record()
        except RunDirError:
            return []
        if record is None or not isinstance(record.get("hydra"), dict):
            return []
        wanted: dict[str, str] = record["hydra"]
        changed = []
        for name, text in self._hydra_files().items():
            if name not in wanted:
                (self.hydra_dir / name).unlink(missing_ok=True)
                changed.append(name)
        for name, text in wanted.items():
            path = self.hydra_dir / name
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                self.hydra_dir.mkdir(parents=True, exist_ok=True)
                ckpt.atomic_write_text(path, text)
                changed.append(name)
        if changed:
            log.info("%s: restored %s to the run that produced this directory's results",
                     self.hydra_dir, ", ".join(changed))
        return changed

    def remove_stale_tmp(self) -> list[Path]:
        """Temporary files of killed writers, in the run dir and its checkpoint folder."""
        dirs = [self.path, self.path / "checkpoint"] + ([self.hydra_dir] if self.hydra_dir else [])
        return [p for d in dirs for p in ckpt.remove_stale_tmp(d)]


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


__all__ = ["RunDir", "RECORD_FILE", "LOCK_FILE"]
