"""The static decode step: fixed shapes per batch-size bucket, one kernel sequence for any mix
of experts, captured as a CUDA graph per bucket on a GPU.

The eager path (`CCoEModel.forward`) fits every step to its rows: keys up to the longest
sequence, one call per distinct MLP module, masks and slot orders worked out on the host
(each `int(...)` or `bool(...)` of a device tensor a host sync). That is right on the CPU
and costly on a GPU, where a decode step of a 7B model is ~30 layers x ~15 small kernels
whose launches outlast their work at small batches. Here a decode step of B rows runs as a
bucket of Bb >= B rows (1, 2, 4, 8, 16, 32, ..., the slot count), and every shape depends on
Bb alone:

- attention reads each row's whole KV slot (P = max_seq_len positions) under a mask built on
  the device from the positions; padding rows write and read a scratch slot of their own;
- at a layer some resident `ffn` expert replaces, the MLPs are one grouped GEMM per
  projection (grouped_mlp.py) over the rows sorted by module; the sort order and the group
  ends are device inputs written before the step, so any mix of experts runs the same kernels;
- the only host-device traffic in a step is one copy of the inputs in and the logits' argmax
  (the sampler's) out.

On CUDA, each bucket's step is captured once (`torch.cuda.CUDAGraph`) and replayed; a push or
pop (the model's `generation` changes) restacks the MLPs and drops the graphs, which are
captured again on first use. On the CPU the same step runs eagerly: that is how the shapes,
the masks, the grouping and the padding are tested without a GPU.

Rows of `trailing` experts (which replace attention too) are not taken (`accepts` says so);
the engine runs those steps on the eager path.

Shape legend: B = rows, Bb = bucket rows, D = hidden size, V = vocab, P = positions per slot,
N = MLP modules stacked at a layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model.attention_batch import AttentionBatch
from ccoe_common.model.fast.products import head_logits
from ccoe_common.model.static.grouped_mlp import GroupedMLP, pick_grouped_mm, stack_mlps

if TYPE_CHECKING:
    from ccoe_common.model.ccoe import CCoEModel
    from ccoe_common.model.kv_cache import KVCache
    from ccoe_common.model.layers import MLP

log = logging.getLogger(__name__)


def bucket_sizes(max_rows: int) -> list[int]:
    """Batch-size buckets up to max_rows: powers of two, then max_rows itself, e.g.
    12 -> [1, 2, 4, 8, 12]. Padding a batch to its bucket costs at most twice its rows."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_rows:
        sizes.append(max_rows)
    return sizes


def bucket_for(rows: int, sizes: Sequence[int]) -> int:
    """The smallest bucket holding `rows` rows."""
    for size in sizes:
        if size >= rows:
            return size
    raise ValueError(f"a decode step of {rows} rows exceeds the largest bucket ({sizes[-1]})")


@dataclass(frozen=True)
class _Layout:
    """Where each piece of a bucket's packed input lives (offsets into one int64 vector)."""

    rows: int  # Bb
    # stacked layer -> (perm, inverse perm, module of each sorted row, group ends) offsets;
    # group ends span N entries, the others Bb.
    layers: dict[int, tuple[int, int, int, int, int]]  # layer -> (perm, inv, groups, offs, N)
    size: int


@dataclass
class _Bucket:
    """One bucket's device inputs and, on CUDA, its captured graph and output."""

    layout: _Layout
    host: Tensor  # [size] int64, pinned on CUDA
    device: Tensor  # [size] int64 on the model's device
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None  # [Bb, V], written by every replay
    # Recorded after each copy of `host` to the device (CUDA): the host buffer is written
    # again only once that copy has run.
    copied: torch.cuda.Event | None = None


