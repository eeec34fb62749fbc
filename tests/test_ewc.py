"""EWC as the GRACE repository's ft_ewc: lambda * sum F (w - w0)^2 (no 1/2), F and w0 from the
window of the last N edit batches, hand-computed on a model with closed-form gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from btp.editors.ewc import EWCPenalty, fisher_and_anchor
from btp.errors import ConfigError


def penalty(fisher: list[float], lam: float = 2.0) -> EWCPenalty:
    f = {"w": torch.tensor(fisher)}
    a = {"w": torch.zeros(len(fisher))}
    return EWCPenalty(f, a, lam)


def test_zero_at_the_anchor() -> None:
    anchor = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    fisher = {k: torch.rand_like(v) + 0.1 for k, v in anchor.items()}
    pen = EWCPenalty(fisher, anchor, 100.0)
    assert pen({k: v.clone() for k, v in anchor.items()}).item() == 0.0


def test_value_is_lambda_fisher_weighted_squared_distance_without_a_half() -> None:
    pen = penalty([1.0, 3.0], lam=2.0)
    w = torch.tensor([2.0, -1.0])
    # 2 * (1*4 + 3*1) = 14 (the repository has no 1/2 factor)
    assert pen({"w": w}).item() == pytest.approx(14.0)


def test_grows_quadratically_with_distance() -> None:
    pen = penalty([0.5, 0.5])
    direction = torch.tensor([1.0, -2.0])
    values = [pen({"w": t * direction}).item() for t in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert values[3] == pytest.approx(4 * values[2])


def test_fisher_zero_contributes_nothing() -> None:
    pen = penalty([0.0, 1.0])
    assert pen({"w": torch.tensor([1000.0, 0.0])}).item() == 0.0
    w = torch.tensor([5.0, 5.0], requires_grad=True)
    pen({"w": w}).backward()
    assert w.grad[0].item() == 0.0 and w.grad[1].item() > 0.0


def test_shape_check() -> None:
    with pytest.raises(ValueError):
        EWCPenalty({"w": torch.ones(2)}, {"w": torch.ones(3)}, 1.0)


class _Reg(nn.Module):
    """y = x @ w, loss = mean squared error: gradient 2 * (x @ w - y) * x, known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 0.0]))
        self.unused = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        class Out:
            pass

        out = Out()
        out.loss = ((x @ self.w - labels) ** 2).mean()
        return out


# Window, most recent first. With w = [1, 0]: gradients g1 = [2, 0], g2 = [0, -4], g3 = [10, 10].
WINDOW = [{"x": torch.tensor([[1.0, 0.0]]), "labels": torch.tensor([0.0])},
          {"x": torch.tensor([[0.0, 2.0]]), "labels": torch.tensor([1.0])},
          {"x": torch.tensor([[1.0, 1.0]]), "labels": torch.tensor([-4.0])}]
CPU = torch.device("cpu")


def _params(model: _Reg) -> dict[str, nn.Parameter]:
    return {"w": model.w, "unused": model.unused}


def test_fisher_window_cumulative_as_the_repository() -> None:
    """The repository never clears the gradient inside the window: the k-th square is that of
    g1 + ... + gk; the sum is divided by N (here 2) and only the N most recent batches count."""
    model = _Reg()
    f, anchor = fisher_and_anchor(model, _params(model), WINDOW, n_batches=2, device=CPU)
    # (g1^2 + (g1 + g2)^2) / 2 = ([4, 0] + [4, 16]) / 2
    assert torch.allclose(f["w"], torch.tensor([4.0, 8.0]))
    assert torch.equal(f["unused"], torch.zeros(1))  # no gradient: Fisher 0, free to move
    assert torch.equal(anchor["w"], torch.tensor([1.0, 0.0]))  # the current weights
    assert model.w.grad is None  # nothing leaks into the edit


def test_fisher_window_per_batch() -> None:
    model = _Reg()
    f, _ = fisher_and_anchor(model, _params(model), WINDOW, n_batches=3, device=CPU,
                             cumulative=False)
    # (g1^2 + g2^2 + g3^2) / 3 = ([4, 0] + [0, 16] + [100, 100]) / 3
    assert torch.allclose(f["w"], torch.tensor([104.0, 116.0]) / 3)


def test_short_window_divides_by_n_and_the_anchor_bug_scales_the_weights() -> None:
    model = _Reg()
    # one edit so far, N = 10: the squared gradient / 10; the anchor is the weights...
    f, anchor = fisher_and_anchor(model, _params(model), WINDOW[:1], n_batches=10, device=CPU)
    assert torch.allclose(f["w"], torch.tensor([0.4, 0.0]))
    assert torch.equal(anchor["w"], model.w.detach())
    # ...or, with the repository's bug, the window's sum of weights / N = 1/10 of them
    _, bug = fisher_and_anchor(model, _params(model), WINDOW[:1], n_batches=10, device=CPU,
                               anchor_sum_bug=True)
    assert torch.allclose(bug["w"], torch.tensor([0.1, 0.0]))
    _, bug3 = fisher_and_anchor(model, _params(model), WINDOW, n_batches=10, device=CPU,
                                anchor_sum_bug=True)
    assert torch.allclose(bug3["w"], torch.tensor([0.3, 0.0]))


def test_bad_window() -> None:
    model = _Reg()
    with pytest.raises(ConfigError):
        fisher_and_anchor(model, _params(model), [], 2, CPU)
    with pytest.raises(ConfigError):
        fisher_and_anchor(model, _params(model), WINDOW, 0, CPU)
