"""The MELO adapter on tiny stand-ins of every shipped checkpoint (table-driven, like peft's tests)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_melo import MeloConfig, MeloModel, NoBlockLeftError, get_melo_model
from tests.tiny_checkpoints import CASE_IDS, CASES, Case, make_batch


def _melo(case: Case, **overrides) -> tuple[torch.nn.Module, MeloModel]:
    base = case.build()
    reference = copy.deepcopy(base)
    params = dict(target_modules=list(case.targets), grace_layer=case.grace_layer, num_block=4,
                  num_rank_per_block=2, init_radius=1e-3, num_iter=8, edit_lr=1e-2)
    params.update(overrides)
    return reference, get_melo_model(base, MeloConfig(**params))


def _randomise(melo: MeloModel, seed: int = 3) -> None:
    """Non-zero B so that every block changes the output (B starts at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in melo.melo_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _keys(melo: MeloModel, batch: dict) -> torch.Tensor:
    """The grace-layer keys of ``batch`` (forced mode records them)."""
    melo.routing.force(0)
    with torch.no_grad():
        melo(**batch)
    keys = melo.routing.last_keys.clone()
    melo.routing.release()
    return keys


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_block_is_the_base_model_bit_exact(case: Case) -> None:
    reference, melo = _melo(case)
    _randomise(melo)
    batch = make_batch(case.kind)
    assert torch.equal(_logits(melo, batch), _logits(reference, batch))  # empty database
    keys = _keys(melo, batch)
    melo.database.update(keys + 100.0, batch["labels"], block=1)  # clusters far from every key
    assert melo.database.route(keys).eq(-1).all()
    assert torch.equal(_logits(melo, batch), _logits(reference, batch))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_block_for_every_example_equals_peft_lora(case: Case) -> None:
    reference, melo = _melo(case)
    _randomise(melo)
    batch = make_batch(case.kind)
    block, p, nb = 2, 2, 4
    melo.database.update(_keys(melo, batch), batch["labels"], block=block)
    assert melo.database.route(_keys(melo, batch)).eq(block).all()

    lora = get_peft_model(reference, LoraConfig(r=p, lora_alpha=p * nb, target_modules=list(case.targets),
                                                lora_dropout=0.0,
                                                fan_in_fan_out=type(reference.get_submodule(case.targets[0])).__name__ == "Conv1D"))
    with torch.no_grad():
        for name, module in lora.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                mine = melo.model.get_submodule(name.replace("base_model.model.", "", 1))
                module.lora_A["default"].weight.copy_(mine.melo_A["default"][:, block * p:(block + 1) * p].T)
                module.lora_B["default"].weight.copy_(mine.melo_B["default"][block * p:(block + 1) * p].T)
    torch.testing.assert_close(_logits(melo, batch), _logits(lora, batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mixed_batch_rows_equal_rows_run_alone(case: Case) -> None:
    reference, melo = _melo(case)
    _randomise(melo)
    batch = make_batch(case.kind, n=4)
    keys = _keys(melo, batch)
    melo.database.update(keys[:1], batch["labels"][:1], block=0)
    melo.database.update(keys[1:2], batch["labels"][1:2], block=3)
    # rows 2 and 3 stay unrouted (init_radius is tiny and the keys are distinct)
    assert melo.database.route(keys).tolist() == [0, 3, -1, -1]
    mixed = _logits(melo, batch)
    base = _logits(reference, batch)
    for row in range(4):
        alone = {k: v[row:row + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[row:row + 1], _logits(melo, alone), rtol=1e-3, atol=1e-4)
    assert torch.equal(mixed[2:], base[2:])  # unrouted rows are the base model's, bit for bit
    assert not torch.allclose(mixed[:2], base[:2])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_edit_trains_only_the_current_block(case: Case) -> None:
    reference, melo = _melo(case, init_radius=1.0)
    base_before = {k: v.clone() for k, v in melo.model.state_dict().items() if "melo_" not in k}
    first = make_batch(case.kind, seed=1)
    second = make_batch(case.kind, seed=2)
    result = melo.edit(first)
    assert result.block == 0 and len(result.losses) == 8
    assert result.losses[-1] < result.losses[0]
    after_first = {n: p.detach().clone() for n, p in melo.melo_parameters()}
    result = melo.edit(second)
    assert result.block == 1 and result.losses[-1] < result.losses[0]
    for name, param in melo.melo_parameters():
        old, new = after_first[name], param.detach()
        if name.endswith("melo_A"):
            assert torch.equal(old[:, :2], new[:, :2]) and torch.equal(old[:, 4:], new[:, 4:])
            assert not torch.equal(old[:, 2:4], new[:, 2:4])
        else:
            assert torch.equal(old[:2], new[:2]) and torch.equal(old[4:], new[4:])
            assert not torch.equal(old[2:4], new[2:4])
    for key, value in melo.model.state_dict().items():
        if "melo_" not in key:
            assert torch.equal(value, base_before[key]), key
    assert melo.database.route(_keys(melo, second)).eq(1).all()
    assert melo.next_block == 2 and melo.num_blocks_left == 2


def test_edit_refuses_when_no_block_is_left() -> None:
    case = CASES[0]
    _, melo = _melo(case, num_block=1, num_iter=1)
    melo.edit(make_batch(case.kind))
    with pytest.raises(NoBlockLeftError, match="all 1 LoRA blocks are used"):
        melo.edit(make_batch(case.kind, seed=5))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_save_load_round_trip(case: Case, tmp_path) -> None:
    reference, melo = _melo(case)
    _randomise(melo)
    batch = make_batch(case.kind, n=4)
    keys = _keys(melo, batch)
    melo.database.update(keys[:2], batch["labels"][:2], block=1)
    melo.next_block = 2
    expected = _logits(melo, batch)
    melo.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                    "vector_database.safetensors"}
    loaded = MeloModel.from_pretrained(reference, tmp_path)
    assert loaded.next_block == 2 and len(loaded.database) == 2
    assert loaded.database.route(keys).tolist() == [1, 1, -1, -1]
    assert torch.equal(_logits(loaded, batch), expected)


def test_peft_own_loader_cannot_read_melo_and_says_so(tmp_path) -> None:
    """The route we chose: MELO is not in peft's PeftType registry, so peft refuses the directory."""
    from peft import PeftConfig

    case = CASES[0]
    _, melo = _melo(case)
    melo.save_pretrained(tmp_path)
    with pytest.raises(KeyError):
        PeftConfig.from_pretrained(str(tmp_path))
    assert MeloConfig.from_pretrained(str(tmp_path)).num_block == 4


@pytest.mark.parametrize("case", [c for c in CASES if c.kind != "classification"], ids=lambda c: c.name)
def test_generate_uses_the_prompt_routing_for_every_step(case: Case) -> None:
    reference, melo = _melo(case)
    _randomise(melo)
    batch = make_batch(case.kind, n=4)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    keys = _keys(melo, batch)
    melo.database.update(keys[:2], batch["labels"][:2], block=0)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=1 if case.kind == "causal_lm" else 0)
    edited = melo.generate(**inputs, **kwargs)
    assert melo.routing.blocks.tolist() == [0, 0, -1, -1]
    with torch.no_grad():
        base = reference.generate(**inputs, **kwargs)
    assert torch.equal(edited[2:], base[2:])


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "seq2seq"], ids=lambda c: c.name)
def test_forward_without_the_grace_layer_is_refused_not_routed_stale(case: Case) -> None:
    """T5 called with ``encoder_outputs=`` after a routed batch: the grace layer (in the encoder)
    does not run, so the decoder's adapted layers have no decision of their own and refuse."""
    reference, melo = _melo(case)
    _randomise(melo)
    batch = make_batch(case.kind, n=4)
    melo.database.update(_keys(melo, batch), batch["labels"], block=0)
    assert not torch.equal(_logits(melo, batch), _logits(reference, batch))  # routed to block 0
    assert melo.routing.blocks.tolist() == [0, 0, 0, 0]
    with torch.no_grad():
        encoded = reference.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(RuntimeError, match="MELO has no routing decision for this forward at decoder"):
        melo(encoder_outputs=encoded, attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert melo.routing.blocks is None  # the previous batch's decision is gone
    # with input_ids the key layer runs again and the forward is routed as before
    assert torch.equal(_logits(melo, batch), _logits(melo, batch))


@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "causal_lm"], ids=lambda c: c.name)
def test_generation_with_and_without_cache_gives_the_same_tokens(case: Case) -> None:
    reference, melo = _melo(case)
    _randomise(melo)
    batch = make_batch(case.kind, n=4)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    melo.database.update(_keys(melo, batch)[:2], batch["labels"][:2], block=1)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=1)
    cached = melo.generate(**inputs, use_cache=True, **kwargs)
    assert melo.routing.blocks.tolist() == [1, 1, -1, -1]
    uncached = melo.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        base = reference.generate(**inputs, **kwargs)
    assert not torch.equal(cached[:2], base[:2]) and torch.equal(cached[2:], base[2:])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_key_id_beyond_the_sequence_is_clamped_to_the_last_position(case: Case) -> None:
    _, melo = _melo(case)
    _, far = _melo(case, key_id=10_000)
    batch = make_batch(case.kind)
    assert torch.equal(_keys(far, batch), _keys(melo, batch))  # key_id -1 = the last position
    _, before = _melo(case, key_id=-10_000)
    with pytest.raises(ValueError, match="key_id=-10000 is before the first of"):
        _keys(before, batch)


