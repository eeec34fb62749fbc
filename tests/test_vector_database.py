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
    """The rules written as the plain per-example, per-cluster loops the original uses."""

    def __init__(self, init_radius: float) -> None:
        self.r0 = init_radius
        self.clusters: list[dict] = []
        self.conflicts = 0
        self.forgotten = 0

    def update(self, keys: torch.Tensor, labels: list[int], block: int) -> None:
        if not self.clusters:
            for key, label in zip(keys, labels):
                self.clusters.append({"c": key.clone(), "r": self.r0, "label": label, "pts": [(key.clone(), block)]})
            return
        before = [(cl["c"].clone(), cl["r"]) for cl in self.clusters]
        nearest = []
        for key in keys:
            dists = [float((key - c).norm()) for c, _ in before]
            j = min(range(len(dists)), key=dists.__getitem__)
            nearest.append((j, dists[j], before[j][1]))
        new = []
        for key, label, (j, d, r) in zip(keys, labels, nearest):
            cl = self.clusters[j]
            if d > r + self.r0:
                new.append({"c": key.clone(), "r": self.r0, "label": label, "pts": [(key.clone(), block)]})
            elif label == cl["label"]:
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
        dists = [float((key - cl["c"]).norm()) for cl in self.clusters]
        j = min(range(len(dists)), key=dists.__getitem__)
        if dists[j] > self.clusters[j]["r"]:
            return -1
        pts = self.clusters[j]["pts"]
        return min(pts, key=lambda pb: float((key - pb[0]).norm()))[1]


def test_batched_database_matches_the_plain_reference() -> None:
    torch.manual_seed(1)
    db, ref = VectorDatabase(init_radius=0.6), ReferenceDatabase(0.6)
    for block in range(12):
        keys = torch.randn(10, 3) * 1.5
        labels = torch.randint(0, 3, (10,))
        db.update(keys, labels, block=block)
        ref.update(keys, labels.tolist(), block=block)
    assert len(db) == len(ref.clusters)
    assert (db.conflicts, db.forgotten) == (ref.conflicts, ref.forgotten)
    assert db.conflicts > 0 and db.forgotten > 0  # the test exercised the conflict path
    assert db.stats()["points"] == sum(len(cl["pts"]) for cl in ref.clusters)
    probe = torch.randn(200, 3) * 1.5
    assert db.route(probe).tolist() == [ref.route(p) for p in probe]
    assert not math.isnan(float(db.radii.sum()))


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_init_radius_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="init_radius must be > 0"):
        VectorDatabase(init_radius=bad)
