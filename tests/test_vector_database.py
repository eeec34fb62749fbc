"""Each rule of MELO's vector database in its own test, plus a check against a plain reference."""

from __future__ import annotations

import math

import pytest
import torch

from peft_melo import VectorDatabase


def k(*xs: float) -> torch.Tensor:
    return torch.tensor([list(xs)], dtype=torch.float32)


def test_empty_database_routes_nowhere_and_first_batch_never_merges() -> None:
    db = VectorDatabase(init_radius=1.0)
    assert db.route(torch.zeros(3, 2)).tolist() == [-1, -1, -1]
    keys = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.0]])  # identical keys still get their own cluster
    db.update(keys, torch.tensor([1, 1, 2]), block=0)
    assert len(db) == 3
    assert db.radii.tolist() == [1.0, 1.0, 1.0]
    assert db.stats() == {"clusters": 3, "points": 3, "conflicts": 0, "forgotten": 0}


def test_far_key_founds_a_new_cluster() -> None:
    db = VectorDatabase(init_radius=1.0)
    db.update(k(0, 0), torch.tensor([7]), block=0)
    db.update(k(2.01, 0), torch.tensor([7]), block=1)  # d = 2.01 > R + init = 2
    assert len(db) == 2
    assert db.route(torch.tensor([[2.0, 0.0], [0.1, 0.0]])).tolist() == [1, 0]


def test_same_label_within_reach_expands_with_new_center_and_radius() -> None:
    db = VectorDatabase(init_radius=1.0)
    db.update(k(0, 0), torch.tensor([7]), block=0)
    db.update(k(1.8, 0), torch.tensor([7]), block=1)  # d = 1.8 <= 2, same label
    assert len(db) == 1
    assert torch.allclose(db.centers[0], torch.tensor([0.9, 0.0]))
    assert db.radii[0].item() == pytest.approx(1.0)  # max(0.9, init_radius)
    db.update(k(4.5, 0), torch.tensor([7]), block=2)  # d from 0.9 = 3.6 > 2: new cluster
    db.update(k(3.0, 0), torch.tensor([7]), block=3)  # nearest is the new one (d=1.5): expands it
    assert len(db) == 2
    assert torch.allclose(db.centers[1], torch.tensor([3.75, 0.0]))
    assert db.radii[1].item() == pytest.approx(1.0)
    wide = VectorDatabase(init_radius=0.5)
    wide.update(k(0, 0), torch.tensor([1]), block=0)
    wide.update(k(0.9, 0), torch.tensor([1]), block=1)
    wide.update(k(-0.4, 0), torch.tensor([1]), block=2)  # d = 0.85 <= 1.0; radius grows past init
    center = (0.0 + 0.9 - 0.4) / 3
    assert wide.centers[0, 0].item() == pytest.approx(center)
    assert wide.radii[0].item() == pytest.approx(0.9 - center)
    # routing inside the cluster goes to the nearest point's block
    assert wide.route(torch.tensor([[0.8, 0.0], [-0.35, 0.0], [0.05, 0.0]])).tolist() == [1, 2, 0]


def test_label_conflict_halves_radii_and_forgets_far_points() -> None:
    db = VectorDatabase(init_radius=1.0)
    db.update(k(0, 0), torch.tensor([1]), block=0)
    db.update(k(0.8, 0), torch.tensor([1]), block=1)  # cluster center 0.4, points at 0 and 0.8
    db.update(k(1.4, 0), torch.tensor([2]), block=2)  # conflict: d = 1.0 from center 0.4
    assert len(db) == 2 and db.conflicts == 1
    assert db.radii[0].item() == pytest.approx(0.5 - 1e-5)
    assert db.radii[1].item() == pytest.approx(0.5 + 1e-5)
    assert torch.allclose(db.centers[0], torch.tensor([0.4, 0.0]))  # old center stays
    assert db.forgotten == 0  # both old points are 0.4 from the center: within 0.5
    assert db.route(torch.tensor([[0.05, 0.0], [1.3, 0.0], [0.92, 0.0]])).tolist() == [0, 2, 2]


