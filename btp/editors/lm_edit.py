"""Pieces shared by the decoder-LLM fact editors (WISE, MEMIT, AlphaEdit).

Free of any one method's logic:

* which modules a method edits when the model config does not name them
  (:func:`default_memit_layers`, :func:`default_wise_layer`), and the transformer block a module
  belongs to (:func:`block_of`);
* weights of Linear and GPT-2 Conv1D layers in one orientation, ``[out, in]``
  (:func:`weight_out_in`, :func:`add_out_in`, :func:`linear_with`);
* text beyond the edit stream: a corpus of documents (:func:`read_corpus`), the prefixes
  ("context templates") that ROME, MEMIT and WISE put before an edit prompt
  (:func:`context_templates`), and an edit batch decoded back to its facts and re-tokenized
  with those prefixes (:func:`decode_facts`, :func:`templated_batch`);
* hooks that capture a module's input or output (:class:`Capture`) and keep the output head to
  the positions a loss reads (:func:`head_at`);
* strings kept in a checkpoint as tensors (:func:`strings_to_tensor`).
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from btp.editors.common import get_module, is_conv1d
from btp.errors import ConfigError, DataError
from btp.families import Family, family_of_model_type
from btp.tasks import fact_tasks, names_phrase


def model_family(model: nn.Module) -> tuple[Family, int]:
    """``(family, number of layers)`` of a decoder LM (:mod:`btp.families`)."""
    config = getattr(model, "config", None)
    family = family_of_model_type(str(getattr(config, "model_type", "")))
    if family is None or family.kind != "causal_lm":
        raise ConfigError(f"{type(model).__name__} is not a decoder-only LM of a known family "
                          "(Llama, Mistral, Qwen2, GPT-J, GPT-2); WISE, MEMIT and AlphaEdit edit "
                          "those: pick such a +model, or name the layers in the model config")
    return family, int(getattr(config, family.layers_attr))


def _scaled(index: int, of: int, n_layers: int) -> int:
    return min(n_layers - 1, max(0, round(index * n_layers / of)))


def _fact_layers(family: Family, what: str) -> Any:
    value = getattr(family, what)
    if value is None or family.ffn_out is None:
        raise ConfigError(f"the {family.name} family has no default {what} (btp.families); name "
                          "the layers in the model config")
    return value


def default_memit_layers(model: nn.Module) -> list[str]:
    """MEMIT's edited modules for ``model``: its family's ``memit_layers`` of ``ffn_out``."""
    family, n = model_family(model)
    (lo, hi), of = _fact_layers(family, "memit_layers")
    lo, hi = _scaled(lo, of, n), _scaled(hi, of, n)
    return [str(family.ffn_out).format(i=i) for i in range(lo, hi + 1)]


def default_wise_layer(model: nn.Module) -> str:
    """WISE's side-memory module for ``model``: its family's ``wise_layer``."""
    family, n = model_family(model)
    path, index, of = _fact_layers(family, "wise_layer")
    return path.format(i=_scaled(index, of, n))


def block_of(module_name: str) -> str:
    """The transformer block holding a module: ``model.layers.8.mlp.down_proj`` ->
    ``model.layers.8`` (the path up to the first numeric component)."""
    parts = module_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    raise ConfigError(f"cannot tell which layer '{module_name}' belongs to: name a module "
                      "inside a numbered block (e.g. model.layers.8.mlp.down_proj)")


def linear_module(model: nn.Module, name: str) -> nn.Module:
    """The Linear/Conv1D module at ``name`` (ConfigError naming it otherwise)."""
    module = get_module(model, name)
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ConfigError(f"'{name}' is a {type(module).__name__}; name a Linear (or GPT-2 "
                          "Conv1D) layer such as model.layers.27.mlp.down_proj")
    return module


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (a view: Conv1D stores ``[in, out]``)."""
    return module.weight.T if is_conv1d(module) else module.weight


