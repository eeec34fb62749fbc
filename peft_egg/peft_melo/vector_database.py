"""The MELO vector database: clusters of keys that remember which LoRA block answers where.

Each cluster has a center (key-dim), a radius, a label (that of the example that created it) and
points (key, block). Routing sends a key to the block of the nearest point of the nearest cluster,
or to no block (-1) when the key lies outside that cluster's radius. All routing is batched
tensor work; an update (once per edit batch) is batched except for the clusters that several keys
of the batch reach, which are replayed in example order to keep the original's semantics.

Storage grows in amortized O(1) per insert: clusters and points live in buffers with spare
capacity (x1.5 when full); a forgotten point is marked dead (cluster id -1) instead of compacting
the table. The routing index lists the live point rows of each cluster as one run; an update
rewrites only the runs of the clusters it touched (at the end of the index, the old runs left as
garbage until they outweigh the live ones), so no table is copied or sorted per batch. A point
whose key is its cluster's center (a founder, a placeholder) stores no key of its own: most
clusters hold one point, so this halves the memory. Such a key is written out before its
cluster's center moves.

An update screens its keys on sketches before any full-width search: each center's coordinates
on ``SKETCH_DIMS`` principal directions of the centers plus the norm of its remainder, so that the
distance between two sketches is a lower bound of the distance between the vectors (the
remainders' norms differ by at most their distance). A key whose lower bound exceeds the reach
(radius + init_radius) of every cluster founds a new cluster whichever center is nearest, unless
a cluster that another key of the batch joins could widen enough to reach it; the others get
their exact nearest center among the few whose lower bound does not exceed the distance to the
best sketch candidate (the full search where too many remain). The decisions are those of a full
search; only the time depends on how well the sketch separates the data. Routing on CPU screens
its keys the same way from ``_SCREEN_ROUTES_FROM`` clusters on; smaller databases and GPUs search
every center (one product of the keys with all centers).
"""

from __future__ import annotations

from dataclasses import dataclass
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
# Sketch width (principal directions kept; one more column holds the remainder's norm).
SKETCH_DIMS = 32
# Relative error allowed for a sketch bound, against |key|^2 + |center|^2: float32 rounding of
# the projections and of the expanded form stays near sqrt(d) * 1.2e-7, a hundred times below.
_SKETCH_SLACK = 1e-3
# Candidates per key, and steps of centers a key's bound leaves open, beyond which the exact
# search runs over every center instead (the sketch does not separate that key).
_MAX_CANDIDATES = 256
_MAX_STEPS = 64
# Centers per step: the screen keeps each key's least bound per step, and the search of a key
# opens whole steps. Centers per product of the screen (a multiple of the step): its [keys, span]
# scores stay in cache; larger spans mean fewer parallel regions but slower memory.
_SCREEN_STEP = 1024
_SCREEN_SPAN = 1 << 13
# Strided sample of centers that the sketch directions are fitted on.
_FIT_SAMPLE = 2048
# Directions are refitted while the database is below this size (they follow the data while it
# is still small; beyond, the copy that growth needs is the only full pass).
_REFIT_BELOW = 1 << 17
# Dead point rows / stale index entries tolerated beyond the live ones before compacting.
_COMPACT_MIN = 1024
# Routing on CPU screens its keys too from this many clusters on (below, or on a GPU, the one
# product with every center costs less than the screen's extra steps and host reads).
_SCREEN_ROUTES_FROM = 4096
_GROWTH = 1.5

LabelMatch = Literal["sum", "exact"]


@dataclass
class _Screen:
    """Sketch screening of a batch of keys (see :meth:`VectorDatabase._screen`).

    ks [n, p + 1] sketches, ks_sq [n] their squared norms, slack [n] rounding room, lows [n, S]
    per step of ``_SCREEN_STEP`` centers the least ``|ks - cs|^2 - |ks|^2 - reach^2``,
    least_need [S] each step's least squared reach.
    """

    ks: torch.Tensor
    ks_sq: torch.Tensor
    slack: torch.Tensor
    lows: torch.Tensor
    least_need: torch.Tensor

    def select(self, rows: torch.Tensor) -> "_Screen":
        return _Screen(self.ks[rows], self.ks_sq[rows], self.slack[rows], self.lows[rows], self.least_need)

    def beyond_reach(self) -> torch.Tensor:
        """[n] keys whose sketch bound exceeds every cluster's reach (outside them all)."""
        return self.lows.amin(1) + self.ks_sq > self.slack


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


