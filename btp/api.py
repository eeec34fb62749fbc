"""A Python API for editing facts of a decoder LLM, given as text, without the runner.

    from btp.api import FactEditor
    editor = FactEditor.load("smollm2-135m")          # a config name, a hub id or a local path
    editor.edit([("The mother tongue of Danielle Darrieux is", "English")])
    editor.generate("The mother tongue of Danielle Darrieux is", max_new_tokens=2)
    editor.save("my_edit")                            # adapter/ + run_config.json
    again = FactEditor.from_run("my_edit")           # or a finished run directory of run.py

The model is one of ``config/model/*.yaml`` (with its values in ``config/values/model/``, e.g.
the demo values of a ``tiny-*`` stand-in) or any causal LM of a known family
(:mod:`btp.families`) by hub id or local path, whose layers come from
:meth:`btp.families.Family.default_layers`. The method is any
registered editor (``melo`` by default; ``grace``, ``ft``, ``ft_ewc``, ``plain_lora``, ...), with
the hyperparameters of ``config/values/experiment/counterfact.yaml`` (the fact-editing values)
and the model's values, then ``settings``. A fact is edited as the runner edits one
(:func:`btp.data.facts.fact_batch`), one fact per edit unless ``facts_per_edit`` says otherwise.

Default for MELO that differs from the experiment files: ``key_position=last_prompt``, the last
prompt token, so that a fact edited as ``prompt target`` is found again when its prompt is asked
alone (the faithful key, position -1 of the padded batch, and ``last_real`` both take their key
after the target, which a question does not contain).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from btp.errors import ConfigError, ModelLoadError, RunDirError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
#: The experiment whose hyperparameters the API starts from (fact editing on decoder LLMs).
FACT_EXPERIMENT = "counterfact"
#: What an API-saved directory holds besides ``adapter/`` and ``run_config.json`` (methods other
#: than MELO: the editor's state, which its ``save_pretrained`` form cannot be loaded from).
EDITOR_STATE = "editor_state.safetensors"
#: MELO's defaults in the API (see the module docstring).
API_DEFAULTS = {"melo": {"key_position": "last_prompt"}}
#: ``+alg=`` file of a method whose file name differs from its editor name.
_ALG_FILES = {"melo": "lora"}

Fact = tuple[str, str] | dict[str, str]


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # called from inside a Hydra app
        return compose("config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def _model_section_for(source: str) -> dict[str, Any]:
    """A model section for a hub id or local path: the family's default layers."""
    import transformers

    from btp.families import family_of_model_type
    from btp.models import _hub_reachable, _offline

    local = Path(source).expanduser().exists()
    try:
        config = transformers.AutoConfig.from_pretrained(
            source, local_files_only=_offline() or (not local and not _hub_reachable()))
    except Exception as e:  # noqa: BLE001 - any hub/IO failure means the same to the user
        raise ModelLoadError(f"'{source}' is neither a config name in {CONFIG_DIR / 'model'} nor a "
                             f"checkpoint that can be read ({type(e).__name__}); give a local "
                             "folder, a reachable hub id, or one of those names") from e
    family = family_of_model_type(config.model_type)
    if family is None or family.kind != "causal_lm":
        raise ConfigError(f"'{source}' is a {config.model_type} model; the API edits causal LMs of "
                          "the families in btp/families.py (Llama, Mistral, Qwen2, GPT-J, GPT-2)")
    targets, key = family.default_layers(int(getattr(config, family.layers_attr)))
    return {"name": Path(source).name or source, "kind": "causal_lm", "pretrained": source,
            "target_modules": targets, "grace_layer": key, "grace_baseline_layer": key}


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except Exception as e:  # noqa: BLE001 - omegaconf's key/type errors
        raise ConfigError(f"setting {key}={value!r}: {e}".splitlines()[0]) from e


