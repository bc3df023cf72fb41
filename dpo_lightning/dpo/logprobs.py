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
    # (N,) the part of `logps` past the pair's shorter completion (LD-DPO's verbose tail); None outside pairs
    tail: torch.Tensor | None = None
    # (N,) sum over completion tokens of log p(token) - log sum_v p(v)^2, detached (WPO's weights); when asked
    aligned: torch.Tensor | None = None


def ld_weighted(half: SequenceLogps, ld_alpha: float | None) -> torch.Tensor:
    """LD-DPO (Liu et al., 2024, arXiv 2409.06411): summed log-probs with the tokens past the pair's shorter
    completion weighted by `ld_alpha` (their `tail`); plain sums when `ld_alpha` is None or no tail is known
    (precomputed reference log-probs, which are stored weighted)."""
    if ld_alpha is None or half.tail is None:
        return half.logps
    return half.logps - (1.0 - ld_alpha) * half.tail.to(half.logps.dtype)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, with_weighting: bool = False):
    """log softmax(logits)[label] for each position, computed row by row in fp32, and with `with_weighting`
    also log sum_v softmax(logits)_v^2 (detached; else None).

    logits: (N, T, V); labels: (N, T) -> (N, T) fp32 each.
    One row at a time bounds the fp32 temporary at T x V instead of N x T x V, which for a 150k vocabulary
    is the difference between hundreds of MB and many GB.
    """
    rows, squares = [], []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        normaliser = torch.logsumexp(row_logits, dim=-1)
        rows.append(picked - normaliser)
        if with_weighting:
            with torch.no_grad():
                squares.append(torch.logsumexp(2 * row_logits, dim=-1) - 2 * normaliser)
    return torch.stack(rows), torch.stack(squares) if with_weighting else None


def forward_logps(model: torch.nn.Module, batch: SequenceBatch, chunk_size: int = 0) -> SequenceLogps:
    """One forward pass over a collated batch's sequences (a PairBatch's 2B, or any SequenceBatch), padded or
    packed into one row.

    With `chunk_size` > 0 (and a model whose logits are its head applied to its final hidden states) only the
    completion positions go through the head, `chunk_size` tokens at a time (`chunked.py`); else the plain path
    computes the logits of every position.
    """
    return forward_logps_and_tokens(model, batch, chunk_size)[0]


def forward_logps_and_tokens(
    model: torch.nn.Module, batch: SequenceBatch, chunk_size: int = 0, *, with_weighting: bool = False
) -> tuple[SequenceLogps, torch.Tensor]:
    """`forward_logps`, and the log-prob of every scored token (K,), detached, in `batch.scored_positions()`
    order (sequence by sequence, each in token order): what a sampler's own per-token log-probs compare with.
    `with_weighting`: also each sequence's WPO `aligned` sum."""
    parts = body_and_head(model) if chunk_size > 0 else None
    rows, positions, sequences, targets = batch.scored_tokens()
    labels = batch.input_ids[rows, targets]
    inputs = batch.model_inputs(additive_mask=_attention_kind(model) == "eager")
    if parts is None and not batch.shared:
        logits = model(**inputs).logits
        per_token, square = token_logps(logits[:, :-1], batch.input_ids[:, 1:], with_weighting)
        mean_logit = logits[:, :-1].detach().mean(dim=-1, dtype=torch.float32)
        values = per_token[rows, positions], mean_logit[rows, positions]
        values += (None if square is None else square[rows, positions],)
    elif parts is None:  # a shared prompt's position may predict two tokens: gather the scored positions first
        values = _gathered_token_logps(model(**inputs).logits[rows, positions], labels, with_weighting)
    else:
        body, head = parts
        hidden = final_hidden_states(model, body, inputs)
        values = chunked_token_logps(hidden[rows, positions], head, labels, chunk_size, with_weighting)
    sums = _per_sequence(batch, sequences, *values)
    return sums, values[0].detach().float()


def _attention_kind(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


GATHER_ROWS = 1024  # scored positions whose fp32 log-softmax is taken at once (bounds the K x V temporary)


def _gathered_token_logps(logits: torch.Tensor, labels: torch.Tensor, with_weighting: bool):
    """(log-probs (K,), mean logits (K,), WPO terms (K,) or None) of the logits (K, V) gathered at the scored
    positions, `GATHER_ROWS` at a time."""
    picked, squares = [], []
    for start in range(0, len(labels), GATHER_ROWS):
        part = slice(start, start + GATHER_ROWS)
        per_token, square = token_logps(logits[None, part], labels[None, part], with_weighting)
        picked.append(per_token[0])
        squares.append(None if square is None else square[0])
    mean_logit = logits.detach().mean(dim=-1, dtype=torch.float32)
    empty = logits.new_zeros(0, dtype=torch.float32)
    per_token = torch.cat(picked) if picked else empty
    square = (torch.cat(squares) if squares else empty) if with_weighting else None
    return per_token, mean_logit, square


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


def _tail_mask(batch: SequenceBatch, sequences: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """(K,) which scored tokens lie past their pair's shorter completion (LD-DPO's tail); None outside a PairBatch.
    `sequences` (K,) is each token's sequence, in sequence order; `counts` (N,) their scored tokens."""
    if not isinstance(batch, PairBatch):
        return None
    chosen, rejected = batch.split(counts)
    shared = torch.minimum(chosen, rejected)
    shared = batch.row_weight(shared)  # the pair's value on both its rows
    starts = torch.cumsum(counts, 0) - counts
    index = torch.arange(len(sequences), device=sequences.device) - starts[sequences].long()
    return index >= shared[sequences]


def _per_sequence(batch: SequenceBatch, sequences, token_logps, mean_logit, square=None) -> SequenceLogps:
    """Per-token values (K,), each of the sequence `sequences` names, summed into their sequences (N,)."""
    zeros = torch.zeros(batch.num_rows, dtype=torch.float32, device=token_logps.device)
    token_logps = token_logps.float()
    counts = zeros.index_add(0, sequences, torch.ones_like(token_logps))
    tail = _tail_mask(batch, sequences, counts)
    aligned = None if square is None else zeros.index_add(0, sequences, token_logps.detach() - square.float())
    return SequenceLogps(
        logps=zeros.index_add(0, sequences, token_logps),
        num_tokens=counts,
        logits_sum=zeros.index_add(0, sequences, mean_logit.detach().float()),
        tail=None if tail is None else zeros.index_add(0, sequences, token_logps * tail),
        aligned=aligned,
    )


class PairLogps(NamedTuple):
    """A PairBatch's per-row log-probs split into its chosen and rejected halves, each (B,)."""

    chosen: SequenceLogps
    rejected: SequenceLogps

    @classmethod
    def of(cls, batch: PairBatch, rows: SequenceLogps) -> PairLogps:
        halves = [(None, None) if values is None else batch.split(values) for values in rows]
        return cls(SequenceLogps(*(h[0] for h in halves)), SequenceLogps(*(h[1] for h in halves)))