def test_conflict_that_drops_every_point_leaves_a_no_block_placeholder() -> None:
    db = VectorDatabase(init_radius=1.0)
    db.update(k(0, 0), torch.tensor([1]), block=0)
    db.update(k(1.0, 0), torch.tensor([1]), block=1)  # center 0.5, points at distance 0.5
    db.update(k(1.1, 0), torch.tensor([2]), block=2)  # conflict d = 0.6 -> radius 0.3: both points go
    assert db.forgotten == 2 and db.conflicts == 1
    assert db.stats()["points"] == 2  # placeholder + the new cluster's point
    assert db.route(torch.tensor([[0.5, 0.0]])).tolist() == [-1]  # inside, but answered by no block


def test_routing_tries_only_the_nearest_cluster() -> None:
    db = VectorDatabase(init_radius=0.5)
    db.update(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([1, 2]), block=0)
    db.update(k(3.9, 0), torch.tensor([2]), block=1)  # expands the right cluster to radius 0.45+
    radius = db.radii[1].item()
    # a key nearer to the left center but outside its radius gets no block, even if it were
    # inside the right cluster's ball
    probe = torch.tensor([[1.2, 0.0]])
    assert db.route(probe).tolist() == [-1]
    assert radius == pytest.approx(0.5)


def test_batch_is_compared_with_the_database_before_the_batch() -> None:
    db = VectorDatabase(init_radius=1.0)
    db.update(k(0, 0), torch.tensor([1]), block=0)
    # two keys close to each other but far from the database: two clusters, not one
    db.update(torch.tensor([[10.0, 0.0], [10.5, 0.0]]), torch.tensor([1, 1]), block=1)
    assert len(db) == 3


def test_label_match_sum_is_a_hash_and_exact_is_not() -> None:
    labels_a = torch.tensor([[3, 4, -100]])
    labels_b = torch.tensor([[4, 3, -100]])  # same sum, other sequence
    for mode, clusters in (("sum", 1), ("exact", 2)):
        db = VectorDatabase(init_radius=1.0, label_match=mode)
        db.update(k(0, 0), labels_a, block=0)
        db.update(k(0.5, 0), labels_b, block=1)
        assert len(db) == clusters, mode
        assert db.conflicts == clusters - 1


def test_state_dict_round_trip_keeps_routing_and_counters() -> None:
    torch.manual_seed(0)
    db = VectorDatabase(init_radius=0.7)
    for block in range(6):
        db.update(torch.randn(8, 4), torch.randint(0, 3, (8,)), block=block)
    other = VectorDatabase(init_radius=0.7)
    other.load_state_dict(db.state_dict())
    probe = torch.randn(64, 4)
    assert torch.equal(other.route(probe), db.route(probe))
    assert other.stats() == db.stats()
    with pytest.raises(ValueError, match="init_radius"):
        VectorDatabase(init_radius=0.5).load_state_dict(db.state_dict())


