"""WISE (Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
Language Models", NeurIPS 2024) as an editor.

Written from the paper (Section 2.3) and the behaviour of its authors' implementation in
EasyEdit (read, not copied).

**Memories.** The *main memory* is one FFN matrix of the frozen model (``wise.layer``, else
``model.wise_layer``, else the family's layer of the authors' configs,
:func:`btp.editors.lm_edit.default_wise_layer`: ``model.layers.27.mlp.down_proj`` of a 32-layer
Llama). It is never written: its module keeps its weights bit for bit. The *side memory* starts as
a copy of it; every edit trains only the side memory.

**Knowledge shards.** The stream is cut into shards of ``save_freq`` edits. A shard is a copy of
the main memory trained on its edits through a random mask of its entries (each entry kept with
probability ``mask_ratio``, drawn when the shard starts): gradients (and the small weight decay)
outside the mask are zero. After every step the shard is clamped to the main memory
``+- norm_constraint`` entrywise. Every ``merge_freq`` edits the finished shards are merged with
TIES (trim each shard's change to its ``densities`` largest entries, elect the sign of the
weighted sum per entry, average the changes that agree; the earlier merged memory joins the merge
with weight 0.6 against 0.4 shared by the new shards, as the authors' code does) into the side
memory. With ``retrieve`` (WISE-Retrieve) each merged group is kept as its own memory with its own
threshold instead of being merged into one.

**Editing one fact** (prompt -> target; ``wise.batch_size`` facts per edit, 1 as the paper's
sequential editing): the fact under every context template (``"{}"`` and 10 greedy continuations
of 5 seed words, 5 and 10 tokens long, as the authors build them) plus one irrelevant passage
(the next sentence-sized passage of ``irrelevant_corpus``, in order) go through the model with the
side memory in place of the main memory, ``num_iter`` steps of SGD (``edit_lr``) on

    L = NLL(target | prompt) + ReLU(a_irr - alpha) + ReLU(beta - a_edit)
        + ReLU(gamma - (a_edit - a_irr)),

``a(x) = ||A(x) (W_side - W_main)||``, the routing activation: the norm of the change the side
memory makes to the layer's output, per token, averaged over the input's real tokens (``A(x)`` the
layer's input). Margins ``alpha, beta, gamma`` = ``act_margin``. The steps stop early when the
loss is below 0.02 and moved less than 1e-4 (the authors' stop). The edit's activation at its last
step is recorded; the routing threshold is ``act_ratio`` times the smallest recorded activation.

What a step computes is only what the loss reads, so that a step costs a forward and backward
of the edit rows through the blocks from the side memory's up: the blocks below it run once per
edit (the frozen-prefix cache); the output head runs at the target positions only; the
irrelevant passage needs only ``a_irr``, which depends on the layer's input (computed below the
side memory, the same at every step, captured by one forward per edit) and the side memory.
The losses and the side memory are those of the whole batch's forward up to float rounding.

**Inference.** Per input row: ``a(x)`` of the side memory; above the threshold the row gets the
side memory's output at this layer, else the main memory's output, bit for bit. Before the first
merge the side memory is the current shard; once shards are waiting to be merged, inference uses
their TIES merge (with the current shard), computed without changing the editing state (the
authors' code merges them for good at evaluation). In ``generate`` the prompt forward decides per
row and the cached one-token steps follow that decision.

Checkpoints hold the shards, masks, merged memories, counters and thresholds, and the context
templates (strings as bytes); ``save_pretrained`` writes the side memories and the routing values.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from btp.editors.base import EditOutcome, Editor, register_editor
from btp.editors.common import (cfg_get, model_device, model_inputs, model_kind, to_device,
                                write_safetensors)
from btp.editors.lm_edit import (Capture, context_templates, decode_facts, default_wise_layer,
                                 head_at, linear_module, linear_with, passages, read_corpus,
                                 strings_to_tensor, templated_batch, tensor_to_strings)
from btp.editors.optim import Step, make_optimizer, run_steps
from btp.errors import ConfigError
from btp.schema import WiseCfg, read_section
from btp.tasks import fact_tasks, names_phrase
from peft_melo.prefix_cache import FrozenPrefixCache

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "wise_memory.safetensors"
CONFIG_NAME = "wise_config.json"
#: The authors' context templates: greedy continuations of these seeds, 5 and 10 new tokens.
WISE_SEEDS = ("I", "You", "Because", "Yes", "Q: ")
WISE_TEMPLATE_LENGTHS = (5, 10)
#: The authors' early stop: loss at most this and changed by at most STOP_DELTA.
STOP_LOSS = 0.02
STOP_DELTA = 1e-4
#: The authors' merge weights once a merged memory exists: old memory vs the new shards.
OLD_MEMORY_WEIGHT = 0.6
#: Irrelevant passages are cut to this many tokens.
IRRELEVANT_MAX_TOKENS = 64


def ties_merge(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
               density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al., NeurIPS 2023) of ``models`` around ``base``.

    Each change ``tau_j = model_j - base`` keeps its ``density`` fraction of largest-magnitude
    entries (trim); per entry the sign of ``sum_j w_j tau_j`` is elected; the changes that agree
    with it (non-zero, same sign) are averaged with their weights (disjoint mean).

    Returns:
        ``base + merged change`` (same shape and dtype as ``base``).
    """
    taus = []
    for m in models:
        tau = (m.float() - base.float())
        k = int(round(density * tau.numel()))
        if k <= 0:
            tau = torch.zeros_like(tau)
        elif k < tau.numel():
            cut = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
            tau = torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))
        taus.append(tau)
    stack = torch.stack(taus)  # [m, *shape]
    w = torch.tensor(list(weights), dtype=stack.dtype, device=stack.device)
    w = w.view(-1, *([1] * (stack.dim() - 1)))
    sign = torch.sign((stack * w).sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    num = (stack * w * agree).sum(0)
    den = (w * agree).sum(0)
    merged = torch.where(den != 0, num / den.clamp(min=1e-12), torch.zeros_like(num))
    return (base.float() + merged).to(base.dtype)


@dataclass
class _Route:
    """What the hook needs beyond the layer input: the real-token mask and the mode."""

    attention_mask: torch.Tensor | None = None
    mode: str = "infer"  # infer | edit | off
    generating: bool = False
    decision: torch.Tensor | None = None  # [n] memory index per row (-1: main), from the prompt
    acts: torch.Tensor | None = None  # edit mode: [n] routing activation per row


class WiseSideMemory:
    """The side memory of one layer and its routing, attached through a forward hook (the
    module tree and its weights stay as they are)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.route = _Route()
        self.shard: torch.Tensor | None = None  # trainable in edit mode
        # Inference memories: [(weight in the layer's layout, threshold)].
        self.memories: list[tuple[torch.Tensor, float]] = []
        self._main: torch.Tensor | None = None
        self._handle = layer.register_forward_hook(self._hook)

    def remove(self) -> None:
        self._handle.remove()

    def delta_out(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``A(x) (W - W_main)``: the change a memory makes to the layer's output."""
        if self._main is None:  # the main memory never changes: one fp32 copy
            self._main = self.layer.weight.detach().float()
        # The difference in fp32, then the input's dtype: a bf16 subtraction would round small
        # changes of the side memory away.
        diff = (weight.float() - self._main.to(weight.device)).to(x.dtype)
        return linear_with(self.layer, x, diff, with_bias=False)

    def activation(self, delta: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[n]``: the per-token norm of ``delta`` ``[n, L, d]`` averaged over real tokens
        (``attention_mask`` ``[n, L]``, else the routing context's; none: every token)."""
        norms = delta.float().norm(dim=-1)  # [n, L]
        am = attention_mask if attention_mask is not None else self.route.attention_mask
        if am is None or am.shape != norms.shape:
            return norms.mean(1)
        m = am.to(norms.device).float()
        return (norms * m).sum(1) / m.sum(1).clamp(min=1.0)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        r = self.route
        x = args[0]
        if r.mode == "off":
            return None
        if r.mode == "edit":
            assert self.shard is not None
            delta = self.delta_out(x, self.shard)
            r.acts = self.activation(delta)
            return output + delta.to(output.dtype)
        if not self.memories:
            return None
        if r.generating and r.decision is not None:
            choice = r.decision  # cached one-token steps follow the prompt's decision
        else:
            with torch.no_grad():
                acts = torch.stack([self.activation(self.delta_out(x, w))
                                    for w, _ in self.memories], 1)  # [n, m]
                thr = torch.tensor([t for _, t in self.memories], device=acts.device)
                passed = acts > thr
                masked = torch.where(passed, acts, torch.full_like(acts, -math.inf))
                best = masked.argmax(1)
                choice = torch.where(passed.any(1), best, torch.full_like(best, -1))
            if r.generating:
                r.decision = choice
        if not bool((choice >= 0).any()):
            return None
        out = output
        for j, (w, _) in enumerate(self.memories):
            rows = (choice == j).to(output.device)
            if bool(rows.any()):
                side = output + self.delta_out(x, w).to(output.dtype)
                out = torch.where(rows.view(-1, *([1] * (output.dim() - 1))), side, out)
        return out


@register_editor("wise")
class WiseEditor(Editor):
    """WISE: a side memory with activation routing, knowledge shards merged with TIES."""

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **_: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches)
        if model_kind(model) != "causal_lm":
            raise ConfigError(f"wise edits decoder-only LMs (+experiment="
                              f"{names_phrase(fact_tasks())}); "
                              f"model '{cfg_get(model_cfg, 'name', '?')}' is {model_kind(model)}")
        self.settings = p = read_section(WiseCfg, alg_cfg)
        self.layer_name = str(p.layer or cfg_get(model_cfg, "wise_layer")
                              or default_wise_layer(model))
        self.layer = linear_module(model, self.layer_name)
        self.mask_ratio = p.mask_ratio
        self.edit_lr = p.edit_lr
        self.num_iter = p.num_iter
        self.norm_constraint = p.norm_constraint
        margins = list(p.act_margin)
        if len(margins) != 3:
            raise ConfigError(f"wise.act_margin must be [alpha, beta, gamma], got {margins}")
        self.alpha, self.beta, self.gamma = margins
        self.act_ratio = p.act_ratio
        self.save_freq = p.save_freq
        self.merge_freq = p.merge_freq
        if self.merge_freq % self.save_freq:
            raise ConfigError(f"wise.merge_freq ({self.merge_freq}) must be a multiple of "
                              f"wise.save_freq ({self.save_freq})")
        self.densities = p.densities
        self.merge_weight = p.weights
        self.weight_decay = p.weight_decay
        self.retrieve = p.retrieve
        self.use_templates = p.context_templates
        self.base_seed = int(torch.initial_seed()) % 2**31
        w0 = self.layer.weight
        # Editing state (everything in state_dict):
        self.count = 0  # edits so far
        self.shard_edits = 0  # edits in the current shard
        self.shard = w0.detach().clone().float()
        self.mask: torch.Tensor | None = None
        self.shard_min_act = math.inf  # smallest edit activation of the current shard
        self.min_act = math.inf  # of every edit (WISE-Merge's threshold)
        self.saved: list[tuple[torch.Tensor, float]] = []  # finished shards, not merged yet
        self.merged: list[tuple[torch.Tensor, float]] = []  # merged memories (one unless retrieve)
        self.templates: list[str] = ["{}"]
        self.tokenizer: Any = None
        self.irrelevant: list[str] = []
        self.side = WiseSideMemory(self.layer)
        self._stale = True
        log.info("wise: side memory of %s (mask_ratio %g, %d steps at lr %g, margins %s, "
                 "act_ratio %g, save/merge every %d/%d edits%s)", self.layer_name,
                 self.mask_ratio, self.num_iter, self.edit_lr, margins, self.act_ratio,
                 self.save_freq, self.merge_freq, ", retrieve" if self.retrieve else "")

    # -- text ---------------------------------------------------------------------------------
    def attach_tokenizer(self, tokenizer: Any, data_dir: Path) -> None:
        """Irrelevant passages from ``irrelevant_corpus`` and the context templates."""
        self.tokenizer = tokenizer
        corpus = Path(self.settings.irrelevant_corpus).expanduser()
        if not corpus.is_absolute():
            corpus = Path(data_dir) / corpus
        if not corpus.exists():
            raise ConfigError(f"wise.irrelevant_corpus: {corpus} does not exist; point it at a "
                              "folder of *.txt documents, a .jsonl of {\"text\": ...} lines or a "
                              ".txt file (relative paths are under data_dir)")
        self.irrelevant = passages(read_corpus(corpus))
        if not self.irrelevant:
            raise ConfigError(f"wise.irrelevant_corpus: {corpus} has no passage of 5 words or "
                              "more")
        if self.use_templates:
            with self._mode("off"):
                self.templates = context_templates(self.base_model, tokenizer, WISE_SEEDS,
                                                   WISE_TEMPLATE_LENGTHS, " ")

    # -- routing context ------------------------------------------------------------------------
    @contextmanager
    def _mode(self, mode: str, attention_mask: torch.Tensor | None = None,
              generating: bool = False) -> Iterator[_Route]:
        old = self.side.route
        self.side.route = _Route(attention_mask=attention_mask, mode=mode, generating=generating)
        try:
            yield self.side.route
        finally:
            self.side.route = old

    def _threshold(self, min_act: float) -> float:
        return self.act_ratio * min_act if math.isfinite(min_act) else math.inf

    def _refresh(self) -> None:
        """The inference memories for the current state (see the module docstring)."""
        if not self._stale:
            return
        w0 = self.layer.weight.detach()
        current = [(self.shard, self.shard_min_act)] if self.shard_edits else []
        if self.retrieve:
            mems = [(w, self._threshold(a)) for w, a in self.merged + self.saved + current]
        elif self.count >= self.save_freq and (self.saved or current):
            # Shards waiting for the next merge: evaluate their merge, state unchanged.
            mems = [(self._merge([w for w, _ in self.saved + current]),
                     self._threshold(self.min_act))]
        else:
            mems = [(w, self._threshold(self.min_act)) for w, _ in self.merged + current]
        self.side.memories = [(w.to(w0.device), t) for w, t in mems]
        self._stale = False

    def _merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        w0 = self.layer.weight.detach().float()
        if self.merged and not self.retrieve:
            weights = [0.4 * self.merge_weight / len(shards)] * len(shards) + [OLD_MEMORY_WEIGHT]
            return ties_merge(w0, shards + [self.merged[0][0]], weights, self.densities)
        return ties_merge(w0, shards, [self.merge_weight / len(shards)] * len(shards),
                          self.densities)

    def forward(self, **inputs: torch.Tensor) -> Any:
        self._refresh()
        inputs = self._on_model_device(inputs)
        with torch.no_grad(), self._mode("infer", inputs.get("attention_mask")):
            return self.base_model(**inputs)

    def generate(self, **inputs: Any) -> torch.Tensor:
        self._refresh()
        inputs = self._on_model_device(inputs)
        with torch.no_grad(), self._mode("infer", inputs.get("attention_mask"), generating=True):
            return self.base_model.generate(**inputs)

    def route_rows(self, **inputs: torch.Tensor) -> torch.Tensor:
        """``[n]``: the memory each row is routed to (-1: the main memory), as ``forward``."""
        self._refresh()
        inputs = self._on_model_device(inputs)
        with torch.no_grad(), self._mode("infer", inputs.get("attention_mask"),
                                         generating=True) as r:
            self.base_model(**{k: v for k, v in inputs.items() if k != "labels"})
            return r.decision if r.decision is not None else torch.full(
                (inputs["input_ids"].shape[0],), -1, dtype=torch.long)

    # -- editing ------------------------------------------------------------------------------
    def _new_mask(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.base_seed * 1_000_003 + self.count) % 2**63)
        return torch.rand(self.shard.shape, generator=gen) < self.mask_ratio

    def _irrelevant_input(self) -> torch.Tensor:
        """``[1, L, d_in]``: the side-memory layer's input for this edit's irrelevant passage
        (the next passage of the corpus). It does not depend on the side memory (the layer's
        input is computed below it), so one forward per edit gives it for every step."""
        text = self.irrelevant[self.count % len(self.irrelevant)]
        ids = self.tokenizer(text, truncation=True, max_length=IRRELEVANT_MAX_TOKENS,
                             return_tensors="pt")["input_ids"]
        with torch.no_grad(), self._mode("off"), Capture(self.base_model, [self.layer_name]) as cap:
            self.base_model(input_ids=ids.to(model_device(self.base_model)), use_cache=False)
        return cap.values[self.layer_name].detach()

    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        if self.tokenizer is None:
            raise RuntimeError("wise: attach_tokenizer() must run before editing")
        t0 = time.perf_counter()
        facts = decode_facts(model_inputs(batch), self.tokenizer)
        device = model_device(self.base_model)
        if self.mask is None or self.count % self.save_freq == 0:
            self.mask = self._new_mask()
        mask = self.mask.to(device)
        w0 = self.layer.weight.detach().float()
        shard = self.shard.to(device).requires_grad_(True)
        self.side.shard = shard
        data, _ = templated_batch(self.tokenizer, facts, self.templates)
        data = to_device(data, device)
        n_edit = data["input_ids"].shape[0]
        x_irr = self._irrelevant_input()
        # The target tokens: row, and the position whose logits predict them (one before).
        rows, pos = (data["labels"][:, 1:] != -100).nonzero(as_tuple=True)  # [P] each
        gold = data["labels"][:, 1:][rows, pos]  # [P]
        per_row = torch.bincount(rows, minlength=n_edit).clamp(min=1).float()  # [n_edit]
        opt = make_optimizer("sgd", [shard], self.edit_lr)
        seen: dict[str, Any] = {"act_edit": 0.0, "last": None}

        def forward(step: int) -> Step:
            # Logits of the target positions only (the prompts need none): [1, P, V].
            with head_at(self.base_model, rows, pos):
                logits = self.base_model(input_ids=data["input_ids"],
                                         attention_mask=data["attention_mask"],
                                         use_cache=False).logits
            logp = torch.log_softmax(logits[0].float(), -1)  # [P, V]
            tok = logp.gather(-1, gold.unsqueeze(-1)).squeeze(-1)  # [P]
            # Mean NLL of each row's target tokens, then the mean over the rows.
            nll = -(torch.zeros(n_edit, device=tok.device).index_add(0, rows, tok)
                    / per_row).mean()
            a_edit = r.acts  # [n_edit], set by the hook in this forward
            a_irr = self.side.activation(self.side.delta_out(x_irr, shard))[0]
            act = (torch.relu(a_irr - self.alpha) + torch.relu(self.beta - a_edit)
                   + torch.relu(self.gamma - (a_edit - a_irr))).mean()
            loss = nll + act
            seen["act_edit"] = float(a_edit.detach().mean())
            seen["parts"] = (float(nll.detach()), float(act.detach()), float(a_irr.detach()))
            value, last = float(loss.detach()), seen["last"]
            seen["last"] = value
            # The authors' stop: the loss is small and no longer moves.
            stop = last is not None and abs(last - value) <= STOP_DELTA and value <= STOP_LOSS
            return Step(loss, value=value, stop=stop)

        def mask_grad() -> None:
            # Only the shard's masked entries move: its gradient and its weight decay.
            shard.grad.add_(self.weight_decay * shard.detach())
            shard.grad.mul_(mask)

        def constrain() -> None:
            nc = float(self.norm_constraint)
            shard.copy_(torch.maximum(torch.minimum(shard, w0 + nc), w0 - nc))

        # The blocks below the side memory's see the same input at every step: they run once.
        with torch.enable_grad(), self._mode("edit", data["attention_mask"]) as r, \
                FrozenPrefixCache(self.base_model, [self.layer_name]) as prefix:
            losses = run_steps(opt, self.num_iter, forward, prefix=prefix,
                               before_update=mask_grad,
                               after_update=None if self.norm_constraint is None else constrain)
        act_edit, parts = seen["act_edit"], seen.get("parts")
        self.side.shard = None
        self.shard = shard.detach().requires_grad_(False)
        self.shard_min_act = min(self.shard_min_act, act_edit)
        self.min_act = min(self.min_act, act_edit)
        before = self.count
        self.count += len(facts)
        self.shard_edits += len(facts)
        if self.count // self.save_freq > before // self.save_freq:
            self.saved.append((self.shard.clone(), self.shard_min_act))
            self.shard = w0.clone()
            self.shard_min_act = math.inf
            self.shard_edits = 0
            self.mask = None
        if self.count // self.merge_freq > before // self.merge_freq and self.saved:
            group = self._merge([w for w, _ in self.saved])
            group_act = min(a for _, a in self.saved)
            self.merged = (self.merged + [(group, group_act)]) if self.retrieve else [
                (group, self.min_act)]
            self.saved = []
        self._stale = True
        log.debug("wise edit %d: loss %.4g -> %.4g in %d steps (last: nll %.4g, routing loss "
                  "%.4g, irrelevant activation %.3g), edit activation %.3g (threshold %.3g)",
                  self.count, losses[0], losses[-1], len(losses), *parts, act_edit,
                  self._threshold(self.min_act))
        return EditOutcome(losses=losses, time_s=time.perf_counter() - t0)

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {
            "shard": self.shard.detach().clone(),
            "counters": torch.tensor([self.count, self.shard_edits, self.base_seed],
                                     dtype=torch.long),
            "acts": torch.tensor([self.shard_min_act, self.min_act], dtype=torch.float64),
            "templates": strings_to_tensor(self.templates),
        }
        if self.mask is not None:
            state["mask"] = self.mask.to(torch.uint8)
        for prefix, items in (("saved", self.saved), ("merged", self.merged)):
            for i, (w, a) in enumerate(items):
                state[f"{prefix}.{i}.w"] = w.detach().clone()
                state[f"{prefix}.{i}.act"] = torch.tensor(a, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "shard" not in state or state["shard"].shape != self.layer.weight.shape:
            raise ConfigError("wise state does not fit this model's side-memory layer: resume "
                              "with the same model and wise.layer")
        device = self.layer.weight.device
        self.shard = state["shard"].float().to(device)
        self.count, self.shard_edits, self.base_seed = (int(x) for x in
                                                         state["counters"].tolist())
        self.shard_min_act, self.min_act = (float(x) for x in state["acts"].tolist())
        self.mask = state["mask"].bool() if "mask" in state else None
        self.templates = tensor_to_strings(state["templates"])
        for prefix in ("saved", "merged"):
            items = []
            i = 0
            while f"{prefix}.{i}.w" in state:
                items.append((state[f"{prefix}.{i}.w"].float().to(device),
                              float(state[f"{prefix}.{i}.act"])))
                i += 1
            setattr(self, prefix, items)
        self._stale = True

    def save_pretrained(self, directory: str | Path) -> None:
        """The inference memories (``memory.<i>``, the layer's layout) and ``wise_config.json``
        (layer, thresholds and the settings)."""
        self._refresh()
        tensors = {f"memory.{i}": w for i, (w, _) in enumerate(self.side.memories)}
        meta = {"alg": "wise", "layer": self.layer_name, "edits": self.count,
                "thresholds": [t for _, t in self.side.memories], "act_ratio": self.act_ratio,
                "mask_ratio": self.mask_ratio, "save_freq": self.save_freq,
                "merge_freq": self.merge_freq, "retrieve": self.retrieve,
                "templates": self.templates}
        if not tensors:  # nothing edited: the side memory is the main memory
            tensors = {"memory.0": self.layer.weight}
            meta["thresholds"] = [None]
        write_safetensors(directory, SAFETENSORS_NAME, tensors, meta, CONFIG_NAME)


__all__ = ["WiseEditor", "WiseSideMemory", "ties_merge"]
