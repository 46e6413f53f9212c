"""Full fine-tune baselines: every backbone parameter learns, on a private copy.

These are what CCoE is compared against (CCoE-25 Table 1's "-mix" models, and the sequential
fine-tuning that forgets): `mixed` trains one copy on all domains shuffled together;
`sequential` trains one copy on each domain in turn and reports after every stage.
The shared backbone is never touched: each baseline deep-copies it first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

from ccoe_common.model.backbone import Backbone
from ccoe_common.training.data import Example
from ccoe_common.training.trainer import FullTarget, TrainConfig, TrainResult, fit


def mixed(backbone: Backbone, per_domain: Mapping[str, Sequence[Example]], config: TrainConfig, *, pad_id: int,
          quiet: bool = False) -> tuple[Backbone, TrainResult]:
    """One copy fine-tuned on the union of all domains (the sampler shuffles them together)."""
    model = copy.deepcopy(backbone)
    union = [ex for name in sorted(per_domain) for ex in per_domain[name]]
    result = fit(FullTarget(model), union, config, pad_id=pad_id, label="baseline mix", quiet=quiet)
    model.requires_grad_(False)
    return model, result


def sequential(backbone: Backbone, per_domain: Mapping[str, Sequence[Example]], order: Sequence[str],
               config: TrainConfig | Mapping[str, TrainConfig], *, pad_id: int,
               after_stage: Callable[[str, Backbone], None] | None = None,
               quiet: bool = False) -> tuple[Backbone, list[TrainResult]]:
    """One copy fine-tuned on order[0], then order[1], ...; after_stage(domain, model) runs after
    each. `config` may differ per domain (a stage as long as that domain's expert training)."""
    model = copy.deepcopy(backbone)
    results = []
    for name in order:
        stage = config[name] if isinstance(config, Mapping) else config
        results.append(fit(FullTarget(model), per_domain[name], stage, pad_id=pad_id,
                           label=f"baseline sequential: {name}", quiet=quiet))
        model.requires_grad_(False)
        if after_stage is not None:
            after_stage(name, model)
    return model, results
