"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook adapter around one frozen layer.

Implemented from the paper's description (no code taken from the original).

The wrapped layer (``grace.layer``, else ``model.grace_baseline_layer``, else GRACE's own layer
for the model type, else ``model.grace_layer``; see :func:`default_grace_layer`) keeps its weights. A codebook of entries sits beside it; each entry holds

* a key: the layer's *input* at the key token of an edited example,
* a value: a trainable vector that replaces the layer's *output*,
* a deferral radius epsilon, and
* the label of the edit that created it.

Editing one example with key k and label y against the nearest entry j at distance d:

* no entry, or ``d > eps_j + init_radius``: **add** a new entry (k, eps = init_radius, y);
* ``d <= eps_j + init_radius`` and y equals label_j: **expand**, eps_j = max(eps_j, d);
  the entry's value is then trained on this example too;
* otherwise (label conflict): **split**, eps_j = d/2 and a new entry (k, eps = d/2, y) is
  added; ``conflicts`` counts these.

Then the values of the entries the batch touched are trained with plain SGD (lr ``edit_lr``,
``num_iter`` steps, fresh optimizer per batch) on the model's own loss; everything else is frozen.

Inference: one nearest-key search per forward for the whole batch (``keys @ codebook.T`` with
squared norms); an example whose key is inside its nearest entry's ball gets that entry's value
at the replaced positions; any other example, and every other position, gets the layer's own
output bit for bit (``torch.where``).

