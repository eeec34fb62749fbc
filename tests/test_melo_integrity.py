"""A saved MELO adapter is verified before use (table-driven): every damaged directory is refused
by ``MeloModel.from_pretrained`` with the file named and the base model left unwrapped; a resumed
checkpoint state goes through the same validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from peft_melo import MeloConfig, MeloModel, get_melo_model
from peft_melo.integrity import CHECKSUM_KEY, AdapterIntegrityError, tensor_digest
from tests.tiny_checkpoints import CASES, make_batch

CASE = CASES[0]  # a T5 stand-in with t5-small's module paths
ADAPTER, DATABASE, CONFIG = "adapter_model.safetensors", "vector_database.safetensors", "adapter_config.json"


def _saved(directory: Path) -> MeloModel:
    """A MELO model with two trained-looking blocks and a 3-cluster database, saved in ``directory``."""
    config = MeloConfig(target_modules=list(CASE.targets), grace_layer=CASE.grace_layer, num_block=4,
                        num_rank_per_block=2, init_radius=1e-3, num_iter=2)
    melo = get_melo_model(CASE.build(), config)
    batch = make_batch(CASE.kind, n=3)
    melo.routing.force(1)
    with torch.no_grad():
        melo(**batch)
    keys = melo.routing.last_keys.clone()
    melo.routing.release()
    melo.database.update(keys, batch["labels"], block=1)
    melo.next_block = 2
    melo.save_pretrained(directory)
    return melo


def _rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None], checksums: bool = True) -> None:
    """Change the tensors of a safetensors file; re-sign them (valid checksums) unless told not to."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    if checksums:
        meta[CHECKSUM_KEY] = json.dumps({k: tensor_digest(v) for k, v in tensors.items()})
    save_file(tensors, str(path), metadata=meta)