# Blocks below the lowest adapted block of each stand-in: T5's decoder reads the adapted encoder,
# so only its encoder prefix is cached.
PREFIX_BLOCKS = {"t5-small-ssm-nq": {"encoder.block": 5, "decoder.block": 0},
                 "t5-large-ssm-nq": {"encoder.block": 22, "decoder.block": 0},
                 "scotus-bert": {"bert.encoder.layer": 9}, "gpt2-xl": {"transformer.h": 36},
                 "llama-2-7b": {"model.layers": 28}, "qwen2.5-7b": {"model.layers": 24},
                 "mistral-7b": {"model.layers": 28}, "gpt-j-6b": {"transformer.h": 22}}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_frozen_prefix_cache_gives_the_uncached_edit(case: Case) -> None:
    """Same losses at every step (fp32, relative 1e-5), same LoRA values, same database."""
    batch = make_batch(case.kind, n=4)
    results = {}
    for cached in (True, False):
        torch.manual_seed(0)
        _, melo = _melo(case, cache_frozen_prefix=cached, num_iter=4, edit_lr=5e-2)
        melo.database.update(_keys(melo, batch) + 50.0, batch["labels"], block=0)
        melo.next_block = 1
        outcome = melo.edit(batch)
        results[cached] = (outcome, dict(melo.melo_parameters()), melo.database.state_dict(), melo)
    (on, on_params, on_db, melo), (off, off_params, off_db, _) = results[True], results[False]
    assert on.cached_blocks == PREFIX_BLOCKS[case.name] and off.cached_blocks == {}
    torch.testing.assert_close(torch.tensor(on.losses), torch.tensor(off.losses), rtol=1e-5, atol=0)
    assert on.losses[-1] < on.losses[0]  # the steps after the first (served from the cache) learn
    for name, value in on_params.items():
        torch.testing.assert_close(value, off_params[name], rtol=1e-4, atol=1e-6)
    assert on_db.keys() == off_db.keys() and all(torch.equal(on_db[k], off_db[k]) for k in on_db)
    # the cache is released after the edit: no block keeps a patched forward
    assert not any("forward" in vars(m) for m in melo.model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_edit_runs_under_bf16_autocast_only_for_a_bf16_model(dtype: torch.dtype) -> None:
    """A bf16 base model: every forward of the edit runs under bf16 autocast (the adapted layers'
    LoRA matmuls too) while the factors and the database stay fp32, and the edit learns; an fp32
    model edits without autocast."""
    from peft_melo.layer import MeloLayer

    case = next(c for c in CASES if c.name == "llama-2-7b")
    torch.manual_seed(0)
    base = case.build().to(dtype)
    melo = get_melo_model(base, MeloConfig(target_modules=list(case.targets), grace_layer=case.grace_layer,
                                           num_block=2, num_rank_per_block=2, init_radius=1e-3,
                                           num_iter=6, edit_lr=5e-2))
    seen: list[tuple[bool, torch.dtype]] = []
    layer = next(m for m in melo.model.modules() if isinstance(m, MeloLayer))
    handle = layer.register_forward_hook(
        lambda module, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    result = melo.edit(make_batch(case.kind, n=2))
    handle.remove()
    assert len(seen) == 6 and {s[0] for s in seen} == {dtype == torch.bfloat16}
    assert {s[1] for s in seen} == {dtype}
    assert result.losses[-1] < result.losses[0]
    assert all(p.dtype == torch.float32 for _, p in melo.melo_parameters())
    assert melo.database.centers.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")  # left as it was


@pytest.mark.parametrize("name", ["t5-small-ssm-nq", "llama-2-7b"])
def test_adapted_layers_never_wait_for_the_device(name: str) -> None:
    """A routed forward reads no tensor value back to the host inside the adapted layers (no
    ``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``): on a GPU each would stall the
    stream once per layer. The routing decision is taken once per forward, at the key layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from peft_melo.layer import MeloLayer

    case = next(c for c in CASES if c.name == name)
    batch = make_batch(case.kind, n=4)
    _, melo = _melo(case)
    _randomise(melo)
    melo.database.update(_keys(melo, batch)[:2], batch["labels"][:2], block=0)  # rows 0, 1 routed
    inside: list[str] = []
    reads: dict[str, int] = {"layers": 0, "elsewhere": 0}

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero):
                reads["layers" if inside else "elsewhere"] += 1
            return func(*args, **(kwargs or {}))

    for module in melo.model.modules():
        if isinstance(module, MeloLayer):
            module.register_forward_pre_hook(lambda m, a: inside.append(m._layer_name))
            module.register_forward_hook(lambda m, a, o: inside.pop() and None)
    with torch.no_grad(), CountReads():
        melo(**batch)
    assert melo.routing.blocks.tolist()[:2] == [0, 0]
    assert reads["layers"] == 0
    assert reads["elsewhere"] <= 4  # the one routing decision (nearest-center checks, any routed)
