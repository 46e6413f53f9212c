"""What the demo zoo is made of. Changing any field makes `ccoe demo build` rebuild."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field


class ZooConfig(BaseModel):
    """Sized so the whole build takes a few minutes on 2 CPU cores (about 2.6M parameters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="Seeds data, weights and sample order: same seed, same zoo.")
    domains: tuple[str, ...] = Field(("arith", "sql", "units"), min_length=1, description="Domains, one expert each.")
    vocab_size: int = Field(1024, ge=300, le=8192, description="BPE vocabulary trained on the synthetic corpus.")
    hidden_size: int = Field(128, ge=32, description="Backbone hidden size.")
    intermediate_size: int = Field(384, ge=32, description="Backbone MLP width.")
    num_layers: int = Field(12, ge=2, description="Backbone decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int = Field(2, ge=1, description="Key/value heads (GQA).")
    pretrain_steps: int = Field(
        700, ge=1, description="Backbone pre-training steps. The experts' accuracy depends on them most: on a "
                               "backbone pre-trained 450 steps the arith, sql and units experts answered 14.5%, "
                               "20.5% and 28% of the test problems, after 700 steps 55.5%, 34% and 83%.")
    pretrain_batch_size: int = Field(16, ge=1, description="Packed sequences per pre-training step.")
    pretrain_seq_len: int = Field(128, ge=16, description="Tokens per packed pre-training sequence.")
    pretrain_lr: float = Field(3e-3, gt=0, le=1, description="Pre-training peak learning rate.")
    train_problems: int = Field(3000, ge=10, description="Training problems per domain.")
    eval_problems: int = Field(64, ge=1, description="Eval-loss problems per domain (early stop, sweep).")
    test_problems: int = Field(200, ge=1, description="Held-out problems per domain for accuracy (never trained on).")
    placement: str = Field("GL", description="Expert placement; GL without a count fills the 15% budget.")
    expert_steps: int = Field(250, ge=1, description="Optimizer steps per expert.")
    expert_steps_by_domain: dict[str, int] = Field(
        default_factory=lambda: {"arith": 1000, "sql": 600},
        description="Steps for domains that need more than expert_steps. Multi-digit arithmetic does: its expert "
                    "answered 6.5% of the test problems after 500 steps, 55.5% after 1000; so does SQL: 73.5% "
                    "after 600 steps. Experts train in parallel, so sql and units together still finish "
                    "before arith.")
    expert_batch_size: int = Field(16, ge=1, description="Examples per expert step.")
    expert_lr: float = Field(3e-3, gt=0, le=1, description="Expert peak learning rate.")
    baseline_lr: float = Field(1e-3, gt=0, le=1, description="Peak learning rate of the full fine-tune baselines.")

    def steps_for(self, domain: str) -> int:
        return self.expert_steps_by_domain.get(domain, self.expert_steps)

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    @classmethod
    def quick(cls) -> ZooConfig:
        """A zoo built in well under a minute, for smoke runs (`ccoe demo --quick`, CI): the same
        pieces at toy size, so its experts are barely trained and most answers are wrong."""
        return cls(vocab_size=400, hidden_size=48, intermediate_size=96, num_layers=4, num_heads=2, num_kv_heads=1,
                   pretrain_steps=20, pretrain_batch_size=4, pretrain_seq_len=64, train_problems=64,
                   eval_problems=8, test_problems=16, expert_steps=10, expert_steps_by_domain={},
                   expert_batch_size=4)
