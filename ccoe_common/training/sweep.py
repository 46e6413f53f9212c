"""Choosing an expert's size: train the same domain at several layer counts and compare the
performance gain −Δε / |Δθ| (CCoE-24 §4.4) of each step up in size.

ε is the validation error — here the eval loss per response token, which every dataset has
(a domain with a checker can use its error rate instead); θ the expert's parameter count. The
first step is measured from the backbone itself (0 expert parameters, its own eval loss), so
"is any expert worth it" is the first row. A small gain means the extra layers bought little.

    rows = sweep_sizes(model, data, None, [1, 2, 4], config=TrainConfig(steps=200))
    rows[1].gain_per_million  -> 0.83   (eval loss fell 0.83 per million added parameters)
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ccoe_common.model.ccoe import CCoEModel
from ccoe_common.model.expert import resolve_layers
from ccoe_common.model.kinds import get_kind
from ccoe_common.model.placement import Placement, Strategy
from ccoe_common.training.data import Dataset, tokenize_all
from ccoe_common.training.expert_run import EvalSplit, split_eval, start_expert, train_expert
from ccoe_common.training.trainer import ExpertTarget, TrainConfig, eval_loss


@dataclass(frozen=True)
class SweepRow:
    """One size. Example: layers=2, parameters=589_824, eval_loss=0.61, gain_per_million=0.83."""

    layers: int
    layer_indices: list[int]
    parameters: int
    eval_loss: float
    delta_eval_loss: float | None  # ε_k − ε_{k−1}; negative is better
    delta_parameters: int | None
    gain_per_million: float | None  # −Δε / |Δθ| per million parameters
    train_seconds: float


def sweep_sizes(
    model: CCoEModel,
    train_data: Dataset,
    eval_data: Dataset | None,
    sizes: Sequence[int],
    *,
    name: str = "sweep",
    kind: str = "ffn",
    strategy: Strategy = "GL",
    config: TrainConfig,
    split: EvalSplit | None = None,
    quiet: bool = False,
) -> list[SweepRow]:
    """Row 0 is the backbone (0 layers); then one trained expert per size, ascending."""
    sizes = sorted(set(sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be layer counts >= 1, got {list(sizes)}")
    k = get_kind(kind)
    # Refuse sizes over the budget before spending any training time on the others.
    placements = {n: Placement(strategy=strategy, num_layers=n) for n in sizes}
    layer_sets = {n: resolve_layers(model.backbone, model.info, k, p, model.budget_fraction)
                  for n, p in placements.items()}

    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if eval_data is None:
        train_ex, _ = tokenize_all(train_data.records, tok, config.max_seq_len)
        _, eval_ex = split_eval(train_ex, split or EvalSplit(), config.seed)
    else:
        eval_ex, _ = tokenize_all(eval_data.records, tok, config.max_seq_len)
    if not eval_ex:
        raise ValueError("the sweep needs eval examples: pass --eval-data or a larger --eval-fraction")
    base = start_expert(model, name=name, kind=kind, placement=placements[sizes[0]])
    # A freshly carved expert computes exactly what the backbone computes.
    backbone_loss = eval_loss(ExpertTarget(model, base), eval_ex, pad_id, config.eval_batch_size, config.precision)
    rows = [SweepRow(0, [], 0, backbone_loss, None, None, None, 0.0)]
    with tempfile.TemporaryDirectory(prefix="ccoe-sweep-") as tmp:
        for n in sizes:
            expert = start_expert(model, name=name, kind=kind, placement=placements[n])
            run = train_expert(model, expert, train_data, eval_data, config, out_uri=f"{tmp}/{name}-{n}",
                               split=split, quiet=quiet)
            eps = run.result.best_eval_loss if run.result.best_eval_loss is not None else run.result.final_eval_loss
            assert eps is not None, "a run with eval examples (checked above) reports an eval loss"
            prev = rows[-1]
            d_eps, d_theta = eps - prev.eval_loss, expert.parameter_count - prev.parameters
            gain = -d_eps / d_theta * 1e6 if d_theta else None
            rows.append(SweepRow(n, list(layer_sets[n]), expert.parameter_count, eps, d_eps, d_theta, gain,
                                 run.result.seconds))
    return rows


def best_size(rows: Sequence[SweepRow]) -> SweepRow:
    """The size whose step up gave the highest gain (the paper's selection rule)."""
    trained = [(r, r.gain_per_million) for r in rows if r.gain_per_million is not None]
    return max(trained, key=lambda pair: pair[1])[0]


def rows_as_json(rows: Sequence[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]
