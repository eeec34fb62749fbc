"""Atomic checkpoints and resume.

One checkpoint is a single safetensors file, ``<run_dir>/checkpoint/state.safetensors``: the
tensors (editor state, the unedited model's locality references, torch RNG states) plus, in the
file's metadata, a JSON document (stream position, metrics so far, cumulative edit time, Python
and numpy RNG states, the resolved config). It is written to a temporary file in the same folder,
flushed to disk, then ``os.replace``d over the previous one, so a run killed with SIGKILL at any
moment leaves either the old or the new checkpoint, never a torn one, and loses at most the edit
batch in progress.

Tests kill runs at chosen points through :func:`kill_hook` (environment variable
``BTP_TEST_KILL_AT=<batches_done>:<point>``); it does nothing when the variable is unset.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from btp.errors import ConfigError, UserError

log = logging.getLogger(__name__)

FILE_NAME = "state.safetensors"
FORMAT_VERSION = 1
#: Config sections that may change between a run and its resume without changing the numbers.
RESUME_IGNORED = ("wandb", "checkpoint", "device")


def kill_hook(point: str, batches_done: int) -> None:
    """SIGKILL this process at ``point`` once ``batches_done`` batches are done (tests only)."""
    spec = os.environ.get("BTP_TEST_KILL_AT")
    if not spec:
        return
    at, _, where = spec.partition(":")
    if int(at) == batches_done and where == point:
        log.warning("test hook: SIGKILL at %s after %d batches", point, batches_done)
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the folder entry is on disk; not every OS allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (readers never see a
    partial file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python/numpy RNG states as JSON, torch (CPU and CUDA) states as tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(internal), gauss],
          "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return js, tensors


def set_rng_state(js: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save(directory: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Atomically replace the checkpoint in ``directory`` with ``tensors`` and ``state``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    # safetensors refuses shared storage and non-contiguous tensors: store private copies.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path = directory / FILE_NAME
    tmp = directory / f".{FILE_NAME}.tmp-{os.getpid()}"
    save_file(clean, str(tmp), metadata={"state": json.dumps(state)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    kill_hook("before_replace", int(state.get("batches_done", -1)))
    os.replace(tmp, path)
    _fsync_dir(directory)


def load(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint in ``directory`` as ``(tensors, state)``, or None when there is none.

    Raises:
        UserError: the file exists but cannot be read (say to delete it or use a new run dir).
    """
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta["state"])
    except Exception as e:  # noqa: BLE001 - any decoding failure means the same to the user
        raise UserError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete it to start over "
            "or use another hydra.run.dir") from e
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {state.get('format_version')}, expected "
                        f"{FORMAT_VERSION}; delete it or use another hydra.run.dir")
    return tensors, state


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without the sections that may change on resume."""
    return {k: v for k, v in config.items() if k not in RESUME_IGNORED}


def check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume when the config that shapes the numbers changed.

    Raises:
        ConfigError: naming the first differing keys and what to do.
    """
    a = _flatten(comparable_config(saved))
    b = _flatten(comparable_config(current))
    diff = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
                          for k in diff[:5])
        more = f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""
        raise ConfigError(
            f"the run dir holds a checkpoint ({path}) made with a different config ({shown}{more}); "
            "rerun with the same overrides to resume, or use another hydra.run.dir")
