"""Atomic checkpoints and resume.

One checkpoint is a single safetensors file, ``<run_dir>/checkpoint/state.safetensors``: the
tensors (editor state, the unedited model's locality references, torch RNG states) plus, in the
file's metadata, a JSON document (stream position, metrics so far, cumulative edit time, Python
and numpy RNG states, the resolved config). It is written to a temporary file in the same folder,
flushed to disk, then ``os.replace``d over the previous one, so a run killed with SIGKILL at any
moment leaves either the old or the new checkpoint, never a torn one, and loses at most the edit
batch in progress. A temporary file left by a killed writer (``.state.safetensors.tmp-<pid>``) is
removed by the next run in the same directory (:func:`remove_stale_tmp`).

Integrity: the metadata also holds a SHA-256 of every tensor (dtype, shape and bytes) and of the
JSON document; :func:`load` verifies them and the document's keys, so a flipped byte or an edited
file is refused with the file named instead of resuming into wrong numbers.

Tests kill runs at chosen points through :func:`kill_hook` (environment variable
``BTP_TEST_KILL_AT=<batches_done>:<point>[:<SIGNAL>]``, SIGKILL unless a signal name is given); it
does nothing when the variable is unset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from btp.errors import ConfigError, RunDirError

log = logging.getLogger(__name__)

FILE_NAME = "state.safetensors"
#: 2: tensor and document checksums in the metadata. 1 (no checksums) is still read, with a warning.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: Config sections that may change between a run and its resume without changing the numbers
#: (where results are logged, which device computes them, whether checkpoints are written).
RESUME_IGNORED = ("wandb", "checkpoint", "device", "threads")
#: Keys of the JSON document (and tensors) that the runner needs to resume.
REQUIRED_STATE = {"batches_done": int, "n_edits": int, "edit_time_s": (int, float),
                  "records": list, "rng": dict, "config": dict, "n_batches": int}
REQUIRED_TENSORS = ("refs.flat", "refs.offsets", "rng.torch")
_TMP_PREFIX = f".{FILE_NAME}.tmp-"


def kill_hook(point: str, batches_done: int) -> None:
    """Signal this process at ``point`` once ``batches_done`` batches are done (tests only).

    ``BTP_TEST_KILL_AT=2:after_edit`` sends SIGKILL; ``2:after_edit:SIGTERM`` sends SIGTERM.
    """
    spec = os.environ.get("BTP_TEST_KILL_AT")
    if not spec:
        return
    at, _, rest = spec.partition(":")
    where, _, sig_name = rest.partition(":")
    if int(at) == batches_done and where == point:
        sig = signal.Signals[sig_name] if sig_name else signal.SIGKILL
        log.warning("test hook: %s at %s after %d batches", sig.name, point, batches_done)
        os.kill(os.getpid(), sig)


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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (full disk, signal) leaves no partial file
        raise
    _fsync_dir(path.parent)


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Delete the temporary files (``.<name>.tmp-<pid>``) that killed writers left in
    ``directory``; returns what was removed.

    Call it only while holding the run directory's lock: then no live writer owns them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.glob(".*.tmp-*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d stale temporary file(s) in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed))
    return removed


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (hex)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def pack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate 1-D tensors into ``(flat, offsets)`` for storage in a checkpoint (offsets has
    n+1 entries); the locality references are such a list."""
    lengths = [int(t.numel()) for t in tensors]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
    if lengths:
        offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)
    flat = torch.cat([t.reshape(-1).long().cpu() for t in tensors]) if tensors else torch.zeros(
        0, dtype=torch.long)
    return flat, offsets


