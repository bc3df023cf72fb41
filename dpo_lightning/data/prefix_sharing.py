"""Prefix sharing: a preference pair laid out once as prompt, chosen completion, rejected completion, so that the
model computes the shared prompt once instead of once per completion.

Within a pair the rejected tokens take the positions the chosen ones took (they restart at the prompt's end)
and attend to the prompt and to themselves, never to the chosen completion; every other attention stays causal
and inside the pair. Each completion token is then computed exactly as in its own sequence: the chosen
completion's first token is scored from the prompt's last position as usual, and so is the rejected
completion's, whose previous position in the row is the chosen completion's end.

Tokens carry a `segment` (PROMPT, CHOSEN, REJECTED, or PAD) and a `group` (the pair's index in the batch, -1 on
padding). The same two tensors describe pairs one per row (padded) and all pairs in one row (packed).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


class SharedRows(NamedTuple):
    input_ids: torch.Tensor  # (R, T) long
    attention_mask: torch.Tensor  # (R, T) long, 1 on real tokens (the 4D mask is built from segments and groups)
    completion_mask: torch.Tensor  # (R, T) long, 1 on chosen and rejected tokens
    position_ids: torch.Tensor  # (R, T) long: the rejected completion restarts at the prompt's end
    segments: torch.Tensor  # (R, T) long: PROMPT, CHOSEN, REJECTED or PAD
    groups: torch.Tensor  # (R, T) long: the pair each token belongs to, -1 on padding
    sequence_lengths: torch.Tensor  # (2B,) long: prompt + chosen of each pair, then prompt + rejected


def _pair_tokens(index: int, prompt: list[int], chosen: list[int], rejected: list[int]):
    """(ids, segments, groups, positions) of one pair laid out once."""
    ids = [*prompt, *chosen, *rejected]
    segments = [PROMPT] * len(prompt) + [CHOSEN] * len(chosen) + [REJECTED] * len(rejected)
    start = len(prompt)
    positions = [*range(start + len(chosen)), *range(start, start + len(rejected))]
    return ids, segments, [index] * len(ids), positions


def shared_rows(
    prompts: list[list[int]],
    chosen: list[list[int]],
    rejected: list[list[int]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    *,
    packed: bool = False,
) -> SharedRows:
    """B pairs, one per right-padded row, or all in one row (`packed`)."""
    laid = [_pair_tokens(i, *pair) for i, pair in enumerate(zip(prompts, chosen, rejected, strict=True))]
    if packed:
        laid = [tuple([value for pair in laid for value in pair[k]] for k in range(4))]
    width = max(len(ids) for ids, *_ in laid)
    if pad_to_multiple_of and not packed:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    def padded(k: int, value: int) -> torch.Tensor:
        out = torch.full((len(laid), width), value, dtype=torch.long)
        for row, parts in enumerate(laid):
            out[row, : len(parts[k])] = torch.tensor(parts[k], dtype=torch.long)
        return out

    segments = padded(1, PAD)
    lengths = [len(p) + len(c) for p, c in zip(prompts, chosen, strict=True)]
    lengths += [len(p) + len(r) for p, r in zip(prompts, rejected, strict=True)]
    return SharedRows(
        input_ids=padded(0, pad_token_id),
        attention_mask=(segments != PAD).long(),
        completion_mask=((segments == CHOSEN) | (segments == REJECTED)).long(),
        position_ids=padded(3, 0),
        segments=segments,
        groups=padded(2, -1),
        sequence_lengths=torch.tensor(lengths, dtype=torch.long),
    )


def shared_attention(segments: torch.Tensor, groups: torch.Tensor, *, additive: bool) -> torch.Tensor:
    """The (R, 1, T, T) mask: query t sees key s <= t of its own pair, except a rejected token never sees a
    chosen one; padding sees itself only (so no row of the softmax is empty). Boolean (True: attend) for sdpa,
    or `additive` (0 / the dtype's minimum, added to the scores) for eager attention."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = groups[:, :, None] == groups[:, None, :]
    hidden = (segments[:, :, None] == REJECTED) & (segments[:, None, :] == CHOSEN)
    padding = (groups < 0)[:, :, None] & torch.eye(length, dtype=torch.bool, device=segments.device)
    allowed = ((causal & same & ~hidden & (groups >= 0)[:, :, None]) | padding)[:, None]
    if not additive:
        return allowed
    zero = torch.zeros((), dtype=torch.float32, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


class Scored(NamedTuple):
    """Where each scored completion token is predicted from, and which sequence of the pair batch it scores."""

    rows: torch.Tensor  # (K,) the row
    positions: torch.Tensor  # (K,) the position whose logits predict the token
    sequences: torch.Tensor  # (K,) 0..B-1 for chosen tokens, B..2B-1 for rejected ones
    targets: torch.Tensor  # (K,) the token's own position


def shared_scoring(segments: torch.Tensor, groups: torch.Tensor, num_pairs: int) -> Scored:
    """Every completion token with a predecessor in its own sequence: the previous position, except for the
    rejected completion's first token, predicted from its pair's last prompt token. In sequence order (chosen
    sequences, then rejected ones, each in token order), as the other layouts give them."""
    rows, targets = ((segments == CHOSEN) | (segments == REJECTED)).nonzero(as_tuple=True)
    length = segments.shape[1]
    index = torch.arange(length, device=segments.device).expand_as(segments)
    last_prompt = torch.where(segments == PROMPT, index, -1).cummax(dim=1).values
    previous = (targets - 1).clamp(min=0)
    rejected = segments[rows, targets] == REJECTED
    first_rejected = rejected & (segments[rows, previous] != REJECTED)
    positions = torch.where(first_rejected, last_prompt[rows, targets], targets - 1)
    # no predecessor inside the pair (an empty prompt): not scored, as a sequence's first token never is
    keep = (positions >= 0) & (groups[rows, positions.clamp(min=0)] == groups[rows, targets])
    rows, positions, targets, rejected = rows[keep], positions[keep], targets[keep], rejected[keep]
    sequences = groups[rows, targets] + num_pairs * rejected.long()
    order = torch.sort(sequences, stable=True).indices
    return Scored(rows[order], positions[order], sequences[order], targets[order])
