"""The zoo's backbone: a tokenizer trained on the synthetic corpus and a small Qwen2-shaped
decoder pre-trained on a mixture of generic text and the domains' raw knowledge.

The mixture is what makes the experiments meaningful at this scale: the backbone knows the
facts (it has read "34 + 27 = 61", SQL queries, "7 km is 7000 m") and the request format
(from generic instructions), but has never seen a domain request answered. An expert then
only has to connect the two, which is what a few MLP layers can learn quickly.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ccoe_common.engine.templates import render_alpaca
from ccoe_common.model.checkpoint import load_backbone
from ccoe_common.model.synthetic import build_tokenizer, make_checkpoint
from ccoe_common.training.data import Example
from ccoe_common.training.trainer import FullTarget, TrainConfig, TrainResult, fit
from ccoe_common.zoo.config import ZooConfig
from ccoe_common.zoo.domains import Domain, generic

EOS = "</s>"


def pretrain_documents(domains: list[Domain], n: int, seed: int) -> list[str]:
    """n documents: half generic (sentences, everyday instructions), half domain raw text."""
    rng = random.Random(f"pretrain:{seed}")
    docs = []
    for _ in range(n):
        if rng.random() < 0.4:
            docs.append(generic.pretrain_text(rng, EOS))
        else:
            d = rng.choice(domains)
            docs.append("\n".join(d.pretrain_line(rng) for _ in range(rng.randint(3, 8))))
    return docs


def zoo_tokenizer(domains: list[Domain], config: ZooConfig):
    """Byte-level BPE with single-digit tokens, trained on the corpus and on rendered requests
    (so the Alpaca header and the domains' words are a few tokens, not dozens)."""
    rng = random.Random(f"tokenizer:{config.seed}")
    corpus = pretrain_documents(domains, 3000, config.seed + 1)
    corpus += [render_alpaca(p.instruction) + p.output for d in domains for p in d.problems(300, config.seed + 99)]
    rng.shuffle(corpus)
    return build_tokenizer(config.vocab_size, corpus=corpus, split_digits=True)


def pack(docs: list[str], tokenizer, seq_len: int) -> list[Example]:
    """Concatenate documents (EOS between them) and cut into seq_len chunks, loss on every token."""
    stream: list[int] = []
    for d in docs:
        stream += [*tokenizer(d, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return [Example(stream[i:i + seq_len], stream[i:i + seq_len])
            for i in range(0, len(stream) - seq_len + 1, seq_len)]


def pretrain_backbone(out_dir: Path, domains: list[Domain], config: ZooConfig, *, quiet: bool = False) -> TrainResult:
    """Write a pre-trained `transformers` checkpoint (config, safetensors, tokenizer) to out_dir."""
    from transformers import AutoModelForCausalLM

    tok = zoo_tokenizer(domains, config)
    init_dir = out_dir.parent / (out_dir.name + ".init")
    make_checkpoint(init_dir, "qwen2", seed=config.seed, with_tokenizer=False, vocab_size=len(tok),
                    hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                    num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                    num_key_value_heads=config.num_kv_heads, max_position_embeddings=512,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    backbone, _ = load_backbone(init_dir)
    need = config.pretrain_steps * config.pretrain_batch_size
    per_doc = 40  # rough tokens per document; a few more documents than needed is harmless
    docs = pretrain_documents(domains, need * config.pretrain_seq_len // per_doc + 100, config.seed)
    examples = pack(docs, tok, config.pretrain_seq_len)
    train_config = TrainConfig(steps=config.pretrain_steps, batch_size=config.pretrain_batch_size,
                               lr=config.pretrain_lr, warmup_steps=max(1, config.pretrain_steps // 20),
                               weight_decay=0.01, max_seq_len=config.pretrain_seq_len, seed=config.seed,
                               log_every=20, precision="fp32")
    result = fit(FullTarget(backbone), examples, train_config, pad_id=tok.pad_token_id, label="pretrain backbone",
                 quiet=quiet)

    hf = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.detach()
             for k, v in backbone.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"pre-trained weights do not match the checkpoint: missing {missing}, "
                           f"unexpected {unexpected}")
    hf.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    for f in init_dir.iterdir():
        f.unlink()
    init_dir.rmdir()
    return result
