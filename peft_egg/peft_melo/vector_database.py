"""The MELO vector database: clusters of keys that remember which LoRA block answers where.

Each cluster has a center (key-dim), a radius, a label (that of the example that created it) and
points (key, block). Routing sends a key to the block of the nearest point of the nearest cluster,
or to no block (-1) when the key lies outside that cluster's radius. All routing is batched
tensor work; an update (once per edit batch) is batched except for the clusters that several keys
of the batch reach, which are replayed in example order to keep the original's semantics.

Storage grows in amortized O(1) per insert: clusters and points live in buffers with spare
capacity; a forgotten point is marked dead (cluster id -1) instead of compacting the table, and
only an index of point rows (sorted by cluster) is rebuilt per update. A point whose key is its
cluster's center (a founder, a placeholder) stores no key of its own: most clusters hold one
point, so this halves the memory. Such a key is written out before its cluster's center moves.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

NO_BLOCK = -1
# The original shrinks both radii by this much around the midpoint on a label conflict.
CONFLICT_MARGIN = 1e-5
# Nearest-center candidates re-ranked on exact distances, and the rounding bound (in ulps per
# sqrt(d)) under which the expanded form cannot order two centers.
TIE_CANDIDATES = 4
# Largest key x center distance matrix built at once (elements): 256 MB in float32.
_NEAREST_CHUNK = 1 << 26
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


def _grown(buffer: torch.Tensor, used: int, capacity: int, fill: float | int | None = None) -> torch.Tensor:
    """A buffer of ``capacity`` rows holding the first ``used`` rows of ``buffer``."""
    out = buffer.new_empty((capacity, *buffer.shape[1:])) if fill is None \
        else buffer.new_full((capacity, *buffer.shape[1:]), fill)
    out[:used] = buffer[:used]
    return out


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
        self.conflicts = 0
        self.forgotten = 0
        self._allocate(torch.empty(0, 0), 0, 0, 1)

    def _allocate(self, like: torch.Tensor, n_clusters: int, n_points: int, label_width: int) -> None:
        """Empty buffers of the given capacities, dtype float32 on ``like``'s device."""
        d, dev = like.shape[-1], like.device
        self._centers = torch.empty(n_clusters, d, device=dev)  # [capC, d]
        self._center_sq = torch.empty(n_clusters, device=dev)  # [capC] squared norms for routing
        self._radii = torch.empty(n_clusters, device=dev)  # [capC]
        self._labels = torch.full((n_clusters, label_width), -100, dtype=torch.long, device=dev)  # [capC, L]
        self._n = 0
        self._kstore = torch.empty(0, d, device=dev)  # [capK, d] keys that are not a center (grows)
        self._nk = 0
        self._pkeyidx = torch.empty(n_points, dtype=torch.long, device=dev)  # [capP] row of _kstore, -1 = center
        self._pblocks = torch.empty(n_points, dtype=torch.long, device=dev)  # [capP], -1 = no block
        self._pclusters = torch.empty(n_points, dtype=torch.long, device=dev)  # [capP], -1 = dead row
        self._np = 0
        self._dead = 0
        self._reindex()

    # ------------------------------------------------------------------ basic views
    def __len__(self) -> int:
        return self._n

    @property
    def centers(self) -> torch.Tensor:
        """[C, d] cluster centers (a view: writes go to the database)."""
        return self._centers[: self._n]

    @property
    def radii(self) -> torch.Tensor:
        """[C] cluster radii (a view)."""
        return self._radii[: self._n]

    @property
    def labels(self) -> torch.Tensor:
        """[C, L] label rows of the clusters, -100 padded (a view)."""
        return self._labels[: self._n]

    @property
    def center_sq(self) -> torch.Tensor:
        return self._center_sq[: self._n]

    @property
    def point_keys(self) -> torch.Tensor:
        """[P, d] keys of the live points, grouped by cluster in insertion order (a copy)."""
        return self._keys_of(self._order)

    @property
    def point_blocks(self) -> torch.Tensor:
        """[P] block of each live point (-1: a no-block placeholder), as :attr:`point_keys`."""
        return self._pblocks[self._order]

    @property
    def point_clusters(self) -> torch.Tensor:
        """[P] cluster of each live point, as :attr:`point_keys`."""
        return self._pclusters[self._order]

    @property
    def device(self) -> torch.device:
        return self._radii.device

    def stats(self) -> dict[str, int]:
        """Database statistics: clusters, points, conflicts, forgotten points."""
        return {
            "clusters": len(self),
            "points": int(self._order.shape[0]),
            "conflicts": int(self.conflicts),
            "forgotten": int(self.forgotten),
        }

    def nbytes(self) -> int:
        """Bytes held by the database's tensors (buffers with their spare capacity, and index)."""
        return sum(v.element_size() * v.nelement() for v in vars(self).values() if isinstance(v, torch.Tensor))

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
        rows = max(1, _NEAREST_CHUNK // max(n_clusters, 1))
        if keys.shape[0] > rows:  # keep the [n, C] distance matrix bounded
            parts = [self._nearest(keys[i: i + rows]) for i in range(0, keys.shape[0], rows)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
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
            blocks = self._pblocks[self._order[self.cluster_start[idx]]]
        else:
            # Each key's candidate points: a [n, M] window into the cluster-sorted row index.
            width = int(counts.max())
            offsets = torch.arange(width, device=keys.device)
            cand = self.cluster_start[idx, None] + offsets[None, :]  # [n, M]
            valid = offsets[None, :] < counts[:, None]
            rows = self._order[torch.where(valid, cand, self.cluster_start[idx, None])]  # [n, M]
            diff = self._keys_of(rows) - keys[:, None, :]  # [n, M, d]
            d2 = (diff * diff).sum(-1).masked_fill(~valid, float("inf"))
            blocks = self._pblocks[rows.gather(1, d2.argmin(1, keepdim=True)).squeeze(1)]
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
            self._allocate(keys, max(16, keys.shape[0]), max(16, keys.shape[0]), rows.shape[1])
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
        founders = (far | ~same) & ~shared
        founder_radii = torch.where(far, torch.full_like(dist, self.init_radius), dist / 2 + CONFLICT_MARGIN)
        expand = ~shared & ~far & same
        conflict = ~shared & ~far & ~same
        if bool(expand.any()):
            self._expand_alone(keys[expand], nearest[expand], block)
        if bool(conflict.any()):
            self._shrink_alone(nearest[conflict], dist[conflict])

        # Clusters reached by several keys: the same rules, in example order.
        if bool(shared.any()):
            order = shared.nonzero().squeeze(1)
            founders[order], founder_radii[order] = self._replay(
                keys[order], nearest[order], dist[order], same[order], block)

        self._append_clusters(keys[founders], founder_radii[founders], rows[founders], block)
        self._reindex()

    # ------------------------------------------------------------------ storage
    def _rows_of(self, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Live point rows of ``clusters`` [m] -> (rows [P'], position in ``clusters`` [P'])."""
        counts = self.cluster_count[clusters]
        local = torch.repeat_interleave(torch.arange(clusters.shape[0], device=clusters.device), counts)
        offsets = torch.arange(local.shape[0], device=clusters.device) - (torch.cumsum(counts, 0) - counts)[local]
        return self._order[self.cluster_start[clusters][local] + offsets], local

    def _set_centers(self, clusters: torch.Tensor, centers: torch.Tensor) -> None:
        self._centers[clusters] = centers
        self._center_sq[clusters] = (centers * centers).sum(-1)

    def _keys_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Keys [..., d] of live point rows [...] (a stored key, or the cluster's center)."""
        centers = self._centers[self._pclusters[rows]]
        if self._nk == 0:
            return centers
        idx = self._pkeyidx[rows]
        return torch.where((idx >= 0).unsqueeze(-1), self._kstore[idx.clamp_min(0)], centers)

    def _store_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Append keys to the key store -> their rows there."""
        m = keys.shape[0]
        if self._nk + m > self._kstore.shape[0]:
            self._kstore = _grown(self._kstore, self._nk, max(self._nk + m, 2 * self._kstore.shape[0], 16))
        self._kstore[self._nk: self._nk + m] = keys
        self._nk += m
        return torch.arange(self._nk - m, self._nk, device=keys.device)

    def _materialize(self, rows: torch.Tensor) -> None:
        """Give the center-keyed points among ``rows`` a stored key (before their center moves)."""
        implicit = rows[self._pkeyidx[rows] < 0]
        if implicit.numel():
            self._pkeyidx[implicit] = self._store_keys(self._centers[self._pclusters[implicit]])

    def _append_points(self, keys: Optional[torch.Tensor], blocks: torch.Tensor, clusters: torch.Tensor) -> None:
        """Append point rows (``keys=None``: each point's key is its cluster's center); the
        buffers grow geometrically (amortized O(1) per point)."""
        m = clusters.shape[0]
        if m == 0:
            return
        if self._np + m > self._pblocks.shape[0]:
            cap = max(self._np + m, 2 * self._pblocks.shape[0], 16)
            self._pkeyidx = _grown(self._pkeyidx, self._np, cap)
            self._pblocks = _grown(self._pblocks, self._np, cap)
            self._pclusters = _grown(self._pclusters, self._np, cap)
        self._pkeyidx[self._np: self._np + m] = -1 if keys is None else self._store_keys(keys)
        self._pblocks[self._np: self._np + m] = blocks
        self._pclusters[self._np: self._np + m] = clusters
        self._np += m

    def _kill_points(self, rows: torch.Tensor) -> None:
        """Mark point rows dead (forgotten); compact once dead rows outnumber live ones."""
        self._pclusters[rows] = -1
        self._dead += int(rows.numel())

    def _compact_points(self) -> None:
        live = (self._pclusters[: self._np] >= 0).nonzero().squeeze(1)
        m = int(live.shape[0])
        idx = self._pkeyidx[live]
        stored = idx >= 0
        kstore = self._kstore[idx[stored]]
        new_idx = torch.full_like(idx, -1)
        new_idx[stored] = torch.arange(kstore.shape[0], device=idx.device)
        self._kstore, self._nk = _grown(kstore, kstore.shape[0], max(kstore.shape[0], 16)), kstore.shape[0]
        cap = max(m, 16)
        self._pkeyidx = _grown(new_idx, m, cap)
        self._pblocks = _grown(self._pblocks[live], m, cap)
        self._pclusters = _grown(self._pclusters[live], m, cap)
        self._np, self._dead = m, 0

    def _expand_alone(self, keys: torch.Tensor, clusters: torch.Tensor, block: int) -> None:
        """Add one point to each of distinct ``clusters`` and refit them.

        Center = mean of the cluster's point keys (old points + the new key); radius =
        max(farthest point from the new center, init_radius).
        """
        rows, local = self._rows_of(clusters)
        m = clusters.shape[0]
        old_keys = self._keys_of(rows)
        self._materialize(rows)  # the centers move below
        self._append_points(keys, torch.full_like(clusters, block), clusters)
        sums = keys.clone().index_add_(0, local, old_keys)
        count = torch.ones(m, device=keys.device).index_add_(0, local, torch.ones_like(local, dtype=keys.dtype))
        centers = sums / count[:, None]
        far = torch.cat([(old_keys - centers[local]).norm(dim=1), (keys - centers).norm(dim=1)])
        widest = keys.new_zeros(m).scatter_reduce_(0, torch.cat([local, torch.arange(m, device=keys.device)]),
                                                   far, reduce="amax")
        self._set_centers(clusters, centers)
        self._radii[clusters] = widest.clamp_min(self.init_radius)

    def _shrink_alone(self, clusters: torch.Tensor, dists: torch.Tensor) -> None:
        """Conflict on distinct ``clusters``: radius d/2 - margin around the kept center, points
        outside forgotten, a no-block placeholder at the center where none survive."""
        self.conflicts += int(clusters.numel())
        self._radii[clusters] = dists / 2 - CONFLICT_MARGIN
        rows, local = self._rows_of(clusters)
        keep = (self._keys_of(rows) - self._centers[clusters][local]).norm(dim=1) <= self._radii[clusters][local]
        self.forgotten += int((~keep).sum())
        self._kill_points(rows[~keep])
        survivors = torch.zeros(clusters.shape[0], dtype=torch.bool, device=clusters.device)
        survivors[local[keep]] = True
        empty = clusters[~survivors]
        self._append_points(None, torch.full_like(empty, NO_BLOCK), empty)  # keyed by the center

    def _replay(self, keys: torch.Tensor, clusters: torch.Tensor, dists: torch.Tensor,
                same: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rules in example order for the keys that share their nearest cluster.

        Works on a local copy of each such cluster (center, radius, points with their rows; a new
        point has row -1): the cost is the size of those clusters, not of the database.

        Returns:
            founder [m] (bool) and founder radius [m] of the replayed keys.
        """
        r0 = torch.tensor(self.init_radius, device=self.device)
        founder = torch.zeros(keys.shape[0], dtype=torch.bool, device=self.device)
        founder_radius = torch.zeros(keys.shape[0], device=self.device)
        for cluster in torch.unique(clusters).tolist():
            events = (clusters == cluster).nonzero().squeeze(1).tolist()  # in example order
            start, count = int(self.cluster_start[cluster]), int(self.cluster_count[cluster])
            old_rows = self._order[start: start + count]
            rows, pk, pb = old_rows.clone(), self._keys_of(old_rows), self._pblocks[old_rows]
            old_center = self._centers[cluster].clone()
            center, radius = old_center.clone(), self._radii[cluster].clone()
            for i in events:
                if dists[i] > radius + r0:
                    founder[i], founder_radius[i] = True, r0
                elif same[i]:
                    rows = torch.cat([rows, rows.new_tensor([-1])])
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
                    rows, pk, pb = rows[keep], pk[keep], pb[keep]
                    if pk.shape[0] == 0:
                        rows, pk, pb = rows.new_tensor([-1]), center[None].clone(), pb.new_tensor([NO_BLOCK])
            if not torch.equal(center, old_center):
                self._materialize(rows[rows >= 0])  # their keys were the old center
            self._set_centers(torch.tensor([cluster], device=self.device), center[None])
            self._radii[cluster] = radius
            self._kill_points(old_rows[~torch.isin(old_rows, rows)])
            new = rows < 0
            self._append_points(pk[new], pb[new], torch.full_like(pb[new], cluster))
        return founder, founder_radius

    def _append_clusters(self, keys: torch.Tensor, radii: torch.Tensor, rows: torch.Tensor, block: int) -> None:
        """New clusters with center = key and one point (key, block)."""
        m = keys.shape[0]
        if m == 0:
            return
        if self._n + m > self._centers.shape[0]:
            cap = max(self._n + m, 2 * self._centers.shape[0], 16)
            self._centers = _grown(self._centers, self._n, cap)
            self._center_sq = _grown(self._center_sq, self._n, cap)
            self._radii = _grown(self._radii, self._n, cap)
            self._labels = _grown(self._labels, self._n, cap, fill=-100)
        if rows.shape[1] > self._labels.shape[1]:
            self._labels = _pad_columns(self._labels, rows.shape[1])
        ids = torch.arange(self._n, self._n + m, device=keys.device)
        self._n += m
        self._set_centers(ids, keys)
        self._radii[ids] = radii.float()
        self._labels[ids] = _pad_columns(rows, self._labels.shape[1])
        self._append_points(None, torch.full_like(ids, block), ids)  # the founder's key is the center

    def _reindex(self) -> None:
        """Rebuild the routing index: live point rows sorted by cluster (insertion order within a
        cluster), each cluster's run in it, and the largest center norm."""
        if self._dead > max(self._np - self._dead, 1024):
            self._compact_points()
        clusters = self._pclusters[: self._np]
        live = (clusters >= 0).nonzero().squeeze(1)
        self._order = live[torch.argsort(clusters[live], stable=True)]  # [P]
        self.cluster_count = torch.bincount(clusters[live], minlength=self._n)  # [C]
        self.cluster_start = torch.cumsum(self.cluster_count, 0) - self.cluster_count  # [C]
        self._max_center_sq = self.center_sq.max() if self._n else self._center_sq.new_zeros(())
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
        centers, keys = state["centers"].float(), state["point_keys"].float()
        labels = state["labels"].long()
        clusters = state["point_clusters"].long()
        self._allocate(centers, 0, 0, max(1, labels.shape[1] if labels.dim() == 2 else 1))
        self._centers, self._radii, self._labels = centers.clone(), state["radii"].float().clone(), labels.clone()
        self._center_sq = (centers * centers).sum(1)
        self._n = centers.shape[0]
        at_center = (keys == centers[clusters]).all(1) if keys.shape[0] else torch.zeros(0, dtype=torch.bool)
        self._kstore, self._nk = keys[~at_center].clone(), int((~at_center).sum())
        idx = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        idx[~at_center] = torch.arange(self._nk, device=keys.device)
        self._pkeyidx, self._pblocks, self._pclusters = idx, state["point_blocks"].long().clone(), clusters.clone()
        self._np = keys.shape[0]
        self.conflicts, self.forgotten = (int(v) for v in state["counters"].tolist())
        self._reindex()