class ReferenceDatabase:
    """The rules written as the plain per-example, per-cluster loops of the original.

    Nearest cluster and distance against the database before the batch; the radius, center and
    points of that cluster read live, so earlier examples of the same batch change the rule.
    """

    def __init__(self, init_radius: float, label_match: str = "sum") -> None:
        self.r0 = init_radius
        self.label_match = label_match
        self.clusters: list[dict] = []
        self.conflicts = 0
        self.forgotten = 0

    def same(self, a: list[int], b: list[int]) -> bool:
        if self.label_match == "sum":
            return sum(max(x, 0) for x in a) == sum(max(x, 0) for x in b)
        width = max(len(a), len(b))
        return a + [-100] * (width - len(a)) == b + [-100] * (width - len(b))

    def nearest(self, key: torch.Tensor, centers: list[torch.Tensor]) -> tuple[int, float]:
        dists = [float((key - c).norm()) for c in centers]
        j = min(range(len(dists)), key=dists.__getitem__)
        return j, dists[j]

    def update(self, keys: torch.Tensor, labels: list[list[int]], block: int) -> None:
        if not self.clusters:
            for key, label in zip(keys, labels):
                self.clusters.append({"c": key.clone(), "r": self.r0, "label": label, "pts": [(key.clone(), block)]})
            return
        old_centers = [cl["c"].clone() for cl in self.clusters]
        found = [self.nearest(key, old_centers) for key in keys]
        new = []
        for key, label, (j, d) in zip(keys, labels, found):
            cl = self.clusters[j]
            if d > cl["r"] + self.r0:
                new.append({"c": key.clone(), "r": self.r0, "label": label, "pts": [(key.clone(), block)]})
            elif self.same(label, cl["label"]):
                cl["pts"].append((key.clone(), block))
                cl["c"] = torch.stack([p for p, _ in cl["pts"]]).mean(0)
                cl["r"] = max(max(float((p - cl["c"]).norm()) for p, _ in cl["pts"]), self.r0)
            else:
                self.conflicts += 1
                cl["r"] = d / 2 - 1e-5
                keep = [(p, b) for p, b in cl["pts"] if float((p - cl["c"]).norm()) <= cl["r"]]
                self.forgotten += len(cl["pts"]) - len(keep)
                cl["pts"] = keep or [(cl["c"].clone(), -1)]
                new.append({"c": key.clone(), "r": d / 2 + 1e-5, "label": label, "pts": [(key.clone(), block)]})
        self.clusters.extend(new)

    def route(self, key: torch.Tensor) -> int:
        j, d = self.nearest(key, [cl["c"] for cl in self.clusters])
        if d > self.clusters[j]["r"]:
            return -1
        pts = self.clusters[j]["pts"]
        return min(pts, key=lambda pb: float((key - pb[0]).norm()))[1]


def _label_rows(labels: torch.Tensor) -> list[list[int]]:
    return [row if isinstance(row, list) else [row] for row in labels.tolist()]


def _assert_same_database(db: VectorDatabase, ref: ReferenceDatabase, probe: torch.Tensor) -> None:
    assert len(db) == len(ref.clusters)
    assert (db.conflicts, db.forgotten) == (ref.conflicts, ref.forgotten)
    assert db.stats()["points"] == sum(len(cl["pts"]) for cl in ref.clusters)
    assert torch.allclose(db.centers, torch.stack([cl["c"] for cl in ref.clusters]), atol=1e-5)
    assert torch.allclose(db.radii, torch.tensor([cl["r"] for cl in ref.clusters]), atol=1e-5)
    assert db.route(probe).tolist() == [ref.route(p) for p in probe]


# (seed, label shape, label_match): streams whose batches reach the same cluster several times,
# so that expansions widen and conflicts shrink a radius mid-batch, points are forgotten and
# placeholders left.
STREAMS = [
    (seed, shape, mode)
    for seed in (1, 2, 3)
    for shape, mode in (("class", "sum"), ("tokens", "sum"), ("tokens", "exact"))
]


# Settings that send the same streams down the other paths of the search and the index: a
# one-direction sketch (weak bounds, many candidates), one candidate per key (the full search
# behind the screen), steps of four centers (bounds kept per step; keys opening more than two
# steps searched in full), compaction at every update, routing through the screen.
SEARCH_VARIANTS = {
    "default": {},
    "narrow sketch": {"SKETCH_DIMS": 1},
    "one candidate": {"_MAX_CANDIDATES": 1},
    "small steps": {"_SCREEN_STEP": 4, "_SCREEN_SPAN": 8, "_MAX_STEPS": 2},
    "eager compaction": {"_COMPACT_MIN": 0},
    "screened routing": {"_SCREEN_ROUTES_FROM": 0},
}


@pytest.mark.parametrize("seed,shape,mode,variant", [
    (*stream, "default") for stream in STREAMS
] + [(1, shape, mode, variant) for _, shape, mode in STREAMS[:3] for variant in list(SEARCH_VARIANTS)[1:]])
def test_batched_database_matches_the_plain_reference(seed: int, shape: str, mode: str, variant: str,
                                                      monkeypatch) -> None:
    import peft_melo.vector_database as vdb

    for name, value in SEARCH_VARIANTS[variant].items():
        monkeypatch.setattr(vdb, name, value)
    gen = torch.Generator().manual_seed(seed)
    db, ref = VectorDatabase(init_radius=0.6, label_match=mode), ReferenceDatabase(0.6, mode)
    for block in range(12):
        keys = torch.randn(10, 3, generator=gen) * 1.5
        if shape == "class":
            labels = torch.randint(0, 3, (10,), generator=gen)
        else:  # token rows padded with -100; "sum" sees collisions such as [1, 2] vs [2, 1]
            labels = torch.randint(0, 3, (10, 2), generator=gen)
            labels[torch.rand(10, generator=gen) < 0.3, 1] = -100
        db.update(keys, labels, block=block)
        ref.update(keys, _label_rows(labels), block=block)
        _assert_same_database(db, ref, torch.randn(50, 3, generator=gen) * 1.5)
    assert db.conflicts > 0 and db.forgotten > 0  # the stream exercised the conflict path
    assert not math.isnan(float(db.radii.sum()))