def _flip_byte(path: Path, tensor_suffix: str) -> None:
    """Flip one byte inside the data of the first tensor whose name ends with ``tensor_suffix``."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k.endswith(tensor_suffix))
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start + 5] ^= 0xFF
    path.write_bytes(bytes(raw))


def _edit_config(directory: Path, **values) -> None:
    cfg = json.loads((directory / CONFIG).read_text())
    cfg.update(values)
    (directory / CONFIG).write_text(json.dumps(cfg))


def _set(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[key] = fn(tensors[key])
    return change


def _first(suffix: str) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        name = next(k for k in tensors if k.endswith(suffix))
        del tensors[name]
    return change


# (id, damage(directory), file named in the message, what the message says)
DAMAGE: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("flipped byte in melo_A", lambda d: _flip_byte(d / ADAPTER, "melo_A"), ADAPTER, "do not match their checksums"),
    ("flipped byte in centers", lambda d: _flip_byte(d / DATABASE, "centers"), DATABASE, "do not match their checksums"),
    ("NaN centers", lambda d: _rewrite(d / DATABASE, _set("centers", lambda t: t.fill_(float("nan")))),
     DATABASE, "centers holds NaN or infinite values"),
    ("infinite radii", lambda d: _rewrite(d / DATABASE, _set("radii", lambda t: t.fill_(float("inf")))),
     DATABASE, "radii holds NaN or infinite values"),
    ("NaN LoRA factor", lambda d: _rewrite(d / ADAPTER, lambda ts: next(v for k, v in ts.items()
                                                                       if k.endswith("melo_B")).fill_(float("nan"))),
     ADAPTER, "holds NaN or infinite values"),
    ("negative next block", lambda d: _rewrite(d / ADAPTER, _set("melo_next_block", lambda t: t.fill_(-1))),
     ADAPTER, "melo_next_block=-1 is outside 0..4"),
    ("next block past num_block", lambda d: _rewrite(d / ADAPTER, _set("melo_next_block", lambda t: t.fill_(9))),
     ADAPTER, "melo_next_block=9 is outside 0..4"),
    ("block id not trained yet", lambda d: _rewrite(d / DATABASE, _set("point_blocks", lambda t: t.fill_(2))),
     DATABASE, "point block ids span 2..2; they must lie in -1..1"),
    ("block id below -1", lambda d: _rewrite(d / DATABASE, _set("point_blocks", lambda t: t.fill_(-5))),
     DATABASE, "point block ids span -5..-5"),
    ("cluster id out of range", lambda d: _rewrite(d / DATABASE, _set("point_clusters", lambda t: t + 7)),
     DATABASE, "point cluster ids span"),
    ("key dimension of another layer",
     lambda d: _rewrite(d / DATABASE, lambda ts: ts.update(centers=torch.zeros(ts["centers"].shape[0], 5),
                                                           point_keys=torch.zeros(ts["point_keys"].shape[0], 5))),
     DATABASE, "keys have dimension 5"),
    ("missing LoRA tensor", lambda d: _rewrite(d / ADAPTER, _first("melo_A")), ADAPTER,
     "do not fit the model's target modules"),
    ("changed grace_layer", lambda d: _edit_config(d, grace_layer="encoder.block.3.layer.1.DenseReluDense.wo"),
     ADAPTER, "saved for another configuration or model (grace_layer"),
    ("changed key_id", lambda d: _edit_config(d, key_id=-2), ADAPTER, "key_id: saved -1, now -2"),
    ("malformed adapter_config.json", lambda d: (d / CONFIG).write_text('{"peft_type": "MELO",'), CONFIG,
     "is not readable JSON"),
    ("non-UTF-8 adapter_config.json", lambda d: (d / CONFIG).write_bytes(b'{"peft_type": "\xff"}'), CONFIG,
     "is not readable JSON"),
    ("adapter_config.json of wrong type", lambda d: _edit_config(d, num_block="four"), CONFIG,
     "MeloConfig.num_block='four' is invalid"),
    ("truncated tensor file", lambda d: (d / DATABASE).write_bytes((d / DATABASE).read_bytes()[:40]), DATABASE,
     "cannot read"),
]


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("adapter")
    _saved(directory)
    return directory


@pytest.mark.parametrize("damage,file_name,message", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_adapter_is_refused_before_use(saved_dir: Path, tmp_path: Path, damage, file_name: str,
                                               message: str) -> None:
    import shutil

    directory = tmp_path / "adapter"
    shutil.copytree(saved_dir, directory)
    damage(directory)
    base = CASE.build()
    with pytest.raises(AdapterIntegrityError) as err:
        MeloModel.from_pretrained(base, directory)
    text = str(err.value)
    assert str(directory / file_name) in text and message in text, text
    assert "\n" not in text
    assert not any("melo_A" in name for name, _ in base.named_parameters())  # model untouched


def test_intact_adapter_loads_and_routes_the_same(saved_dir: Path) -> None:
    loaded = MeloModel.from_pretrained(CASE.build(), saved_dir)
    assert loaded.next_block == 2 and len(loaded.database) == 3
    assert loaded.database.point_blocks.tolist() == [1, 1, 1]


def test_override_that_changes_the_key_is_refused(saved_dir: Path) -> None:
    with pytest.raises(AdapterIntegrityError, match="key_position: saved 'padded', now 'last_real'"):
        MeloModel.from_pretrained(CASE.build(), saved_dir, key_position="last_real")


def test_adapter_without_checksums_loads_with_a_warning(saved_dir: Path, tmp_path: Path, caplog) -> None:
    import shutil

    directory = tmp_path / "old"
    shutil.copytree(saved_dir, directory)
    for name in (ADAPTER, DATABASE):
        with safe_open(str(directory / name), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="peft_melo.integrity"):
        loaded = MeloModel.from_pretrained(CASE.build(), directory)
    assert loaded.next_block == 2
    assert "carries no checksums" in caplog.text


def test_checkpoint_state_is_validated(saved_dir: Path, tmp_path: Path) -> None:
    melo = _saved(tmp_path / "again")
    state = melo.checkpoint_state()
    bad = dict(state, **{"db.radii": torch.full_like(state["db.radii"], float("nan"))})
    other = get_melo_model(CASE.build(), melo.config_)
    with pytest.raises(AdapterIntegrityError, match="checkpoint state: radii holds NaN"):
        other.load_checkpoint_state(bad)
    bad = dict(state, melo_next_block=torch.tensor([7]))
    with pytest.raises(AdapterIntegrityError, match="melo_next_block=7 is outside 0..4"):
        other.load_checkpoint_state(bad)
    other.load_checkpoint_state(state)
    assert other.next_block == 2 and len(other.database) == 3