def _capacity(need: int, current: int) -> int:
    """Next capacity of a full buffer: geometric, so that inserts cost amortized O(1)."""
    return max(need, int(_GROWTH * current), 16)


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

    Shapes: C clusters, P points, d key dimension, L label columns, p sketch dimensions.
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
        p = min(SKETCH_DIMS, d)
        self._centers = torch.empty(n_clusters, d, device=dev)  # [capC, d]
        self._center_sq = torch.empty(n_clusters, device=dev)  # [capC] squared norms for routing
        self._radii = torch.empty(n_clusters, device=dev)  # [capC]
        self._labels = torch.full((n_clusters, label_width), -100, dtype=torch.long, device=dev)  # [capC, L]
        # [capC, p + 3]: sketch (p + 1), its squared norm, squared reach with rounding room; a
        # key's row [-2 sketch, 1, -1] times it gives |key - center|^2's bound - |key's sketch|^2 - reach^2
        self._screen_cols = torch.zeros(n_clusters, p + 3, device=dev)
        self._proj = torch.empty(d, p, device=dev)  # [d, p] orthonormal sketch directions
        self._fitted = False
        self._max_center_sq = torch.zeros((), device=dev)  # >= every |center|^2 (a rounding bound)
        self._n = 0
        self._kstore = torch.empty(0, d, device=dev)  # [capK, d] keys that are not a center (grows)
        self._nk = 0
        self._pkeyidx = torch.empty(n_points, dtype=torch.long, device=dev)  # [capP] row of _kstore, -1 = center
        self._pblocks = torch.empty(n_points, dtype=torch.long, device=dev)  # [capP], -1 = no block
        self._pclusters = torch.empty(n_points, dtype=torch.long, device=dev)  # [capP], -1 = dead row
        self._np = 0
        self._dead = 0
        self._live = 0
        # Routing index: cluster j's live point rows are _order[_cstart[j] : _cstart[j] + _ccount[j]].
        self._order = torch.empty(0, dtype=torch.long, device=dev)  # [capO] (runs + garbage)
        self._no = 0
        self._cstart = torch.zeros(n_clusters, dtype=torch.long, device=dev)  # [capC]
        self._ccount = torch.zeros(n_clusters, dtype=torch.long, device=dev)  # [capC]
        self._multi = 0  # clusters whose point count is not 1
        self._single_point = True
        self._touched: list[torch.Tensor] = []  # clusters that lost points in the running update

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
    def cluster_count(self) -> torch.Tensor:
        """[C] live points per cluster."""
        return self._ccount[: self._n]

    @property
    def cluster_start(self) -> torch.Tensor:
        """[C] where each cluster's run of point rows starts in the routing index."""
        return self._cstart[: self._n]

    @property
    def point_keys(self) -> torch.Tensor:
        """[P, d] keys of the live points, grouped by cluster in insertion order (a copy)."""
        return self._keys_of(self._grouped_rows())

    @property
    def point_blocks(self) -> torch.Tensor:
        """[P] block of each live point (-1: a no-block placeholder), as :attr:`point_keys`."""
        return self._pblocks[self._grouped_rows()]

    @property
    def point_clusters(self) -> torch.Tensor:
        """[P] cluster of each live point, as :attr:`point_keys`."""
        return self._pclusters[self._grouped_rows()]

    @property
    def device(self) -> torch.device:
        return self._radii.device

    def stats(self) -> dict[str, int]:
        """Database statistics: clusters, points, conflicts, forgotten points."""
        return {
            "clusters": len(self),
            "points": int(self._live),
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
        approx = torch.addmm(self.center_sq, keys, self.centers.T, alpha=-2.0)  # [n, C]; |k|^2 dropped
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
                # every center whose expanded value could still beat the best exact distance
                rows = unsure.nonzero().squeeze(1)
                limit = dist[rows].square() - key_sq[rows] + 2 * bound[rows]
                r, c = (approx[rows] <= limit[:, None]).nonzero(as_tuple=True)
                many = torch.bincount(r, minlength=rows.shape[0]) > _MAX_CANDIDATES
                keep = ~many[r]
                local = torch.arange(rows.shape[0], device=keys.device)
                idx[rows], dist[rows] = self._exact_among(
                    keys[rows], torch.cat([local, r[keep]]), torch.cat([idx[rows], c[keep]]))
                if bool(many.any()):
                    crowded = rows[many]
                    idx[crowded], dist[crowded] = self._nearest_exhaustive(keys[crowded])
        return idx, dist

    def _exact_among(self, keys: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest center of each key [m] among its candidates, given as pairs (key
        ``rows`` [P], center ``cols`` [P]): lowest index on an exact tie; inf for a key without
        candidates."""
        m = keys.shape[0]
        exact = (keys[rows] - self.centers[cols]).norm(dim=1)  # as a per-cluster loop computes it
        dist = torch.full((m,), float("inf"), device=keys.device).scatter_reduce(0, rows, exact, "amin")
        at_min = exact == dist[rows]
        idx = torch.full((m,), torch.iinfo(torch.long).max, dtype=torch.long, device=keys.device)
        return idx.scatter_reduce(0, rows[at_min], cols[at_min], "amin"), dist

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

    # ------------------------------------------------------------------ sketches
    def _sketch_of(self, x: torch.Tensor) -> torch.Tensor:
        """[m, d] vectors -> [m, p + 1]: coordinates on the sketch directions, remainder's norm."""
        coords = x @ self._proj  # [m, p]
        rest = (x - coords @ self._proj.T).norm(dim=1, keepdim=True)  # [m, 1], not |x|^2 - |coords|^2
        return torch.cat([coords, rest], dim=1)

    def _fit_sketch(self) -> None:
        """Fit the sketch directions to the centers (principal directions of a strided sample,
        completed to p orthonormal columns) and sketch every center again. Any orthonormal
        directions give the same answers; ones that follow the data give tighter bounds."""
        n, p = self._n, self._proj.shape[1]
        sample = self._centers[: n: max(1, n // _FIT_SAMPLE)][:_FIT_SAMPLE].double()
        vh = torch.linalg.svd(sample - sample.mean(0), full_matrices=False).Vh  # [k, d]
        eye = torch.eye(vh.shape[1], p, dtype=vh.dtype, device=vh.device)
        basis, _ = torch.linalg.qr(torch.cat([vh[:p].T, eye], dim=1))  # first columns span vh[:p]
        self._proj = basis[:, :p].float().contiguous()
        self._fitted = True
        for first in range(0, n, _SCREEN_SPAN):
            last = min(n, first + _SCREEN_SPAN)
            sketch = self._sketch_of(self._centers[first: last])
            self._screen_cols[first: last, :-2] = sketch
            self._screen_cols[first: last, -2] = (sketch * sketch).sum(1)

    def _sketch_slack(self, keys: torch.Tensor) -> torch.Tensor:
        """[n] allowed error of a squared sketch distance from each key (see ``_SKETCH_SLACK``)."""
        return _SKETCH_SLACK * ((keys * keys).sum(1) + self._max_center_sq)

    def _screen(self, keys: torch.Tensor) -> "_Screen":
        """Lower bounds of every key's distance to every cluster's reach, on the sketches: one
        ``[n, p + 3] x [p + 3, C]`` product (see ``_screen_cols``) in spans of centers, of which
        each step keeps only its minimum per key (the [n, C] matrix never exists)."""
        ks = self._sketch_of(keys)  # [n, p + 1]
        n, count, step = keys.shape[0], len(self), _SCREEN_STEP
        ones = ks.new_ones(n, 1)
        span = step * max(1, min(_SCREEN_SPAN, _NEAREST_CHUNK // max(n, 1)) // step)
        rows = torch.cat([-2.0 * ks, ones, -ones], dim=1)  # [n, p + 3]
        lows = []
        for first in range(0, count, span):
            last = min(count, first + span)
            scores = rows @ self._screen_cols[first: last].T  # [n, w] bound - |ks|^2 - reach^2
            whole = (last - first) // step * step
            if whole:
                lows.append(scores[:, :whole].view(n, -1, step).amin(2))
            if whole < last - first:
                lows.append(scores[:, whole:].amin(1, keepdim=True))
        need = torch.nn.functional.pad(self._screen_cols[:count, -1], (0, -count % step), value=float("inf"))
        return _Screen(ks, (ks * ks).sum(1), self._sketch_slack(keys), torch.cat(lows, 1),
                       need.view(-1, step).amin(1))

    def _scan_steps(self, bound_rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``|cs|^2 - 2 ks.cs`` of one key over one whole step per pair, batched.

        Args:
            bound_rows: [P, p + 3] each pair's key row ``[-2 ks, 1, 0]``.
            steps: [P] each pair's step.

        Returns:
            scores [P, step] (inf past the last center) and the centers they belong to [P, step].
        """
        count = len(self)
        centers = steps[:, None] * _SCREEN_STEP + torch.arange(_SCREEN_STEP, device=steps.device)  # [P, step]
        cols = self._screen_cols[centers.clamp_max(count - 1)]  # [P, step, p + 3]
        scores = torch.bmm(cols, bound_rows[:, :, None]).squeeze(2)
        return scores.masked_fill(centers >= count, float("inf")), centers

    def _nearest_screened(self, keys: torch.Tensor, screen: "_Screen") -> tuple[torch.Tensor, torch.Tensor]:
        """Exact nearest center per key, as :meth:`_nearest`, searching only the centers whose
        sketch bound does not exceed the distance to a first candidate (the nearest is among
        them), in the steps whose screened minimum allows one. A key with more than
        ``_MAX_STEPS`` such steps or ``_MAX_CANDIDATES`` such centers is searched over all."""
        m, dev = keys.shape[0], keys.device
        all_rows = torch.arange(m, device=dev)
        # [m, p + 3] rows giving |cs|^2 - 2 ks.cs = the squared bound - |ks|^2 (no reach)
        bound_rows = torch.cat([-2.0 * screen.ks, screen.ks.new_ones(m, 1), screen.ks.new_zeros(m, 1)], dim=1)
        # The step with the least screened value first: its nearest sketch is the first
        # candidate, whose exact distance bounds the search; its other centers are collected.
        best = screen.lows.argmin(1)  # [m]
        scores, centers = self._scan_steps(bound_rows, best)
        seed = centers.gather(1, scores.argmin(1, keepdim=True)).squeeze(1)
        upper = (keys - self.centers[seed]).norm(dim=1)  # [m] the nearest is at most this far
        # candidates: |ks - cs|^2 <= upper^2 (+ rounding room)
        limit = upper.square() * (1 + _SKETCH_SLACK) + screen.slack - screen.ks_sq
        r, c = (scores <= limit[:, None]).nonzero(as_tuple=True)
        found_rows, found_cols = [all_rows, r], [seed, centers[r, c]]
        # Other steps only where the screened minimum (+ the step's least reach) allows one.
        visit = screen.lows + screen.least_need[None, :] <= (limit + screen.slack)[:, None]  # [m, steps]
        visit[all_rows, best] = False
        full = visit.sum(1) > _MAX_STEPS
        visit &= ~full[:, None]
        pair_rows, pair_steps = visit.nonzero(as_tuple=True)
        per_call = max(1, _NEAREST_CHUNK // (_SCREEN_STEP * bound_rows.shape[1]))  # bounds the gather
        for first in range(0, pair_rows.shape[0], per_call):
            rows, steps = pair_rows[first: first + per_call], pair_steps[first: first + per_call]
            scores, centers = self._scan_steps(bound_rows[rows], steps)
            r, c = (scores <= limit[rows, None]).nonzero(as_tuple=True)
            found_rows.append(rows[r])
            found_cols.append(centers[r, c])
        rows, cols = torch.cat(found_rows), torch.cat(found_cols)
        full |= torch.bincount(rows, minlength=m) > _MAX_CANDIDATES + 1  # the seed counts twice
        keep = ~full[rows]
        idx, dist = self._exact_among(keys, rows[keep], cols[keep])
        if bool(full.any()):
            many = full.nonzero().squeeze(1)
            idx[many], dist[many] = self._nearest(keys[many])
        return idx, dist

    def _reach_during_batch(self, clusters: torch.Tensor, dists: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clusters that keys of this batch reach, and how far each one's reach (radius +
        init_radius) can grow before the batch ends.

        Every point a cluster holds during the batch lies within D of its old center (D: its
        farthest point now, or the farthest key ``dists`` [m] joining it, ``clusters`` [m] their
        nearest cluster); a center is a mean of such points, so a refitted radius is at most 2D;
        a conflict's radius is at most D.

        Returns:
            touched [t] and the largest reach [t] each can have during the batch.
        """
        touched, inverse = torch.unique(clusters, return_inverse=True)
        rows, local = self._rows_of(touched)
        spread = (self._keys_of(rows) - self._centers[touched][local]).norm(dim=1)
        far = torch.zeros(touched.shape[0], device=dists.device).scatter_reduce(0, local, spread, "amax")
        far = far.scatter_reduce(0, inverse, dists, "amax")
        radius = torch.maximum(self._radii[touched], (2 * far).clamp_min(self.init_radius))
        return touched, radius + self.init_radius

    def _batch_nearest(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest center and distance of the keys that need them for this batch's rules.

        Returns:
            clear [n]: keys far from every cluster's reach for the whole batch (they found new
            clusters whichever center is nearest); nearest [n], dist [n] for the other keys
            (-1 and inf for clear ones).

        A key is clear when its sketch bound exceeds every reach, unless a cluster that another
        key of the batch reaches could widen enough to take it; such a key is searched exactly
        too, until no clear key is within the widened reach of the clusters reached.
        """
        n = keys.shape[0]
        screen = self._screen(keys)
        clear = screen.beyond_reach()
        nearest = torch.full((n,), -1, dtype=torch.long, device=keys.device)
        dist = torch.full((n,), float("inf"), device=keys.device)
        search = ~clear
        while bool(search.any()):
            rows = search.nonzero().squeeze(1)
            nearest[rows], dist[rows] = self._nearest_screened(keys[rows], screen.select(rows))
            clear_rows = clear.nonzero().squeeze(1)
            if clear_rows.numel() == 0:
                break
            reached = ~clear
            touched, reach = self._reach_during_batch(nearest[reached], dist[reached])
            gap = torch.cdist(keys[clear_rows], self._centers[touched], compute_mode="donot_use_mm_for_euclid_dist")
            risky = (gap <= reach[None, :] * (1 + _SKETCH_SLACK)).any(1)
            search = torch.zeros_like(clear)
            search[clear_rows[risky]] = True
            clear &= ~search
        return clear, nearest, dist

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
        if self.device.type == "cpu" and len(self) >= _SCREEN_ROUTES_FROM:
            # A key beyond every reach is outside its nearest cluster whichever that is.
            screen = self._screen(keys)
            near = (~screen.beyond_reach()).nonzero().squeeze(1)
            idx = torch.zeros(n, dtype=torch.long, device=keys.device)
            dist = torch.full((n,), float("inf"), device=keys.device)
            if near.numel():
                idx[near], dist[near] = self._nearest_screened(keys[near], screen.select(near))
        else:
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

        Keys beyond the reach of every cluster (screened on sketches) found clusters without a
        full search; keys that are alone in reaching their cluster see exactly the old state and
        are decided together; only clusters reached by several keys of the batch are replayed in
        order.

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
            self._index_batch(0, 0)
            return
        if keys.device != self.device:
            keys, rows = keys.to(self.device), rows.to(self.device)
        points_before, clusters_before = self._np, self._n

        clear, nearest, dist = self._batch_nearest(keys)
        founders = clear.clone()  # far from everything: a new cluster of radius init_radius
        founder_radii = torch.full_like(dist, self.init_radius)
        searched = (~clear).nonzero().squeeze(1)
        if searched.numel():
            founders[searched], founder_radii[searched] = self._apply_rules(
                keys[searched], rows[searched], nearest[searched], dist[searched], block)
        self._append_clusters(keys[founders], founder_radii[founders], rows[founders], block)
        self._index_batch(points_before, clusters_before)

    def _apply_rules(self, keys: torch.Tensor, rows: torch.Tensor, nearest: torch.Tensor,
                     dist: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The three rules for keys [m] with their nearest cluster and distance; changes the
        reached clusters and returns which keys found a cluster [m] and its radius [m]."""
        same = self._labels_equal(self.labels[nearest], rows)
        _, inverse, counts = torch.unique(nearest, return_inverse=True, return_counts=True)
        shared = counts[inverse] > 1  # [m] another key of the batch reaches the same cluster

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
        return founders, founder_radii

    # ------------------------------------------------------------------ storage
    def _rows_of(self, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Live point rows of ``clusters`` [m] -> (rows [P'], position in ``clusters`` [P'])."""
        counts = self._ccount[clusters]
        local = torch.repeat_interleave(torch.arange(clusters.shape[0], device=clusters.device), counts)
        offsets = torch.arange(local.shape[0], device=clusters.device) - (torch.cumsum(counts, 0) - counts)[local]
        return self._order[self._cstart[clusters][local] + offsets], local

    def _grouped_rows(self) -> torch.Tensor:
        """[P] live point rows grouped by cluster (cluster order, insertion order within)."""
        return self._rows_of(torch.arange(self._n, device=self.device))[0]

    def _set_centers(self, clusters: torch.Tensor, centers: torch.Tensor) -> None:
        self._centers[clusters] = centers
        sq = (centers * centers).sum(-1)
        self._center_sq[clusters] = sq
        if sq.numel():
            self._max_center_sq = torch.maximum(self._max_center_sq, sq.max())
        if self._fitted:
            sketch = self._sketch_of(centers)
            self._screen_cols[clusters, :-2] = sketch
            self._screen_cols[clusters, -2] = (sketch * sketch).sum(-1)

    def _set_radii(self, clusters: torch.Tensor, radii: torch.Tensor) -> None:
        self._radii[clusters] = radii
        reach = (radii + self.init_radius).clamp_min(0)
        self._screen_cols[clusters, -1] = reach.square() * (1 + _SKETCH_SLACK)

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
            self._kstore = _grown(self._kstore, self._nk, _capacity(self._nk + m, self._kstore.shape[0]))
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
            cap = _capacity(self._np + m, self._pblocks.shape[0])
            self._pkeyidx = _grown(self._pkeyidx, self._np, cap)
            self._pblocks = _grown(self._pblocks, self._np, cap)
            self._pclusters = _grown(self._pclusters, self._np, cap)
        self._pkeyidx[self._np: self._np + m] = -1 if keys is None else self._store_keys(keys)
        self._pblocks[self._np: self._np + m] = blocks
        self._pclusters[self._np: self._np + m] = clusters
        self._np += m
        self._live += m

    def _kill_points(self, rows: torch.Tensor) -> None:
        """Mark point rows dead (forgotten); their clusters' runs are rewritten at the update's end."""
        self._touched.append(self._pclusters[rows])
        self._pclusters[rows] = -1
        self._dead += int(rows.numel())
        self._live -= int(rows.numel())

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
        self._set_radii(clusters, widest.clamp_min(self.init_radius))

    def _shrink_alone(self, clusters: torch.Tensor, dists: torch.Tensor) -> None:
        """Conflict on distinct ``clusters``: radius d/2 - margin around the kept center, points
        outside forgotten, a no-block placeholder at the center where none survive."""
        self.conflicts += int(clusters.numel())
        self._set_radii(clusters, dists / 2 - CONFLICT_MARGIN)
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
            start, count = int(self._cstart[cluster]), int(self._ccount[cluster])
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
            self._set_radii(torch.tensor([cluster], device=self.device), radius[None])
            self._kill_points(old_rows[~torch.isin(old_rows, rows)])
            new = rows < 0
            self._append_points(pk[new], pb[new], torch.full_like(pb[new], cluster))
        return founder, founder_radius

    def _append_clusters(self, keys: torch.Tensor, radii: torch.Tensor, rows: torch.Tensor, block: int) -> None:
        """New clusters with center = key and one point (key, block)."""
        m = keys.shape[0]
        if m == 0:
            return
        grew = self._n + m > self._centers.shape[0]
        if grew:
            cap = _capacity(self._n + m, self._centers.shape[0])
            self._centers = _grown(self._centers, self._n, cap)
            self._center_sq = _grown(self._center_sq, self._n, cap)
            self._radii = _grown(self._radii, self._n, cap)
            self._labels = _grown(self._labels, self._n, cap, fill=-100)
            self._screen_cols = _grown(self._screen_cols, self._n, cap)
            self._cstart = _grown(self._cstart, self._n, cap, fill=0)
            self._ccount = _grown(self._ccount, self._n, cap, fill=0)
        if rows.shape[1] > self._labels.shape[1]:
            self._labels = _pad_columns(self._labels, rows.shape[1])
        ids = torch.arange(self._n, self._n + m, device=keys.device)
        self._n += m
        self._set_centers(ids, keys)
        self._set_radii(ids, radii.float())
        self._labels[ids] = _pad_columns(rows, self._labels.shape[1])
        self._append_points(None, torch.full_like(ids, block), ids)  # the founder's key is the center
        if not self._fitted or (grew and self._n < _REFIT_BELOW):
            self._fit_sketch()  # amortized like the copy above: the data seen so far sets the directions

    def _index_batch(self, points_before: int, clusters_before: int) -> None:
        """Rewrite the index runs of the clusters this update changed (points added or
        forgotten) at the end of the index; compact when dead rows or stale runs dominate."""
        changed = torch.cat(self._touched + [self._pclusters[points_before: self._np]])
        self._touched = []
        changed = torch.unique(changed)
        changed = changed[changed >= 0]
        if changed.numel():
            old_rows, _ = self._rows_of(changed)
            rows = torch.cat([old_rows, torch.arange(points_before, self._np, device=self.device)])
            owner = self._pclusters[rows]
            rows, owner = rows[owner >= 0], owner[owner >= 0]
            at = torch.argsort(owner * self._np + rows)  # by cluster, insertion order within
            rows, owner = rows[at], owner[at]
            counts = torch.bincount(torch.searchsorted(changed, owner), minlength=changed.shape[0])
            old_counts = self._ccount[changed]
            if self._no + rows.shape[0] > self._order.shape[0]:
                self._order = _grown(self._order, self._no, _capacity(self._no + rows.shape[0], self._order.shape[0]))
            self._order[self._no: self._no + rows.shape[0]] = rows
            self._cstart[changed] = self._no + torch.cumsum(counts, 0) - counts
            self._ccount[changed] = counts
            self._no += rows.shape[0]
            self._multi += int((counts != 1).sum()) - int(((old_counts != 1) & (changed < clusters_before)).sum())
        if self._dead > max(self._live, _COMPACT_MIN):
            self._compact_points()
            self._index_all()
        elif self._no - self._live > max(self._live, _COMPACT_MIN):  # stale runs: copy the live ones out
            self._order = self._grouped_rows()
            self._cstart[: self._n] = torch.cumsum(self.cluster_count, 0) - self.cluster_count
            self._no = self._order.shape[0]
        self._single_point = self._multi == 0

    def _index_all(self) -> None:
        """Build the routing index from scratch (after loading or compacting the point rows)."""
        clusters = self._pclusters[: self._np]
        live = (clusters >= 0).nonzero().squeeze(1)
        self._order = live[torch.argsort(clusters[live], stable=True)]  # [P]
        self._no = self._live = int(live.shape[0])
        counts = torch.bincount(clusters[live], minlength=self._n)
        self._ccount = torch.zeros(self._centers.shape[0], dtype=torch.long, device=self.device)
        self._ccount[: self._n] = counts
        self._cstart = torch.zeros_like(self._ccount)
        self._cstart[: self._n] = torch.cumsum(counts, 0) - counts
        self._multi = int((counts != 1).sum())
        self._single_point = self._multi == 0
        self._max_center_sq = self.center_sq.max() if self._n else self._center_sq.new_zeros(())

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
        self._screen_cols = centers.new_zeros(self._n, self._screen_cols.shape[1])
        self._set_radii(torch.arange(self._n, device=centers.device), self._radii[: self._n].clone())
        at_center = (keys == centers[clusters]).all(1) if keys.shape[0] else torch.zeros(0, dtype=torch.bool)
        self._kstore, self._nk = keys[~at_center].clone(), int((~at_center).sum())
        idx = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        idx[~at_center] = torch.arange(self._nk, device=keys.device)
        self._pkeyidx, self._pblocks, self._pclusters = idx, state["point_blocks"].long().clone(), clusters.clone()
        self._np = keys.shape[0]
        self.conflicts, self.forgotten = (int(v) for v in state["counters"].tolist())
        self._index_all()
        if self._n:
            self._fit_sketch()
