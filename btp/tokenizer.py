"""An offline tokenizer for the tiny stand-in models (no hub download needed).

A byte-level BPE (any text encodes without unknown tokens) trained with the ``tokenizers``
library on the texts of the shipped data sample, shipped as ``btp/assets/tokenizer.json``.
The special tokens of all three model families sit at fixed ids at the start of the vocabulary:

==  =================  ==========================================
id  token              role
==  =================  ==========================================
0   ``<pad>``          T5 pad and decoder start
1   ``</s>``           T5 eos (appended by the T5 post-processor)
2   ``<unk>``          T5 unk
3   ``[PAD]``          BERT pad
4   ``[UNK]``          BERT unk
5   ``[CLS]``          BERT cls (``[CLS] x [SEP]``)
6   ``[SEP]``          BERT sep
7   ``[MASK]``         BERT mask
8   ``<|endoftext|>``  GPT-2 bos/eos/unk, and pad
==  =================  ==========================================

The decoder-LLM tokenizer families add three more special tokens after the trained vocabulary
(:data:`EXTRA_SPECIAL_TOKENS`, ids 6000-6002 with the shipped asset), so the three original
families keep their vocabulary, and with it their tiny models' weights, unchanged.

:func:`get_tokenizer` wraps it as ``transformers.PreTrainedTokenizerFast`` for a tokenizer family
(:data:`FAMILIES`; a model family names its own in :mod:`btp.families`). Each uses its special
tokens as the real tokenizer does:

=========  =====================================  ==================================================
family     real tokenizer                         here
=========  =====================================  ==================================================
``t5``     T5                                     ``x </s>``; pad ``<pad>`` (also decoder start)
``bert``   BERT WordPiece                         ``[CLS] x [SEP]``; pad ``[PAD]``
``gpt2``   GPT-2 / GPT-J byte-level BPE           ``x``; ``<|endoftext|>`` is bos, eos, unk and pad
``llama``  Llama 2 / Mistral SentencePiece        ``<s> x`` (bos added, eos not); eos ``</s>``,
                                                  unk ``<unk>``; pad = eos (the real one has none,
                                                  the runner pads with eos)
``qwen2``  Qwen2 / Qwen2.5 byte-level BPE         ``x`` (no bos); ``<|endoftext|>`` is eos and pad;
                                                  ``<|im_start|>``/``<|im_end|>`` are specials
=========  =====================================  ==================================================

Rebuild the asset (deterministic: same texts in the same order give the same file)::

    python -m btp.tokenizer --rebuild [--data-dir data] [--vocab-size 6000]

It must be rebuilt from the *shipped sample*, not from the full data that download.sh writes into
the same folder, or the tiny models' vocabulary changes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import Any, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger(__name__)

ASSET_PATH = Path(__file__).resolve().parent / "assets" / "tokenizer.json"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_VOCAB_SIZE = 6000

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                  "<|endoftext|>"]
SPECIAL_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

#: Special tokens of the decoder-LLM families, appended after the trained vocabulary.
EXTRA_SPECIAL_TOKENS = ["<s>", "<|im_start|>", "<|im_end|>"]

#: The tokenizer families; a model family names its own (:attr:`btp.families.Family.tokenizer`).
FAMILIES = ("t5", "bert", "gpt2", "llama", "qwen2")
_MAX_LEN = {"t5": 512, "bert": 512, "gpt2": 1024, "llama": 4096, "qwen2": 32768}
#: Folders of the data sample that the asset was not trained on (added after it was built);
#: leaving them out keeps ``--rebuild`` reproducing the shipped asset.
CORPUS_EXCLUDE = ("counterfact",)


def _strings(obj: Any) -> Iterator[str]:
    """Every string in a JSON value, depth first, dict keys in file order."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for item in obj:
            yield from _strings(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)


def corpus_texts(data_dir: Path) -> list[str]:
    """All texts of the data files under ``data_dir`` (json, jsonl, txt), sorted by path,
    without the folders of :data:`CORPUS_EXCLUDE`."""
    texts: list[str] = []
    root = Path(data_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()
                       and p.relative_to(root).parts[0] not in CORPUS_EXCLUDE):
        if path.suffix == ".json":
            texts.extend(_strings(json.loads(path.read_text(encoding="utf-8"))))
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    texts.extend(_strings(json.loads(line)))
        elif path.suffix == ".txt":
            texts.append(path.read_text(encoding="utf-8"))
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on ``texts`` (in order); specials get ids 0..8."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for token, idx in SPECIAL_IDS.items():
        assert tok.token_to_id(token) == idx, (token, tok.token_to_id(token))
    return tok


@functools.lru_cache(maxsize=1)
def _asset_json() -> str:
    if not ASSET_PATH.is_file():
        from btp.errors import ModelLoadError

        raise ModelLoadError(
            f"tokenizer asset missing: {ASSET_PATH}; rebuild it with "
            "'python -m btp.tokenizer --rebuild'"
        )
    return ASSET_PATH.read_text(encoding="utf-8")


def base_tokenizer() -> Tokenizer:
    """A fresh copy of the shipped BPE (no post-processor); callers may modify it."""
    return Tokenizer.from_str(_asset_json())


def get_tokenizer(family: str) -> Any:
    """The shipped tokenizer as ``PreTrainedTokenizerFast`` for a tokenizer family.

    Families: ``t5``/``bert``/``gpt2``/``llama``/``qwen2`` (module docstring). T5 appends
    ``</s>``; BERT wraps as ``[CLS] x [SEP]``; GPT-2 adds nothing and pads with its eos; Llama
    prepends ``<s>``; Qwen2 adds nothing. A model kind is not a family: a causal LM may use any
    of three of them (the model family's table entry names its tokenizer family).
    """
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family '{family}'; expected {FAMILIES}")
    tok = base_tokenizer()
    if family == "t5":
        eos = SPECIAL_IDS["</s>"]
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
        )
        kwargs = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    elif family == "bert":
        cls, sep = SPECIAL_IDS["[CLS]"], SPECIAL_IDS["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        kwargs = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                  "sep_token": "[SEP]", "mask_token": "[MASK]"}
    elif family == "llama":
        tok.add_special_tokens(EXTRA_SPECIAL_TOKENS)
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        kwargs = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "pad_token": "</s>"}
    elif family == "qwen2":
        tok.add_special_tokens(EXTRA_SPECIAL_TOKENS)
        eos = "<|endoftext|>"
        kwargs = {"eos_token": eos, "pad_token": eos,
                  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    else:
        eos = "<|endoftext|>"
        kwargs = {"pad_token": eos, "eos_token": eos, "bos_token": eos, "unk_token": eos}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=_MAX_LEN[family], padding_side="right", **kwargs
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m btp.tokenizer --rebuild``: retrain the asset from the shipped sample."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="retrain and write the asset")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--out", type=Path, default=ASSET_PATH)
    args = parser.parse_args(argv)
    if not args.rebuild:
        parser.error("nothing to do; pass --rebuild")
    logging.basicConfig(level=logging.INFO)
    tok = build_tokenizer(corpus_texts(args.data_dir), args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out), pretty=False)
    log.info("wrote %s (vocab %d)", args.out, tok.get_vocab_size())


if __name__ == "__main__":
    main()
