"""The batches the collators make and every step reads, typed so that no other code re-derives their layout.

- `SequenceBatch`: N prompt + completion sequences, masks built from lengths (never from the pad id, which may
  equal EOS), in one of two layouts: N rows right-padded to a common width, or all N packed into one row with
  `position_ids` restarting at each sequence (`packed`), so that no compute is spent on padding; and for pairs a
  third, each pair's prompt once (`shared`, `prefix_sharing.py`), a row per pair or all in one row. Its methods
  (`scored_tokens`, `row_lengths`, `model_inputs`) serve every layout alike.
- `PairBatch`: B preference pairs as one SequenceBatch of 2B rows, B chosen then B rejected, and a pair
  weight. It alone knows that order: `split` turns a per-row result (2B, ...) into its chosen and rejected
  halves, and `row_weight` spreads the pair weights over the rows.
- `PromptBatch`: P left-padded prompts for generation, with the prompts themselves for the judge.

They live with the collators, below the objective code that reads them: the data layer makes them, the
layers above only read them. Plain (non-frozen) dataclasses, so that Lightning moves them between devices.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from dpo_lightning.data.prefix_sharing import Scored, shared_attention, shared_rows, shared_scoring


def _pad(rows: list[list[int]], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _to(batch, device):
    moved = {
        f.name: value.to(device) if isinstance(value := getattr(batch, f.name), torch.Tensor) else value
        for f in fields(batch)
    }
    return replace(batch, **moved)


@dataclass
class SequenceBatch:
    """N prompt + completion sequences: N rows right-padded to a common width T, or packed into one row."""

    input_ids: torch.Tensor  # (N, T) long; packed: (1, L), L the sum of the N lengths
    attention_mask: torch.Tensor  # (N, T) long, 1 on real tokens; packed: (1, L) all 1
    completion_mask: torch.Tensor  # (N, T) long, 1 on completion tokens (prompt and padding 0); packed: (1, L)
    position_ids: torch.Tensor | None = None  # packed only: (1, L), restarting at 0 at each sequence
    sequence_lengths: torch.Tensor | None = None  # packed only: (N,) long, the sequences' lengths in order
    # prefix sharing only (`prefix_sharing.py`): each token's segment and pair, from which the mask is built
    segments: torch.Tensor | None = None
    groups: torch.Tensor | None = None

    @classmethod
    def from_rows(
        cls,
        prompts: list[list[int]],
        completions: list[list[int]],
        pad_token_id: int,
        pad_to_multiple_of=None,
        *,
        packed: bool = False,
    ) -> SequenceBatch:
        """Sequence i is prompts[i] + completions[i]: row i followed by padding, or the i-th span of one row."""
        pairs = list(zip(prompts, completions, strict=True))
        sequences = [list(p) + list(c) for p, c in pairs]
        completion = [[0] * len(p) + [1] * len(c) for p, c in pairs]
        if packed:
            flat = [token for sequence in sequences for token in sequence]
            return cls(
                input_ids=torch.tensor([flat], dtype=torch.long),
                attention_mask=torch.ones((1, len(flat)), dtype=torch.long),
                completion_mask=torch.tensor([[flag for flags in completion for flag in flags]], dtype=torch.long),
                position_ids=torch.tensor([[i for s in sequences for i in range(len(s))]], dtype=torch.long),
                sequence_lengths=torch.tensor([len(s) for s in sequences], dtype=torch.long),
            )
        width = max(len(s) for s in sequences)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        return cls(
            input_ids=_pad(sequences, pad_token_id, width),
            attention_mask=_pad([[1] * len(s) for s in sequences], 0, width),
            completion_mask=_pad(completion, 0, width),
        )

    @property
    def shared(self) -> bool:
        """Whether pairs share their prompt (laid out once as prompt, chosen, rejected: `prefix_sharing.py`)."""
        return self.segments is not None

    @property
    def packed(self) -> bool:
        return self.sequence_lengths is not None and not self.shared

    @property
    def num_rows(self) -> int:
        """N, the number of sequences (rows of the padded layout)."""
        return len(self.sequence_lengths) if self.sequence_lengths is not None else self.input_ids.shape[0]

    def row_lengths(self) -> torch.Tensor:
        """(N,) real tokens of each sequence (with prefix sharing: as if it were laid out alone)."""
        return self.sequence_lengths if self.sequence_lengths is not None else self.attention_mask.sum(dim=1)

    def padding_share(self) -> float:
        """The share of the layout's positions that are padding (what packing saves)."""
        if self.shared:
            return 1.0 - float(self.attention_mask.sum()) / float(self.attention_mask.numel())
        lengths = self.row_lengths()
        return 1.0 - float(lengths.sum()) / float(len(lengths) * int(lengths.max())) if len(lengths) else 0.0

    def model_inputs(self, *, additive_mask: bool = False) -> dict[str, torch.Tensor | bool | None]:
        """Keyword arguments of a causal LM's forward: padded rows with their attention mask, or the packed row
        with restarting `position_ids` and no mask (transformers then keeps each sequence's attention to its
        own tokens: a block-diagonal causal mask for sdpa and eager, variable lengths for flash attention).
        Shared prompts pass their 4D mask, boolean for sdpa or `additive_mask` for eager attention."""
        if self.shared:
            mask = shared_attention(self.segments, self.groups, additive=additive_mask)
            return {
                "input_ids": self.input_ids,
                "attention_mask": mask,
                "position_ids": self.position_ids,
                "use_cache": False,
            }
        if self.packed:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}

    def scored_tokens(self) -> Scored:
        """Every scored completion token: its row, the position whose logits predict it, its sequence and its
        own position (the one after the predicting one, except for a shared prompt's rejected completion)."""
        if self.shared:
            return shared_scoring(self.segments, self.groups, self.num_rows // 2)
        rows, positions, sequences = self.scored_positions()
        return Scored(rows, positions, sequences, positions + 1)

    def scored_positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position, sequence) of every position t whose next token t + 1 is a completion token: the
        positions whose logits score the completion (the one-token shift), and the sequence each belongs to.
        A sequence's first token is never scored, as in the padded layout where nothing precedes it: in a packed
        row the position before it is the previous sequence's last (reachable with an empty prompt). With
        shared prompts, see `scored_tokens`."""
        if self.shared:
            return self.scored_tokens()[:3]
        rows, positions = self.completion_mask[:, 1:].nonzero(as_tuple=True)
        if not self.packed:
            return rows, positions, rows
        starts = torch.cumsum(self.sequence_lengths, 0) - self.sequence_lengths
        begins = torch.zeros(self.input_ids.shape[1], dtype=torch.bool, device=positions.device)
        begins[starts] = True
        keep = ~begins[positions + 1]
        rows, positions = rows[keep], positions[keep]
        sequences = torch.searchsorted(starts, positions + 1, right=True) - 1
        return rows, positions, sequences

    def to(self, device) -> SequenceBatch:
        return _to(self, device)


@dataclass
class PairBatch(SequenceBatch):
    """B preference pairs: rows 0..B-1 hold prompt + chosen, rows B..2B-1 prompt + rejected, pair by pair."""

    pair_weight: torch.Tensor | None = None  # (B,) float; 0 for pairs that count nowhere (ties, shard padding)
    ref_logps: torch.Tensor | None = None  # (2B,) float, per row: the reference's log-probs, when precomputed

    @classmethod
    def from_pairs(
        cls,
        prompts: list[list[int]],
        chosen: list[list[int]],
        rejected: list[list[int]],
        pad_token_id: int,
        *,
        weight: torch.Tensor | None = None,
        pad_to_multiple_of: int | None = None,
        ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
        packed: bool = False,
        shared: bool = False,
    ) -> PairBatch:
        """`ref_logps`: the reference's (chosen (B,), rejected (B,)) log-probs, when they were precomputed;
        `packed`: the 2B sequences in one row (padding-free); `shared`: each pair's prompt once
        (`prefix_sharing.py`), a row per pair or, packed, all in one row."""
        per_row = None if ref_logps is None else torch.cat(ref_logps)
        if shared:
            laid = shared_rows(prompts, chosen, rejected, pad_token_id, pad_to_multiple_of, packed=packed)
            return cls(**laid._asdict(), pair_weight=weight, ref_logps=per_row)
        rows = SequenceBatch.from_rows(
            [list(p) for p in prompts] * 2, [*chosen, *rejected], pad_token_id, pad_to_multiple_of, packed=packed
        )
        return cls(**{f.name: getattr(rows, f.name) for f in fields(rows)}, pair_weight=weight, ref_logps=per_row)

    @property
    def num_pairs(self) -> int:
        return self.num_rows // 2

    def split(self, per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen (B, ...), rejected (B, ...)) of a per-row result (2B, ...)."""
        if per_row.shape[0] != self.num_rows:
            raise ValueError(f"a per-row result of {per_row.shape[0]} rows for a batch of {self.num_rows} rows")
        return per_row[: self.num_pairs], per_row[self.num_pairs :]

    def weights(self) -> torch.Tensor:
        """(B,) float pair weights: the stored ones, else 1 for every pair."""
        if self.pair_weight is not None:
            return self.pair_weight.float()
        return torch.ones(self.num_pairs, dtype=torch.float32, device=self.input_ids.device)

    def row_weight(self, pair_weight: torch.Tensor | None = None) -> torch.Tensor:
        """(2B,) each row's pair weight (`pair_weight` (B,) in place of the stored one when given)."""
        weight = self.weights() if pair_weight is None else pair_weight
        return torch.cat([weight, weight])


