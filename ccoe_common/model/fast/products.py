"""Products laid out for half precision on the CPU: one row through `torch.mv`, a few rows
transposed (`W @ x^T`). Each gives what `F.linear` gives (the one-row and transposed kernels
round like it up to bf16 rounding of the result; tested in tests/unit/model/fast/).

Shape legend: M = rows, D = hidden size, I = MLP intermediate size, V = vocab.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ccoe_common.model.layers import MLP

_HALF = (torch.bfloat16, torch.float16)


def half_on_cpu(x: Tensor) -> bool:
    """Where the CPU fast paths apply (measured faster only for bf16/fp16 on the CPU)."""
    # `is_cpu` rather than `device.type`: no device object per call. It runs for every
    # projection; a one-row 150m step without its products went 4.80 -> 4.67 ms.
    return x.dtype in _HALF and x.is_cpu


class Linear(nn.Linear):
    """`nn.Linear` that multiplies a single half-precision row on the CPU with `torch.mv`.

    Decoding one sequence runs every projection on one row. For bf16 weights on the CPU,
    `F.linear` takes such a row through a GEMM kernel that streams the weight about 1.5x
    slower than the matrix-vector kernel (measured on 2 cores: 150 vs 105 us for a 768x2048
    weight, 1.8 vs 1.1 ms for a 32000x768 LM head). In fp32 both run at the same speed, and
    CUDA (not measured here) keeps `F.linear`. Same parameters and state dict as `nn.Linear`.
    """

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, with a single half-precision row on the CPU through `torch.mv` (see Linear)."""
    if x.numel() == weight.shape[1] and half_on_cpu(x):
        return mv(weight, bias, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def mv(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """weight [out, in] times the vector x [in] (plus bias [out]) -> [out]."""
    return torch.mv(weight, x) if bias is None else torch.addmv(bias, weight, x)


def row_product(lin: nn.Linear, x: Tensor) -> Tensor:
    """`lin(x)` for one half-precision row on the CPU, x [in] -> [out]: the same `mv` as
    `linear`, without its checks and reshapes and without nn.Module's call (~5 us a product
    in all; a one-row 150m step makes 110 of them besides the LM head)."""
    return mv(lin.weight, lin.bias, x)


# Up to this many rows, half-precision logits on the CPU come from `W @ h^T` (see head_logits).
TRANSPOSED_HEAD_MAX_ROWS = 32


def head_logits(head: nn.Linear, h: Tensor) -> Tensor:
    """The LM head on rows h [M, D] -> logits [M, V].

    For a few half-precision rows on the CPU, `W @ h^T` streams the [V, D] head faster than
    `h @ W^T`. Measured on 2 cores, bf16, head plus the sampler's max over the vocab, for a
    151,936 x 896 head: 13 rows 20.2 vs 12.9 ms, 32 rows 24.6 vs 20.4 ms, 64 rows 36.2 vs
    39.9 ms (slower, hence the limit). A 32,000 x 768 head: 13 rows 5.1 vs 3.0 ms.
    The logits come back as a transposed view; the sampler reads it in place.
    """
    if h.dim() == 2 and 1 < h.shape[0] <= TRANSPOSED_HEAD_MAX_ROWS and head.bias is None and half_on_cpu(h):
        return (head.weight @ h.t()).t()
    return head(h)


# Above this many rows the plain MLP is faster again: the transposed GEMMs lose their edge
# and the residual add reads the transposed output with a large stride. Measured on 2 cores,
# bf16, 22 layers of 768x2048 MLPs plus the residual add: 64 rows 18 vs 26 ms (transposed vs
# plain), 256 rows 42 vs 52, 384 rows 67 vs 63, 2048 rows (a prefill step) 399 vs 257.
TRANSPOSED_MLP_MAX_ROWS = 256


def wants_transposed_mlp(x: Tensor) -> bool:
    """Whether `transposed_mlp` is the faster way to run an MLP on x [..., D]."""
    rows = x.numel() // x.shape[-1]
    return 1 < rows <= TRANSPOSED_MLP_MAX_ROWS and half_on_cpu(x)


def transposed_mlp(mlp: MLP, x: Tensor) -> Tensor:
    """The same MLP computed on x^T: [D, M] -> [I, M] -> [D, M].

    For several half-precision rows on the CPU, `W @ x^T` (the weight as the row-major left
    operand) runs ~1.8x faster than `x @ W^T` (measured on 2 cores, bf16, 768x2048: 261 vs
    463 us at 64 rows, 119 vs 252 us at 13). The intermediate activations stay transposed, so
    nothing is copied to get there; the result is a transposed view the residual add reads.
    """
    xt = x.reshape(-1, x.shape[-1]).t()  # [D, M]
    gate = _weight_times(mlp.gate_proj, xt)  # [I, M]
    up = _weight_times(mlp.up_proj, xt)
    out = _weight_times(mlp.down_proj, F.silu(gate) * up)  # [D, M]
    return out.t().view(x.shape)


def _weight_times(lin: nn.Linear, xt: Tensor) -> Tensor:
    """lin applied to the columns of xt: [in, M] -> [out, M]."""
    if lin.bias is None:
        return lin.weight @ xt
    return torch.addmm(lin.bias[:, None], lin.weight, xt)
