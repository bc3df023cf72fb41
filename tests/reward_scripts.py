"""Scripted rewards that tests name by import path (`reward_scripts:NAME`, with tests/ on the path)."""

from __future__ import annotations

import os
import zlib

from dpo_lightning.builtin import sentiment_reward


def ties_on_rank_one(prompts: list[str], completions: list[str]) -> list[float]:
    """Every pair a tie on global rank 1 (a constant), the built-in sentiment reward elsewhere."""
    if os.environ.get("RANK") == "1":
        return [0.0] * len(completions)
    return sentiment_reward(prompts, completions)


def text_hash(prompts: list[str], completions: list[str]) -> list[float]:
    """A score in [0, 1) from each completion's CRC-32: two different completions (almost) never tie, so every
    pair is decided and every metric defined, whatever a tiny random policy samples."""
    return [zlib.crc32(completion.encode()) / 2**32 for completion in completions]
