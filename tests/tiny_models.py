"""A random Qwen2 small enough to build in milliseconds, and random token pairs for it, for the tests that
compare two computations of the same log-probs (no tokenizer needed: ids are drawn directly)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 97


def random_qwen2(seed: int = 0, **config) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    values.update(config)
    return Qwen2ForCausalLM(Qwen2Config(**values)).float()


def random_pairs(seed: int, prompts: tuple[int, ...], chosen: tuple[int, ...], rejected: tuple[int, ...]):
    """(prompts, chosen, rejected) token lists of the given lengths, ids in [1, VOCAB)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [ids(n) for n in prompts], [ids(n) for n in chosen], [ids(n) for n in rejected]