def test_reference_streams_exercise_every_within_batch_path() -> None:
    """The random streams above reach a cluster several times in one batch, with both orders."""
    gen = torch.Generator().manual_seed(1)
    db = VectorDatabase(init_radius=0.6)
    shared_batches = 0
    for block in range(12):
        keys = torch.randn(10, 3, generator=gen) * 1.5
        labels = torch.randint(0, 3, (10,), generator=gen)
        if len(db):
            nearest, _ = db._nearest(keys)
            shared_batches += int(torch.unique(nearest).numel() < nearest.numel())
        db.update(keys, labels, block=block)
    assert shared_batches >= 6
    assert int((db.point_blocks == -1).sum()) >= 1  # a placeholder was left


def test_within_batch_conflict_makes_a_later_key_far() -> None:
    """Note case 1: the conflict halves the radius, so the later same-label key founds a cluster."""
    db = VectorDatabase(init_radius=1.0)
    db.update(k(10, 0), torch.tensor([20]), block=0)
    db.update(torch.tensor([[10.5, 0.0], [11.8, 0.0]]), torch.tensor([99, 20]), block=1)
    assert len(db) == 3 and db.conflicts == 1
    assert db.radii.tolist() == pytest.approx([0.25 - 1e-5, 0.25 + 1e-5, 1.0])
    assert torch.equal(db.centers[0], torch.tensor([10.0, 0.0]))  # not expanded


def test_within_batch_second_conflict_is_far_instead() -> None:
    """Note case 2: one conflict in all, not two."""
    db = VectorDatabase(init_radius=1.0)
    db.update(k(20, 0), torch.tensor([30]), block=0)
    db.update(torch.tensor([[20.4, 0.0], [21.6, 0.0]]), torch.tensor([77, 78]), block=1)
    assert len(db) == 3 and db.conflicts == 1
    assert db.radii.tolist() == pytest.approx([0.2 - 1e-5, 0.2 + 1e-5, 1.0])


def test_within_batch_expansion_widens_the_reach_of_a_later_key() -> None:
    """Note case 3: the second key meets the radius grown by the first (2.5 <= 5/3 + 1)."""
    db = VectorDatabase(init_radius=1.0)
    db.update(k(0, 0), torch.tensor([10]), block=0)
    db.update(k(2, 0), torch.tensor([10]), block=1)  # one cluster: center 1, radius 1
    assert len(db) == 1
    db.update(torch.tensor([[3.0, 0.0], [-1.5, 0.0]]), torch.tensor([10, 10]), block=2)
    assert len(db) == 1 and db.stats()["points"] == 4
    assert db.centers[0, 0].item() == pytest.approx(0.875)
    assert db.radii[0].item() == pytest.approx(2.375)
    assert db.route(torch.tensor([[-1.4, 0.0], [2.9, 0.0], [0.1, 0.0]])).tolist() == [2, 2, 0]


