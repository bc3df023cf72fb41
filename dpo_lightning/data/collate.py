"""Collate tokenized pairs into one batch of 2B rows (B chosen sequences, then B rejected ones), and prompts
into a left-padded batch for generation."""

from __future__ import annotations

import json

import torch


def _pad(rows: list[list[int]], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def completion_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion rows (N, T): `input_ids`, `attention_mask` (1 on real tokens),
    `completion_mask` (1 on completion tokens); masks from lengths, never from the pad id."""
    pairs = list(zip(prompts, completions, strict=True))
    sequences = [list(p) + list(c) for p, c in pairs]
    width = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return {
        "input_ids": _pad(sequences, pad_token_id, width),
        "attention_mask": _pad([[1] * len(s) for s in sequences], 0, width),
        "completion_mask": _pad([[0] * len(p) + [1] * len(c) for p, c in pairs], 0, width),
    }


class PairCollator:
    """Right-pads prompt+completion sequences; masks are built from lengths, never from the pad id.

    Input: B items with `prompt_ids`, `chosen_ids`, `rejected_ids` (int lists). Output (2B, T) long tensors:
    `input_ids`, `attention_mask` (1 on real tokens), `completion_mask` (1 on completion tokens); and
    `pair_weight` (B,) when the items carry a `weight` (evaluation shards, where padding rows weigh 0).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [list(item["prompt_ids"]) for item in items] * 2
        answers = [list(item["chosen_ids"]) for item in items] + [list(item["rejected_ids"]) for item in items]
        batch = completion_batch(prompts, answers, self.pad_token_id, self.pad_to_multiple_of)
        if "weight" in items[0]:
            batch["pair_weight"] = torch.tensor([float(item["weight"]) for item in items])
        return batch


class PromptCollator:
    """Left-pads prompts for batched generation, so that every row's next token is at the last position.

    Input: P items with `prompt_ids` and `prompt_json`. Output: `input_ids`, `attention_mask` (P, T) long
    (mask from lengths), `prompts` (the P prompts as text or messages, for the reward model), and
    `prompt_weight` (P,) when the items carry a `weight` (evaluation shards, where padding rows weigh 0).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        rows = [list(item["prompt_ids"]) for item in items]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "prompts": [json.loads(item["prompt_json"]) for item in items],
        }
        if "weight" in items[0]:
            batch["prompt_weight"] = torch.tensor([float(item["weight"]) for item in items])
        return batch


def collate_in_batches(data, collate, batch_size: int) -> list[dict]:
    """Every row of `data` (a Dataset or list), collated `batch_size` at a time, in order."""
    rows = [data[i] for i in range(len(data))]
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