Config (section ``grace``): ``layer`` (null: see :func:`default_grace_layer`), ``init_radius``,
``edit_lr``, ``num_iter``, ``replacement`` (``replace_last`` | ``replace_prompt``),
``batch_size`` (used by the runner), ``label_match`` (``exact`` | ``sum``: MELO's quirk),
``key_id`` (default -1) and ``key_position`` (``padded``: position ``key_id`` of the padded batch,
as MELO, the default; ``last_real``: the last non-pad token). Missing keys take these defaults.

Replaced positions, per model kind (the "prompt" is what the wrapped layer sees as input, minus
pads and, for causal LMs with labels, minus the label tokens):

* T5 (wrapped layer in the encoder): the encoder runs once per forward/generate, so its decision
  holds for every decoder step. ``replace_last``: the last real (non-pad) input token;
  ``replace_prompt``: every real input token.
* BERT: as T5 (the whole input is the prompt).
* GPT-2 (causal LM): ``replace_last``: the last prompt token, i.e. the position just before the
  first label token when labels are passed (teacher-forced training and perplexity), else the
  last real token; ``replace_prompt``: every real position whose label is -100 (all real
  positions without labels). In ``generate`` only the prompt forward decides and replaces; the
  cached one-token decoding steps are left untouched (without a KV cache, each full re-forward
  gets the prompt forward's replacement again at the same prompt positions: same result).

Replacing at the key token itself would be a no-op for GPT-2 training (the last position of
"prompt label<eos>" predicts nothing) and for T5/BERT whenever the padded key position is a pad
(pads are masked out of attention), hence the "last real/prompt token" rule above.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from btp.editors.base import EditOutcome, Editor, register_editor
from btp.editors.common import (
    cfg_get,
    cfg_str,
    get_module,
    layer_dims,
    model_device,
    model_inputs,
    read_safetensors,
    to_device,
    write_safetensors,
)
from btp.errors import ConfigError

log = logging.getLogger(__name__)

REPLACEMENTS = ("replace_last", "replace_prompt")
KEY_POSITIONS = ("padded", "last_real")
LABEL_MATCHES = ("exact", "sum")

# GRACE's own layer where it differs from the model's MELO ``grace_layer`` (by HF model_type).
# GRACE's SCOTUS experiments wrap BERT layer 10; its T5 (block 4 wo) and GPT-2 (h.35 c_fc)
# layers are the ones MELO reuses, so those come from the model config.
GRACE_OWN_LAYER = {"bert": "bert.encoder.layer.10.output.dense"}

SAFETENSORS_NAME = "grace_codebook.safetensors"
CONFIG_NAME = "grace_config.json"


class _StopForward(Exception):
    """Raised by the codebook in capture mode: nothing above the wrapped layer is needed."""


@dataclass
class ForwardContext:
    """What the codebook needs to know about the current forward beyond the layer input.

    attention_mask: [n, L] (1 = real token) or None.
    prompt_mask: [n, L] bool, the positions that count as prompt (real and, for causal LMs with
        labels, not a label token) or None (= every position).
    generating: True inside ``generate``: only the first (prompt) forward decides.
    calls: forwards of the wrapped layer seen so far under this context.
    decision: the prompt forward's replace mask and values, re-applied by uncached steps.
    """

    attention_mask: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    generating: bool = False
    calls: int = 0
    decision: tuple[torch.Tensor, torch.Tensor] | None = None  # (replace mask, values)


def label_rows(labels: torch.Tensor) -> list[torch.Tensor]:
    """One 1-D long tensor of label token ids per example (-100 dropped); [n] labels -> [1] each."""
    if labels.dim() == 1:
        return [labels[i : i + 1].long() for i in range(labels.shape[0])]
    return [row[row != -100].long() for row in labels]


class GraceCodebook(nn.Module):
    """A codebook attached to one layer through a forward hook.

    A hook rather than a replacement module: the model's module tree, its ``state_dict`` keys and
    code that reads the layer's attributes (T5's FFN reads ``wo.weight``) stay as they were.
    Calling the codebook calls the layer (so the hook applies); ``base_output`` bypasses it.
    The codebook is not a submodule of the model, so the editor saves its tensors explicitly
    (``codebook_state``).
    """

    def __init__(self, layer: nn.Module, *, init_radius: float, replacement: str = "replace_last",
                 key_position: str = "padded", key_id: int = -1,
                 label_match: str = "exact") -> None:
        super().__init__()
        if replacement not in REPLACEMENTS:
            raise ConfigError(f"grace.replacement must be one of {REPLACEMENTS}, got {replacement!r}")
        if key_position not in KEY_POSITIONS:
            raise ConfigError(f"grace.key_position must be one of {KEY_POSITIONS}, got {key_position!r}")
        if label_match not in LABEL_MATCHES:
            raise ConfigError(f"grace.label_match must be one of {LABEL_MATCHES}, got {label_match!r}")
        self.layer = layer
        self.in_dim, self.out_dim = layer_dims(layer)
        self.init_radius = float(init_radius)
        self.replacement = replacement
        self.key_position = key_position
        self.key_id = int(key_id)
        self.label_match = label_match
        w = next(layer.parameters())
        dev, dt = w.device, w.dtype
        self.register_buffer("keys", torch.zeros(0, self.in_dim, device=dev, dtype=dt), persistent=False)
        self.register_buffer("values", torch.zeros(0, self.out_dim, device=dev, dtype=dt), persistent=False)
        self.register_buffer("radii", torch.zeros(0, device=dev, dtype=dt), persistent=False)
        # Labels as rows of token ids padded with -100 (classification: one id per row).
        self.register_buffer("labels", torch.full((0, 1), -100, device=dev, dtype=torch.long),
                             persistent=False)
        self.conflicts = 0
        # Per-forward state, set by the editor; never module-level globals.
        self.ctx: ForwardContext | None = None
        self.mode = "infer"  # "infer" | "capture" | "train"
        self.captured: dict[str, torch.Tensor] = {}
        self.train_values: torch.Tensor | None = None  # [m, out] leaf being trained
        self.train_assign: torch.Tensor | None = None  # [n] row of train_values per example
        self.enabled = True
        self._handle = layer.register_forward_hook(self._hook)

    def remove(self) -> None:
        """Detach from the layer: it behaves exactly as before the codebook existed."""
        self._handle.remove()

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's own output for ``x`` (hook bypassed)."""
        self.enabled = False
        try:
            return self.layer(x)
        finally:
            self.enabled = True

    # ----------------------------------------------------------------------------- codebook
    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    def nearest(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest entry and its Euclidean distance for each key ([n, in] -> [n], [n]).

        One matmul with precomputed squared norms instead of cdist (several times faster at
        these shapes); clamped at 0 because the expansion can go slightly negative.
        """
        k = keys.to(self.keys.dtype)
        d2 = (k * k).sum(-1, keepdim=True) - 2.0 * (k @ self.keys.T) + (self.keys * self.keys).sum(-1)[None]
        d2min, idx = d2.clamp_min_(0.0).min(dim=1)
        return idx, d2min.sqrt()

    def _labels_equal(self, entry: int, label: torch.Tensor) -> bool:
        stored = self.labels[entry]
        stored = stored[stored != -100]
        if self.label_match == "sum":
            # MELO's original comparison (sum of ids, -100 as 0): a hash with collisions.
            return int(stored.sum()) == int(label.sum())
        return stored.shape == label.shape and bool(torch.equal(stored, label.to(stored.device)))

    def _append(self, key: torch.Tensor, value: torch.Tensor, radius: float,
                label: torch.Tensor) -> int:
        dev = self.keys.device
        width = max(self.labels.shape[1], int(label.numel()), 1)
        labels = self.labels
        if labels.shape[1] < width:
            labels = torch.cat([labels, labels.new_full((labels.shape[0], width - labels.shape[1]), -100)], 1)
        row = torch.full((1, width), -100, dtype=torch.long, device=dev)
        row[0, : label.numel()] = label.to(dev)
        self.keys = torch.cat([self.keys, key.detach().to(self.keys)[None]])
        self.values = torch.cat([self.values, value.detach().to(self.values)[None]])
        self.radii = torch.cat([self.radii, self.radii.new_tensor([radius])])
        self.labels = torch.cat([labels, row])
        return self.size - 1

    def add_or_update(self, key: torch.Tensor, value_init: torch.Tensor,
                      label: torch.Tensor) -> tuple[int, str]:
        """Apply GRACE's rule for one edit; returns (entry index to train, rule applied).

        The rule is one of "add", "expand", "split" (see the module docstring).
        """
        if self.size == 0:
            return self._append(key, value_init, self.init_radius, label), "add"
        idx, dist = self.nearest(key[None])
        j, d = int(idx[0]), float(dist[0])
        if d > float(self.radii[j]) + self.init_radius:
            return self._append(key, value_init, self.init_radius, label), "add"
        if self._labels_equal(j, label):
            if d > float(self.radii[j]):
                self.radii[j] = d
            return j, "expand"
        self.radii[j] = d / 2.0
        self.conflicts += 1
        return self._append(key, value_init, d / 2.0, label), "split"

    def codebook_state(self) -> dict[str, torch.Tensor]:
        """Tensors-only codebook (for checkpoints and save_pretrained)."""
        return {
            "keys": self.keys.detach().clone(),
            "values": self.values.detach().clone(),
            "radii": self.radii.detach().clone(),
            "labels": self.labels.detach().clone(),
            "conflicts": torch.tensor(self.conflicts, dtype=torch.long),
        }

    def load_codebook_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`codebook_state` (onto this module's device)."""
        dev = self.keys.device
        if state["keys"].shape[1:] != self.keys.shape[1:] or state["values"].shape[1:] != self.values.shape[1:]:
            raise ConfigError(
                f"GRACE state has key/value dims {tuple(state['keys'].shape[1:])}/"
                f"{tuple(state['values'].shape[1:])}, the wrapped layer has "
                f"{self.in_dim}/{self.out_dim}: resume with the same model and grace.layer"
            )
        self.keys = state["keys"].to(dev, self.keys.dtype)
        self.values = state["values"].to(dev, self.values.dtype)
        self.radii = state["radii"].to(dev, self.radii.dtype)
        self.labels = state["labels"].to(dev, torch.long)
        self.conflicts = int(state["conflicts"])

    # ----------------------------------------------------------------------------- forward
    def _key_index(self, n: int, length: int, device: torch.device) -> torch.Tensor:
        """[n] position of the key token in each row."""
        am = self.ctx.attention_mask if self.ctx is not None else None
        if self.key_position == "last_real" and am is not None and am.shape == (n, length):
            return _last_true(am.bool())
        return torch.full((n,), self.key_id % length, dtype=torch.long, device=device)

    def _replace_mask(self, n: int, length: int, device: torch.device) -> torch.Tensor:
        """[n, L] bool: positions whose output an active entry replaces."""
        pm = self.ctx.prompt_mask if self.ctx is not None else None
        if pm is None or pm.shape != (n, length):
            pm = torch.ones(n, length, dtype=torch.bool, device=device)
        if self.replacement == "replace_prompt":
            return pm
        last = _last_true(pm)
        mask = torch.zeros(n, length, dtype=torch.bool, device=device)
        mask[torch.arange(n, device=device), last] = True
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with the codebook applied (the hook does the work)."""
        return self.layer(x)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled or not args:
            return None
        return self.apply_codebook(args[0], out)

    def apply_codebook(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output ``out`` for input ``x`` after the codebook's decision."""
        flat = x.dim() == 2  # a [n, d] input (no sequence axis) counts as length 1
        xs, os_ = (x[:, None], out[:, None]) if flat else (x, out)
        n, length = xs.shape[0], xs.shape[1]
        if self.ctx is not None and self.ctx.generating:
            self.ctx.calls += 1
            if self.ctx.calls > 1:  # a later step: only the prompt forward decides
                return self._reapply(os_, flat)
        if self.mode == "capture":
            kpos = self._key_index(n, length, xs.device)
            rows = torch.arange(n, device=xs.device)
            rmask = self._replace_mask(n, length, xs.device)
            # Initial value: the layer's own output averaged over the replaced positions, so a
            # fresh entry starts as (nearly) the identity edit.
            w = rmask.to(os_.dtype)[..., None]
            init = (os_ * w).sum(1) / w.sum(1).clamp_min(1.0)
            self.captured = {"keys": xs[rows, kpos].detach(), "init": init.detach()}
            raise _StopForward
        if self.mode == "train":
            vals = self.train_values[self.train_assign].to(os_.dtype)  # [n, out]
            rmask = self._replace_mask(n, length, xs.device)
            res = torch.where(rmask[..., None], vals[:, None, :], os_)
            return res[:, 0] if flat else res
        if self.size == 0:
            return out
        kpos = self._key_index(n, length, xs.device)
        keys = xs[torch.arange(n, device=xs.device), kpos]
        idx, dist = self.nearest(keys)
        hit = dist <= self.radii[idx]
        if not bool(hit.any()):
            return out
        rmask = self._replace_mask(n, length, xs.device) & hit[:, None]
        vals = self.values[idx].to(os_.dtype)
        if self.ctx is not None and self.ctx.generating:
            self.ctx.decision = (rmask, vals)
        res = torch.where(rmask[..., None], vals[:, None, :], os_)
        return res[:, 0] if flat else res

    def _reapply(self, os_: torch.Tensor, flat: bool) -> torch.Tensor:
        """A generation step after the prompt forward.

        With a KV cache (the step sees fewer positions than the prompt) the prompt's outputs
        are already cached and new tokens are left untouched. Without a cache (the whole
        sequence again) the prompt forward's decision is re-applied at the same positions, so
        both ways give the same result.
        """
        decision = self.ctx.decision if self.ctx is not None else None
        if decision is None or os_.shape[1] < decision[0].shape[1]:
            return os_[:, 0] if flat else os_
        rmask, vals = decision
        pad = os_.shape[1] - rmask.shape[1]
        rmask = torch.cat([rmask, rmask.new_zeros(rmask.shape[0], pad)], 1)
        res = torch.where(rmask[..., None], vals[:, None, :], os_)
        return res[:, 0] if flat else res


def _last_true(mask: torch.Tensor) -> torch.Tensor:
    """[n, L] bool -> [n] index of the last True per row (L-1 for an all-False row)."""
    length = mask.shape[1]
    pos = torch.arange(length, device=mask.device).expand_as(mask)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=1).values
    return torch.where(last < 0, torch.full_like(last, length - 1), last)


def default_grace_layer(model: nn.Module, alg_cfg: Any, model_cfg: Any) -> str:
    """The layer GRACE wraps, first set of: ``grace.layer``, ``model.grace_baseline_layer``,
    GRACE's own layer for the model type (when the model has it), ``model.grace_layer``."""
    for name in (cfg_get(alg_cfg, "layer"), cfg_get(model_cfg, "grace_baseline_layer")):
        if name:
            return str(name)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    own = GRACE_OWN_LAYER.get(model_type)
    # A smaller stand-in may lack GRACE's own layer: then the model's grace_layer serves.
    if own is not None and own in dict(model.named_modules()):
        return own
    name = cfg_get(model_cfg, "grace_layer")
    if not name:
        raise ConfigError("GRACE needs a layer: set grace.layer or model.grace_baseline_layer")
    return str(name)


def make_context(batch: dict[str, torch.Tensor], causal: bool, generating: bool = False) -> ForwardContext:
    """Forward context from a batch: the real-token mask and, for causal LMs, the prompt mask."""
    am = batch.get("attention_mask")
    ids = batch.get("input_ids")
    prompt = am.bool() if am is not None else (torch.ones_like(ids, dtype=torch.bool) if ids is not None else None)
    labels = batch.get("labels")
    if causal and prompt is not None and labels is not None and labels.shape == prompt.shape:
        prompt = prompt & (labels == -100)
    return ForwardContext(attention_mask=am, prompt_mask=prompt, generating=generating)


@register_editor("grace")
class GraceEditor(Editor):
    """GRACE as an :class:`Editor`: wraps one layer of ``model`` with a :class:`GraceCodebook`."""

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **_: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches)
        self.layer_name = default_grace_layer(model, alg_cfg, model_cfg)
        layer = get_module(model, self.layer_name)
        self.codebook = GraceCodebook(
            layer,
            init_radius=float(cfg_get(alg_cfg, "init_radius", 1.0)),
            replacement=cfg_str(alg_cfg, "replacement", "replace_last"),
            key_position=cfg_str(alg_cfg, "key_position", "padded"),
            key_id=int(cfg_get(alg_cfg, "key_id", -1)),
            label_match=cfg_str(alg_cfg, "label_match", "exact"),
        )
        self.edit_lr = float(cfg_get(alg_cfg, "edit_lr", 1.0))
        self.num_iter = int(cfg_get(alg_cfg, "num_iter", 100))
        self.is_seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        log.info("GRACE wraps %s (key dim %d, value dim %d), replacement=%s, key=%s",
                 self.layer_name, self.codebook.in_dim, self.codebook.out_dim,
                 self.codebook.replacement, self.codebook.key_position)

    # ------------------------------------------------------------------------------ helpers
    def _causal(self, batch: dict[str, torch.Tensor]) -> bool:
        labels = batch.get("labels")
        return not self.is_seq2seq and labels is not None and labels.dim() == 2

    @contextmanager
    def _context(self, ctx: ForwardContext, mode: str = "infer") -> Iterator[None]:
        self.codebook.ctx, self.codebook.mode = ctx, mode
        try:
            yield
        finally:
            self.codebook.ctx, self.codebook.mode = None, "infer"
            self.codebook.train_values = self.codebook.train_assign = None

    # ---------------------------------------------------------------------------- interface
    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        t0 = time.perf_counter()
        batch = to_device(model_inputs(batch), model_device(self.base_model))
        causal = self._causal(batch)
        ctx = make_context(batch, causal)
        # 1) keys and initial values: run the model up to the wrapped layer only.
        with self._context(ctx, "capture"), torch.no_grad():
            try:
                self.base_model(**batch)
            except _StopForward:
                pass
        cap = self.codebook.captured
        self.codebook.captured = {}
        if "keys" not in cap:
            raise ConfigError(f"GRACE layer {self.layer_name} was not reached by the forward pass")
        # 2) codebook rules, one example at a time (later examples see earlier ones).
        entries: list[int] = []
        for i, label in enumerate(label_rows(batch["labels"])):
            j, rule = self.codebook.add_or_update(cap["keys"][i], cap["init"][i], label)
            entries.append(j)
            log.debug("GRACE edit example %d: %s entry %d", i, rule, j)
        uniq = sorted(set(entries))
        where = {e: r for r, e in enumerate(uniq)}
        dev = self.codebook.values.device
        assign = torch.tensor([where[e] for e in entries], dtype=torch.long, device=dev)
        index = torch.tensor(uniq, dtype=torch.long, device=dev)
        # 3) train only the touched values with SGD; fresh optimizer per batch.
        values = self.codebook.values[index].clone().requires_grad_(True)
        opt = torch.optim.SGD([values], lr=self.edit_lr)
        losses: list[float] = []
        with self._context(make_context(batch, causal), "train"), torch.enable_grad():
            self.codebook.train_values, self.codebook.train_assign = values, assign
            for _ in range(self.num_iter):
                opt.zero_grad(set_to_none=True)
                loss = self.base_model(**batch).loss
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        with torch.no_grad():
            self.codebook.values[index] = values.detach().to(self.codebook.values.dtype)
        return EditOutcome(losses=losses, time_s=time.perf_counter() - t0)

    def forward(self, **inputs: Any) -> Any:
        batch = to_device(inputs, model_device(self.base_model))
        tensors = model_inputs(batch)
        with self._context(make_context(tensors, self._causal(tensors))), torch.no_grad():
            return self.base_model(**batch)

    def generate(self, **inputs: Any) -> torch.Tensor:
        batch = to_device(inputs, model_device(self.base_model))
        tensors = model_inputs(batch)
        # No labels at generation: the prompt is every real token.
        ctx = make_context({k: v for k, v in tensors.items() if k != "labels"}, False,
                           generating=not self.is_seq2seq)
        with self._context(ctx), torch.no_grad():
            return self.base_model.generate(**batch)

    def stats(self) -> dict[str, int]:
        return {"clusters": self.codebook.size, "conflicts": self.codebook.conflicts, "forgotten": 0}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"grace.{k}": v for k, v in self.codebook.codebook_state().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.codebook.load_codebook_state(
            {k[len("grace."):]: v for k, v in state.items() if k.startswith("grace.")})

    def _meta(self) -> dict[str, Any]:
        cb = self.codebook
        return {"alg": "grace", "layer": self.layer_name, "init_radius": cb.init_radius,
                "replacement": cb.replacement, "key_position": cb.key_position, "key_id": cb.key_id,
                "label_match": cb.label_match, "key_dim": cb.in_dim, "value_dim": cb.out_dim,
                "entries": cb.size, "conflicts": cb.conflicts}

    def save_pretrained(self, directory: str | Path) -> None:
        write_safetensors(directory, SAFETENSORS_NAME, self.codebook.codebook_state(),
                          self._meta(), CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path,
                        model_cfg: Any = None) -> "GraceEditor":
        """Rebuild an editor around ``model`` from a :meth:`save_pretrained` directory."""
        tensors, meta = read_safetensors(directory, SAFETENSORS_NAME, CONFIG_NAME)
        alg_cfg = {k: meta[k] for k in ("init_radius", "replacement", "key_position", "key_id",
                                        "label_match")}
        alg_cfg["layer"] = meta["layer"]
        editor = cls(model, alg_cfg, model_cfg)
        editor.codebook.load_codebook_state(tensors)
        return editor
