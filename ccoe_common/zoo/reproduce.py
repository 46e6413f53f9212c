"""`ccoe demo reproduce`: the papers' claims, measured on the demo zoo.

Per domain, exact-match accuracy on held-out generated problems for:
- backbone: the pre-trained backbone alone;
- expert: the backbone with that domain's CCoE expert (trained with the backbone frozen);
- mix: a full copy of the backbone fine-tuned on all domains mixed (CCoE-25's "-mix");
- sequential: a full copy fine-tuned on the domains one after another (catastrophic forgetting
  shows as the early domains' accuracy falling); `sequential_after_own_stage` is the accuracy
  right after the domain's own stage;
- served: the experts pushed through the registry onto the local serving stack (Ray Serve,
  gRPC, Redis), the rule table set in the registry, and every test problem sent over gRPC with
  no expert named: the rules pick the expert. `served_equals_expert` says whether every
  answer is the expert's own, word for word;
- mixed_batch: all experts resident in one CCoEModel, every domain's requests routed by the
  rule table and run together in mixed-expert batches through `CCoEModel.forward`.

Isolation (CCoE's claim that adding B costs A nothing) is checked bit for bit: A's logits on
its test prompts with only A resident, after every other expert is pushed, and after a new
version of another expert is trained on the same model object and pushed, must be identical.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ccoe_common.console import stdout_to_stderr
from ccoe_common.model.backbone import Backbone
from ccoe_common.model.ccoe import CCoEModel
from ccoe_common.training import baselines
from ccoe_common.training.data import read_records, tokenize_all
from ccoe_common.training.expert_run import start_expert, train_expert
from ccoe_common.training.trainer import TrainConfig
from ccoe_common.zoo.build import build_zoo, expert_config, read_zoo
from ccoe_common.zoo.config import ZooConfig
from ccoe_common.zoo.domains import Problem, get_domain
from ccoe_common.zoo.evaluate import accuracy, batched_greedy, prompt_of, read_problems
from ccoe_common.zoo.rules import read_rules
from ccoe_common.zoo.served import served_answers

MAX_NEW_TOKENS = 40
SERVED_NOTE = ("served = experts pushed through the registry onto the local gRPC stack, rules set in the "
               "registry, requests over gRPC with no expert named; mixed_batch = all experts co-resident "
               "in one CCoEModel, mixed-expert batches routed by rules.json")


def _baseline_config(config: ZooConfig, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=config.expert_batch_size, lr=config.baseline_lr,
                       warmup_steps=max(1, steps // 20), max_seq_len=128, seed=config.seed, log_every=10,
                       precision="fp32")


def _eval_full(model: CCoEModel, backbone: Backbone, tests: dict[str, list[Problem]]) -> dict[str, float]:
    """Accuracy of a fully fine-tuned copy, run through the same batched generation."""
    view = CCoEModel(backbone, model.info, model.tokenizer)
    return {d: accuracy(get_domain(d), ps, batched_greedy(view, [prompt_of(p) for p in ps], [None] * len(ps),
                                                          max_new_tokens=MAX_NEW_TOKENS))
            for d, ps in tests.items()}


def _cached_baseline(path: Path, make, like: Backbone) -> Backbone:
    if path.exists():
        import copy

        model = copy.deepcopy(like)
        model.load_state_dict(load_file(str(path)), strict=True)
        return model
    model = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
               not model.config.tie_word_embeddings}, str(path))
    return model


def reproduce(workdir: Path, config: ZooConfig | None = None, *, quiet: bool = False) -> dict[str, Any]:
    config = config or ZooConfig()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    build_zoo(workdir, config, quiet=quiet)
    zoo = read_zoo(workdir)
    assert zoo is not None, "build_zoo has just written it"
    t0 = time.monotonic()
    model = CCoEModel.from_pretrained(zoo["backbone"]["path"])
    names = list(config.domains)
    tests = {d: read_problems(zoo["data"][d]["test"], d) for d in names}
    prompts = {d: [prompt_of(p) for p in ps] for d, ps in tests.items()}
    acc: dict[str, dict[str, float]] = {d: {} for d in names}

    def score(d: str, answers: list[str]) -> float:
        return accuracy(get_domain(d), tests[d], answers)

    say("[1/5] backbone and experts")
    for d in names:
        acc[d]["backbone"] = score(d, batched_greedy(model, prompts[d], [None] * len(prompts[d]),
                                                     max_new_tokens=MAX_NEW_TOKENS))
    # Isolation: A's logits with only A resident, then after pushing every other expert, then
    # after a new version of another expert is trained on this same model object and pushed.
    first = names[0]
    probe_ids = [model.tokenizer(p, add_special_tokens=False).input_ids for p in prompts[first][:16]]
    width = max(map(len, probe_ids))
    probe = torch.tensor([x + [model.tokenizer.pad_token_id] * (width - len(x)) for x in probe_ids])
    probe_lens = torch.tensor([len(x) for x in probe_ids])

    def probe_logits() -> torch.Tensor:
        with torch.inference_mode():
            return model.forward(probe, model.resolve([first] * len(probe)), query_lens=probe_lens)

    model.push(zoo["experts"][first]["uri"])
    alone = probe_logits()
    answers_alone = batched_greedy(model, prompts[first], [first] * len(prompts[first]), max_new_tokens=MAX_NEW_TOKENS)
    for d in names[1:]:
        model.push(zoo["experts"][d]["uri"])
    after_push = probe_logits()
    expert_answers = {d: batched_greedy(model, prompts[d], [d] * len(prompts[d]), max_new_tokens=MAX_NEW_TOKENS)
                      for d in names}
    for d in names:
        acc[d]["expert"] = score(d, expert_answers[d])
    isolation: dict[str, Any] = {"domain": first, "after_push_identical": bool(torch.equal(alone, after_push))}
    if len(names) > 1:
        other = names[1]
        say(f"  isolation: training {other}@2 on the model that serves {first}")
        copy_b = start_expert(model, from_uri=zoo["experts"][other]["uri"])
        quick = expert_config(config).model_copy(update={"steps": 10, "warmup_steps": 1, "eval_every": 10})
        run = train_expert(model, copy_b, read_records(zoo["data"][other]["train"], model.tokenizer), None, quick,
                           out_uri=str(workdir / "reproduce" / f"{other}-v2"),
                           continued_from=zoo["experts"][other]["uri"], quiet=True)
        model.push(run.uri)
        after_train = probe_logits()
        answers_after = batched_greedy(model, prompts[first], [first] * len(prompts[first]),
                                       max_new_tokens=MAX_NEW_TOKENS)
        isolation.update(trained_and_pushed=f"{other}@{run.manifest.version}",
                         after_train_and_push_identical=bool(torch.equal(alone, after_train)),
                         answers_identical=answers_after == answers_alone)
        model.pop(other, run.manifest.version)

    say("[2/5] mixed batches: every domain's requests in each batch, routed by rules.json")
    rules = read_rules(Path(zoo["rules"]))
    order = [(d, i) for i in range(max(map(len, tests.values()))) for d in names if i < len(tests[d])]
    routed = [rules.route(tests[d][i].instruction)[0] for d, i in order]
    mixed = batched_greedy(model, [prompts[d][i] for d, i in order], routed, max_new_tokens=MAX_NEW_TOKENS)
    for d in names:
        acc[d]["mixed_batch"] = score(d, [a for (dd, _), a in zip(order, mixed, strict=True) if dd == d])
    say("    served: pushing every expert through the registry onto the local gRPC stack")
    with stdout_to_stderr():  # Ray prints to stdout; --json output must stay clean
        served, served_routes = served_answers(
            zoo["backbone"]["path"], {d: zoo["experts"][d]["uri"] for d in names}, rules,
            {d: [p.instruction for p in tests[d]] for d in names}, MAX_NEW_TOKENS, say)
    routing_ok = dict.fromkeys(names, 0.0)
    served_equal = {}
    for d in names:
        acc[d]["served"] = score(d, served[d])
        routing_ok[d] = sum(r == d for r in served_routes[d]) / len(tests[d])
        served_equal[d] = served[d] == expert_answers[d]

    pad = model.tokenizer.pad_token_id
    per_domain = {d: tokenize_all(read_records(zoo["data"][d]["train"], model.tokenizer).records,
                                  model.tokenizer, 128)[0] for d in names}
    base_dir = workdir / "baselines" / config.digest()
    mix_steps = sum(config.steps_for(d) for d in names)  # as many steps as all experts together
    say(f"[3/5] baseline mix: full fine-tune on all domains ({mix_steps} steps)")
    mix = _cached_baseline(base_dir / "mix.safetensors", lambda: baselines.mixed(
        model.backbone, per_domain, _baseline_config(config, mix_steps), pad_id=pad,
        quiet=quiet)[0], model.backbone)
    for d, a in _eval_full(model, mix, tests).items():
        acc[d]["mix"] = a
    del mix

    stages = {d: _baseline_config(config, config.steps_for(d)) for d in names}  # each as long as its expert
    say(f"[4/5] baseline sequential: full fine-tune on "
        f"{' -> '.join(f'{d} ({stages[d].steps} steps)' for d in names)}")
    own_stage: dict[str, float] = {}
    stage_file = base_dir / "sequential_stages.json"

    def after_stage(d: str, bb: Backbone) -> None:
        view = CCoEModel(bb, model.info, model.tokenizer)
        own_stage[d] = score(d, batched_greedy(view, prompts[d], [None] * len(prompts[d]),
                                               max_new_tokens=MAX_NEW_TOKENS))

    seq = _cached_baseline(base_dir / "sequential.safetensors", lambda: baselines.sequential(
        model.backbone, per_domain, names, stages, pad_id=pad,
        after_stage=after_stage, quiet=quiet)[0], model.backbone)
    if own_stage:
        stage_file.write_text(json.dumps(own_stage))
    elif stage_file.exists():
        own_stage = json.loads(stage_file.read_text())
    say("[5/5] evaluating the sequential baseline")
    for d, a in _eval_full(model, seq, tests).items():
        acc[d]["sequential"] = a
        if d in own_stage:
            acc[d]["sequential_after_own_stage"] = own_stage[d]

    return {
        "domains": acc,
        "isolation": isolation,
        "routing_accuracy": routing_ok,
        "served_equals_expert": served_equal,
        "test_problems": {d: len(ps) for d, ps in tests.items()},
        "expert_parameters": {d: zoo["experts"][d]["parameters"] for d in names},
        "backbone_parameters": zoo["backbone"]["parameters"],
        "note": SERVED_NOTE,
        "seconds": time.monotonic() - t0,
    }
