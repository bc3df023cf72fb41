"""Collators: tokenized pairs into one `PairBatch` of 2B rows (B chosen sequences, then B rejected ones), and
prompts into a left-padded `PromptBatch` for generation."""

from __future__ import annotations

import json

import torch

from dpo_lightning.data.batch import PairBatch, PromptBatch


def _weights(items: list[dict]) -> torch.Tensor | None:
    return torch.tensor([float(item["weight"]) for item in items]) if "weight" in items[0] else None


REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # the reference's log-probs, when precomputed


def _ref_logps(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor] | None:
    if REF_COLUMNS[0] not in items[0]:
        return None
    chosen, rejected = (torch.tensor([float(item[c]) for item in items], dtype=torch.float32) for c in REF_COLUMNS)
    return chosen, rejected


class PairCollator:
    """Right-pads prompt+completion sequences; masks are built from lengths, never from the pad id.

    Input: B items with `prompt_ids`, `chosen_ids`, `rejected_ids` (int lists), a `weight` on evaluation shards
    (where padding rows weigh 0), and `ref_chosen_logps`/`ref_rejected_logps` when the reference's log-probs
    were precomputed. Output: a PairBatch of 2B rows, with `pair_weight` and `ref_logps` when the items carry
    them.
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, *, packed: bool = False, shared: bool = False
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed  # padding-free: the 2B sequences in one row
        self.shared = shared  # prefix sharing: each pair's prompt once

    def __call__(self, items: list[dict]) -> PairBatch:
        return PairBatch.from_pairs(
            [item["prompt_ids"] for item in items],
            [list(item["chosen_ids"]) for item in items],
            [list(item["rejected_ids"]) for item in items],
            self.pad_token_id,
            weight=_weights(items),
            pad_to_multiple_of=self.pad_to_multiple_of,
            ref_logps=_ref_logps(items),
            packed=self.packed,
            shared=self.shared,
        )


class PromptCollator:
    """Left-pads prompts for batched generation, so that every row's next token is at the last position.

    Input: P items with `prompt_ids` and `prompt_json`, and a `weight` on evaluation shards. Output: a
    PromptBatch (the prompts as text or messages, for the judge), with `prompt_weight` when items carry weights.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> PromptBatch:
        return PromptBatch.from_prompts(
            [list(item["prompt_ids"]) for item in items],
            [json.loads(item["prompt_json"]) for item in items],
            self.pad_token_id,
            _weights(items),
        )


def collate_in_batches(data, collate, batch_size: int) -> list:
    """Every row of `data` (a Dataset or list), collated `batch_size` at a time, in order."""
    rows = [data[i] for i in range(len(data))]
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