class StaticDecoder:
    """Runs decode steps of up to `max_rows` rows on the static path.

    cache: the engine's KV cache with one slot more than the engine hands out; that last slot
    is the padding rows' scratch. graphs: capture CUDA graphs (default: on a CUDA device).
    """

    def __init__(self, model: CCoEModel, cache: KVCache, max_rows: int, *, graphs: bool | None = None):
        if cache.num_slots < max_rows + 1:
            raise ValueError(f"the static decode path needs a KV cache with a scratch slot: {max_rows} rows need "
                             f"{max_rows + 1} slots, the cache has {cache.num_slots}")
        self.model = model
        self.cache = cache
        self.scratch_slot = cache.num_slots - 1
        self.buckets = bucket_sizes(max_rows)
        device = model.backbone.device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {device}")
        self.grouped_kernel, self._mm = pick_grouped_mm(device, model.backbone.dtype)
        self._generation = -1
        self._stacks: dict[int, GroupedMLP] = {}
        self._index: dict[int, dict[ExpertKey, int]] = {}  # layer -> expert -> module index
        self._by_rows: dict[int, _Bucket] = {}
        self._pool: Any = None  # CUDA graph memory pool shared by the buckets' graphs
        self.captures = 0  # graphs captured so far (each bucket once per resident set)
        log.info("static decode path: buckets %s, grouped GEMM %s, CUDA graphs %s",
                 self.buckets, self.grouped_kernel, "on" if self.graphs else "off")

    # ---- what it takes ---------------------------------------------------------------------

    def accepts(self, experts: Sequence[ExpertKey | None]) -> bool:
        """Whether a decode step on these experts runs here: rows on the backbone or on
        resident `ffn` experts (trailing experts replace attention, which is shared here)."""
        if len(experts) > self.buckets[-1]:
            return False
        loaded = self.model.loaded(experts)
        return all(e is None or e.kind.name == "ffn" for e in loaded)

    # ---- one step --------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int],
               experts: Sequence[ExpertKey | None]) -> Tensor:
        """Logits [B, V] for one new token per row: tokens[r] at positions[r] of slots[r], on
        experts[r]. The result is a view of a buffer the next step overwrites."""
        b = len(tokens)
        if not (len(positions) == len(slots) == len(experts) == b) or b == 0:
            raise ValueError(f"decode needs one token, position, slot and expert per row; got {len(tokens)}, "
                             f"{len(positions)}, {len(slots)}, {len(experts)}")
        self._refresh()
        bucket = self._bucket(bucket_for(b, self.buckets))
        self._fill(bucket, tokens, positions, slots, experts)
        if not self.graphs:
            return self._run(bucket)[:b]
        if bucket.graph is None:
            self._capture(bucket)
        assert bucket.graph is not None and bucket.logits is not None
        bucket.graph.replay()
        return bucket.logits[:b]

    # ---- layouts ---------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Restack the MLPs and forget the buckets when the resident set changed (or something
        gave a stacked weight its own tensor)."""
        if self._generation == self.model.generation and all(s.intact() for s in self._stacks.values()):
            return
        generation = self.model.generation
        experts = [e for e in self.model.resident_experts() if e.kind.name == "ffn"]
        stacks: dict[int, GroupedMLP] = {}
        index: dict[int, dict[ExpertKey, int]] = {}
        for i, layer in enumerate(self.model.backbone.decoder_layers()):
            mine = [e for e in experts if i in e.modules]
            if not mine:
                _own_storage(layer.mlp)  # a layer no longer stacked lets go of the old stack
                continue
            modules: list[MLP] = [layer.mlp, *(e.modules[i] for e in mine)]  # type: ignore[list-item]
            stacks[i] = stack_mlps(modules, self._mm)
            index[i] = {e.key: j + 1 for j, e in enumerate(mine)}
        self._stacks, self._index = stacks, index
        self._by_rows.clear()  # their graphs point at the old stacks
        self._generation = generation

    def _bucket(self, rows: int) -> _Bucket:
        bucket = self._by_rows.get(rows)
        if bucket is not None:
            return bucket
        offset = 3 * rows  # tokens, positions, slots
        layers: dict[int, tuple[int, int, int, int, int]] = {}
        for i in sorted(self._stacks):
            n = len(self._stacks[i].modules)
            layers[i] = (offset, offset + rows, offset + 2 * rows, offset + 3 * rows, n)
            offset += 3 * rows + n
        layout = _Layout(rows=rows, layers=layers, size=offset)
        device = self.model.backbone.device
        host = torch.zeros(layout.size, dtype=torch.long, pin_memory=device.type == "cuda")
        bucket = _Bucket(layout, host, torch.zeros(layout.size, dtype=torch.long, device=device))
        self._by_rows[rows] = bucket
        return bucket

    def _fill(self, bucket: _Bucket, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int],
              experts: Sequence[ExpertKey | None]) -> None:
        """Write the step's inputs, padded to the bucket, into its device buffer (one copy)."""
        lay = bucket.layout
        pad = lay.rows - len(tokens)
        values = [*tokens, *([0] * pad), *positions, *([0] * pad), *slots, *([self.scratch_slot] * pad)]
        keys = [*experts, *([None] * pad)]
        for i in sorted(lay.layers):
            index = self._index[i]
            module = [0 if k is None else index.get(k, 0) for k in keys]
            perm = sorted(range(lay.rows), key=module.__getitem__)  # stable: rows keep their order per module
            inv = [0] * lay.rows
            for at, r in enumerate(perm):
                inv[r] = at
            n = lay.layers[i][4]
            counts = [0] * n
            for m in module:
                counts[m] += 1
            ends, total = [], 0
            for c in counts:
                total += c
                ends.append(total)
            values += [*perm, *inv, *(module[r] for r in perm), *ends]
        self._upload(bucket, torch.tensor(values, dtype=torch.long))

    def _upload(self, bucket: _Bucket, values: Tensor) -> None:
        if bucket.copied is not None:
            bucket.copied.synchronize()  # the last copy out of the pinned buffer has run
        bucket.host.copy_(values)
        bucket.device.copy_(bucket.host, non_blocking=True)
        if bucket.device.is_cuda:
            bucket.copied = torch.cuda.Event()
            bucket.copied.record()

    # ---- the step itself (captured on CUDA) ------------------------------------------------

    def _run(self, bucket: _Bucket) -> Tensor:
        """The decode step on the bucket's device inputs -> logits [Bb, V]. No host syncs."""
        lay, buf = bucket.layout, bucket.device
        bb = lay.rows
        backbone = self.model.backbone
        tokens, positions, slots = buf[:bb], buf[bb:2 * bb], buf[2 * bb:3 * bb]
        pos = positions[:, None]  # [Bb, 1]
        cos, sin = backbone.rotary(pos, backbone.dtype)
        keys = torch.arange(self.cache.max_seq_len, device=buf.device)
        mask = (keys[None, :] <= pos)[:, None, None, :]  # [Bb, 1, 1, P]: the slot's first position..this one
        batch = AttentionBatch(
            positions=pos, query_lens=torch.ones_like(positions), mask=mask, cos=cos, sin=sin, cache=self.cache,
            slots=slots, write_rows=torch.arange(bb, device=buf.device), write_cols=torch.zeros_like(positions),
            key_len=self.cache.max_seq_len, write_slots=slots, write_positions=positions,
        )
        h = backbone.embed_tokens(tokens[:, None])  # [Bb, 1, D]
        for i, layer in enumerate(backbone.decoder_layers()):
            p = layer.parts()
            h = h + p.self_attn(p.input_layernorm(h), batch, i)
            x = p.post_attention_layernorm(h)
            stack = self._stacks.get(i)
            if stack is None:
                h = h + p.mlp(x)
                continue
            at_perm, at_inv, at_groups, at_offs, n = lay.layers[i]
            perm, inv = buf[at_perm:at_perm + bb], buf[at_inv:at_inv + bb]
            groups, offs = buf[at_groups:at_groups + bb], buf[at_offs:at_offs + n].to(torch.int32)
            y = stack.forward(x[:, 0][perm], offs, groups)  # [Bb, D], rows sorted by module
            h = h + y[inv][:, None]
        return head_logits(backbone.lm_head, backbone.norm(h[:, 0]))

    def _capture(self, bucket: _Bucket) -> None:
        """Capture the bucket's step as a CUDA graph, on inputs that touch only the scratch slot."""
        lay = bucket.layout
        if bucket.copied is not None:
            bucket.copied.synchronize()
        real = bucket.host.clone()
        # Warm-up runs execute: with every row a padding row they write only the scratch slot.
        self._fill(bucket, [0] * lay.rows, [0] * lay.rows, [self.scratch_slot] * lay.rows, [None] * lay.rows)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a request's generator made in `submit`)
        # do not break a capture running on the engine's thread.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            bucket.logits = self._run(bucket)
        bucket.graph = graph
        self.captures += 1
        self._upload(bucket, real)


def _own_storage(mlp: MLP) -> None:
    """Give an MLP's weights tensors of their own if they are views into a larger stack."""
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            for p in (lin.weight, lin.bias):
                if p is not None and p.untyped_storage().nbytes() > p.numel() * p.element_size():
                    p.data = p.detach().clone()
