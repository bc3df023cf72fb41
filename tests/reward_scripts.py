"""Scripted rewards that tests name by import path (`reward_scripts:NAME`, with tests/ on the path)."""

from __future__ import annotations

import os

from dpo_lightning.builtin import sentiment_reward


def ties_on_rank_one(prompts: list[str], completions: list[str]) -> list[float]:
    """Every pair a tie on global rank 1 (a constant), the built-in sentiment reward elsewhere."""
    if os.environ.get("RANK") == "1":
        return [0.0] * len(completions)
    return sentiment_reward(prompts, completions)
