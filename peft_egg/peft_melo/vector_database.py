"""The MELO vector database: clusters of keys that remember which LoRA block answers where.

Each cluster has a center (key-dim), a radius, a label (that of the example that created it) and
points (key, block). Routing sends a key to the block of the nearest point of the nearest cluster,
or to no block (-1) when the key lies outside that cluster's radius. All routing is batched
tensor work; an update (once per edit batch) is batched except for the rare clusters that see a
label conflict in the batch, which are replayed in example order to keep the original's semantics.
"""

from __future__ import annotations

from typing import Literal

import torch

NO_BLOCK = -1
# The original shrinks both radii by this much around the midpoint on a label conflict.
CONFLICT_MARGIN = 1e-5
# Nearest-center candidates re-ranked on exact distances, and the rounding bound (in ulps per
# sqrt(d)) under which the expanded form cannot order two centers.
TIE_CANDIDATES = 4
_ROUNDING_ULPS = 8.0

LabelMatch = Literal["sum", "exact"]


def _as_label_rows(labels: torch.Tensor) -> torch.Tensor:
    """Labels as a 2-D LongTensor [n, L]: class ids become one column, token ids stay as they are."""
    labels = labels.detach().long()
    if labels.dim() == 1:
        return labels[:, None]
    if labels.dim() != 2:
        raise ValueError(f"labels must be [n] class ids or [n, L] token ids, got shape {tuple(labels.shape)}")
    return labels


