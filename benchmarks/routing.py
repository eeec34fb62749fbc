"""Routing speed: MELO inference overhead and routing against the bare matmul floor.

Prints, as its last two lines:
  routing_overhead=<x>  forward time of the MELO-wrapped T5 / the base T5 (t5-small-ssm-nq's real
                        dimensions, random weights, batch 32, input 20, decoder 5, 10,000 clusters)
  route_vs_matmul=<y>   time to route 64 keys of dim 512 against 100,000 clusters / time of the bare
                        ``keys @ centers.T`` on the same tensors (the compute floor)
Each pair is timed interleaved (A, B, A, B, ...; ``benchmarks.common``): the printed ratio is
the median per-round ratio; its spread, the absolute times and the machine's load are logged.
Usage: python -m benchmarks.routing [--device cpu|cuda] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics

import torch
from transformers import T5Config, T5ForConditionalGeneration

from benchmarks.common import interleaved, load_line, setup
from peft_melo import MeloConfig, VectorDatabase, get_melo_model

log = logging.getLogger("benchmarks.routing")


def t5_small_ssm_nq(device: str) -> torch.nn.Module:
    """google/t5-small-ssm-nq's architecture with random weights (no download)."""
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8,
                   num_decoder_layers=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   dropout_rate=0.0, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval().to(device)


def routing_overhead(device: str, repeats: int, n_clusters: int = 10_000) -> tuple[float, float, float]:
    base = t5_small_ssm_nq(device)
    wrapped = get_melo_model(copy.deepcopy(base), MeloConfig(
        target_modules=[f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in (5, 6)]
        + [f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in (5, 6)],
        grace_layer="encoder.block.4.layer.1.DenseReluDense.wo", num_block=20, num_rank_per_block=2,
        init_radius=75.0))
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(2, 32128, (32, 20), generator=g).to(device),
        "attention_mask": torch.ones(32, 20, dtype=torch.long, device=device),
        "decoder_input_ids": torch.randint(2, 32128, (32, 5), generator=g).to(device),
    }
    # The database: the batch's own keys for half the batch (so those rows take the LoRA path)
    # plus far-away clusters up to n_clusters, in 20 blocks.
    wrapped.routing.force(0)
    with torch.no_grad():
        wrapped(**inputs)
    keys = wrapped.routing.last_keys.clone()
    wrapped.routing.release()
    db = wrapped.database
    db.update(keys[:16], torch.arange(16), block=0)
    filler = torch.randn(n_clusters - 16, keys.shape[1], generator=g).to(device) * 100 + 1000
    db.update(filler, torch.arange(n_clusters - 16) + 100, block=1)
    assert len(db) >= n_clusters - 16
    with torch.no_grad():
        wrapped(**inputs)
    routed = int((wrapped.routing.blocks >= 0).sum())
    log.info("database: %d clusters; %d of 32 rows routed to a block", len(db), routed)
    with torch.no_grad():
        result = interleaved("MELO forward / base forward", lambda: wrapped(**inputs),
                             lambda: base(**inputs), repeats, device, warmup=2)
    return result.median, statistics.median(result.b), statistics.median(result.a)


def route_vs_matmul(device: str, repeats: int, n_clusters: int = 100_000, dim: int = 512) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(1)
    db = VectorDatabase(init_radius=1.0)
    db.update(torch.randn(n_clusters, dim, generator=g).to(device), torch.arange(n_clusters), block=0)
    keys = torch.randn(64, dim, generator=g).to(device)
    centers = db.centers
    result = interleaved("route / bare matmul", lambda: db.route(keys), lambda: keys @ centers.T,
                         repeats * 4, device, warmup=2)
    return result.median, statistics.median(result.b), statistics.median(result.a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    log.info("device=%s repeats=%d", args.device, args.repeats)
    ratio, t_base, t_melo = routing_overhead(args.device, args.repeats)
    log.info("forward batch 32 (input 20, decoder 5): base %.1f ms, MELO with 10,000 clusters %.1f ms",
             t_base * 1e3, t_melo * 1e3)
    ratio2, t_floor, t_route = route_vs_matmul(args.device, args.repeats)
    log.info("64 keys x 100,000 clusters x 512: bare matmul %.2f ms, route %.2f ms", t_floor * 1e3, t_route * 1e3)
    log.info("%s", load_line())
    print(f"routing_overhead={ratio:.3f}")
    print(f"route_vs_matmul={ratio2:.3f}")


if __name__ == "__main__":
    main()
