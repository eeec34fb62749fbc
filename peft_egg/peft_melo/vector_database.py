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

LabelMatch = Literal["sum", "exact"]


def _as_label_rows(labels: torch.Tensor) -> torch.Tensor:
    """Labels as a 2-D LongTensor [n, L]: class ids become one column, token ids stay as they are."""
    labels = labels.detach().long()
    if labels.dim() == 1:
        return labels[:, None]
    if labels.dim() != 2:
        raise ValueError(f"labels must be [n] class ids or [n, L] token ids, got shape {tuple(labels.shape)}")
    return labels


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

        ``|k - c|^2 = |k|^2 - 2 k.c + |c|^2`` with cached ``|c|^2``: one matmul, several times
        faster than ``torch.cdist`` for these shapes.
        """
        sq = self.center_sq[None, :] - 2.0 * (keys @ self.centers.T)  # [n, C]; |k|^2 is constant per row
        idx = sq.argmin(dim=1)
        # The expanded form loses precision for large norms; the chosen distance is recomputed
        # directly ([n, d] work) so that radius tests near a boundary are exact.
        dist = (keys - self.centers[idx]).norm(dim=1)
        return idx, dist

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

        Every key is compared with the database as it was before this batch (keys of the batch do
        not see each other). Then, per key in order: farther than R + init_radius -> new cluster;
        else same label -> expand that cluster; else conflict -> halve both radii around the
        midpoint, found a new cluster and forget the old cluster's points outside its new radius.

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
        radius = self.radii[nearest]
        far = dist > radius + self.init_radius
        same = self._labels_equal(self.labels[nearest], rows)
        expand = ~far & same
        conflict = ~far & ~same

        # New clusters (rule 1 and the new half of rule 3), appended in example order.
        founders = far | conflict
        founder_radii = torch.where(
            conflict, dist / 2 + CONFLICT_MARGIN, torch.full_like(dist, self.init_radius)
        )[founders]

        conflicted = torch.unique(nearest[conflict])
        replay = torch.isin(nearest, conflicted) & ~far  # clusters replayed in order
        bulk = expand & ~replay
        if bool(bulk.any()):
            self._add_points(keys[bulk], nearest[bulk], block)
            self._refit(torch.unique(nearest[bulk]))
        if conflicted.numel():
            self._replay(keys[replay], nearest[replay], dist[replay], conflict[replay], block)
        self._append_clusters(keys[founders], founder_radii, rows[founders], block)
        self._reindex()

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
        self._add_points(keys, ids, block)

    def _add_points(self, keys: torch.Tensor, clusters: torch.Tensor, block: int) -> None:
        self.point_keys = torch.cat([self.point_keys, keys])
        self.point_blocks = torch.cat([self.point_blocks, torch.full_like(clusters, block)])
        self.point_clusters = torch.cat([self.point_clusters, clusters])

    def _refit(self, clusters: torch.Tensor) -> None:
        """Center = mean of the cluster's point keys; radius = max(farthest point, init_radius)."""
        n_clusters = len(self)
        sums = torch.zeros_like(self.centers).index_add_(0, self.point_clusters, self.point_keys)
        counts = torch.zeros(n_clusters, device=self.device).index_add_(
            0, self.point_clusters, torch.ones_like(self.point_clusters, dtype=torch.float32)
        )
        means = sums / counts.clamp_min(1)[:, None]
        self.centers[clusters] = means[clusters]
        dists = (self.point_keys - self.centers[self.point_clusters]).norm(dim=1)
        far = torch.zeros(n_clusters, device=self.device).scatter_reduce_(
            0, self.point_clusters, dists, reduce="amax", include_self=True
        )
        self.radii[clusters] = far[clusters].clamp_min(self.init_radius)

    def _replay(
        self,
        keys: torch.Tensor,
        clusters: torch.Tensor,
        dists: torch.Tensor,
        is_conflict: torch.Tensor,
        block: int,
    ) -> None:
        """Apply expand/conflict events in example order for clusters with a conflict this batch.

        Rare (only clusters that see a label conflict), and the order matters there: a conflict
        shrinks the radius and forgets points that a later expansion of the same batch would
        otherwise have kept.
        """
        for key, cluster, dist, conflict in zip(keys, clusters.tolist(), dists.tolist(), is_conflict.tolist()):
            if not conflict:
                self._add_points(key[None], torch.tensor([cluster], device=self.device), block)
                self._refit(torch.tensor([cluster], device=self.device))
                continue
            self.conflicts += 1
            new_radius = dist / 2 - CONFLICT_MARGIN
            self.radii[cluster] = new_radius
            mine = self.point_clusters == cluster
            too_far = mine & ((self.point_keys - self.centers[cluster]).norm(dim=1) > new_radius)
            dropped = int(too_far.sum())
            if dropped == 0:
                continue
            self.forgotten += dropped
            keep = ~too_far
            survivors = bool((mine & keep).any())
            self.point_keys = self.point_keys[keep]
            self.point_blocks = self.point_blocks[keep]
            self.point_clusters = self.point_clusters[keep]
            if not survivors:
                # The cluster keeps its center, answered by "no block" until a later edit.
                self.point_keys = torch.cat([self.point_keys, self.centers[cluster][None]])
                self.point_blocks = torch.cat([self.point_blocks, self.point_blocks.new_tensor([NO_BLOCK])])
                self.point_clusters = torch.cat([self.point_clusters, self.point_clusters.new_tensor([cluster])])

    def _reindex(self) -> None:
        """Sort points by cluster and cache the per-cluster runs and center norms for routing."""
        order = torch.argsort(self.point_clusters, stable=True)
        self.point_keys = self.point_keys[order]
        self.point_blocks = self.point_blocks[order]
        self.point_clusters = self.point_clusters[order]
        self.cluster_count = torch.bincount(self.point_clusters, minlength=len(self))
        self.cluster_start = torch.cumsum(self.cluster_count, 0) - self.cluster_count
        self.center_sq = (self.centers * self.centers).sum(1)
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