def _lowest_index_min(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise minimum of ``values`` [n, w] and the smallest ``index`` [n, w] attaining it."""
    best = values.min(dim=1).values
    at_min = values == best[:, None]
    chosen = torch.where(at_min, index, torch.full_like(index, torch.iinfo(torch.long).max)).min(dim=1).values
    return chosen, best


def _pad_columns(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad label rows with -100 (the HF ignore index) up to ``width`` columns."""
    if rows.shape[1] >= width:
        return rows
    pad = rows.new_full((rows.shape[0], width - rows.shape[1]), -100)
    return torch.cat([rows, pad], dim=1)


class VectorDatabase:
    """Clusters in key space mapped to LoRA blocks (MELO's neuron index).

    Args:
        init_radius: radius of a new cluster, and the margin beyond a cluster's radius inside
            which a new key joins (or conflicts with) that cluster instead of founding its own.
        label_match: ``"sum"`` compares the sums of label ids (-100 counted as 0) like the
            original, a hash with collisions; ``"exact"`` compares the label sequences.

    Shapes: C clusters, P points, d key dimension, L label columns.
    """

    def __init__(self, init_radius: float, label_match: LabelMatch = "sum") -> None:
        if init_radius <= 0:
            raise ValueError(f"init_radius must be > 0, got {init_radius}")
        if label_match not in ("sum", "exact"):
            raise ValueError(f"label_match must be 'sum' or 'exact', got {label_match!r}")
        self.init_radius = float(init_radius)
        self.label_match: LabelMatch = label_match
        self.centers = torch.empty(0, 0)  # [C, d] float32
        self.center_sq = torch.empty(0)  # [C] squared norms, cached for routing
        self.radii = torch.empty(0)  # [C]
        self.labels = torch.empty(0, 1, dtype=torch.long)  # [C, L], -100 padded
        # Points are kept sorted by cluster so that a cluster's points are one contiguous run.
        self.point_keys = torch.empty(0, 0)  # [P, d]
        self.point_blocks = torch.empty(0, dtype=torch.long)  # [P], -1 = placeholder (no block)
        self.point_clusters = torch.empty(0, dtype=torch.long)  # [P]
        self.cluster_start = torch.empty(0, dtype=torch.long)  # [C] first point of each cluster
        self.cluster_count = torch.empty(0, dtype=torch.long)  # [C] points per cluster
        self.conflicts = 0
        self.forgotten = 0

    # ------------------------------------------------------------------ basic views
    def __len__(self) -> int:
        return int(self.radii.shape[0])

    @property
    def device(self) -> torch.device:
        return self.radii.device

    def stats(self) -> dict[str, int]:
        """Database statistics: clusters, points, conflicts, forgotten points."""
        return {
            "clusters": len(self),
            "points": int(self.point_blocks.shape[0]),
            "conflicts": int(self.conflicts),
            "forgotten": int(self.forgotten),
        }

    def to(self, device: torch.device | str) -> "VectorDatabase":
        """Move every tensor to ``device`` (in place); returns self."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    # ------------------------------------------------------------------ label comparison
    def _labels_equal(self, cluster_rows: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
        """Elementwise label agreement of two aligned sets of label rows -> BoolTensor [n]."""
        if self.label_match == "sum":
            return cluster_rows.clamp(min=0).sum(1) == new_rows.clamp(min=0).sum(1)
        width = max(cluster_rows.shape[1], new_rows.shape[1])
        return (_pad_columns(cluster_rows, width) == _pad_columns(new_rows, width)).all(1)

    # ------------------------------------------------------------------ nearest search
    def _nearest(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest center per key -> (index [n], Euclidean distance [n]).

        The index is the argmin of the exact distances ``|k - c|`` (lowest index on an exact
        tie), as a per-cluster distance loop gives it. The candidates come from the expanded form
        ``|c|^2 - 2 k.c`` (one matmul, several times faster than ``torch.cdist``); its rounding
        can swap two nearly equidistant centers, so the best ``TIE_CANDIDATES`` are re-ranked on
        exact distances, and a row whose next-best approximate value lies within the rounding
        bound of its best one is searched exactly over every center.
        """
        n_clusters = len(self)
        approx = self.center_sq[None, :] - 2.0 * (keys @ self.centers.T)  # [n, C]; |k|^2 dropped
        width = min(n_clusters, TIE_CANDIDATES)
        cand_approx, cand = approx.topk(width, dim=1, largest=False)  # [n, w] ascending
        exact = (keys[:, None, :] - self.centers[cand]).norm(dim=2)  # [n, w]
        idx, dist = _lowest_index_min(exact, cand)
        if width < n_clusters:
            # Rounding of the expanded form: about sqrt(d) ulps of |k|^2 + |c|^2.
            key_sq = (keys * keys).sum(1)
            bound = _ROUNDING_ULPS * keys.shape[1] ** 0.5 * torch.finfo(torch.float32).eps \
                * (key_sq + self._max_center_sq)
            unsure = (cand_approx[:, -1] + key_sq) - dist.square() <= bound
            if bool(unsure.any()):
                rows = unsure.nonzero().squeeze(1)
                idx[rows], dist[rows] = self._nearest_exhaustive(keys[rows])
        return idx, dist

    def _nearest_exhaustive(self, keys: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact-distance argmin over every center (rare fallback), in chunks of centers."""
        best_d = torch.full((keys.shape[0],), float("inf"), device=keys.device)
        best_i = torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device)
        for first in range(0, len(self), chunk):
            block = self.centers[first: first + chunk]
            d = (keys[:, None, :] - block[None]).norm(dim=2)  # [m, chunk]
            local_d, local_i = d.min(dim=1)  # first minimum on ties
            better = local_d < best_d  # strict: an equal later center never wins
            best_d = torch.where(better, local_d, best_d)
            best_i = torch.where(better, local_i + first, best_i)
        return best_i, best_d

    # ------------------------------------------------------------------ routing
    def route(self, keys: torch.Tensor) -> torch.Tensor:
        """Block per key (LongTensor [n]); -1 where the key is outside its nearest cluster.

        Nearest center first; outside that cluster's radius -> no block (no other cluster is
        tried, as in the original); inside -> the block of the nearest point of that cluster.
        """
        n = keys.shape[0]
        if len(self) == 0:
            return torch.full((n,), NO_BLOCK, dtype=torch.long, device=keys.device)
        keys = keys.detach().to(self.centers.device, torch.float32)
        idx, dist = self._nearest(keys)
        inside = dist <= self.radii[idx]
        counts = self.cluster_count[idx]  # [n]
        if self._single_point:
            blocks = self.point_blocks[self.cluster_start[idx]]
        else:
            # Gather each key's candidate points: a [n, M] window into the cluster-sorted points.
            width = int(counts.max())
            offsets = torch.arange(width, device=keys.device)
            cand = self.cluster_start[idx, None] + offsets[None, :]  # [n, M]
            valid = offsets[None, :] < counts[:, None]
            cand = torch.where(valid, cand, self.cluster_start[idx, None])
            diff = self.point_keys[cand] - keys[:, None, :]  # [n, M, d]
            d2 = (diff * diff).sum(-1).masked_fill(~valid, float("inf"))
            blocks = self.point_blocks[cand.gather(1, d2.argmin(1, keepdim=True)).squeeze(1)]
        return torch.where(inside, blocks, torch.full_like(blocks, NO_BLOCK))

    # ------------------------------------------------------------------ update
    def update(self, keys: torch.Tensor, labels: torch.Tensor, block: int) -> None:
        """Fold one edit batch into the database (the original's three rules).

        The nearest cluster ``j_i`` of each key and the distance ``d_i`` to its center come from
        the database as it was before this batch (clusters founded by the batch are never
        candidates). Then, per key in order, against the CURRENT state of ``j_i``: ``d_i`` >
        radius + init_radius -> new cluster; else same label -> expand ``j_i``; else conflict ->
        ``j_i``'s radius becomes ``d_i/2 - 1e-5`` (its points outside are forgotten), the new
        cluster's ``d_i/2 + 1e-5``. An earlier key of the batch that expanded or shrank ``j_i``
        thus changes the rule a later key meets.

        Keys that are alone in reaching their cluster see exactly the old state and are decided
        together; only clusters reached by several keys of the batch are replayed in order.

        Args:
            keys: [n, d] keys of the batch.
            labels: [n] class ids or [n, L] label token ids padded with -100.
            block: the LoRA block that this batch trained.
        """
        keys = keys.detach().float()
        rows = _as_label_rows(labels).to(keys.device)
        if rows.shape[0] != keys.shape[0]:
            raise ValueError(f"{keys.shape[0]} keys but {rows.shape[0]} label rows")
        if len(self) == 0:
            self._reset_storage(keys)
            new_radii = torch.full((keys.shape[0],), self.init_radius, device=keys.device)
            self._append_clusters(keys, new_radii, rows, block)
            self._reindex()
            return
        if keys.device != self.device:
            keys, rows = keys.to(self.device), rows.to(self.device)

        nearest, dist = self._nearest(keys)
        same = self._labels_equal(self.labels[nearest], rows)
        _, inverse, counts = torch.unique(nearest, return_inverse=True, return_counts=True)
        shared = counts[inverse] > 1  # [n] another key of the batch reaches the same cluster

        # Keys alone at their cluster: decided from the old state, all at once.
        far = dist > self.radii[nearest] + self.init_radius
        founders = far | ~same
        founder_radii = torch.where(far, torch.full_like(dist, self.init_radius), dist / 2 + CONFLICT_MARGIN)
        founders &= ~shared
        expand = ~shared & ~far & same
        conflict = ~shared & ~far & ~same
        new_points: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (keys, blocks, cluster)
        rewritten: list[torch.Tensor] = []  # clusters whose point set is replaced
        if bool(expand.any()):
            rewritten.append(nearest[expand])
            new_points.append(self._expand_alone(keys[expand], nearest[expand], block))
        if bool(conflict.any()):
            rewritten.append(nearest[conflict])
            new_points.append(self._shrink_alone(nearest[conflict], dist[conflict]))

        # Clusters reached by several keys: the same rules, in example order.
        if bool(shared.any()):
            order = shared.nonzero().squeeze(1)
            replay_founder, replay_radius, replayed, points = self._replay(
                keys[order], nearest[order], dist[order], same[order], block)
            founders[order] = replay_founder
            founder_radii[order] = replay_radius
            rewritten.append(replayed)
            new_points.append(points)

        if rewritten:
            self._replace_points(torch.cat(rewritten), new_points)
        self._append_clusters(keys[founders], founder_radii[founders], rows[founders], block)
        self._reindex()

    def _cluster_points(self, cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [m, d], blocks [m]) of one cluster, from its run of cluster-sorted points."""
        start, count = int(self.cluster_start[cluster]), int(self.cluster_count[cluster])
        return self.point_keys[start: start + count], self.point_blocks[start: start + count]

    def _expand_alone(self, keys: torch.Tensor, clusters: torch.Tensor, block: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add one point to each of distinct ``clusters`` and refit them -> their new point sets.

        Center = mean of the cluster's point keys (old points + the new key); radius =
        max(farthest point from the new center, init_radius).
        """
        old = torch.isin(self.point_clusters, clusters)
        pk = torch.cat([self.point_keys[old], keys])
        pb = torch.cat([self.point_blocks[old], torch.full_like(clusters, block)])
        pc = torch.cat([self.point_clusters[old], clusters])
        ordered, perm = clusters.sort()
        local = perm[torch.searchsorted(ordered, pc)]  # [m] position of each point's cluster in ``clusters``
        m = clusters.shape[0]
        sums = keys.new_zeros(m, keys.shape[1]).index_add_(0, local, pk)
        count = keys.new_zeros(m).index_add_(0, local, torch.ones_like(local, dtype=keys.dtype))
        centers = sums / count[:, None]
        far = (pk - centers[local]).norm(dim=1)
        widest = keys.new_zeros(m).scatter_reduce_(0, local, far, reduce="amax")
        self.centers[clusters] = centers
        self.radii[clusters] = widest.clamp_min(self.init_radius)
        return pk, pb, pc

    def _shrink_alone(self, clusters: torch.Tensor, dists: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conflict on distinct ``clusters``: radius d/2 - margin around the kept center, points
        outside forgotten, a no-block placeholder at the center where none survive."""
        self.conflicts += int(clusters.numel())
        self.radii[clusters] = dists / 2 - CONFLICT_MARGIN
        old = torch.isin(self.point_clusters, clusters)
        pk, pb, pc = self.point_keys[old], self.point_blocks[old], self.point_clusters[old]
        keep = (pk - self.centers[pc]).norm(dim=1) <= self.radii[pc]
        self.forgotten += int((~keep).sum())
        pk, pb, pc = pk[keep], pb[keep], pc[keep]
        empty = clusters[~torch.isin(clusters, pc)]
        return (torch.cat([pk, self.centers[empty]]),
                torch.cat([pb, torch.full_like(empty, NO_BLOCK)]),
                torch.cat([pc, empty]))

    def _replay(self, keys: torch.Tensor, clusters: torch.Tensor, dists: torch.Tensor,
                same: torch.Tensor, block: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The rules in example order for the keys that share their nearest cluster.

        Works on a local copy of each such cluster (center, radius, points): the cost is the
        size of those clusters, not of the database.

        Returns:
            founder [m] (bool), founder radius [m], the replayed clusters, and their new point
            sets as (keys, blocks, cluster ids).
        """
        r0 = torch.tensor(self.init_radius, device=self.device)
        founder = torch.zeros(keys.shape[0], dtype=torch.bool, device=self.device)
        founder_radius = torch.zeros(keys.shape[0], device=self.device)
        replayed = torch.unique(clusters)
        out_keys, out_blocks, out_clusters = [], [], []
        for cluster in replayed.tolist():
            events = (clusters == cluster).nonzero().squeeze(1).tolist()  # in example order
            pk, pb = (t.clone() for t in self._cluster_points(cluster))
            center, radius = self.centers[cluster].clone(), self.radii[cluster].clone()
            for i in events:
                if dists[i] > radius + r0:
                    founder[i], founder_radius[i] = True, r0
                elif same[i]:
                    pk = torch.cat([pk, keys[i][None]])
                    pb = torch.cat([pb, pb.new_tensor([block])])
                    center = pk.mean(0)
                    radius = torch.maximum((pk - center).norm(dim=1).max(), r0)
                else:
                    self.conflicts += 1
                    radius = dists[i] / 2 - CONFLICT_MARGIN
                    founder[i], founder_radius[i] = True, dists[i] / 2 + CONFLICT_MARGIN
                    keep = (pk - center).norm(dim=1) <= radius
                    self.forgotten += int((~keep).sum())
                    pk, pb = pk[keep], pb[keep]
                    if pk.shape[0] == 0:
                        pk, pb = center[None].clone(), pb.new_tensor([NO_BLOCK])
            self.centers[cluster], self.radii[cluster] = center, radius
            out_keys.append(pk)
            out_blocks.append(pb)
            out_clusters.append(torch.full_like(pb, cluster))
        points = (torch.cat(out_keys), torch.cat(out_blocks), torch.cat(out_clusters))
        return founder, founder_radius, replayed, points

    def _replace_points(self, clusters: torch.Tensor,
                        new_points: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Drop the points of ``clusters`` and append their new point sets."""
        keep = ~torch.isin(self.point_clusters, clusters)
        self.point_keys = torch.cat([self.point_keys[keep]] + [p[0] for p in new_points])
        self.point_blocks = torch.cat([self.point_blocks[keep]] + [p[1] for p in new_points])
        self.point_clusters = torch.cat([self.point_clusters[keep]] + [p[2] for p in new_points])

    def _reset_storage(self, keys: torch.Tensor) -> None:
        d, dev = keys.shape[1], keys.device
        self.centers = keys.new_empty(0, d)
        self.radii = keys.new_empty(0)
        self.labels = torch.empty(0, 1, dtype=torch.long, device=dev)
        self.point_keys = keys.new_empty(0, d)
        self.point_blocks = torch.empty(0, dtype=torch.long, device=dev)
        self.point_clusters = torch.empty(0, dtype=torch.long, device=dev)

    def _append_clusters(self, keys: torch.Tensor, radii: torch.Tensor, rows: torch.Tensor, block: int) -> None:
        """New clusters with center = key and one point (key, block)."""
        if keys.shape[0] == 0:
            return
        first = len(self)
        width = max(self.labels.shape[1], rows.shape[1])
        self.labels = torch.cat([_pad_columns(self.labels, width), _pad_columns(rows, width)])
        self.centers = torch.cat([self.centers, keys])
        self.radii = torch.cat([self.radii, radii.float()])
        ids = torch.arange(first, first + keys.shape[0], device=keys.device)
        self.point_keys = torch.cat([self.point_keys, keys])
        self.point_blocks = torch.cat([self.point_blocks, torch.full_like(ids, block)])
        self.point_clusters = torch.cat([self.point_clusters, ids])

    def _reindex(self) -> None:
        """Sort points by cluster and cache the per-cluster runs and center norms for routing."""
        order = torch.argsort(self.point_clusters, stable=True)
        self.point_keys = self.point_keys[order]
        self.point_blocks = self.point_blocks[order]
        self.point_clusters = self.point_clusters[order]
        self.cluster_count = torch.bincount(self.point_clusters, minlength=len(self))
        self.cluster_start = torch.cumsum(self.cluster_count, 0) - self.cluster_count
        self.center_sq = (self.centers * self.centers).sum(1)
        self._max_center_sq = self.center_sq.max() if len(self) else self.center_sq.new_zeros(())
        self._single_point = bool((self.cluster_count == 1).all())

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (for safetensors): clusters, points and counters."""
        return {
            "centers": self.centers.contiguous(),
            "radii": self.radii.contiguous(),
            "labels": self.labels.contiguous(),
            "point_keys": self.point_keys.contiguous(),
            "point_blocks": self.point_blocks.contiguous(),
            "point_clusters": self.point_clusters.contiguous(),
            "counters": torch.tensor([self.conflicts, self.forgotten], dtype=torch.long),
            "init_radius": torch.tensor([self.init_radius], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (onto the tensors' own device)."""
        missing = {"centers", "radii", "labels", "point_keys", "point_blocks", "point_clusters", "counters"} - set(state)
        if missing:
            raise KeyError(f"vector database state is missing {sorted(missing)}")
        if "init_radius" in state and float(state["init_radius"][0]) != self.init_radius:
            raise ValueError(
                f"vector database was saved with init_radius={float(state['init_radius'][0])}, "
                f"this one has init_radius={self.init_radius}"
            )
        self.centers = state["centers"].float()
        self.radii = state["radii"].float()
        self.labels = state["labels"].long()
        self.point_keys = state["point_keys"].float()
        self.point_blocks = state["point_blocks"].long()
        self.point_clusters = state["point_clusters"].long()
        self.conflicts, self.forgotten = (int(v) for v in state["counters"].tolist())
        self._reindex()