def test_nearest_center_is_the_exact_distance_argmin_on_near_ties() -> None:
    """Two centers at distances differing by ~1e-4 of a key of norm ~1e3: the expanded form
    |c|^2 - 2 k.c rounds them into the wrong order; the exact distances do not."""
    gen = torch.Generator().manual_seed(0)
    dim, wrong = 64, 0
    for trial in range(200):
        key = torch.randn(1, dim, generator=gen) * 300
        u = torch.randn(dim, generator=gen)
        u /= u.norm()
        a = key[0] + u * 1.0
        b = key[0] - u * (1.0 + 1e-4 * torch.rand((), generator=gen).item())
        centers = torch.stack([b, a]) if trial % 2 else torch.stack([a, b])
        db = VectorDatabase(init_radius=5.0)
        db.update(centers, torch.tensor([1, 2]), block=0)
        exact = (key - centers).norm(dim=1)
        want = int(exact.argmin())
        got, dist = db._nearest(key)
        approx = ((centers * centers).sum(1) - 2 * (key @ centers.T)[0]).argmin()
        wrong += int(approx) != want
        assert int(got) == want, trial
        assert float(dist) == float(exact[want])
    assert wrong > 0  # the expanded form alone gets some of these wrong


@pytest.mark.parametrize("max_candidates", [256, 8], ids=["among candidates", "over every center"])
def test_nearest_center_rechecks_beyond_the_candidate_window(max_candidates: int, monkeypatch) -> None:
    """Many near-equidistant centers (more than the re-ranked candidates): still the exact argmin,
    from the centers the rounding bound leaves open or, past ``_MAX_CANDIDATES``, from all."""
    import peft_melo.vector_database as vdb

    monkeypatch.setattr(vdb, "_MAX_CANDIDATES", max_candidates)
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(1, 32, generator=gen) * 200
    dirs = torch.randn(40, 32, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    centers = key + dirs * (2.0 + 1e-5 * torch.rand(40, 1, generator=gen))
    db = VectorDatabase(init_radius=1.0)
    db.update(centers, torch.arange(40), block=0)
    got, _ = db._nearest(key)
    assert int(got) == int((key - centers).norm(dim=1).argmin())


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_init_radius_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="init_radius must be > 0"):
        VectorDatabase(init_radius=bad)


def test_memory_per_cluster_stays_near_one_key() -> None:
    """Founders are keyed by their center (no second copy of the key); spare capacity included,
    a database of single-point clusters holds at most 2.2 x (4 bytes x d) per cluster."""
    gen = torch.Generator().manual_seed(0)
    dim = 512
    db = VectorDatabase(init_radius=1.0)
    db.update(torch.randn(3000, dim, generator=gen) * 10, torch.arange(3000) % 5, block=0)
    for block in range(1, 4):  # grows the buffers; near keys expand or conflict
        near = db.centers[torch.randint(0, len(db), (20,), generator=gen)] + 0.01 * torch.randn(20, dim, generator=gen)
        db.update(torch.cat([near, torch.randn(80, dim, generator=gen) * 10]), torch.randint(0, 5, (100,), generator=gen), block)
    assert db.conflicts > 0 and db.stats()["points"] > len(db)  # expansions and conflicts happened
    assert db.nbytes() / len(db) <= 2.2 * 4 * dim
    other = VectorDatabase(init_radius=1.0)
    other.load_state_dict(db.state_dict())  # a loaded database keys its founders by center too
    assert other.nbytes() <= db.nbytes()
    probe = torch.cat([db.centers[:50] + 0.001, torch.randn(50, dim, generator=gen) * 10])
    assert torch.equal(other.route(probe), db.route(probe))


def test_nearest_search_in_chunks_gives_the_same_answer(monkeypatch) -> None:
    import peft_melo.vector_database as vdb

    gen = torch.Generator().manual_seed(4)
    db = VectorDatabase(init_radius=1.0)
    db.update(torch.randn(200, 8, generator=gen), torch.arange(200), block=0)
    keys = torch.randn(50, 8, generator=gen)
    want = db._nearest(keys)
    monkeypatch.setattr(vdb, "_NEAREST_CHUNK", 200 * 3)  # 3 keys per chunk
    got = db._nearest(keys)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_screen_skips_the_search_only_for_keys_beyond_every_reach(monkeypatch) -> None:
    """Against the full search, at several screening steps: a key left unsearched is farther from
    its nearest center than that cluster's reach; a searched key gets the full search's answer."""
    import peft_melo.vector_database as vdb

    monkeypatch.setattr(vdb, "_SCREEN_STEP", 256)
    gen = torch.Generator().manual_seed(5)
    dim = 64
    db = VectorDatabase(init_radius=1.0)
    db.update(torch.randn(5000, dim, generator=gen) * 3, torch.arange(5000) % 7, block=0)
    near = db.centers[torch.randint(0, len(db), (30,), generator=gen)] + 0.05 * torch.randn(30, dim, generator=gen)
    keys = torch.cat([near, torch.randn(30, dim, generator=gen) * 3])
    clear, nearest, dist = db._batch_nearest(keys)
    want_idx, want_dist = db._nearest(keys)
    assert 0 < int(clear.sum()) < keys.shape[0]  # both kinds in this batch
    searched = ~clear
    assert torch.equal(nearest[searched], want_idx[searched])
    assert torch.equal(dist[searched], want_dist[searched])
    assert bool((want_dist[clear] > db.radii[want_idx[clear]] + db.init_radius).all())


