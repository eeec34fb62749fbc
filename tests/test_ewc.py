"""EWC penalty: zero at the anchor, grows with distance, weighted by the Fisher diagonal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from btp.editors.ewc import EWCPenalty, fisher_diagonal
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


def test_value_is_half_lambda_fisher_weighted_squared_distance() -> None:
    pen = penalty([1.0, 3.0], lam=2.0)
    w = torch.tensor([2.0, -1.0])
    # 2/2 * (1*4 + 3*1) = 7
    assert pen({"w": w}).item() == pytest.approx(7.0)


def test_grows_with_distance() -> None:
    pen = penalty([0.5, 0.5])
    direction = torch.tensor([1.0, -2.0])
    values = [pen({"w": t * direction}).item() for t in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert values[3] == pytest.approx(4 * values[2])  # quadratic


def test_fisher_zero_contributes_nothing() -> None:
    pen = penalty([0.0, 1.0])
    assert pen({"w": torch.tensor([1000.0, 0.0])}).item() == 0.0
    assert pen({"w": torch.tensor([1000.0, 1.0])}).item() == pen({"w": torch.tensor([0.0, 1.0])}).item()
    # the gradient pulls only the parameter with Fisher > 0 back to its anchor
    w = torch.tensor([5.0, 5.0], requires_grad=True)
    pen({"w": w}).backward()
    assert w.grad[0].item() == 0.0 and w.grad[1].item() > 0.0


def test_state_round_trip_and_shape_check() -> None:
    pen = penalty([1.0, 2.0], lam=3.0)
    again = EWCPenalty.from_state(pen.state(), 3.0)
    w = {"w": torch.tensor([0.3, -0.7])}
    assert again(w).item() == pen(w).item()
    assert EWCPenalty.from_state({}, 1.0) is None
    with pytest.raises(ValueError):
        EWCPenalty({"w": torch.ones(2)}, {"w": torch.ones(3)}, 1.0)


class _Reg(nn.Module):
    """y = x @ w (+ unused param), loss = mean squared error: gradients known in closed form."""

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


def test_fisher_is_the_mean_squared_gradient() -> None:
    model = _Reg()
    batches = [{"x": torch.tensor([[1.0, 0.0]]), "labels": torch.tensor([0.0])},
               {"x": torch.tensor([[0.0, 2.0]]), "labels": torch.tensor([1.0])},
               {"x": torch.tensor([[5.0, 5.0]]), "labels": torch.tensor([0.0])}]
    params = {"w": model.w, "unused": model.unused}
    f = fisher_diagonal(model, params, iter(batches), n_batches=2, device=torch.device("cpu"))
    # batch 1: grad = 2*(1-0)*[1,0] = [2,0]; batch 2: 2*(0-1)*[0,2] = [0,-4] -> mean sq [2, 8]
    assert torch.allclose(f["w"], torch.tensor([2.0, 8.0]))
    assert torch.equal(f["unused"], torch.zeros(1))  # no gradient: Fisher 0, free to move
    assert model.w.grad is None
    with pytest.raises(ConfigError):
        fisher_diagonal(model, params, iter([]), 2, torch.device("cpu"))
