"""GRACE (Hartvigsen et al., NeurIPS 2023) as the GRACE repository runs it: a codebook adapter
around one frozen layer.

Written from the paper and from reading the repository's behaviour (no code taken from it).

The wrapped layer (``grace.layer``, else ``model.grace_baseline_layer``, else GRACE's own layer
for the model type, else ``model.grace_layer``; see :func:`default_grace_layer`) keeps its
weights. A codebook of entries sits beside it; each entry holds

* a key: the layer's *input* at the key token of an edited example,
* a value: a trainable vector that replaces the layer's *output*,
* a deferral radius epsilon, and
* the label of the edit that created it.

Editing one example with key k and label y against the nearest entry j at distance d:

* no entry, or ``d > eps_j + init_radius``: **add** a new entry (k, eps = init_radius, y);
* ``d <= eps_j + init_radius`` and y agrees with label_j: **expand**. ``eps_expand=coverage``
  (default): eps_j = max(eps_j, d); ``moving_average``: when d > eps_j the key moves halfway
  to k and eps_j = d. The entry's value is then trained on this example;
* otherwise (label conflict): **split**, eps_j = d/2 - 1e-5 and a new entry (k, eps = d/2, y) is
  added; ``conflicts`` counts these.

Labels agree (``label_match``) when the means of their token ids are equal (``mean``, the
repository's rule, a hash: [2, 9] and [9, 2] agree; a causal LM's label row counts its -100
prompt positions) or, with ``exact``, when the id sequences are equal.

A new entry's value starts (``val_init``) ``cold``: uniform in [0, 1) (the default), or ``warm``:
the layer's output at the key token. The values of the entries an edit touched are then trained
with Adam (lr ``edit_lr``, a fresh optimizer per edit, ``num_iter`` steps, no early stop) on the
model's own loss; everything else is frozen. ``val_train=adv`` adds N(0, 1) noise to the value
of every example of the edit batch but the first at each training forward (the repository's
perturbation; a no-op for its batches of one); ``sgd`` (default) trains plainly.

Which records are edited: the runner cuts the stream into ``batch_size`` records per edit (1 by
default, as the repository), and of those only the ones the edited model still gets wrong are
edited (``error_filter``, :func:`btp.editors.common.records_to_edit`); the others count in the
stream but train nothing.

Inference: one nearest-key search per forward for the whole batch (``keys @ codebook.T`` with
squared norms); an example whose key is inside its nearest entry's ball gets that entry's value
at the replaced positions; any other example, and every other position, gets the layer's own
output bit for bit (``torch.where``).

The key token (``key_position``) and the replaced positions (``replacement``), per row of the
layer input [n, L, d]:

* ``auto`` (default) puts the key where the repository's falls at its batch size of one: T5, the
  real token ``key_id`` from the end (``-1``: the last real token, ``</s>``); BERT, position
  ``key_id`` of the input padded to its fixed length (the repository pads SCOTUS to 512 too);
  GPT-2, the last prompt token (the last real position whose label is -100; the last real token
  when a row has no such position, e.g. upstream text or a generation prompt).
  ``padded``: position ``key_id`` of the padded batch; ``last_real``: the real token ``key_id``
  from the end.
* ``replace_prompt`` (default, the repository's ``config/editor/grace.yaml``): every position
  before the key token, i.e. ``[:key]`` (with T5's default key, every input token but ``</s>``);
  ``replace_last``: the key token only (the setting EasyEdit and WISE use for GRACE);
  ``replace_all``: every position.

T5's encoder runs once per forward/generate, so its decision holds for every decoder step. In a
GPT-2 ``generate`` only the prompt forward decides and replaces; the cached one-token steps are
left untouched (without a KV cache each full re-forward gets the prompt forward's replacement
again at the same positions: same result).

Config (section ``grace``): ``layer``, ``init_radius``, ``edit_lr``, ``num_iter``,
``replacement``, ``batch_size`` (used by the runner), ``error_filter``, ``label_match``,
``key_id``, ``key_position``, ``val_init``, ``eps_expand``, ``val_train``,
``cache_frozen_prefix`` (default true: the blocks below the wrapped layer's block run once per
edit instead of at every training step; same losses). Missing keys take the defaults above.
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
    ERROR_FILTERS,
    cfg_get,
    check_choice,
    frozen_prefix,
    get_module,
    layer_dims,
    model_device,
    model_inputs,
    model_kind,
    read_safetensors,
    records_to_edit,
    select_rows,
    to_device,
    write_safetensors,
)
from btp.editors.optim import Step, make_optimizer, run_steps
from btp.errors import ConfigError
from btp.families import family_of_model_type
from btp.schema import GraceCfg, read_section

log = logging.getLogger(__name__)

REPLACEMENTS = ("replace_prompt", "replace_last", "replace_all")
KEY_POSITIONS = ("auto", "padded", "last_real")
LABEL_MATCHES = ("mean", "exact")
VAL_INITS = ("cold", "warm")
EPS_EXPANDS = ("coverage", "moving_average")
VAL_TRAINS = ("sgd", "adv")
#: The margin the repository takes off the old entry's radius on a split (d/2 - 1e-5).
SPLIT_MARGIN = 1e-5

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


def label_means(batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """[n] float32: the mean of each example's label row as the repository's label test sees it.

    Its batches hold one record, so a row is never padded: a T5 label row is its token ids, a
    GPT-2 row is every real position (the prompt's -100 included), a class label is itself.
    Here padding (T5: -100; GPT-2: attention mask 0) is left out so that batching changes nothing.
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.float()
    am = batch.get("attention_mask")
    means = []
    for i, row in enumerate(labels):
        if kind == "causal_lm" and am is not None and am.shape == labels.shape:
            real = row[am[i].bool()]
        else:
            real = row[row != -100]
        means.append(real.float().mean() if real.numel() else row.new_zeros((), dtype=torch.float32))
    return torch.stack(means).float()


class GraceCodebook(nn.Module):
    """A codebook attached to one layer through a forward hook.

    A hook rather than a replacement module: the model's module tree, its ``state_dict`` keys and
    code that reads the layer's attributes (T5's FFN reads ``wo.weight``) stay as they were.
    Calling the codebook calls the layer (so the hook applies); ``base_output`` bypasses it.
    The codebook is not a submodule of the model, so the editor saves its tensors explicitly
    (``codebook_state``).

    Args:
        layer: the wrapped Linear/Conv1D layer.
        init_radius: epsilon of a new entry (and the margin of the add test).
        replacement, key_position, key_id, label_match, eps_expand, val_train: see the module
            docstring.
        kind: ``seq2seq`` | ``classification`` | ``causal_lm`` (where ``auto`` puts the key).
    """

    def __init__(self, layer: nn.Module, *, init_radius: float, replacement: str = "replace_prompt",
                 key_position: str = "auto", key_id: int = -1, label_match: str = "mean",
                 eps_expand: str = "coverage", val_train: str = "sgd",
                 kind: str = "seq2seq") -> None:
        super().__init__()
        self.replacement = check_choice("grace", "replacement", replacement, REPLACEMENTS)
        self.key_position = check_choice("grace", "key_position", key_position, KEY_POSITIONS)
        self.label_match = check_choice("grace", "label_match", label_match, LABEL_MATCHES)
        self.eps_expand = check_choice("grace", "eps_expand", eps_expand, EPS_EXPANDS)
        self.val_train = check_choice("grace", "val_train", val_train, VAL_TRAINS)
        self.layer = layer
        self.in_dim, self.out_dim = layer_dims(layer)
        self.init_radius = float(init_radius)
        self.key_id = int(key_id)
        self.kind = kind
        w = next(layer.parameters())
        dev, dt = w.device, w.dtype
        self.register_buffer("keys", torch.zeros(0, self.in_dim, device=dev, dtype=dt), persistent=False)
        self.register_buffer("values", torch.zeros(0, self.out_dim, device=dev, dtype=dt), persistent=False)
        self.register_buffer("radii", torch.zeros(0, device=dev, dtype=dt), persistent=False)
        # Labels as rows of token ids padded with -100 (classification: one id per row), and
        # each label's mean (float32, the repository's comparison) for label_match=mean.
        self.register_buffer("labels", torch.full((0, 1), -100, device=dev, dtype=torch.long),
                             persistent=False)
        self.register_buffer("label_means", torch.zeros(0, device=dev, dtype=torch.float32),
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
        """Number of entries."""
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

    def labels_agree(self, entry: int, label: torch.Tensor, mean: torch.Tensor | float) -> bool:
        """Whether an edit's label agrees with entry ``entry``'s (``label_match``)."""
        if self.label_match == "mean":
            # float32 equality of the means, as the repository compares them
            return bool(self.label_means[entry] == torch.as_tensor(mean, dtype=torch.float32))
        stored = self.labels[entry]
        stored = stored[stored != -100]
        return stored.shape == label.shape and bool(torch.equal(stored, label.to(stored.device)))

    def _append(self, key: torch.Tensor, value: torch.Tensor, radius: float,
                label: torch.Tensor, mean: torch.Tensor | float) -> int:
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
        self.label_means = torch.cat([self.label_means,
                                      torch.as_tensor(mean, dtype=torch.float32, device=dev).reshape(1)])
        return self.size - 1

    def add_or_update(self, key: torch.Tensor, label: torch.Tensor, new_value: Callable[[], torch.Tensor],
                      mean: torch.Tensor | float | None = None) -> tuple[int, str]:
        """Apply GRACE's rule for one edit; returns (entry index to train, rule applied).

        Args:
            key: [in] the edit's key.
            label: 1-D label token ids (-100 dropped), for ``label_match=exact``.
            new_value: makes the initial value ([out]) of a new entry; called only on add/split.
            mean: the label row's mean (:func:`label_means`); default the mean of ``label``.

        The rule is one of "add", "expand", "split" (see the module docstring).
        """
        if mean is None:
            mean = label.float().mean()
        if self.size == 0:
            return self._append(key, new_value(), self.init_radius, label, mean), "add"
        idx, dist = self.nearest(key[None])
        j, d = int(idx[0]), float(dist[0])
        if d > float(self.radii[j]) + self.init_radius:
            return self._append(key, new_value(), self.init_radius, label, mean), "add"
        if self.labels_agree(j, label, mean):
            if d > float(self.radii[j]):
                if self.eps_expand == "moving_average":
                    self.keys[j] = 0.5 * self.keys[j] + 0.5 * key.detach().to(self.keys)
                self.radii[j] = d
            return j, "expand"
        new = self._append(key, new_value(), d / 2.0, label, mean)
        self.radii[j] = d / 2.0 - SPLIT_MARGIN
        self.conflicts += 1
        return new, "split"

    def codebook_state(self) -> dict[str, torch.Tensor]:
        """Tensors-only codebook (for checkpoints and save_pretrained)."""
        return {
            "keys": self.keys.detach().clone(),
            "values": self.values.detach().clone(),
            "radii": self.radii.detach().clone(),
            "labels": self.labels.detach().clone(),
            "label_means": self.label_means.detach().clone(),
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
        means = state.get("label_means")
        if means is None:  # a state written without means: the mean of each stored label
            means = torch.stack([r[r != -100].float().mean() for r in self.labels]) \
                if self.labels.shape[0] else torch.zeros(0)
        self.label_means = means.to(dev, torch.float32)
        self.conflicts = int(state["conflicts"])

    # ----------------------------------------------------------------------------- forward
    def key_index(self, n: int, length: int, device: torch.device) -> torch.Tensor:
        """[n] position of the key token in each row (``key_position``, module docstring)."""
        ctx = self.ctx
        am = ctx.attention_mask if ctx is not None else None
        real = am.bool() if am is not None and am.shape == (n, length) else None
        mode = self.key_position
        if mode == "auto":
            mode = {"seq2seq": "last_real", "classification": "padded",
                    "causal_lm": "last_prompt"}[self.kind]
        if mode == "padded" or real is None:
            k = min(self.key_id, length - 1) if self.key_id >= 0 else max(self.key_id, -length) % length
            return torch.full((n,), k, dtype=torch.long, device=device)
        last = _last_true(real)
        if mode == "last_real":
            # rows are right-padded: real tokens sit at [0, count)
            count = real.sum(1).clamp_min(1)
            k = torch.full_like(count, self.key_id) + (0 if self.key_id >= 0 else count)
            return torch.minimum(k.clamp_min(0), count - 1)
        pm = ctx.prompt_mask if ctx is not None else None
        if pm is None or pm.shape != (n, length):
            return last
        has_prompt = pm.any(1)
        return torch.where(has_prompt, _last_true(pm), last)

    def replace_mask(self, kpos: torch.Tensor, length: int) -> torch.Tensor:
        """[n, L] bool: positions an active entry replaces, given the key positions [n]."""
        pos = torch.arange(length, device=kpos.device)[None]
        if self.replacement == "replace_prompt":
            return pos < kpos[:, None]
        if self.replacement == "replace_last":
            return pos == kpos[:, None]
        return torch.ones(kpos.shape[0], length, dtype=torch.bool, device=kpos.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with the codebook applied (the hook does the work)."""
        return self.layer(x)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled or not args:
            return None
        return self.apply_codebook(args[0], out)

    def apply_codebook(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer's output ``out`` for input ``x`` after the codebook's decision."""
        flat = x.dim() == 2  # a [n, d] input (no sequence axis): its one position is replaced
        xs, os_ = (x[:, None], out[:, None]) if flat else (x, out)
        n, length = xs.shape[0], xs.shape[1]
        if self.ctx is not None and self.ctx.generating:
            self.ctx.calls += 1
            if self.ctx.calls > 1:  # a later step: only the prompt forward decides
                return self._reapply(os_, flat)
        rows = torch.arange(n, device=xs.device)
        if flat:
            kpos = torch.zeros(n, dtype=torch.long, device=xs.device)
            rmask = torch.ones(n, 1, dtype=torch.bool, device=xs.device)
        else:
            kpos = self.key_index(n, length, xs.device)
            rmask = self.replace_mask(kpos, length)
        if self.mode == "capture":
            # keys, and the layer output at the key token (``val_init=warm``)
            self.captured = {"keys": xs[rows, kpos].detach(), "warm": os_[rows, kpos].detach()}
            raise _StopForward
        if self.mode == "train":
            vals = self.train_values[self.train_assign].to(os_.dtype)  # [n, out]
            if self.val_train == "adv":
                noise = torch.randn_like(vals)
                noise[0] = 0.0  # the first example keeps its clean value
                vals = vals + noise
            res = torch.where(rmask[..., None], vals[:, None, :], os_)
            return res[:, 0] if flat else res
        if self.size == 0:
            return out
        idx, dist = self.nearest(xs[rows, kpos])
        hit = dist <= self.radii[idx]
        if not bool(hit.any()):
            return out
        rmask = rmask & hit[:, None]
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
    """The layer GRACE (and the GRACE repository's fine-tuning) edits, first set of:
    ``<section>.layer``, ``model.grace_baseline_layer``, GRACE's own layer for the model type
    (when the model has it), ``model.grace_layer``."""
    for name in (cfg_get(alg_cfg, "layer"), cfg_get(model_cfg, "grace_baseline_layer")):
        if name:
            return str(name)
    # GRACE's SCOTUS experiments wrap BERT layer 10 (the family table's grace_layer); its T5
    # (block 4 wo) and GPT-2 (h.35 c_fc) layers are the ones MELO reuses, from the model config.
    family = family_of_model_type(str(getattr(getattr(model, "config", None), "model_type", "")))
    own = family.grace_layer if family is not None else None
    # A smaller stand-in may lack GRACE's own layer: then the model's grace_layer serves.
    if own is not None and own in dict(model.named_modules()):
        return own
    name = cfg_get(model_cfg, "grace_layer")
    if not name:
        raise ConfigError("GRACE (and FT) need a layer: set grace.layer (ft.layer) or "
                          "model.grace_baseline_layer")
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
        self.kind = model_kind(model)
        self.settings = s = read_section(GraceCfg, alg_cfg)
        self.codebook = GraceCodebook(
            layer,
            init_radius=s.init_radius,
            replacement=s.replacement,
            key_position=s.key_position,
            key_id=s.key_id,
            label_match=s.label_match,
            eps_expand=s.eps_expand,
            val_train=s.val_train,
            kind=self.kind,
        )
        self.val_init = check_choice("grace", "val_init", s.val_init, VAL_INITS)
        self.error_filter = check_choice("grace", "error_filter", s.error_filter, ERROR_FILTERS)
        self.edit_lr = s.edit_lr
        self.num_iter = s.num_iter
        self.cache_frozen_prefix = s.cache_frozen_prefix
        self.is_seq2seq = self.kind == "seq2seq"
        self.skipped = 0  # records the filter left unedited (the model already got them right)
        log.info("GRACE wraps %s (key dim %d, value dim %d), replacement=%s, key=%s, "
                 "val_init=%s, error_filter=%s", self.layer_name, self.codebook.in_dim,
                 self.codebook.out_dim, self.codebook.replacement, self.codebook.key_position,
                 self.val_init, self.error_filter)

    # ------------------------------------------------------------------------------ helpers
    def _causal(self, batch: dict[str, torch.Tensor]) -> bool:
        labels = batch.get("labels")
        return self.kind == "causal_lm" and labels is not None and labels.dim() == 2

    @contextmanager
    def _context(self, ctx: ForwardContext, mode: str = "infer") -> Iterator[None]:
        self.codebook.ctx, self.codebook.mode = ctx, mode
        try:
            yield
        finally:
            self.codebook.ctx, self.codebook.mode = None, "infer"
            self.codebook.train_values = self.codebook.train_assign = None

    def _new_value(self, warm: torch.Tensor) -> Callable[[], torch.Tensor]:
        """The initial value of a new entry: uniform [0, 1) (``cold``) or ``warm`` ([out])."""
        cb = self.codebook
        if self.val_init == "warm":
            return lambda: warm
        return lambda: torch.rand(cb.out_dim, device=cb.values.device).to(cb.values.dtype)

    # ---------------------------------------------------------------------------- interface
    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        batch = to_device(model_inputs(batch), model_device(self.base_model))
        rows = records_to_edit(self, batch, self.kind, self.error_filter)
        self.skipped += int((~rows).sum())
        if not bool(rows.any()):
            log.debug("GRACE: the model already gets these %d record(s) right; nothing edited",
                      int(rows.numel()))
            return EditOutcome()
        batch = select_rows(batch, rows, self.kind)
        t0 = time.perf_counter()
        causal = self._causal(batch)
        # 1) keys (and warm values): run the model up to the wrapped layer only.
        with self._context(make_context(batch, causal), "capture"), torch.no_grad():
            try:
                self.base_model(**batch)
            except _StopForward:
                pass
        cap = self.codebook.captured
        self.codebook.captured = {}
        if "keys" not in cap:
            raise ConfigError(f"GRACE layer {self.layer_name} was not reached by the forward pass")
        # 2) codebook rules, one example at a time (later examples see earlier ones).
        means = label_means(batch, self.kind)
        entries: list[int] = []
        for i, label in enumerate(label_rows(batch["labels"])):
            j, rule = self.codebook.add_or_update(cap["keys"][i], label,
                                                  self._new_value(cap["warm"][i]), means[i])
            entries.append(j)
            log.debug("GRACE edit example %d: %s entry %d", i, rule, j)
        uniq = sorted(set(entries))
        where = {e: r for r, e in enumerate(uniq)}
        dev = self.codebook.values.device
        assign = torch.tensor([where[e] for e in entries], dtype=torch.long, device=dev)
        index = torch.tensor(uniq, dtype=torch.long, device=dev)
        # 3) train only the touched values with Adam; fresh optimizer per edit.
        values = self.codebook.values[index].clone().requires_grad_(True)
        opt = make_optimizer("adam", [values], self.edit_lr)
        # The trained values live in the codebook's hook, not in a module: the blocks below the
        # wrapped layer's block see the same input at every step and run once (the cache).
        prefix = frozen_prefix(self.base_model, self.cache_frozen_prefix, [self.layer_name])
        with self._context(make_context(batch, causal), "train"), torch.enable_grad(), prefix:
            self.codebook.train_values, self.codebook.train_assign = values, assign
            losses = run_steps(opt, self.num_iter, lambda _: Step(self.base_model(**batch).loss),
                               prefix=prefix)
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
        state = {f"grace.{k}": v for k, v in self.codebook.codebook_state().items()}
        state["grace.skipped"] = torch.tensor(self.skipped, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.codebook.load_codebook_state(
            {k[len("grace."):]: v for k, v in state.items() if k.startswith("grace.")})
        self.skipped = int(state.get("grace.skipped", torch.tensor(0)))

    def _meta(self) -> dict[str, Any]:
        cb = self.codebook
        return {"alg": "grace", "layer": self.layer_name, "init_radius": cb.init_radius,
                "replacement": cb.replacement, "key_position": cb.key_position, "key_id": cb.key_id,
                "label_match": cb.label_match, "eps_expand": cb.eps_expand,
                "val_train": cb.val_train, "val_init": self.val_init,
                "edit_lr": self.edit_lr, "num_iter": self.num_iter,
                "error_filter": self.error_filter, "key_dim": cb.in_dim, "value_dim": cb.out_dim,
                "entries": cb.size, "conflicts": cb.conflicts, "skipped": self.skipped}

    def save_pretrained(self, directory: str | Path) -> None:
        write_safetensors(directory, SAFETENSORS_NAME, self.codebook.codebook_state(),
                          self._meta(), CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path,
                        model_cfg: Any = None) -> "GraceEditor":
        """Rebuild an editor around ``model`` from a :meth:`save_pretrained` directory."""
        tensors, meta = read_safetensors(directory, SAFETENSORS_NAME, CONFIG_NAME)
        keys = ("init_radius", "replacement", "key_position", "key_id", "label_match",
                "eps_expand", "val_train", "val_init", "edit_lr", "num_iter", "error_filter")
        alg_cfg = {k: meta[k] for k in keys if k in meta}
        alg_cfg["layer"] = meta["layer"]
        editor = cls(model, alg_cfg, model_cfg)
        editor.codebook.load_codebook_state(tensors)
        editor.skipped = int(meta.get("skipped", 0))
        return editor
