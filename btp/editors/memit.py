"""MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023) as an editor.

Written from the paper (Section 4, Algorithm 1) and the behaviour of its authors' code (read, not
copied). One edit batch (``memit.batch_size`` facts; null = ``num_edit_per_block``) is one MEMIT
call; sequential batches update the weights in place, one call after another.

For each fact ``i`` of the batch (prompt ``p_i`` -> target ``o_i``):

1. **Target hidden state** ``z_i`` at the last edited layer ``L``: the output of block ``L`` (the
   residual stream) at the key token, plus a vector ``delta_i`` found by Adam (``v_lr``,
   ``v_num_grad_steps`` iterations, stopping when the loss is below 0.05) that makes the model
   predict ``o_i`` after ``p_i`` under every context template (``"{}"`` and prefixes the model
   generated itself, :func:`btp.editors.lm_edit.context_templates`): loss = mean over templates of
   the target tokens' mean negative log-likelihood + ``v_weight_decay * ||delta|| / ||h||^2``;
   ``||delta||`` is clamped to ``clamp_norm_factor * ||h||`` after every step (``h``: the
   unedited hidden state of the plain prompt).
2. **Spread over the layers** ``l_1 < ... < l_k = L`` (``memit.layers``, else ``model.memit_layers``,
   else the family's layers, :func:`btp.editors.lm_edit.default_memit_layers`), lowest first: the
   keys ``K`` (inputs of the layer's FFN output projection at the key token, averaged over the
   templates) and the current hidden states at ``L`` give the residual
   ``R = (Z - H_L) / (k - j)`` for the j-th layer, and the layer's weight moves by the
   least-squares update

       Delta = R K^T (lambda C + K K^T)^{-1},

   ``C = E[k k^T]`` the layer's key second moment over a text corpus and ``lambda`` =
   ``mom2_update_weight``. The solve is in float64.

The key token is the last token of the prompt (ROME/MEMIT's ``fact_token=last``): the task records
carry no subject span, so the paper's ``subject_last`` token and the KL term on
"{subject} is a" are not available (README lists this difference).

**Layer statistics.** ``C`` is computed from text (``memit.stats_corpus``, relative to ``data_dir``;
the shipped OpenWebText sample by default, any folder of ``*.txt``, ``.jsonl`` or ``.txt`` file
otherwise): the first ``stats_n_samples`` documents, each cut to ``stats_max_length`` tokens (null:
the model's context length), every real token's key. It is cached as safetensors in
``memit.stats_dir`` (null: ``$MESGD_CACHE/layer_stats``, i.e. ``~/.cache/mesgd/layer_stats``), one
file per layer, named by model, layer, corpus fingerprint, sample count, length and a hash of
the layer's weights, and reused by every later run (:func:`layer_second_moments`).

Checkpoints hold the edited layers' weights and the context templates (strings as bytes);
``save_pretrained`` writes the edited weights as the model names them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from btp.editors.base import EditOutcome, Editor, register_editor
from btp.editors.common import (cfg_get, model_device, model_inputs, model_kind,
                                read_safetensors, to_device, write_safetensors)
from btp.editors.lm_edit import (Capture, add_at_positions, add_out_in, block_of, corpus_tag,
                                 context_templates, decode_facts, default_memit_layers,
                                 last_prompt_positions, linear_module, read_corpus,
                                 strings_to_tensor, templated_batch, tensor_to_strings,
                                 weight_fingerprint)
from btp.editors.optim import Step, make_optimizer, run_steps
from btp.errors import ConfigError
from btp.schema import MemitCfg, read_section
from btp.tasks import fact_tasks, names_phrase
from peft_melo.prefix_cache import FrozenPrefixCache

log = logging.getLogger(__name__)

WEIGHTS_NAME = "edited_weights.safetensors"
CONFIG_NAME = "edit_config.json"
#: MEMIT's context templates: one 10-token continuation (seed word included) of each seed word,
#: sampled from the 5 most likely tokens, followed by ". " and the prompt.
MEMIT_SEEDS = ("The", "Therefore", "Because", "I", "You")
MEMIT_TEMPLATE_LENGTHS = (10,)
MEMIT_TOP_K = 5
#: The loss under which the search for delta stops early (MEMIT's compute_z).
Z_LOSS_STOP = 5e-2
#: Documents per forward when computing the layer statistics.
STATS_BATCH = 4


class _StopForward(Exception):
    """Raised once the highest captured layer has been seen: nothing above it is needed."""


def model_context_length(model: nn.Module, default: int = 1024) -> int:
    """The model's context length (``max_position_embeddings`` / ``n_positions``)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


