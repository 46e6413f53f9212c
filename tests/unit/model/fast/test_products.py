"""CPU fast paths of the products (model/fast/products.py): one row through `torch.mv`, up to
256 bf16 rows through a transposed MLP, up to 32 through a transposed LM head; everything else
takes the plain kernels exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ccoe_common.engine.params import SamplingParams
from ccoe_common.engine.sampler import RowSampling, sample
from ccoe_common.model.fast import products
from ccoe_common.model.fast.products import TRANSPOSED_HEAD_MAX_ROWS, TRANSPOSED_MLP_MAX_ROWS, Linear, head_logits
from ccoe_common.model.layers import MLP


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64), (64,)])
def test_one_bf16_row_matches_f_linear(bias, shape, monkeypatch):
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    real_mv, real_addmv, mv_calls = torch.mv, torch.addmv, []
    monkeypatch.setattr(torch, "mv", lambda *a: mv_calls.append("mv") or real_mv(*a))
    monkeypatch.setattr(torch, "addmv", lambda *a: mv_calls.append("addmv") or real_addmv(*a))
    got = layer(x)
    assert mv_calls == ["addmv" if bias else "mv"], "one bf16 row on the CPU should take the matrix-vector kernel"
    want = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    assert got.shape == (*shape[:-1], 96) and got.dtype == torch.bfloat16
    # Same product, another kernel: equal up to bf16 rounding of the result.
    assert torch.allclose(got.float(), want, atol=0.05, rtol=0.02)


def test_other_inputs_take_f_linear_exactly(monkeypatch):
    for name in ("mv", "addmv"):
        monkeypatch.setattr(torch, name, lambda *a: pytest.fail("only one half-precision row takes torch.mv"))
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


def _mlp(dtype: torch.dtype, bias: bool) -> MLP:
    config = SimpleNamespace(hidden_size=64, intermediate_size=160, mlp_bias=bias)  # all MLP reads
    torch.manual_seed(0)
    mlp = MLP(config, dtype=dtype)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return mlp


def _reference(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    def lin(m: torch.nn.Linear, v: torch.Tensor) -> torch.Tensor:
        return F.linear(v, m.weight.float(), None if m.bias is None else m.bias.float())
    xf = x.float()
    return lin(mlp.down_proj, F.silu(lin(mlp.gate_proj, xf)) * lin(mlp.up_proj, xf))


@pytest.mark.parametrize("bias", [False, True])
def test_several_bf16_rows_take_the_transposed_mlp(bias, monkeypatch):
    mlp = _mlp(torch.bfloat16, bias)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    want = _reference(mlp, x)
    monkeypatch.setattr(F, "linear", lambda *a: pytest.fail("the transposed path multiplies W @ x^T itself"))
    got = mlp(x)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=0.03, rtol=0.03)


def test_fp32_mlp_is_the_plain_one():
    mlp = _mlp(torch.float32, True)
    x = torch.randn(3, 5, 64)
    want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert torch.equal(mlp(x), want)


def test_a_prefill_sized_bf16_batch_takes_the_plain_mlp(monkeypatch):
    mlp = _mlp(torch.bfloat16, False)
    x = torch.randn(2, TRANSPOSED_MLP_MAX_ROWS, 64, dtype=torch.bfloat16)  # above the limit
    want = _reference(mlp, x)
    monkeypatch.setattr(products, "transposed_mlp", lambda *a: pytest.fail("too many rows for the transposed path"))
    got = mlp(x)
    assert got.shape == x.shape
    assert torch.allclose(got.float(), want, atol=0.03, rtol=0.03)


@pytest.mark.parametrize("rows", [2, 13, TRANSPOSED_HEAD_MAX_ROWS])
def test_a_few_bf16_rows_take_the_transposed_head_and_sample_as_f_linear(rows, monkeypatch):
    torch.manual_seed(rows)
    head = Linear(64, 500, bias=False, dtype=torch.bfloat16).requires_grad_(False)  # as served
    h = torch.randn(rows, 64, dtype=torch.bfloat16)
    want = F.linear(h.float(), head.weight.float())
    monkeypatch.setattr(F, "linear", lambda *a: pytest.fail("the transposed head multiplies W @ h^T itself"))
    got = head_logits(head, h)
    assert got.shape == (rows, 500) and got.dtype == torch.bfloat16
    assert got.stride() == (1, rows), "logits stay the transposed view of W @ h^T"
    assert torch.allclose(got.float(), want, atol=0.05, rtol=0.02)
    # The sampler reads the view as it is: greedy picks and logprobs as from a contiguous copy.
    greedy = SamplingParams.create(logprobs=True)
    picks = sample(got, [RowSampling(greedy, None, None)] * rows)
    assert picks == sample(got.contiguous(), [RowSampling(greedy, None, None)] * rows)


def test_other_heads_are_plain_linear(monkeypatch):
    torch.manual_seed(0)
    head = Linear(64, 500, bias=False, dtype=torch.bfloat16)
    many = torch.randn(TRANSPOSED_HEAD_MAX_ROWS + 1, 64, dtype=torch.bfloat16)
    assert torch.equal(head_logits(head, many), F.linear(many, head.weight))
    full = Linear(64, 500, bias=False)
    rows = torch.randn(5, 64)
    assert torch.equal(head_logits(full, rows), F.linear(rows, full.weight))
    seq = torch.randn(2, 3, 64, dtype=torch.bfloat16)  # [B, T, D]: every position's logits
    assert torch.equal(head_logits(head, seq), F.linear(seq, head.weight))