def unpack(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`pack`."""
    bounds = offsets.tolist()
    return [flat[bounds[i]: bounds[i + 1]].clone() for i in range(len(bounds) - 1)]


def save(directory: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Atomically replace the checkpoint in ``directory`` with ``tensors`` and ``state``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    # safetensors refuses shared storage and non-contiguous tensors: store private copies.
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    text = json.dumps(state)
    metadata = {"state": text, "state_sha256": _text_digest(text),
                "tensor_sha256": json.dumps({k: tensor_digest(v) for k, v in clean.items()})}
    path = directory / FILE_NAME
    tmp = directory / f"{_TMP_PREFIX}{os.getpid()}"
    try:
        save_file(clean, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        kill_hook("before_replace", int(state.get("batches_done", -1)))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (full disk, signal) leaves no partial file
        raise
    _fsync_dir(directory)


def load(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint in ``directory`` as ``(tensors, state)``, or None when there is none.

    Every tensor and the JSON document are checked against their checksums, and the document
    against :data:`REQUIRED_STATE`.

    Raises:
        RunDirError: the file exists but cannot be read, fails a checksum or lacks a key (the
            message names the file and says to delete it or use another run dir).
    """
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        return None
    fix = f"delete {path} to start the run over, or use another hydra.run.dir"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        text = meta["state"]
        state = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any decoding failure means the same to the user
        raise RunDirError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(state, dict):
        raise RunDirError(f"checkpoint {path}: its metadata is not a JSON object; {fix}")
    version = state.get("format_version")
    if version not in READABLE_VERSIONS:
        raise RunDirError(f"checkpoint {path} has format {version!r}, this version reads "
                          f"{', '.join(map(str, READABLE_VERSIONS))}; {fix}")
    if version == 1:
        log.warning("checkpoint %s (format 1) carries no checksums; resuming without verifying it",
                    path)
    else:
        _verify(path, meta, text, tensors, fix)
    _check_keys(path, state, tensors, fix)
    return tensors, state


def _verify(path: Path, meta: dict[str, str], text: str, tensors: dict[str, torch.Tensor],
            fix: str) -> None:
    """Compare the document and every tensor with the checksums stored at save time."""
    try:
        expected = json.loads(meta["tensor_sha256"])
        state_sha = meta["state_sha256"]
    except (KeyError, json.JSONDecodeError) as e:
        raise RunDirError(f"checkpoint {path}: its checksums are missing or unreadable; "
                          f"{fix}") from e
    if _text_digest(text) != state_sha:
        raise RunDirError(f"checkpoint {path} is corrupt: its state document does not match its "
                          f"checksum; {fix}")
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise RunDirError(f"checkpoint {path} is corrupt: its tensors do not match the list it was "
                          f"saved with; {fix}")
    bad = sorted(k for k, t in tensors.items() if tensor_digest(t) != expected[k])
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise RunDirError(f"checkpoint {path} is corrupt: tensor(s) {', '.join(bad[:3])}{more} do "
                          f"not match their checksums; {fix}")


def _check_keys(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor],
                fix: str) -> None:
    """The keys and value types the runner reads on resume."""
    for key, kind in REQUIRED_STATE.items():
        value = state.get(key)
        if key not in state or not isinstance(value, kind) or isinstance(value, bool):
            raise RunDirError(f"checkpoint {path}: its metadata lacks '{key}' or holds a wrong "
                              f"type there ({type(value).__name__}); {fix}")
    for key in ("python", "numpy"):
        if not isinstance(state["rng"].get(key), list):
            raise RunDirError(f"checkpoint {path}: its metadata lacks the {key} RNG state; {fix}")
    missing = [k for k in REQUIRED_TENSORS if k not in tensors]
    if missing:
        raise RunDirError(f"checkpoint {path} lacks tensor(s) {', '.join(missing)}; {fix}")
    if not 0 <= state["batches_done"] <= state["n_batches"]:
        raise RunDirError(f"checkpoint {path}: batches_done {state['batches_done']} is outside "
                          f"0..{state['n_batches']}; {fix}")


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


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every result-changing key that differs (sorted, dotted keys)."""
    a = _flatten(comparable_config(saved))
    b = _flatten(comparable_config(current))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def format_diff(diff: list[str], shown: int = 5) -> str:
    """The first ``shown`` entries of :func:`config_diff`, with a count of the rest."""
    more = f" (+{len(diff) - shown} more)" if len(diff) > shown else ""
    return ", ".join(diff[:shown]) + more


def check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume when the config that shapes the numbers changed.

    Raises:
        ConfigError: naming the first differing keys and what to do.
    """
    diff = config_diff(saved, current)
    if diff:
        raise ConfigError(
            f"the run dir holds a checkpoint ({path}) made with a different config "
            f"({format_diff(diff)}); rerun with the same overrides to resume (only wandb.*, device "
            "and checkpoint.* may differ), or use another hydra.run.dir")
