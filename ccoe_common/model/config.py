"""The backbone's architecture, read from a `transformers` checkpoint's `config.json`.

Only the Llama / Qwen2 / Mistral decoder family is supported: pre-norm decoder layers with
RMSNorm, rotary attention (optionally grouped-query, optionally with q/k/v bias) and a gated
SiLU MLP. Anything outside that family is refused at load with the field that differs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ccoe_common.errors import CCoEError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class BackboneConfigError(CCoEError, ValueError):
    """The checkpoint's config.json describes a model this engine cannot run. The server's own
    checkpoint, not the caller's input, is at fault: FAILED_PRECONDITION."""

    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from both the v4 and v5 config layouts."""

    theta: float = 10000.0
    type: str = "default"
    # Extra parameters of the scaled variants, e.g. {"factor": 8.0} for "linear".
    params: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneConfig:
    """What the decoder needs to know about a checkpoint's shapes and numerics.

    Example: a Qwen2-0.5B checkpoint gives model_type="qwen2", hidden_size=896,
    num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Window of sliding-window attention, or None when every layer attends to everything.
    # The decoder attends fully; the engine caps context at this length when it is set.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BackboneConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BackboneConfigError(
                f"config.json model_type is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise BackboneConfigError(f"config.json hidden_act is {act!r}; only 'silu' is supported")
        if raw.get("pretraining_tp", 1) not in (1, None):
            raise BackboneConfigError("config.json pretraining_tp must be 1")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            head_dim = int(raw.get("head_dim") or hidden // heads)
            layers = int(raw["num_hidden_layers"])
            intermediate = int(raw["intermediate_size"])
            vocab = int(raw["vocab_size"])
        except KeyError as e:
            raise BackboneConfigError(f"config.json lacks the required field {e.args[0]!r}") from e
        if heads % kv_heads:
            raise BackboneConfigError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        attention_bias = bool(raw.get("attention_bias", False))
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias, o_bias = attention_bias, attention_bias
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_raw(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=_sliding_window(raw, model_type),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> BackboneConfig:
        config_path = Path(path) / "config.json"
        try:
            raw = json.loads(config_path.read_text())
        except FileNotFoundError as e:
            raise BackboneConfigError(f"no config.json in backbone directory {path}") from e
        except json.JSONDecodeError as e:
            raise BackboneConfigError(f"{config_path} is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    def architecture_dict(self) -> dict[str, Any]:
        """The fields that decide which weights fit this backbone (used in its fingerprint)."""
        d = asdict(self)
        # Token ids and context limits do not change what an expert's weights mean.
        for key in ("bos_token_id", "eos_token_ids", "max_position_embeddings", "sliding_window"):
            d.pop(key)
        return d


def _rope_from_raw(raw: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes rope_parameters; older checkpoints use rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    if not params:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise BackboneConfigError(
            f"config.json rope type is {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    numeric = {k: float(v) for k, v in params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return RopeConfig(theta=theta, type=rope_type, params=numeric)


def _sliding_window(raw: dict[str, Any], model_type: str) -> int | None:
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
