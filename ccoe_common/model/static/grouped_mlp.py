"""The mixed-expert MLP of one layer as one grouped GEMM per projection.

At a layer where some rows run on an `ffn` expert, the eager path (backbone.py's `_bucketed`)
calls each distinct MLP module once on its rows: one GEMM per module and projection, with
row counts only the host knows. Here the MLPs of a layer (the backbone's first, then every
resident `ffn` expert that replaces this layer) are stored as one stacked weight per
projection, rows sorted by module, and each projection is one `grouped_mm(x, W, offs=...)`.
The group sizes live in a device tensor (`offs`), so the kernel sequence does not depend on
them: a CUDA graph captured once replays for any mix of experts.

Stacking is a storage layout, as in fast/packing.py: each module's weight becomes a view
(`stack[j]`) of the stacked tensor, so values, Parameters and state dicts stay and nothing
is held twice. Anything that gives a parameter a tensor of its own ends the sharing; the
stack then no longer matches (`GroupedMLP.intact`) and is built again.

Shape legend: M = rows, D = hidden size, I = MLP intermediate size, N = stacked modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from ccoe_common.model.layers import MLP

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

GroupedMM = Callable[[Tensor, Tensor, Tensor], Tensor]


def _torch_grouped_mm() -> Callable[..., Tensor] | None:
    """`F.grouped_mm` (public from torch 2.9 or so), else the private `torch._grouped_mm`
    that earlier 2.x releases shipped with the same arguments; None if neither exists."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn if callable(fn) else None


def masked_grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """What `grouped_mm(x, w.transpose(-2, -1), offs=offs)` computes, from plain matmuls:
    x [M, K], w [N, O, K], offs [N] int32 group ends -> [M, O].

    Every row is multiplied by every group's weight and the right product kept, so it reads
    each weight once (the same bytes as the grouped kernel) at N times the arithmetic, and
    needs neither a host sync nor a kernel the torch build may lack. Rows past offs[-1] get
    zeros.
    """
    rows = torch.arange(x.shape[0], device=x.device)
    group = torch.bucketize(rows, offs.to(torch.long), right=True)  # [M], N for rows past the end
    out = x.new_zeros(x.shape[0], w.shape[1])
    for n in range(w.shape[0]):
        out = torch.where((group == n)[:, None], x @ w[n].t(), out)
    return out


def pick_grouped_mm(device: torch.device, dtype: torch.dtype) -> tuple[str, GroupedMM]:
    """The grouped GEMM to use on `device` in `dtype`: ("grouped_mm", fn) when torch has the
    kernel and it runs there (probed once on a tiny problem against the masked form), else
    ("masked", masked_grouped_mm). Call before any CUDA graph capture: the probe syncs."""
    fn = _torch_grouped_mm()
    if fn is not None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(24, 32, generator=gen).to(device=device, dtype=dtype)
        w = torch.randn(3, 16, 32, generator=gen).to(device=device, dtype=dtype)
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        try:
            got = fn(x, w.transpose(-2, -1), offs=offs)
            want = masked_grouped_mm(x, w, offs)
            # Both round 32-term products of random values; a kernel that computes the right
            # thing lands far inside 5% of the largest value, a wrong grouping far outside.
            ok = got.shape == want.shape and bool(((got - want).abs().max() <= 0.05 * want.abs().max()).item())
        except Exception:  # noqa: BLE001 - any refusal (dtype, device, layout, arch) means: not here
            ok = False
        if ok:
            def grouped(a: Tensor, b: Tensor, o: Tensor) -> Tensor:
                return fn(a, b.transpose(-2, -1), offs=o)

            return "grouped_mm", grouped
    return "masked", masked_grouped_mm


class GroupedMLP:
    """The MLPs of one layer stacked for grouped GEMMs; modules[0] is the backbone's.

    Built by `stack_mlps`; `forward(x_sorted, offs, row_bias_index)` runs rows sorted by
    module index, offs[n] = end of module n's rows.
    """

    def __init__(self, modules: Sequence[MLP], stacks: dict[str, Tensor], biases: dict[str, Tensor] | None,
                 mm: GroupedMM):
        self.modules = tuple(modules)
        self.stacks = stacks  # projection -> [N, out, in]
        self.biases = biases  # projection -> [N, out], or None when the MLPs have no bias
        self.mm = mm

    def intact(self) -> bool:
        """Whether every module's weights are still views of this stack."""
        return all(getattr(m, p).weight.data_ptr() == self.stacks[p][j].data_ptr()
                   for j, m in enumerate(self.modules) for p in _PROJECTIONS)

    def forward(self, x: Tensor, offs: Tensor, groups: Tensor | None = None) -> Tensor:
        """x [M, D] sorted by module -> [M, D]; offs [N] int32; groups [M] long module index
        per row, needed only when the MLPs have biases (grouped_mm takes none per group)."""
        gate = self._project("gate_proj", x, offs, groups)
        up = self._project("up_proj", x, offs, groups)
        return self._project("down_proj", F.silu(gate) * up, offs, groups)

    def _project(self, name: str, x: Tensor, offs: Tensor, groups: Tensor | None) -> Tensor:
        out = self.mm(x, self.stacks[name], offs)
        if self.biases is not None:
            if groups is None:
                raise ValueError("MLPs with biases need the module index of every row")
            out = out + self.biases[name][groups]
        return out


def stack_mlps(modules: Sequence[MLP], mm: GroupedMM) -> GroupedMLP:
    """Move the weights (and biases) of `modules` into one tensor per projection, each
    module's a view of it. Values and Parameters stay; the old storage is freed when nothing
    else holds it (one layer at a time, so the transient is one layer's stack)."""
    has_bias = [m.gate_proj.bias is not None for m in modules]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot stack MLPs where only some have biases")
    stacks: dict[str, Tensor] = {}
    biases: dict[str, Tensor] | None = {} if all(has_bias) else None
    with torch.no_grad():
        for name in _PROJECTIONS:
            linears = [getattr(m, name) for m in modules]
            stacks[name] = torch.stack([lin.weight.detach() for lin in linears])
            for j, lin in enumerate(linears):
                lin.weight.data = stacks[name][j]
            if biases is not None:
                biases[name] = torch.stack([lin.bias.detach() for lin in linears])
                for j, lin in enumerate(linears):
                    lin.bias.data = biases[name][j]
    return GroupedMLP(modules, stacks, biases, mm)
