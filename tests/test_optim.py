"""The baselines' shared optimizer loop (btp/editors/optim.py) on a one-parameter quadratic."""

from __future__ import annotations

import pytest
import torch

from btp.editors.optim import Step, make_optimizer, run_steps
from btp.errors import ConfigError


def _quadratic(start: float = 3.0) -> torch.Tensor:
    return torch.tensor([start], requires_grad=True)


def test_plain_steps_follow_sgd_by_hand() -> None:
    w = _quadratic()
    opt = make_optimizer("sgd", [w], 0.25)
    losses = run_steps(opt, 3, lambda _: Step((w ** 2).sum()))
    # loss w^2, gradient 2w, w <- w - 0.25 * 2w = w / 2: 3 -> 1.5 -> 0.75 -> 0.375
    assert losses == [9.0, 2.25, 0.5625]
    assert w.item() == 0.375


def test_none_stops_before_recording_or_updating() -> None:
    w = _quadratic()
    opt = make_optimizer("sgd", [w], 0.25)
    losses = run_steps(opt, 10, lambda step: None if step == 2 else Step((w ** 2).sum()))
    assert losses == [9.0, 2.25] and w.item() == 0.75


def test_stop_records_the_value_but_does_not_update() -> None:
    w = _quadratic()
    opt = make_optimizer("sgd", [w], 0.25)
    losses = run_steps(opt, 10, lambda step: Step((w ** 2).sum(), value=-float(step),
                                                  stop=step == 1))
    assert losses == [0.0, -1.0] and w.item() == 1.5


def test_hooks_run_around_the_update_and_the_prefix_is_told_once() -> None:
    w = _quadratic()
    opt = make_optimizer("sgd", [w], 0.25)
    calls: list[str] = []

    class Prefix:
        def step_done(self) -> None:
            calls.append("prefix")

    def forward(step: int) -> Step:
        calls.append(f"forward{step}")
        return Step((w ** 2).sum())

    def before() -> None:
        calls.append("before")
        w.grad.zero_()  # a gradient edit: nothing moves

    def after() -> None:
        calls.append("after")
        assert not torch.is_grad_enabled()
        w.clamp_(max=2.0)  # a projection

    losses = run_steps(opt, 2, forward, prefix=Prefix(), before_update=before, after_update=after)
    assert calls == ["forward0", "prefix", "before", "after", "forward1", "before", "after"]
    assert losses == [9.0, 4.0] and w.item() == 2.0


def test_zero_steps_and_unknown_optimizer() -> None:
    w = _quadratic()
    assert run_steps(make_optimizer("adam", [w], 0.1), 0, lambda _: Step((w ** 2).sum())) == []
    assert w.item() == 3.0
    with pytest.raises(ConfigError, match="optimizer must be adam or sgd, got 'rmsprop'"):
        make_optimizer("rmsprop", [w], 0.1)
