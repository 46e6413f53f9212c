"""Tiny random-weight checkpoints with an offline tokenizer, for tests, demos and benchmarks.

Saved exactly as `transformers` saves a real model (config.json + model.safetensors +
tokenizer files), so everything downstream loads them through the normal path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

Arch = Literal["qwen2", "llama", "mistral"]

_TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) . , ? !\n"
    "Compute 12 + 7 and 144 / 12. SELECT name FROM users WHERE age > 30 ORDER BY name;\n"
    "Convert 5 km to meters. What is the date 10 days after 2024-03-01? def add(a, b): return a + b\n"
    "The patient presents with fever and cough. The court held that the contract was void.\n"
)


# A minimal chat format so chat-message requests work on synthetic models.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 512, corpus: Iterable[str] | None = None,
                    split_digits: bool = False):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained in milliseconds on a fixed corpus (deterministic).

    corpus: train on these texts instead of the built-in sentences (the demo zoo trains on its
    own synthetic domains). split_digits: every digit its own token, so "347" is 3, 4, 7 —
    small models learn arithmetic far more easily when numbers are not merged into chunks.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_CORPUS] * 8 if corpus is None else corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def tiny_config(arch: Arch = "qwen2", **overrides: Any):
    """A transformers config for a tiny decoder; overrides win (e.g. num_key_value_heads=4)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base: dict[str, Any] = {
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    base.update(overrides)
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig}[arch]
    return cls(**base)


def make_checkpoint(path: str | Path, arch: Arch = "qwen2", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    with_tokenizer: bool = True, init_std: float | None = None, device: str = "cpu",
                    **overrides: Any) -> Path:
    """Create and save a random-weight checkpoint at `path`; returns the path.

    init_std: std of the random weights; the default (0.02) gives near-uniform next-token
    distributions, a larger value gives a model whose greedy outputs vary with the input.
    device: where the weights are drawn before saving; "cuda" makes a 7B-shaped checkpoint in
    seconds where the CPU takes minutes (other values, not other bits: each device has its
    own random stream).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = tiny_config(arch, **overrides)
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if init_std is not None:
        # Norm weights stay 1; biases get noise too so bias paths are exercised.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, init_std)
    model.save_pretrained(path)
    if with_tokenizer:
        build_tokenizer(config.vocab_size).save_pretrained(path)
    return path
