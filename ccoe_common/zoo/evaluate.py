"""Batched greedy generation through `CCoEModel.forward` with a KV cache, and exact-match
accuracy over a domain's held-out problems.

Rows of one batch may use different experts (that is how "served" accuracy is measured:
all domains' requests mixed in every batch). One forward per step for the whole batch;
each row stops at EOS or a newline-free answer's end.

    texts = batched_greedy(model, ["...### Response:\\n"] * 2, ["sql", None], max_new_tokens=40)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ccoe_common.engine.templates import render_alpaca
from ccoe_common.model.ccoe import CCoEModel, ExpertSelector
from ccoe_common.model.kv_cache import KVCache
from ccoe_common.zoo.domains import Domain, Problem


@torch.inference_mode()
def batched_greedy(
    model: CCoEModel,
    prompts: Sequence[str],
    experts: Sequence[ExpertSelector],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of each prompt on its expert."""
    tok = model.tokenizer
    stops = set(model.config.eos_token_ids)
    if tok.eos_token_id is not None:
        stops.add(tok.eos_token_id)
    # Resolve each selector to one version up front, as a served request would be pinned.
    pinned = model.resolve(experts)
    device = model.backbone.device
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        ids_list = [tok(prompts[i], add_special_tokens=False).input_ids for i in idx]
        b, t = len(idx), max(len(x) for x in ids_list)
        ids = torch.full((b, t), tok.pad_token_id or 0, dtype=torch.long)
        for r, x in enumerate(ids_list):
            ids[r, : len(x)] = torch.tensor(x)
        lens = torch.tensor([len(x) for x in ids_list])
        cache = KVCache(model.config, b, t + max_new_tokens, model.backbone.dtype, device)
        slots = torch.arange(b, device=device)
        sel = [pinned[i] for i in idx]
        logits = model.forward(ids, sel, query_lens=lens, cache=cache, slots=slots, logits_at=lens - 1)
        generated: list[list[int]] = [[] for _ in idx]
        done = [False] * b
        pos = lens.clone()
        for _ in range(max_new_tokens):
            next_ids = logits.argmax(-1).cpu()
            for r in range(b):
                if not done[r]:
                    token = int(next_ids[r])
                    if token in stops:
                        done[r] = True
                    else:
                        generated[r].append(token)
            if all(done):
                break
            logits = model.forward(next_ids[:, None], sel, positions=pos[:, None], cache=cache, slots=slots,
                                   logits_at=torch.zeros(b, dtype=torch.long))
            pos = pos + 1
        for r, i in enumerate(idx):
            out[i] = tok.decode(generated[r], skip_special_tokens=True)
    return out


def read_problems(path: str | Path, domain: str) -> list[Problem]:
    """Generated problems from the zoo's JSONL (instruction, output, answer per line)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Problem(domain, r["instruction"], r["output"], r["answer"]) for r in rows]


def prompt_of(problem: Problem) -> str:
    """Serving renders requests with the same template training used."""
    return render_alpaca(problem.instruction)


def accuracy(domain: Domain, problems: Sequence[Problem], answers: Sequence[str]) -> float:
    """Share of problems whose generated answer the domain's checker accepts, in [0, 1]."""
    if not problems:
        return 0.0
    return sum(domain.check(p, a) for p, a in zip(problems, answers, strict=True)) / len(problems)
