"""What a caller asks the engine for, and what it gets back.

    req = GenerationRequest(prompt="Compute 12 + 7", expert="math",
                            sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_new_tokens=64))
    async for delta in engine.generate(req): print(delta.text, end="")
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccoe_common.engine.templates import TEMPLATES, Template
from ccoe_common.errors import InvalidRequest
from ccoe_common.experts.reference import ExpertKey

# The least normal fp32 value (~1.18e-38). A temperature below it decodes greedily: sampling
# at temperature t tends to greedy as t -> 0, and fp32 holds such a t as a subnormal or as 0
# (1e-45 is 1.4e-45, 1e-46 is 0.0), which hardware may flush to zero before dividing by it.
MIN_TEMPERATURE = 2.0 ** -126

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256

# Allowed values, written the way error messages state them.
_RANGES = {
    "temperature": "[0, 10] (0 = greedy)",
    "top_k": "[0, 100000] (0 = off)",
    "top_p": "(0, 1] (1 = off)",
    "repetition_penalty": "(0, 10] (1 = off)",
    "seed": "[0, 2^63)",
    "max_new_tokens": "[1, 1000000]",
    "stop": f"at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_STRING_CHARS} characters",
    "stop_token_ids": "a list of token ids >= 0",
}


class SamplingParams(BaseModel):
    """How to pick tokens. The defaults are greedy decoding of at most 64 tokens."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0.0, le=10.0,
                               description="0 = greedy (so is anything below 2^-126); higher = more random.")
    top_k: int = Field(0, ge=0, le=100_000, description="Keep the k most likely tokens; 0 = off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Keep the smallest set with this total probability.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0,
                                      description="Divide logits of already-seen tokens (>1 discourages repeats).")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Per-request seed: same seed, same sample.")
    max_new_tokens: int = Field(64, ge=1, le=1_000_000, description="Stop after this many new tokens.")
    stop: tuple[str, ...] = Field((), description="Stop when the text contains one of these (not returned).")
    stop_token_ids: tuple[int, ...] = Field((), description="Extra token ids that end generation (returned).")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    logprobs: bool = Field(False, description="Return the log-probability of each chosen token.")

    @classmethod
    def create(cls, **kwargs: Any) -> SamplingParams:
        """Validate, turning pydantic's errors into InvalidRequest naming the parameter and its range."""
        try:
            params = cls(**kwargs)
        except ValidationError as e:
            err = e.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else "sampling"
            allowed = _RANGES.get(name)
            got = err.get("input")
            detail = f"must be in {allowed}" if allowed else err["msg"]
            raise InvalidRequest(name, f"{detail}, got {got!r}") from e
        if len(params.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_STRING_CHARS for s in params.stop):
            raise InvalidRequest("stop", f"must be {_RANGES['stop']}, got {list(params.stop)!r}")
        if any(t < 0 for t in params.stop_token_ids):
            raise InvalidRequest("stop_token_ids",
                                 f"must be {_RANGES['stop_token_ids']}, got {list(params.stop_token_ids)}")
        return params

    @property
    def greedy(self) -> bool:
        """Greedy decoding: temperature 0, or below MIN_TEMPERATURE (e.g. 1e-45)."""
        return self.temperature < MIN_TEMPERATURE


@dataclass
class GenerationRequest:
    """One request. Give exactly one of prompt, messages (chat) or prompt_ids.

    template: "raw" sends the prompt as is, "alpaca" wraps it in the Alpaca instruction format
    (the papers' training format), "chat" applies the tokenizer's chat template to messages.
    expert: None = bare backbone; "math" = newest resident version; "math@2" or an ExpertKey
    pins one. timeout_s: the request fails with DEADLINE_EXCEEDED after this long.
    allow_staged: may run on a version pushed with `Engine.push(..., staged=True)` and not yet
    admitted (a replica's smoke test does); other requests are refused such a version.
    """

    prompt: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    prompt_ids: Sequence[int] | None = None
    template: Template = "raw"
    expert: str | ExpertKey | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    timeout_s: float | None = None
    allow_staged: bool = False

    def check(self) -> None:
        given = [n for n in ("prompt", "messages", "prompt_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InvalidRequest("prompt", f"give exactly one of prompt, messages, prompt_ids; got {given or 'none'}")
        if self.template not in TEMPLATES:
            raise InvalidRequest("template", f"must be one of {list(TEMPLATES)}, got {self.template!r}")
        if self.messages is not None and self.template != "chat":
            raise InvalidRequest("template", "messages need template='chat'")
        if self.template == "chat" and self.messages is None:
            raise InvalidRequest("messages", "template='chat' needs messages")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise InvalidRequest("timeout_s", f"must be > 0, got {self.timeout_s}")
        if not self.request_id or len(self.request_id) > 128:
            raise InvalidRequest("request_id", "must be 1 to 128 characters")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Seconds from submission: queued until first scheduled, first token, finished."""

    queue_s: float
    ttft_s: float | None
    total_s: float


@dataclass(frozen=True)
class TokenDelta:
    """One streamed step: the new token ids and the text they complete (may be "" while a
    multi-byte character or a possible stop string is still pending)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # set on the last delta: "stop" | "length"
    expert: ExpertKey | None = None
    usage: Usage | None = None  # set on the last delta
    timings: Timings | None = None  # set on the last delta


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    expert: ExpertKey | None
    usage: Usage
    timings: Timings
    logprobs: list[float] | None = None