@dataclass
class PromptBatch:
    """P prompts, left-padded so that every row's next token is at the last position (batched generation)."""

    input_ids: torch.Tensor  # (P, T) long
    attention_mask: torch.Tensor  # (P, T) long, 1 on real tokens
    prompts: list[Any]  # the P prompts as text or chat messages, for the judge
    prompt_weight: torch.Tensor | None = None  # (P,) float; 0 for rows that only even out evaluation shards

    @classmethod
    def from_prompts(
        cls, rows: list[list[int]], prompts: list[Any], pad_token_id: int, weight: torch.Tensor | None = None
    ) -> PromptBatch:
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        return cls(input_ids, attention_mask, list(prompts), weight)

    @property
    def num_prompts(self) -> int:
        return self.input_ids.shape[0]

    def weights(self) -> torch.Tensor:
        """(P,) float prompt weights on CPU: the stored ones, else 1 for every prompt."""
        if self.prompt_weight is not None:
            return self.prompt_weight.float().cpu()
        return torch.ones(self.num_prompts, dtype=torch.float32)

    def prompt_ids(self) -> list[list[int]]:
        """Each prompt's own tokens, padding removed."""
        rows = zip(self.input_ids.cpu(), self.attention_mask.cpu(), strict=True)
        return [row[mask.bool()].tolist() for row, mask in rows]

    def to(self, device) -> PromptBatch:
        return _to(self, device)