@torch.no_grad()
def second_moments(model: nn.Module, tokenizer: Any, texts: Sequence[str],
                   layer_names: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """``E[k k^T]`` over every real token of ``texts`` of each layer's input ``k``.

    Returns:
        ``{layer name: [d_in, d_in] float32}``, plus ``"count"`` (tokens seen, a 0-d tensor).
    """
    device = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    order = {n: i for i, n in enumerate(n for n, _ in model.named_modules())}
    top = max(layer_names, key=lambda n: order[n])
    for start in range(0, len(texts), STATS_BATCH):
        chunk = list(texts[start:start + STATS_BATCH])
        enc = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), int(tokenizer.pad_token_id or 0), dtype=torch.long)
        am = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            am[i, : len(e)] = 1
        ids, am = ids.to(device), am.to(device)
        cap = Capture(model, layer_names, "input")

        def stop(mod: nn.Module, args: tuple, output: Any) -> None:
            raise _StopForward

        handle = None
        with cap:
            handle = model.get_submodule(top).register_forward_hook(stop)
            try:
                model(input_ids=ids, attention_mask=am)
            except _StopForward:
                pass
            finally:
                handle.remove()
        real = am.bool()
        for name in layer_names:
            k = cap.values[name][real].float()  # [tokens, d_in]
            s = k.T @ k
            sums[name] = s if name not in sums else sums[name] + s
        count += int(real.sum())
    if count == 0:
        raise ConfigError("the statistics corpus gave no tokens; point memit.stats_corpus at "
                          "a folder or file with text")
    out = {name: (s / count).float() for name, s in sums.items()}
    out["count"] = torch.tensor(count)
    return out


def stats_cache_dir(stats_dir: str | None) -> Path:
    """Where layer statistics are cached: ``stats_dir``, else ``$MESGD_CACHE/layer_stats``."""
    if stats_dir:
        return Path(stats_dir).expanduser()
    from btp.packaged_models import cache_root

    return cache_root() / "layer_stats"


def layer_second_moments(model: nn.Module, tokenizer: Any, layer_names: Sequence[str], *,
                         model_name: str, corpus: Path, n_samples: int,
                         max_length: int | None, stats_dir: str | None) -> dict[str, torch.Tensor]:
    """Each layer's ``E[k k^T]`` (float32, on the model's device), read from the cache when a
    file for the same model, layer weights, corpus, sample count and length is there, else
    computed (:func:`second_moments`) and written there for the next run."""
    length = int(max_length or model_context_length(model))
    folder = stats_cache_dir(stats_dir) / str(model_name).replace("/", "--")
    tag = corpus_tag(corpus)
    files = {}
    for name in layer_names:
        fp = weight_fingerprint([linear_module(model, name).weight])
        files[name] = folder / f"{name}.{tag}.n{n_samples}.len{length}.{fp}.safetensors"
    out: dict[str, torch.Tensor] = {}
    missing = [n for n, f in files.items() if not f.is_file()]
    device = model_device(model)
    if missing:
        t0 = time.perf_counter()
        texts = read_corpus(corpus, n_samples)
        stats = second_moments(model, tokenizer, texts, missing, length)
        log.info("layer statistics of %d layer(s) from %d documents (%d tokens) of %s in %.1f s",
                 len(missing), len(texts), int(stats["count"]), corpus, time.perf_counter() - t0)
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        for name in missing:
            tmp = files[name].with_name(f".{files[name].name}.tmp-{os.getpid()}")
            save_file({"mom2": stats[name].cpu().contiguous(), "count": stats["count"]},
                      str(tmp), metadata={"corpus": str(corpus), "layer": name})
            os.replace(tmp, files[name])
            out[name] = stats[name].to(device)
    for name in layer_names:
        if name not in out:
            from safetensors.torch import load_file

            out[name] = load_file(str(files[name]))["mom2"].to(device)
            log.info("layer statistics of %s read from %s", name, files[name])
    return out


