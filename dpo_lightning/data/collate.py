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
        sequences, completion = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for item in items:
                prompt, answer = list(item["prompt_ids"]), list(item[key])
                sequences.append(prompt + answer)
                completion.append([0] * len(prompt) + [1] * len(answer))
        width = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": _pad(sequences, self.pad_token_id, width),
            "attention_mask": _pad([[1] * len(s) for s in sequences], 0, width),
            "completion_mask": _pad(completion, 0, width),
        }
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
