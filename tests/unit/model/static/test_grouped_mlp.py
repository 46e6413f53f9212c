"""The mixed-expert MLP as one grouped GEMM per projection (model/static/grouped_mlp.py)
against the per-expert loop: each module called on its own rows.

The two paths round differently (other kernels, other summation orders), so they are compared
with a bound derived from the arithmetic: both are within `mlp_error_bound` of the exact
(float64) MLP on the same rounded inputs and weights, hence within twice it of each other.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccoe_common.model.config import BackboneConfig
from ccoe_common.model.layers import MLP
from ccoe_common.model.static.grouped_mlp import masked_grouped_mm, pick_grouped_mm, stack_mlps

HIDDEN, INTER = 64, 96
# Rows per module (backbone first): an empty group, and one module with most rows.
COUNTS = (3, 0, 5, 1)


def _config(mlp_bias: bool) -> BackboneConfig:
    from ccoe_common.model.config import RopeConfig

    return BackboneConfig(model_type="llama", vocab_size=32, hidden_size=HIDDEN, intermediate_size=INTER, num_layers=1,
                          num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope=RopeConfig(),
                          max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=False, o_bias=False,
                          mlp_bias=mlp_bias)


def _mlps(n: int, dtype: torch.dtype, device: torch.device, mlp_bias: bool, seed: int) -> list[MLP]:
    gen = torch.Generator().manual_seed(seed)
    mlps = []
    for _ in range(n):
        mlp = MLP(_config(mlp_bias))
        with torch.no_grad():
            for p in mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        mlps.append(mlp.to(device=device, dtype=dtype).requires_grad_(False))
    return mlps


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


def mlp_error_bound(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """First-order bound on |computed - exact| of `mlp(x)` in x's dtype, per element, with
    products accumulated in fp32 and each result rounded to the dtype (unit roundoff u):
    a K-term dot product is off by at most K*u32*(|x| . |w|) plus u*|result|, silu's slope is
    at most 1.1, and errors of the product silu(g)*a add up to first order. Doubled to cover
    second-order terms and silu's own rounding."""
    u, u32 = _unit_roundoff(x.dtype), 2.0**-24
    f64 = {n: p.detach().double() for n, p in mlp.named_parameters()}
    xd = x.double()

    def proj(name: str, v: torch.Tensor, err_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        w = f64[f"{name}.weight"]
        out = v @ w.t()
        if f"{name}.bias" in f64:
            out = out + f64[f"{name}.bias"]
        err = u * out.abs() + v.shape[-1] * u32 * (v.abs() @ w.abs().t())
        if err_in is not None:
            err = err + err_in @ w.abs().t()
        return out, err

    g, eg = proj("gate_proj", xd, None)
    a, ea = proj("up_proj", xd, None)
    s = F.silu(g)
    es = 1.1 * eg + u * s.abs()
    h = s * a
    eh = es * a.abs() + s.abs() * ea + es * ea + u * h.abs()
    _, eo = proj("down_proj", h, eh)
    return 2 * eo


def _loop(mlps: list[MLP], x: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    out, start = [], 0
    for mlp, c in zip(mlps, counts, strict=True):
        if c:
            out.append(mlp(x[start:start + c]))
        start += c
    return torch.cat(out)


def _dtypes(device: torch.device) -> list[torch.dtype]:
    # The CUDA grouped kernel is bf16 only; the CPU runs both (fp32 takes the same op).
    return [torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.bfloat16]


@pytest.fixture()
def fp32_accumulation(device, monkeypatch):
    """The bound assumes products summed in fp32; cuBLAS may otherwise round bf16 partial
    sums to bf16 (split-K), which the grouped kernel never does."""
    if device.type == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_grouped_mlp_matches_the_per_expert_loop(device, mlp_bias, fp32_accumulation):
    for dtype in _dtypes(device):
        mlps = _mlps(len(COUNTS), dtype, device, mlp_bias, seed=1)
        x = torch.randn(sum(COUNTS), HIDDEN, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
        with torch.inference_mode():
            expected = _loop(mlps, x, COUNTS)
            kernel, mm = pick_grouped_mm(device, dtype)
            stacked = stack_mlps(mlps, mm)
            offs = torch.tensor(COUNTS, device=device).cumsum(0).to(torch.int32)
            groups = torch.repeat_interleave(torch.arange(len(COUNTS), device=device),
                                             torch.tensor(COUNTS, device=device))
            got = stacked.forward(x, offs, groups)
        assert got.isfinite().all()
        bounds = torch.cat([mlp_error_bound(m, x[s:s + c]) for m, c, s in
                            zip(mlps, COUNTS, [0, *torch.tensor(COUNTS).cumsum(0).tolist()], strict=False) if c])
        diff = (got.double() - expected.double()).abs()
        assert (diff <= bounds).all(), f"{kernel} in {dtype}: worst excess {(diff - bounds).max():.3g}"
        # Where the CPU build has the kernel, the grouped path must not silently fall back.
        if device.type == "cpu" and hasattr(F, "grouped_mm"):
            assert kernel == "grouped_mm"


def test_masked_fallback_matches_per_group_products_in_fp32(device):
    """The fallback (every row times every weight, the right one kept) against one matmul per
    group. Matmuls of different row counts block the sum differently, so each is within
    K*u32*(|x| . |w|) of the exact product, and the two within twice that."""
    dtype = torch.float32
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, HIDDEN, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(4, INTER, HIDDEN, generator=gen).to(device=device, dtype=dtype)
    offs = torch.tensor([3, 3, 8, 9], dtype=torch.int32, device=device)
    got = masked_grouped_mm(x, w, offs)
    pick = [0, 0, 0, 2, 2, 2, 2, 2, 3]
    want = torch.cat([x[0:3] @ w[0].t(), x[3:8] @ w[2].t(), x[8:9] @ w[3].t()])
    bound = 2 * HIDDEN * 2.0**-24 * torch.stack([x[r].abs() @ w[g].abs().t() for r, g in enumerate(pick)])
    assert ((got - want).abs() <= bound).all()
    # A row of the empty group's neighbour never takes the empty group's weight.
    assert not torch.allclose(got[3:8], x[3:8] @ w[1].t())


def test_stacking_keeps_values_and_parameters(device):
    mlps = _mlps(3, torch.float32, device, True, seed=4)
    params = [list(m.parameters()) for m in mlps]
    before = [[p.detach().clone() for p in ps] for ps in params]
    stacked = stack_mlps(mlps, masked_grouped_mm)
    assert stacked.intact()
    for ps, old, m in zip(params, before, mlps, strict=True):
        assert [id(p) for p in m.parameters()] == [id(p) for p in ps]  # same Parameter objects
        assert all(torch.equal(p, o) for p, o in zip(ps, old, strict=True))
    assert mlps[1].up_proj.weight.data_ptr() == stacked.stacks["up_proj"][1].data_ptr()
    with torch.no_grad():
        mlps[2].down_proj.weight.data = mlps[2].down_proj.weight.detach().clone()
    assert not stacked.intact()
