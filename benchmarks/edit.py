"""Edit speed: frozen-prefix caching against the uncached loop, and MELO against plain LoRA.

Every pair is timed interleaved (A, B, A, B, ...; ``benchmarks.common``) and reported as the
median per-round ratio with its spread. ``torch.set_flush_denormal(True)`` is on.

* ``edit_vs_uncached_t5small``: one MELO edit with ``cache_frozen_prefix`` on / off on a T5 with
  google/t5-small-ssm-nq's real dimensions (random weights), the qa config's targets (4 ``wo``),
  r = 40, batch 100 of random tokens (input 20, labels 8).
* ``edit_vs_uncached_gpt2xl``: the same on GPT-2 XL's widths (n_embd 1600, 25 heads, FFN 6400,
  vocab 50257) with the hallucination config's layers: targets h.36/h.37 ``mlp.c_fc``, key layer
  h.35, r = 700; ``--gpt2xl-layers`` blocks in all (48 = the real model; fewer keeps the 13 blocks
  from the key layer up and drops lower ones, which raises the ratio), batch 4 x 32 tokens,
  ``--gpt2xl-iters`` steps per edit (default 6; the hallucination task runs 50, and more steps
  only lower the ratio towards its floor: the first step runs every block either way).
* ``edit_vs_plain_lora_0`` / ``edit_vs_plain_lora_10000``: the T5 MELO edit (cache on, its
  default) with an empty database and with 10,000 stored clusters, against the same number of
  Adam + StepLR steps of upstream peft's ``LoraModel`` on the same modules and rank.

Usage: python -m benchmarks.edit [--iters N] [--rounds N] [--device cpu|cuda] [--threads N]
       [--gpt2xl-layers N] [--gpt2xl-iters N] [--skip-gpt2xl] [--parts t5small,plain_lora,gpt2xl]
"""

from __future__ import annotations

import argparse
import copy
import logging

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.common import interleaved, load_line, setup
from benchmarks.routing import t5_small_ssm_nq
from peft_melo import MeloConfig, MeloModel, get_melo_model

log = logging.getLogger("benchmarks.edit")
T5_TARGETS = [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (5, 6)] + [
    f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in (5, 6)
]
T5_KEY = "encoder.block.4.layer.1.DenseReluDense.wo"


def t5_batch(n: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(2, 32128, (n, 20), generator=g).to(device),
        "attention_mask": torch.ones(n, 20, dtype=torch.long, device=device),
        "labels": torch.randint(2, 32128, (n, 8), generator=g).to(device),
    }


def gpt2xl(n_layer: int, device: str) -> tuple[torch.nn.Module, list[str], str]:
    """GPT-2 XL's widths with random weights; the adapted/key layers keep their distance from the top."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_embd=1600, n_head=25, n_positions=1024, vocab_size=50257,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).to(device)
    top = n_layer - 48  # real: key h.35, targets h.36, h.37
    targets = [f"transformer.h.{i + top}.mlp.c_fc" for i in (36, 37)]
    return model, targets, f"transformer.h.{35 + top}.mlp.c_fc"


def melo_model(base: torch.nn.Module, targets: list[str], key: str, iters: int, num_block: int,
               num_rank_per_block: int) -> MeloModel:
    """MELO on ``base`` itself (no copy: GPT-2 XL's weights are 6 GB in fp32)."""
    return get_melo_model(base, MeloConfig(
        target_modules=targets, grace_layer=key, num_block=num_block,
        num_rank_per_block=num_rank_per_block, init_radius=75.0, num_iter=iters))


def editor(melo: MeloModel, batch: dict[str, torch.Tensor], cached: bool = True):
    """One edit of ``batch`` with the frozen-prefix cache on or off (the same model both ways)."""
    def run() -> None:
        if melo.num_blocks_left == 0:
            melo.next_block = 0  # benchmark only: reuse blocks, the work per edit is the same
        melo.config_.cache_frozen_prefix = cached
        melo.edit(batch)
    return run


def plain_lora(base: torch.nn.Module, batch: dict[str, torch.Tensor], iters: int):
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=40, lora_alpha=40, target_modules=T5_TARGETS,
                                                          lora_dropout=0.0))
    params = [p for p in lora.parameters() if p.requires_grad]

    def run() -> None:
        opt = torch.optim.Adam(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        for _ in range(iters):
            loss = lora(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10, help="optimizer steps per edit")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per ratio")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gpt2xl-layers", type=int, default=48)
    parser.add_argument("--gpt2xl-iters", type=int, default=6, help="optimizer steps per GPT-2 XL edit")
    parser.add_argument("--skip-gpt2xl", action="store_true")
    parser.add_argument("--parts", default="t5small,plain_lora,gpt2xl",
                        help="comma-separated: t5small (edit_vs_uncached_t5small), plain_lora, gpt2xl")
    args = parser.parse_args()
    setup(args.threads)
    parts = set(args.parts.split(","))
    if args.skip_gpt2xl:
        parts.discard("gpt2xl")
    dev = args.device
    lines = []

    if parts & {"t5small", "plain_lora"}:
        base = t5_small_ssm_nq(dev)
        batch = t5_batch(args.batch, dev)
    if "t5small" in parts:
        melo = melo_model(copy.deepcopy(base), T5_TARGETS, T5_KEY, args.iters, 20, 2)
        t5 = interleaved("t5small cached / uncached edit", editor(melo, batch, True),
                         editor(melo, batch, False), args.rounds, dev)
        lines.append(f"edit_vs_uncached_t5small={t5.median:.3f}")
        del melo
    if "plain_lora" in parts:
        floor = plain_lora(base, batch, args.iters)  # on a copy: built before MELO wraps ``base``
        melo = melo_model(base, T5_TARGETS, T5_KEY, args.iters, 20, 2)  # empty database
        empty = interleaved("MELO edit (0 clusters) / plain LoRA", editor(melo, batch), floor, args.rounds, dev)
        g = torch.Generator().manual_seed(1)
        filler = torch.randn(10_000, 512, generator=g).to(dev) * 100 + 1000
        melo.database.update(filler, torch.arange(10_000), block=19)
        full = interleaved("MELO edit (10,000 clusters) / plain LoRA", editor(melo, batch), floor,
                           args.rounds, dev)
        lines.append(f"edit_vs_plain_lora_0={empty.median:.3f}")
        lines.append(f"edit_vs_plain_lora_10000={full.median:.3f}")
        del melo, floor
    if parts & {"t5small", "plain_lora"}:
        del base

    if "gpt2xl" in parts:
        model, targets, key = gpt2xl(args.gpt2xl_layers, dev)
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, 50257, (4, 32), generator=g).to(dev)
        gbatch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        xl_melo = melo_model(model, targets, key, args.gpt2xl_iters, 350, 2)
        xl = interleaved(f"gpt2xl ({args.gpt2xl_layers} blocks, {args.gpt2xl_iters} steps) cached / uncached edit",
                         editor(xl_melo, gbatch, True), editor(xl_melo, gbatch, False),
                         max(3, args.rounds // 2), dev)
        lines.append(f"edit_vs_uncached_gpt2xl={xl.median:.3f}")

    log.info("%s", load_line())
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
