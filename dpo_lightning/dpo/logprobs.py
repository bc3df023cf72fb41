"""Per-sequence log-probabilities of completions under a causal LM.

A causal LM's logits at position t predict token t+1 (the one-token shift), so the completion token at t+1
is scored by logits[t] and the mask that selects scored tokens is the completion mask shifted left by one.
Masks come from lengths in the collator, never from comparing ids with the pad id: pad may equal EOS, and
the EOS that ends a completion must be scored.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dpo_lightning.data.batch import PairBatch, SequenceBatch
from dpo_lightning.dpo.chunked import body_and_head, chunked_token_logps
from dpo_lightning.models.sharding import is_sharded


class SequenceLogps(NamedTuple):
    logps: torch.Tensor  # (N,) sum of completion-token log-probs
    num_tokens: torch.Tensor  # (N,) completion tokens scored
    logits_sum: torch.Tensor  # (N,) sum over completion tokens of the vocabulary-mean logit, detached


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] for each position, computed row by row in fp32.

    logits: (N, T, V); labels: (N, T) -> (N, T) fp32.
    One row at a time bounds the fp32 temporary at T x V instead of N x T x V, which for a 150k vocabulary
    is the difference between hundreds of MB and many GB.
    """
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def _padded_sums(logits: torch.Tensor, per_token: torch.Tensor, completion_mask: torch.Tensor) -> SequenceLogps:
    """Per-sequence sums of per-token log-probs (N, T - 1) over the scored (shifted) completion positions."""
    scored = completion_mask[:, 1:].to(torch.float32)
    with torch.no_grad():
        mean_logit = logits[:, :-1].detach().mean(dim=-1, dtype=torch.float32)
        logits_sum = (mean_logit * scored).sum(dim=-1)
    return SequenceLogps(
        logps=(per_token * scored).sum(dim=-1),
        num_tokens=scored.sum(dim=-1),
        logits_sum=logits_sum,
    )


def forward_logps(model: torch.nn.Module, batch: SequenceBatch, chunk_size: int = 0) -> SequenceLogps:
    """One forward pass over a collated batch's sequences (a PairBatch's 2B, or any SequenceBatch), padded or
    packed into one row.

    With `chunk_size` > 0 (and a model whose logits are its head applied to its final hidden states) only the
    completion positions go through the head, `chunk_size` tokens at a time (`chunked.py`); else the plain path
    computes the logits of every position.
    """
    return forward_logps_and_tokens(model, batch, chunk_size)[0]


def forward_logps_and_tokens(
    model: torch.nn.Module, batch: SequenceBatch, chunk_size: int = 0
) -> tuple[SequenceLogps, torch.Tensor]:
    """`forward_logps`, and the log-prob of every scored token (K,), detached, in `batch.scored_positions()`
    order (sequence by sequence, each in token order): what a sampler's own per-token log-probs compare with."""
    parts = body_and_head(model) if chunk_size > 0 else None
    if parts is None:
        logits = model(**batch.model_inputs()).logits
        if not batch.packed:
            per_token = token_logps(logits[:, :-1], batch.input_ids[:, 1:])
            rows, positions, _ = batch.scored_positions()
            sums = _padded_sums(logits, per_token, batch.completion_mask)
            return sums, per_token.detach()[rows, positions]
        sequences, per_token, mean_logit = _packed_token_values(logits, batch)
        return _per_sequence(batch, sequences, per_token, mean_logit), per_token.detach()
    body, head = parts
    hidden = final_hidden_states(model, body, batch.model_inputs())
    rows, positions, sequences = batch.scored_positions()
    per_token, mean_logit = chunked_token_logps(
        hidden[rows, positions], head, batch.input_ids[rows, positions + 1], chunk_size
    )
    return _per_sequence(batch, sequences, per_token, mean_logit), per_token.detach().float()


def final_hidden_states(model: torch.nn.Module, body: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The body's last hidden states (N, T, H) for the chunked head.

    A sharded model (FSDP2) gathers its embeddings, final norm and head only in its own (root) forward, so the
    body is run inside it: the root computes one position's logits, which are dropped, and keeps the head's
    weight whole until its backward, where the chunked head's gradient is reduced like any other."""
    if not is_sharded(model):
        return body(**inputs).last_hidden_state
    captured = []
    handle = body.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


def _packed_token_values(logits: torch.Tensor, batch: SequenceBatch):
    """The plain path on a packed row: (sequence, log-prob, mean logit) of each scored position."""
    rows, positions, sequences = batch.scored_positions()
    per_token = token_logps(logits[:, :-1], batch.input_ids[:, 1:])  # (1, L - 1)
    mean_logit = logits[:, :-1].detach().mean(dim=-1, dtype=torch.float32)
    return sequences, per_token[rows, positions], mean_logit[rows, positions]


def _per_sequence(batch: SequenceBatch, sequences, token_logps, mean_logit) -> SequenceLogps:
    """Per-token values summed into their sequences."""
    zeros = torch.zeros(batch.num_rows, dtype=torch.float32, device=token_logps.device)
    return SequenceLogps(
        logps=zeros.index_add(0, sequences, token_logps.float()),
        num_tokens=zeros.index_add(0, sequences, torch.ones_like(token_logps, dtype=torch.float32)),
        logits_sum=zeros.index_add(0, sequences, mean_logit.detach().float()),
    )


class PairLogps(NamedTuple):
    """A PairBatch's per-row log-probs split into its chosen and rejected halves, each (B,)."""

    chosen: SequenceLogps
    rejected: SequenceLogps

    @classmethod
    def of(cls, batch: PairBatch, rows: SequenceLogps) -> PairLogps:
        halves = [batch.split(values) for values in rows]
        return cls(SequenceLogps(*(h[0] for h in halves)), SequenceLogps(*(h[1] for h in halves)))