class FactEditor:
    """A model and an editing method, to edit facts given as text and ask questions.

    Build it with :meth:`load` (a fresh model) or :meth:`from_run` (a saved edit or run).

    Attributes:
        cfg: the resolved configuration (the runner's form; ``save`` writes it).
        model: the frozen base model; tokenizer: its tokenizer; editor: the method
            (a :class:`btp.editors.base.Editor`); device: where the model runs.
    """

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, tokenizer: Any, editor: Any,
                 device: torch.device) -> None:
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.editor = editor
        self.device = device
        self.n_edits = 0

    # ------------------------------------------------------------------ building
    @classmethod
    def load(cls, model: str, method: str = "melo", *, settings: dict[str, Any] | None = None,
             device: str = "auto", dtype: str | None = None, seed: int = 0,
             facts_per_edit: int = 1) -> "FactEditor":
        """Load ``model`` and wrap it with ``method``.

        Args:
            model: a name in ``config/model`` (``smollm2-135m``, ``tiny-llama``, ``llama2-7b``,
                ...), a hub id or a local checkpoint folder.
            method: a registered editor: ``melo`` (or ``lora``), ``grace``, ``ft``, ``ft_ewc``,
                ``plain_lora``, ...
            settings: hyperparameters of the method's section (``{"num_iter": 20}``), or any key
                by its full path (``{"model.dtype": "bf16", "ewc.lambda_": 0.5}``).
            device: ``auto`` (CUDA when present), ``cpu``, ``cuda:N``.
            dtype: the base model's weights (``fp32``, ``bf16``, ``fp16``); None: the config's.
            seed: seeds torch (and a tiny stand-in's init).
            facts_per_edit: facts trained together in one edit (MELO: one block each edit).

        Raises:
            ConfigError: an unknown method, setting or value; ModelLoadError: a model that
                cannot be loaded (the message says what to set).
        """
        from btp.editors import EDITORS
        from btp.models import load_model_and_tokenizer
        from btp.runner import pick_device, plain
        from btp.schema import alg_section, check_values

        name = "melo" if method == "lora" else method
        alg_file = _ALG_FILES.get(name, name)
        if name not in EDITORS or not (CONFIG_DIR / "alg" / f"{alg_file}.yaml").is_file():
            raise ConfigError(f"unknown method '{method}'; use one of {sorted(EDITORS)}")
        overrides = [f"+alg={alg_file}", f"+experiment={FACT_EXPERIMENT}"]
        known = (CONFIG_DIR / "model" / f"{model}.yaml").is_file()
        if known:
            overrides.append(f"+model={model}")
        cfg = _compose(overrides)
        if not known:
            for key, value in _model_section_for(model).items():
                _set(cfg, f"model.{key}", value)
        section = {"ft_ewc": "ft"}.get(name, name)
        for key, value in {**API_DEFAULTS.get(name, {}), **(settings or {})}.items():
            _set(cfg, key if "." in key else f"{section}.{key}", value)
        if dtype is not None:
            _set(cfg, "model.dtype", dtype)
        _set(cfg, "num_edit_per_block", int(facts_per_edit))
        _set(cfg, "seed", int(seed))
        _set(cfg, "device", device)
        check_values(cfg)
        if str(cfg.model.kind) != "causal_lm":
            raise ConfigError(f"model '{model}' is a {cfg.model.kind} model; the API edits causal LMs")
        torch.manual_seed(int(seed))
        dev = pick_device(device)
        model_cfg = plain(cfg.model)
        base, tokenizer = load_model_and_tokenizer(model_cfg, dev, seed=int(seed))
        editor = EDITORS[cfg.alg.name](base, plain(alg_section(cfg)), model_cfg, None)
        _attach_tokenizer(editor, tokenizer, cfg)
        log.info("editing %s with %s", cfg.model.name, cfg.alg.name)
        return cls(cfg, base, tokenizer, editor, dev)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> "FactEditor":
        """The edited model of a directory that :meth:`save` or a finished ``run.py`` wrote,
        ready to ask (and to edit further).

        Raises:
            RunDirError: no ``run_config.json`` or no ``adapter/``, an unfinished run, or saved
                files that fail their checks (the file is named).
        """
        from btp import checkpoint as ckpt
        from btp.editors import EDITORS
        from btp.editors.melo import MeloEditor
        from btp.models import load_model_and_tokenizer
        from btp.runner import pick_device, plain
        from btp.schema import alg_section

        run_dir = Path(run_dir)
        config_file = run_dir / "run_config.json"
        if not config_file.is_file() or not (run_dir / "adapter").is_dir():
            raise RunDirError(f"{run_dir} holds no finished edit (run_config.json and adapter/ "
                              "are written by FactEditor.save and by a finished run.py)")
        api_saved = (run_dir / "api.json").is_file()
        if not api_saved and not (run_dir / "summary.json").is_file():
            raise RunDirError(f"{run_dir}: the run is not finished (no summary.json); resume it "
                              "with the same command first")
        from btp.rundir import RunDir

        record = RunDir(run_dir, hydra_subdir=None).read_record() or {}
        cfg = OmegaConf.create(record["config"])
        dev = pick_device(device)
        model_cfg = plain(cfg.model)
        base, tokenizer = load_model_and_tokenizer(model_cfg, dev, seed=int(cfg.seed))
        alg_cfg = plain(alg_section(cfg))
        if cfg.alg.name == "melo":
            editor = MeloEditor.from_pretrained(base, alg_cfg, model_cfg, run_dir / "adapter")
        else:
            editor = EDITORS[cfg.alg.name](base, alg_cfg, model_cfg, None)
            _attach_tokenizer(editor, tokenizer, cfg)
            editor.load_state_dict(_editor_state(run_dir, ckpt))
        out = cls(cfg, base, tokenizer, editor, dev)
        if api_saved:
            out.n_edits = int(json.loads((run_dir / "api.json").read_text())["n_edits"])
        return out

    # ------------------------------------------------------------------ editing and asking
    def edit(self, facts: Iterable[Fact]) -> list[dict[str, Any]]:
        """Edit ``facts``: ``(prompt, target)`` pairs or ``{"prompt": ..., "target": ...}``.

        Returns:
            one dict per edit: ``facts`` (how many), ``loss`` (first and last step), ``time_s``.
        """
        from btp.data.facts import fact, fact_batch
        from btp.data import batched

        records = []
        for item in facts:
            prompt, target = (item["prompt"], item["target"]) if isinstance(item, dict) else item
            if not (isinstance(prompt, str) and prompt.strip() and isinstance(target, str)
                    and target.strip()):
                raise ConfigError(f"a fact is a non-empty (prompt, target) pair of strings, got "
                                  f"{item!r:.80}")
            records.append(fact(prompt, target))
        chunks = batched(records, int(self.cfg.num_edit_per_block))
        self.editor.check_stream(len(chunks))
        max_length = int(self.cfg.data.max_length or 1024)
        results = []
        for chunk in chunks:
            outcome = self.editor.edit(fact_batch(self.tokenizer, chunk, max_length))
            self.n_edits += len(chunk)
            results.append({"facts": len(chunk),
                            "loss": (outcome.losses[0], outcome.losses[-1]) if outcome.losses else None,
                            "time_s": outcome.time_s})
        return results

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 20) -> str | list[str]:
        """Greedy continuation of each prompt by the edited model (one prompt at a time, so no
        padding enters a prompt); a string for a string, a list for a list."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        tok = self.tokenizer
        answers = []
        for text in texts:
            enc = tok([text], return_tensors="pt")
            ids = self.editor.generate(input_ids=enc["input_ids"].to(self.device),
                                       attention_mask=enc["attention_mask"].to(self.device),
                                       max_new_tokens=int(max_new_tokens), do_sample=False,
                                       pad_token_id=tok.pad_token_id)
            answers.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return answers[0] if single else answers

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | Path) -> Path:
        """Write ``adapter/`` (the method's ``save_pretrained``; MELO's records the base model as
        ``base_model_name_or_path``), ``run_config.json`` and ``api.json``; methods other than
        MELO also their state (``editor_state.safetensors``). :meth:`from_run` reads it back."""
        from safetensors.torch import save_file

        from btp.rundir import RECORD_FILE, RECORD_VERSION
        from btp.runner import resolved_config

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.editor.save_pretrained(out / "adapter")
        if self.cfg.alg.name != "melo":
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.editor.state_dict().items()}
            save_file(state, str(out / EDITOR_STATE))
        record = {"format": RECORD_VERSION, "config": resolved_config(self.cfg)}
        (out / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        (out / "api.json").write_text(json.dumps({"n_edits": self.n_edits}, indent=2) + "\n")
        return out


def _attach_tokenizer(editor: Any, tokenizer: Any, cfg: DictConfig) -> None:
    """Editors that read text beyond the edits (MEMIT's statistics) take the tokenizer, as the
    runner gives it to them before the stream."""
    attach = getattr(editor, "attach_tokenizer", None)
    if attach is not None:
        attach(tokenizer, Path(cfg.data_dir))


def _editor_state(run_dir: Path, ckpt: Any) -> dict[str, torch.Tensor]:
    """A non-MELO editor's state: ``editor_state.safetensors`` (API) or the run's checkpoint."""
    from safetensors.torch import load_file

    if (run_dir / EDITOR_STATE).is_file():
        return load_file(str(run_dir / EDITOR_STATE))
    saved = ckpt.load(run_dir / "checkpoint")
    if saved is None:
        raise RunDirError(f"{run_dir}: no checkpoint/ to restore the editor from (the run was made "
                          "with checkpoint.enabled=false); only MELO loads from adapter/ alone")
    return {k[len("editor."):]: v for k, v in saved[0].items() if k.startswith("editor.")}


__all__ = ["FactEditor", "API_DEFAULTS"]
