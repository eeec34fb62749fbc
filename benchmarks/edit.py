"""Edit speed: one MELO edit against plain peft LoRA on the same modules, rank and steps.

T5 with google/t5-small-ssm-nq's real dimensions and random weights, the qa config's targets
(4 ``wo``), r = 40, batch 100 of random tokens (input 20, labels 8). MELO's edit is timed with an
empty database and with 10,000 clusters already stored; the floor is the same number of Adam +
StepLR steps on an upstream ``LoraModel``. ``torch.set_flush_denormal(True)`` is on: with random
weights the untied LM head gives huge logits whose gradients fill with denormals otherwise.

Prints as its last lines ``edit_vs_plain_lora_0=<x>`` and ``edit_vs_plain_lora_10000=<y>``.
Usage: python benchmarks/edit.py [--iters N] [--batch N] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.routing import t5_small_ssm_nq
from peft_melo import MeloConfig, get_melo_model

log = logging.getLogger("benchmarks.edit")
TARGETS = [f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (5, 6)] + [
    f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in (5, 6)
]


def plain_lora_steps(model: torch.nn.Module, batch: dict, iters: int, device: str) -> float:
    lora = get_peft_model(model, LoraConfig(r=40, lora_alpha=40, target_modules=TARGETS, lora_dropout=0.0))
    params = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    start = time.perf_counter()
    for _ in range(iters):
        loss = lora(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    log.info("device=%s threads=%d iters=%d batch=%d (flush_denormal on)", args.device,
             torch.get_num_threads(), args.iters, args.batch)
    base = t5_small_ssm_nq(args.device)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(2, 32128, (args.batch, 20), generator=g).to(args.device),
        "attention_mask": torch.ones(args.batch, 20, dtype=torch.long, device=args.device),
        "labels": torch.randint(2, 32128, (args.batch, 8), generator=g).to(args.device),
    }
    melo = get_melo_model(copy.deepcopy(base), MeloConfig(
        target_modules=TARGETS, grace_layer="encoder.block.4.layer.1.DenseReluDense.wo", num_block=20,
        num_rank_per_block=2, init_radius=75.0, num_iter=args.iters))
    floor = plain_lora_steps(copy.deepcopy(base), batch, args.iters, args.device)  # also a warm-up
    floor = min(floor, plain_lora_steps(copy.deepcopy(base), batch, args.iters, args.device))
    t_empty = melo.edit(batch).time_s
    filler = torch.randn(10_000, 512, generator=g).to(args.device) * 100 + 1000
    melo.database.update(filler, torch.arange(10_000), block=19)
    t_full = melo.edit(batch).time_s
    log.info("plain LoRA %d steps: %.2f s; MELO edit: %.2f s (empty db), %.2f s (%d clusters)",
             args.iters, floor, t_empty, t_full, len(melo.database))
    print(f"edit_vs_plain_lora_0={t_empty / floor:.3f}")
    print(f"edit_vs_plain_lora_10000={t_full / floor:.3f}")


if __name__ == "__main__":
    main()