def add_out_in(module: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` in place, ``delta`` given as ``[out, in]`` (any float dtype)."""
    with torch.no_grad():
        w = module.weight
        w.add_((delta.T if is_conv1d(module) else delta).to(device=w.device, dtype=w.dtype))


def linear_with(module: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                with_bias: bool = True) -> torch.Tensor:
    """The layer's output for input ``x`` with ``weight`` (in the module's own layout) in place
    of its own weight, with its own bias (none with ``with_bias=False``)."""
    bias = getattr(module, "bias", None) if with_bias else None
    if is_conv1d(module):
        out = x @ weight.to(x.dtype)
        return out + bias if bias is not None else out
    return nn.functional.linear(x, weight.to(x.dtype), bias)


# ------------------------------------------------------------------------------ text and prompts
def read_corpus(path: Path, max_docs: int | None = None) -> list[str]:
    """Documents of a text corpus: a folder (``openwebtext-10k.jsonl`` when present, else its
    ``*.txt`` files, one document each, sorted by name), a ``.jsonl`` file (one ``{"text": ...}``
    per line) or a ``.txt`` file (one document per non-empty line).

    Raises:
        DataError: nothing readable there (the message says what to provide).
    """
    path = Path(path)
    docs: list[str] = []
    if path.is_dir():
        jsonl = path / "openwebtext-10k.jsonl"
        if jsonl.is_file():
            path = jsonl
        else:
            for f in sorted(path.glob("*.txt")):
                docs.append(f.read_text(encoding="utf-8", errors="replace"))
                if max_docs is not None and len(docs) >= max_docs:
                    break
    if path.is_file() and path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError) as e:
                    raise DataError(f"{path}, line {lineno}: expected a JSON object with a "
                                    f"string 'text' ({e})") from e
                if isinstance(text, str) and text.strip():
                    docs.append(text)
                if max_docs is not None and len(docs) >= max_docs:
                    break
    elif path.is_file():
        docs = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if ln.strip()][: max_docs or None]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found at {path}: give a folder of *.txt documents, a .jsonl "
                        "file of {\"text\": ...} lines or a .txt file (the shipped sample: "
                        "data/openwebtext)")
    return docs


def corpus_tag(path: Path) -> str:
    """A short fingerprint of a corpus's files (names, sizes, mtimes), for cache file names."""
    path = Path(path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.sha1()
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:"
                     f"{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:10]


def passages(docs: Sequence[str], min_words: int = 5, max_words: int = 40) -> list[str]:
    """Sentence-sized pieces of documents (split at sentence ends and line breaks), each at
    least ``min_words`` and at most ``max_words`` words, in document order."""
    out: list[str] = []
    for doc in docs:
        for piece in re.split(r"(?<=[.!?])\s+|\n+", doc):
            words = piece.split()
            if len(words) >= min_words:
                out.append(" ".join(words[:max_words]))
    return out


def _bos_prefix(tokenizer: Any) -> list[int]:
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids and ids[0] == bos else []


@torch.no_grad()
def context_templates(model: nn.Module, tokenizer: Any, seeds: Sequence[str],
                      lengths: Sequence[int], join: str, top_k: int = 1,
                      generator: torch.Generator | None = None,
                      count_seed: bool = False) -> list[str]:
    """``["{}"]`` plus one generated prefix per seed word and length, each ending in ``join``
    followed by ``{}`` (where the edit prompt goes), as ROME/MEMIT and WISE build them.

    Each prefix is the seed word continued by the model for ``length`` new tokens (``length``
    tokens in all, the seed's included, with ``count_seed``, as MEMIT counts): greedy when
    ``top_k`` is 1 (WISE), else sampled from the ``top_k`` most likely tokens with ``generator``
    (MEMIT). Braces in the text are replaced by spaces so that the prefix is a format string.
    """
    device = next(model.parameters()).device
    out = ["{}"]
    for length in lengths:
        for seed in seeds:
            ids = torch.tensor([tokenizer(seed)["input_ids"]], device=device)
            n_new = int(length) - (ids.shape[1] if count_seed else 0)
            for _ in range(max(0, n_new)):
                logits = model(input_ids=ids).logits[0, -1].float()
                if top_k <= 1:
                    nxt = logits.argmax()
                else:
                    vals, idx = logits.topk(min(top_k, logits.numel()))
                    probs = torch.softmax(vals, -1).cpu()
                    nxt = idx[torch.multinomial(probs, 1, generator=generator).to(idx.device)][0]
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            text = tokenizer.decode(ids[0], skip_special_tokens=True)
            text = text.replace("{", " ").replace("}", " ").strip()
            out.append(f"{text}{join}{{}}")
    return out


def decode_facts(batch: dict[str, torch.Tensor], tokenizer: Any) -> list[tuple[str, str]]:
    """The ``(prompt, target)`` texts of a tokenized fact batch: the real tokens before the first
    label are the prompt, the labelled tokens the target (special tokens dropped)."""
    ids, labels = batch["input_ids"], batch["labels"]
    am = batch.get("attention_mask")
    out = []
    for i in range(ids.shape[0]):
        real = am[i].bool() if am is not None else torch.ones_like(ids[i], dtype=torch.bool)
        lab = labels[i] != -100
        if not bool(lab.any()):
            raise ConfigError("an edit record has no target tokens: WISE, MEMIT and AlphaEdit "
                              "edit facts (prompt -> target); use +experiment="
                              f"{names_phrase(fact_tasks())}")
        first = int(lab.nonzero()[0])
        prompt = tokenizer.decode(ids[i][:first][real[:first]], skip_special_tokens=True)
        target = tokenizer.decode(ids[i][lab], skip_special_tokens=True)
        out.append((prompt.strip(), target.strip()))
    return out


def templated_batch(tokenizer: Any, facts: Sequence[tuple[str, str]], templates: Sequence[str],
                    max_length: int = 1024) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every fact under every template, tokenized as the fact tasks tokenize (labels on the
    target only; :func:`btp.data.facts.fact_batch`).

    Returns:
        ``(batch, owner)``: rows ordered fact by fact, template by template
        (``[n_facts * n_templates, L]``), and ``owner`` ``[rows]``, the fact of each row.
    """
    from btp.data.facts import fact, fact_batch

    records = [fact(t.format(p), tgt) for p, tgt in facts for t in templates]
    owner = torch.arange(len(facts)).repeat_interleave(len(templates))
    return fact_batch(tokenizer, records, max_length), owner


def last_prompt_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[n]`` long: per row, the position of the last prompt token (just before the first
    label), where MEMIT's key is read with ``fact_token=last`` and the target is predicted."""
    lab = batch["labels"] != -100
    if not bool(lab.any(1).all()):
        raise ConfigError("a row without target tokens cannot be edited")
    return lab.float().argmax(1) - 1


class Capture:
    """Forward hooks that record a module's input (``what="input"``) or output (``"output"``)
    while the context is open: ``cap.values[name]`` is the last tensor seen (``[n, L, d]``)."""

    def __init__(self, model: nn.Module, names: Sequence[str], what: str = "input") -> None:
        self.model, self.names, self.what = model, list(names), what
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "Capture":
        for name in self.names:
            module = get_module(self.model, name)

            def hook(mod: nn.Module, args: tuple, output: Any, _name: str = name) -> None:
                value = args[0] if self.what == "input" else output
                self.values[_name] = value[0] if isinstance(value, tuple) else value

            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextmanager
def add_at_positions(block: nn.Module, rows: torch.Tensor, positions: torch.Tensor,
                     delta: torch.Tensor) -> Iterator[None]:
    """Add ``delta`` ``[d]`` to a block's output hidden state at ``(rows[j], positions[j])``
    (the residual stream after the block) while the context is open; differentiable in delta."""

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        add = torch.zeros_like(h, dtype=delta.dtype)
        add = add.index_put((rows.to(h.device), positions.to(h.device)),
                            delta.unsqueeze(0).expand(len(rows), -1))
        h = h + add.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def head_at(model: nn.Module, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """While open, the model's output head reads only the hidden states at
    ``(rows[j], positions[j])``: a forward's logits are ``[1, P, V]`` (``P = len(rows)``, in the
    given order) instead of ``[n, L, V]``.

    An edit's loss needs the logits of its target tokens only; the head over every position of
    every row (and the log-softmax and its backward over ``V``) dominates a small model's step.
    The logits kept are computed as the head computes them, from the same hidden states.
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output head to restrict")

    def pre_hook(mod: nn.Module, args: tuple) -> tuple:
        h = args[0]
        return (h[rows.to(h.device), positions.to(h.device)].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def strings_to_tensor(items: Sequence[str]) -> torch.Tensor:
    """A list of strings as a uint8 tensor (its JSON, UTF-8), for safetensors checkpoints."""
    return torch.tensor(list(json.dumps(list(items)).encode("utf-8")), dtype=torch.uint8)


def tensor_to_strings(t: torch.Tensor) -> list[str]:
    """Inverse of :func:`strings_to_tensor`."""
    return list(json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8")))


def weight_fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """A short hash of tensors' bytes: a cache file of layer statistics belongs to these
    weights."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:12]
