"""One DPO evaluation of a pair batch, shared by training, validation, online DPO and evaluate.py: the
policy's log-probs (with gradients), the reference's (from the `Reference` seam) and the per-pair loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from dpo_lightning.data.batch import PairBatch
from dpo_lightning.dpo.logprobs import PairLogps, forward_logps_and_tokens
from dpo_lightning.dpo.reference import Reference
from dpo_lightning.losses import LossOutput, compute_loss


@dataclass(frozen=True)
class LossSettings:
    """What the loss needs beyond log-probs: the variant, beta, the label-flip rate and DiscoPOP's temperature."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05

    @classmethod
    def of(cls, cfg) -> LossSettings:
        return cls(cfg.loss_type, cfg.beta, cfg.label_smoothing, cfg.discopop_tau)


class PairResult(NamedTuple):
    loss: LossOutput  # per pair (B,)
    policy: PairLogps  # the policy's log-probs, chosen and rejected (B,) each, with gradients
    reference: PairLogps  # the reference's, without
    policy_tokens: torch.Tensor  # (K,) the policy's log-prob of each scored token, detached, in scored order


def pair_loss(settings: LossSettings, policy: PairLogps, reference: PairLogps) -> LossOutput:
    """The configured loss of B pairs from their policy and reference log-probs."""
    return compute_loss(
        settings.loss_type,
        policy.chosen.logps,
        policy.rejected.logps,
        reference.chosen.logps.float(),
        reference.rejected.logps.float(),
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        discopop_tau=settings.discopop_tau,
        chosen_lengths=policy.chosen.num_tokens,
        rejected_lengths=policy.rejected.num_tokens,
    )


def pair_forward(
    policy: torch.nn.Module, reference: Reference, batch: PairBatch, settings: LossSettings, *, chunk_size: int = 0
) -> PairResult:
    """Policy and reference log-probs of a pair batch's 2B rows, and the per-pair loss. `chunk_size`: how the
    policy's log-probs are computed (`logprobs.forward_logps`); the reference computes its own its way."""
    rows, tokens = forward_logps_and_tokens(policy, batch, chunk_size)
    policy_logps = PairLogps.of(batch, rows)
    reference_logps = PairLogps.of(batch, reference.logps(batch))
    return PairResult(pair_loss(settings, policy_logps, reference_logps), policy_logps, reference_logps, tokens)
