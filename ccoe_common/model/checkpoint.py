"""Loading a backbone from a local `transformers` checkpoint directory.

The directory holds config.json, model.safetensors (or shards listed in
model.safetensors.index.json) and, optionally, a tokenizer. Nothing is fetched from a hub.

The fingerprint is a sha256 over the architecture fields of the config and every stored
tensor (name, stored dtype, shape, bytes) in name order. It does not depend on how the
checkpoint is sharded or on the dtype the backbone is run in, so an expert made on a
backbone served in fp32 is accepted by the same backbone served in bf16, and refused by any
backbone whose weights differ by a single bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ccoe_common.experts.manifest import BaseModelRef
from ccoe_common.model.backbone import Backbone
from ccoe_common.model.config import BackboneConfig, BackboneConfigError
from ccoe_common.model.layers import stack_projections

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneInfo:
    """Identity of a loaded backbone. Example: fingerprint="9a0e…", parameter_count=125_829_120."""

    path: str
    config: BackboneConfig
    fingerprint: str
    parameter_count: int

    def base_model_ref(self) -> BaseModelRef:
        return BaseModelRef(
            fingerprint=self.fingerprint,
            model_type=self.config.model_type,
            num_layers=self.config.num_layers,
            hidden_size=self.config.hidden_size,
            parameter_count=self.parameter_count,
        )


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise BackboneConfigError(
        f"no model.safetensors or model.safetensors.index.json in {path}; "
        "save the checkpoint with save_pretrained(..., safe_serialization=True)"
    )


def _local_name(hf_name: str) -> str:
    # transformers stores decoder weights under "model."; the LM head sits at the top.
    return hf_name.removeprefix("model.")


def load_backbone(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[Backbone, BackboneInfo]:
    """Load weights into a frozen Backbone and compute its fingerprint.

    dtype None keeps float32 on CPU and uses bfloat16 on CUDA.
    """
    path = Path(path)
    config = BackboneConfig.from_dir(path)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = Backbone(config, device="meta", dtype=dtype)
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")

    hasher = hashlib.sha256(json.dumps(config.architecture_dict(), sort_keys=True).encode())
    state: dict[str, torch.Tensor] = {}
    handles = [safe_open(str(f), framework="pt") for f in _weight_files(path)]
    located = {name: h for h in handles for name in h.keys()}
    for hf_name in sorted(located):
        name = _local_name(hf_name)
        if name not in expected:
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue  # some exporters write the tied head anyway
            raise BackboneConfigError(f"checkpoint tensor {hf_name!r} does not belong to a {config.model_type} decoder")
        stored = located[hf_name].get_tensor(hf_name)
        hasher.update(f"{name}|{stored.dtype}|{tuple(stored.shape)}|".encode())
        hasher.update(stored.reshape(-1).view(torch.uint8).numpy())
        # .to() copies when dtype or device change; clone otherwise so no tensor aliases the
        # file mapping (n loaded models must cost n times the memory, not share pages).
        converted = stored.to(device=device, dtype=dtype)
        state[name] = converted.clone() if converted.data_ptr() == stored.data_ptr() else converted
    missing = sorted(expected - state.keys())
    if missing:
        raise BackboneConfigError(f"checkpoint {path} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    stack_projections(model)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.to(device)
    model.requires_grad_(False)
    model.eval()
    count = sum(p.numel() for p in model.parameters())
    info = BackboneInfo(path=str(path), config=config, fingerprint=hasher.hexdigest(), parameter_count=count)
    log.info("loaded backbone %s: %d parameters, fingerprint %s", path, count, info.fingerprint[:12])
    return model, info


def load_tokenizer(path: str | Path):  # -> PreTrainedTokenizerFast | None
    """The checkpoint's fast tokenizer, or None when the directory has none.

    PreTrainedTokenizerFast is used on purpose: AutoTokenizer on a qwen2 directory swaps in
    Qwen2Tokenizer, whose own pre-tokenizer gives different ids for a custom tokenizer.json.
    """
    if not (Path(path) / "tokenizer.json").exists():
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))
