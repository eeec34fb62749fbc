"""Database scale: memory per cluster, one update batch and routing at 10k / 100k / 1M clusters.

For each size the database is filled with 512-wide random keys (one point per cluster, class
labels), then timed:

* ``bytes_per_cluster_<n>``: bytes held by every tensor of the database (buffers with their spare
  capacity, the routing index) / clusters, after one more update (so the growth slack counts);
* ``update_ms_<n>``: one update batch of 100 keys, half of them near stored centers with another
  label (conflicts), half near with the same label or far; median of ``--repeats``;
* ``route_vs_matmul_<n>``: routing 64 keys / the bare ``keys @ centers.T`` on the same tensors,
  interleaved (``benchmarks.common``), median per-round ratio.

Usage: python -m benchmarks.scale [--sizes 10000,100000,1000000] [--threads N] [--repeats N]
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch

from benchmarks.common import interleaved, load_line, setup, timed_once
from peft_melo import VectorDatabase

log = logging.getLogger("benchmarks.scale")
DIM = 512


def filled(n: int, device: str, gen: torch.Generator) -> VectorDatabase:
    """``n`` single-point clusters of random keys, loaded as a saved state (filling through
    ``update`` would search every new key against every stored one: hours at 1M)."""
    centers = torch.randn(n, DIM, generator=gen).to(device) * 10
    db = VectorDatabase(init_radius=1.0)
    db.load_state_dict({
        "centers": centers, "radii": torch.ones(n, device=device),
        "labels": (torch.arange(n, device=device) % 50)[:, None],
        "point_keys": centers, "point_blocks": torch.zeros(n, dtype=torch.long, device=device),
        "point_clusters": torch.arange(n, device=device),
        "counters": torch.zeros(2, dtype=torch.long)})
    return db


def update_batch(db: VectorDatabase, gen: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """100 keys: 50 close to stored centers (label drawn from 50: mostly conflicts), 50 random."""
    picked = torch.randint(0, len(db), (50,), generator=gen).to(device)
    near = db.centers[picked] + 0.01 * torch.randn(50, DIM, generator=gen).to(device)
    keys = torch.cat([near, torch.randn(50, DIM, generator=gen).to(device) * 10])
    return keys, torch.randint(0, 50, (100,), generator=gen).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup(args.threads)
    lines = []
    for n in (int(x) for x in args.sizes.split(",")):
        gen = torch.Generator().manual_seed(n)
        db = filled(n, args.device, gen)
        times = []
        conflicts = db.conflicts
        for block in range(args.repeats):
            keys, labels = update_batch(db, gen, args.device)
            times.append(timed_once(lambda: db.update(keys, labels, block=100 + block), args.device))
        per_cluster = db.nbytes() / len(db)
        probe = torch.randn(64, DIM, generator=gen).to(args.device) * 10
        centers = db.centers
        route = interleaved(f"route / matmul at {len(db)} clusters", lambda: db.route(probe),
                            lambda: probe @ centers.T, args.repeats, args.device, warmup=1)
        log.info("%d clusters: %.0f bytes per cluster (%.2f x a 4 x %d key), update of 100 keys "
                 "%.1f ms (median; %d conflicts in %d updates)", len(db), per_cluster,
                 per_cluster / (4 * DIM), DIM, statistics.median(times) * 1e3,
                 db.conflicts - conflicts, args.repeats)
        tag = {10_000: "10k", 100_000: "100k", 1_000_000: "1m"}.get(n, str(n))
        lines += [f"bytes_per_cluster_{tag}={per_cluster:.0f}",
                  f"update_ms_{tag}={statistics.median(times) * 1e3:.1f}",
                  f"route_vs_matmul_{tag}={route.median:.3f}"]
        del db, centers
    log.info("%s", load_line())
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