def test_key_beyond_reach_is_searched_when_the_batch_can_widen_its_cluster() -> None:
    """The second key is beyond the cluster's reach before the batch (2.5 > 1 + 1), but the first
    key of the same batch joins that cluster and may widen it: the second is searched exactly."""
    db = VectorDatabase(init_radius=1.0)
    db.update(k(0, 0), torch.tensor([10]), block=0)
    db.update(k(2, 0), torch.tensor([10]), block=1)  # one cluster: center 1, radius 1
    keys = torch.tensor([[3.0, 0.0], [-1.5, 0.0], [40.0, 0.0]])
    screen = db._screen(keys)
    assert (screen.lows.amin(1) + screen.ks_sq > screen.slack).tolist() == [False, True, True]
    clear, nearest, dist = db._batch_nearest(keys)
    assert clear.tolist() == [False, False, True]  # the far key at 40 stays unsearched
    assert nearest[:2].tolist() == [0, 0] and dist[:2].tolist() == pytest.approx([2.0, 2.5])


def test_index_is_rewritten_per_update_not_rebuilt() -> None:
    """After many updates the index's runs equal a from-scratch build; stale runs stay bounded."""
    gen = torch.Generator().manual_seed(6)
    db = VectorDatabase(init_radius=0.6)
    for block in range(40):
        db.update(torch.randn(10, 3, generator=gen) * 1.5, torch.randint(0, 3, (10,), generator=gen), block=block)
    rebuilt = VectorDatabase(init_radius=0.6)
    rebuilt.load_state_dict(db.state_dict())
    assert torch.equal(db.point_clusters, rebuilt.point_clusters)
    assert torch.equal(db.point_blocks, rebuilt.point_blocks)
    assert torch.equal(db.cluster_count, rebuilt.cluster_count)
    assert db._no - db._live <= max(db._live, 1024)


def test_screened_routing_routes_as_the_full_search(monkeypatch) -> None:
    """Routing through the sketch screen sends every key where the full search does: keys near
    centers (inside and just outside), far keys, points of expanded and shrunk clusters."""
    import peft_melo.vector_database as vdb

    monkeypatch.setattr(vdb, "_SCREEN_STEP", 256)
    gen = torch.Generator().manual_seed(7)
    dim = 64
    db = VectorDatabase(init_radius=1.0)
    db.update(torch.randn(3000, dim, generator=gen) * 3, torch.arange(3000) % 5, block=0)
    for block in range(1, 4):  # expansions and conflicts: multi-point clusters, placeholders
        near = db.centers[torch.randint(0, len(db), (40,), generator=gen)] + 0.3 * torch.randn(40, dim, generator=gen)
        db.update(near, torch.randint(0, 5, (40,), generator=gen), block=block)
    centers = db.centers[torch.randint(0, len(db), (60,), generator=gen)]
    probe = torch.cat([centers + 0.05 * torch.randn(60, dim, generator=gen),
                       centers + 0.9 * torch.randn(60, dim, generator=gen) / dim ** 0.5,
                       torch.randn(60, dim, generator=gen) * 3])
    monkeypatch.setattr(vdb, "_SCREEN_ROUTES_FROM", 1 << 40)
    want = db.route(probe)
    monkeypatch.setattr(vdb, "_SCREEN_ROUTES_FROM", 0)
    got = db.route(probe)
    assert (want >= 0).sum() > 30 and (want < 0).sum() > 30  # both outcomes in the probe
    assert torch.equal(got, want)
