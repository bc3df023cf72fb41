"""Hold out a seeded share of prompts for validation, so that no prompt is on both sides."""

from __future__ import annotations

import json
import random


def prompt_key(prompt) -> str:
    """A hashable key for a text prompt or a message-list prompt."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def held_out_count(n_prompts: int, val_fraction: float) -> int:
    """Prompts to hold out: round(fraction * n), at least 1 and at most n - 1 (train keeps one)."""
    if val_fraction <= 0 or n_prompts < 2:
        return 0
    return min(max(round(val_fraction * n_prompts), 1), n_prompts - 1)


def split_by_prompt(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows); a prompt's rows all go to one side, chosen by a seeded shuffle."""
    # Sorted, so that the draw depends on the set of prompts, not on the row order.
    keys = sorted({prompt_key(row["prompt"]) for row in rows})
    n_val = held_out_count(len(keys), val_fraction)
    if n_val == 0:
        return list(rows), []
    random.Random(seed).shuffle(keys)
    held_out = set(keys[:n_val])
    train = [row for row in rows if prompt_key(row["prompt"]) not in held_out]
    val = [row for row in rows if prompt_key(row["prompt"]) in held_out]
    return train, val