def memit_delta(resid: torch.Tensor, keys: torch.Tensor, mom2: torch.Tensor,
                mom2_weight: float) -> torch.Tensor:
    """MEMIT's least-squares update of one layer.

    Args:
        resid: ``[n, d_out]``, the part of each fact's target this layer must write.
        keys: ``[n, d_in]``, each fact's key at this layer.
        mom2: ``[d_in, d_in]``, ``E[k k^T]`` of the preserved keys.
        mom2_weight: ``lambda``.

    Returns:
        ``Delta = R^T-shaped [d_out, d_in] = resid^T (lambda C + K^T K)^{-1} K`` (float64 solve,
        returned in float32): the smallest change (in the ``C`` metric) that adds ``resid`` to
        the layer's output for each key.
    """
    k = keys.double()
    a = mom2_weight * mom2.double() + k.T @ k
    adj = torch.linalg.solve(a, k.T)  # [d_in, n]
    return (resid.double().T @ adj.T).float()


@register_editor("memit")
class MemitEditor(Editor):
    """MEMIT: closed-form updates of the FFN output projections of a range of layers."""

    #: The section name in messages (AlphaEdit shares this class's steps) and its dataclass.
    section = "memit"
    section_cls: type[MemitCfg] = MemitCfg

    def __init__(self, model: nn.Module, alg_cfg: Any, model_cfg: Any,
                 upstream_batches: Callable[[], Any] | None = None, **_: Any) -> None:
        super().__init__(model, alg_cfg, model_cfg, upstream_batches)
        if model_kind(model) != "causal_lm":
            raise ConfigError(f"{self.name} edits decoder-only LMs (+experiment="
                              f"{names_phrase(fact_tasks())}); model "
                              f"'{cfg_get(model_cfg, 'name', '?')}' is {model_kind(model)}")
        self.settings = p = read_section(self.section_cls, alg_cfg)
        layers = p.layers or cfg_get(model_cfg, "memit_layers")
        self.layers = [str(x) for x in layers] if layers else default_memit_layers(model)
        self.modules = {n: linear_module(model, n) for n in self.layers}
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        self.layers.sort(key=lambda n: order[n])
        self.z_block = block_of(self.layers[-1])
        self.v_num_grad_steps = p.v_num_grad_steps
        self.v_lr = p.v_lr
        self.v_weight_decay = p.v_weight_decay
        self.clamp_norm_factor = p.clamp_norm_factor
        self.mom2_update_weight = p.mom2_update_weight
        self.use_templates = p.context_templates
        self.stats_n_samples = p.stats_n_samples
        self.stats_max_length = p.stats_max_length
        self.model_name = str(cfg_get(model_cfg, "name", type(model).__name__))
        self.mom2: dict[str, torch.Tensor] = {}
        self.templates: list[str] = ["{}"]
        self.tokenizer: Any = None
        log.info("%s edits %s (z at %s)", self.name, ", ".join(self.layers), self.z_block)

    # -- text: statistics and templates ------------------------------------------------------
    def attach_tokenizer(self, tokenizer: Any, data_dir: Path) -> None:
        """Read (or compute and cache) the layers' key statistics and build the templates."""
        self.tokenizer = tokenizer
        corpus = Path(self.settings.stats_corpus).expanduser()
        if not corpus.is_absolute():
            corpus = Path(data_dir) / corpus
        if not corpus.exists():
            raise ConfigError(f"{self.section}.stats_corpus: {corpus} does not exist; point it at "
                              "a folder of *.txt documents, a .jsonl of {\"text\": ...} lines or a "
                              ".txt file (relative paths are under data_dir)")
        self.mom2 = layer_second_moments(
            self.base_model, tokenizer, self.layers, model_name=self.model_name, corpus=corpus,
            n_samples=self.stats_n_samples, max_length=self.stats_max_length,
            stats_dir=self.settings.stats_dir)
        if self.use_templates:
            gen = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
            self.templates = context_templates(self.base_model, tokenizer, MEMIT_SEEDS,
                                               MEMIT_TEMPLATE_LENGTHS, ". ", top_k=MEMIT_TOP_K,
                                               generator=gen, count_seed=True)
        self.on_stats()

    def on_stats(self) -> None:
        """Called once the statistics are there (AlphaEdit builds its projections)."""

    def _need_text(self) -> None:
        if self.tokenizer is None or not self.mom2:
            raise RuntimeError(f"{self.name}: attach_tokenizer() must run before editing")

    # -- the three quantities of the update ----------------------------------------------------
    def _rows(self, facts: list[tuple[str, str]], templates: Sequence[str]
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        batch, owner = templated_batch(self.tokenizer, facts, templates)
        batch = to_device(batch, model_device(self.base_model))
        return batch, owner, last_prompt_positions(batch)

    @torch.no_grad()
    def keys_at(self, facts: list[tuple[str, str]], layers: Sequence[str]
                ) -> dict[str, torch.Tensor]:
        """``{layer: [n, d_in]}``: each fact's key at each layer (one forward), averaged over
        the templates."""
        batch, owner, pos = self._rows(facts, self.templates)
        with Capture(self.base_model, layers, "input") as cap:
            self.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rows = torch.arange(len(pos), device=pos.device)
        n = len(facts)
        out = {}
        for layer in layers:
            k = cap.values[layer][rows, pos].float()  # [rows, d_in]
            mean = torch.zeros(n, k.shape[1], device=k.device)
            mean.index_add_(0, owner.to(k.device), k)
            out[layer] = mean / torch.bincount(owner, minlength=n).to(k.device).unsqueeze(1)
        return out

    def keys(self, facts: list[tuple[str, str]], layer: str) -> torch.Tensor:
        """``[n, d_in]``: each fact's key at ``layer``, averaged over the templates."""
        return self.keys_at(facts, [layer])[layer]

    @torch.no_grad()
    def hidden_at_z(self, facts: list[tuple[str, str]]) -> torch.Tensor:
        """``[n, d]``: the output of block ``L`` at the key token of each plain prompt."""
        batch, _, pos = self._rows(facts, ["{}"])
        with Capture(self.base_model, [self.z_block], "output") as cap:
            self.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rows = torch.arange(len(pos), device=pos.device)
        return cap.values[self.z_block][rows, pos].float()

    def target(self, fact: tuple[str, str]) -> tuple[torch.Tensor, list[float]]:
        """``z`` ``[d]`` for one fact (step 1 of the module docstring) and the losses."""
        batch, _, pos = self._rows([fact], self.templates)
        n_rows = len(pos)
        rows = torch.arange(n_rows, device=pos.device)
        labels = batch["labels"]
        gold = labels[:, 1:]
        mask = (gold != -100).float()
        block = self.base_model.get_submodule(self.z_block)
        with torch.no_grad(), Capture(self.base_model, [self.z_block], "output") as cap:
            self.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        h = cap.values[self.z_block][0, pos[0]].detach().float()  # the plain prompt's state
        delta = torch.zeros_like(h, requires_grad=True)
        opt = make_optimizer("adam", [delta], self.v_lr)
        max_norm = self.clamp_norm_factor * h.norm()
        last = self.v_num_grad_steps - 1

        def forward(step: int) -> Step:
            logits = self.base_model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            tok = logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll = (-(tok * mask).sum(1) / mask.sum(1)).mean()
            loss = nll + self.v_weight_decay * (delta.norm() / h.norm() ** 2)
            value = float(loss.detach())
            # As MEMIT: stop once the loss is small; the last iteration only measures.
            return Step(loss, value=value, stop=value < Z_LOSS_STOP or step == last)

        def clamp() -> None:
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())

        # Blocks below L see the same input at every step: they run once.
        with torch.enable_grad(), add_at_positions(block, rows, pos, delta), \
                FrozenPrefixCache(self.base_model, [self.z_block]) as prefix:
            losses = run_steps(opt, self.v_num_grad_steps, forward, prefix=prefix,
                               after_update=clamp)
        return (h + delta.detach()), losses

    # -- the update ---------------------------------------------------------------------------
    def layer_delta(self, j: int, layer: str, keys: torch.Tensor,
                    resid: torch.Tensor) -> torch.Tensor:
        """``[d_out, d_in]`` change of ``layer`` (MEMIT's; AlphaEdit overrides)."""
        return memit_delta(resid, keys, self.mom2[layer], self.mom2_update_weight)

    def after_batch(self, facts: list[tuple[str, str]]) -> None:
        """Called after a batch has updated every layer (AlphaEdit keeps the keys)."""

    def edit(self, batch: dict[str, torch.Tensor]) -> EditOutcome:
        self._need_text()
        t0 = time.perf_counter()
        facts = decode_facts(model_inputs(batch), self.tokenizer)
        losses: list[float] = []
        zs = []
        for fact in facts:
            z, fl = self.target(fact)
            zs.append(z)
            losses.extend(fl)
        z_all = torch.stack(zs)  # [n, d]
        for j, layer in enumerate(self.layers):
            keys = self.keys(facts, layer)
            resid = (z_all - self.hidden_at_z(facts)) / (len(self.layers) - j)
            add_out_in(self.modules[layer], self.layer_delta(j, layer, keys, resid))
        self.after_batch(facts)
        return EditOutcome(losses=losses, time_s=time.perf_counter() - t0)

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"w.{n}": m.weight.detach().clone() for n, m in self.modules.items()}
        state["templates"] = strings_to_tensor(self.templates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.modules if f"w.{n}" not in state]
        if missing:
            raise ConfigError(f"{self.name} state lacks {missing[:3]}: resume with the same model "
                              f"and {self.section}.layers")
        with torch.no_grad():
            for n, m in self.modules.items():
                m.weight.copy_(state[f"w.{n}"].to(m.weight))
        if "templates" in state:
            self.templates = tensor_to_strings(state["templates"])

    def _meta(self) -> dict[str, Any]:
        return {"alg": self.name, "layers": self.layers, "z_block": self.z_block,
                "v_num_grad_steps": self.v_num_grad_steps, "v_lr": self.v_lr,
                "v_weight_decay": self.v_weight_decay,
                "clamp_norm_factor": self.clamp_norm_factor,
                "mom2_update_weight": self.mom2_update_weight, "templates": self.templates}

    def save_pretrained(self, directory: str | Path) -> None:
        """The edited weights (named as in the model's state_dict) + ``edit_config.json``."""
        write_safetensors(directory, WEIGHTS_NAME,
                          {f"{n}.weight": m.weight for n, m in self.modules.items()},
                          self._meta(), CONFIG_NAME)

    @staticmethod
    def load_weights(model: nn.Module, directory: str | Path) -> list[str]:
        """Put saved edited weights into ``model`` (same architecture); returns their names."""
        tensors, _ = read_safetensors(directory, WEIGHTS_NAME, CONFIG_NAME)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(params[k]))
        return sorted(tensors)


__all__ = ["MemitEditor", "memit_delta", "layer_second_moments", "second_moments"]
