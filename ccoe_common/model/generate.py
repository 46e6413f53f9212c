"""Greedy generation for one request, on a private one-slot KV cache, without an engine.

The reference the engine is tested against (it must produce the same tokens for the same
greedy request), and what `ccoe demo` uses to show each expert's continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ccoe_common.model.ccoe import CCoEModel, ExpertSelector
from ccoe_common.model.kv_cache import KVCache


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # new tokens only, including the stop token when one ended it
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)


@torch.inference_mode()
def greedy_generate(
    model: CCoEModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    expert: ExpertSelector = None,
    stop_token_ids: Sequence[int] | None = None,
) -> Generation:
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = set(model.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    device = model.backbone.device
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, model.backbone.dtype, device)
    slots = torch.zeros(1, dtype=torch.long, device=device)
    # Resolve "name" to one version now so every step runs on the same one.
    pinned = model.resolve([expert])
    ids = torch.tensor([list(prompt_ids)], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.forward(ids, pinned, positions=positions, cache=cache, slots=slots,
                               logits_at=torch.tensor([ids.shape[1] - 1], device=device))
        token = int(logits[0].argmax())
        out.append(token)
        if token in stops:
            return Generation(out, "stop")
        positions = positions[:, -1:] + 1
        ids = torch.tensor([[token]], device=device)
    return Generation(out, "length")
