"""The one-row matrix-vector path of `Linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccoe_common.model.layers import Linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64), (64,)])
def test_one_bf16_row_matches_f_linear(bias, shape, monkeypatch):
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    real_mv, mv_calls = torch.mv, []
    monkeypatch.setattr(torch, "mv", lambda *a: mv_calls.append(1) or real_mv(*a))
    got = layer(x)
    assert mv_calls == [1], "a single bf16 row on the CPU should take the matrix-vector kernel"
    want = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    assert got.shape == (*shape[:-1], 96) and got.dtype == torch.bfloat16
    # Same product, another kernel: equal up to bf16 rounding of the result.
    assert torch.allclose(got.float(), want, atol=0.05, rtol=0.02)


def test_other_inputs_take_f_linear_exactly(monkeypatch):
    monkeypatch.setattr(torch, "mv", lambda *a: pytest.fail("only one half-precision row takes torch.mv"))
    torch.manual_seed(0)
    half = Linear(64, 96, dtype=torch.bfloat16)
    rows = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(half(rows), F.linear(rows, half.weight, half.bias))
    full = Linear(64, 96)
    row = torch.randn(1, 64)
    assert torch.equal(full(row), F.linear(row, full.weight, full.bias))


def test_gradients_flow_through_the_matrix_vector_path():
    layer = Linear(16, 8, dtype=torch.bfloat16)
    x = torch.randn(1, 16, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
    assert layer.weight.grad.shape == (8, 16)
