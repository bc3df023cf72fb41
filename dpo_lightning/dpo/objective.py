"""One DPO evaluation of a pair batch, shared by training, validation, online DPO and evaluate.py: the
policy's log-probs (with gradients), the reference's (from the `Reference` seam) and the per-pair loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import NamedTuple

import torch

from dpo_lightning.data.batch import PairBatch
from dpo_lightning.dpo.logprobs import PairLogps, forward_logps_and_tokens, ld_weighted
from dpo_lightning.dpo.reference import Reference
from dpo_lightning.losses import (
    LOSSES,
    LossOutput,
    Terms,
    chosen_nll,
    compute_loss,
    is_reference_free,
    objective_terms,
    wpo_weights,
)


@dataclass(frozen=True)
class LossSettings:
    """What the objective needs beyond log-probs: the configuration's keys of the same names (`DPOConfig`)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    loss_weights: str = ""
    rpo_alpha: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False
    ld_alpha: float | None = None
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5

    @classmethod
    def of(cls, cfg) -> LossSettings:
        """From a DPOConfig, or from a mapping of a run's saved configuration (absent keys take the defaults)."""
        values = cfg if isinstance(cfg, Mapping) else {f.name: getattr(cfg, f.name) for f in fields(cls)}
        return cls(**{f.name: values.get(f.name, f.default) for f in fields(cls)})

    @cached_property  # read at every micro-batch: the configuration's strings are parsed once
    def terms(self) -> Terms:
        return objective_terms(self.loss_type, self.loss_weights, self.rpo_alpha)

    @property
    def uses_nll(self) -> bool:
        return any(LOSSES[name].nll for name, _ in self.terms)

    @property
    def reference_free(self) -> bool:
        return is_reference_free(self.terms)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The per-pair metrics the objective's losses add to the preference metrics (ORPO's log odds)."""
        return tuple(metric for name, _ in self.terms for metric in LOSSES[name].metric_names)


class PairResult(NamedTuple):
    loss: LossOutput  # per pair (B,)
    policy: PairLogps  # the policy's log-probs, chosen and rejected (B,) each, with gradients
    reference: PairLogps  # the reference's, without
    policy_tokens: torch.Tensor  # (K,) the policy's log-prob of each scored token, detached, in scored order


def pair_loss(
    settings: LossSettings, policy: PairLogps, reference: PairLogps, pair_weight: torch.Tensor | None = None
) -> LossOutput:
    """The configured objective of B pairs from their policy and reference log-probs; `pair_weight` (B,), 0 for
    pairs that count nowhere, is what the micro-batch terms (sft's token mean, aot's sorts) are taken over."""
    weight = torch.ones_like(policy.chosen.num_tokens) if pair_weight is None else pair_weight
    nll = chosen_nll(policy.chosen.logps, policy.chosen.num_tokens, weight) if settings.uses_nll else None
    wpo = None
    if settings.use_weighting:
        wpo = wpo_weights(policy.chosen.aligned, policy.chosen.num_tokens)
        wpo = wpo * wpo_weights(policy.rejected.aligned, policy.rejected.num_tokens)
    return compute_loss(
        settings.terms,
        ld_weighted(policy.chosen, settings.ld_alpha),
        ld_weighted(policy.rejected, settings.ld_alpha),
        ld_weighted(reference.chosen, settings.ld_alpha).float(),
        ld_weighted(reference.rejected, settings.ld_alpha).float(),
        beta=settings.beta,
        label_smoothing=settings.label_smoothing,
        discopop_tau=settings.discopop_tau,
        cpo_alpha=settings.cpo_alpha,
        simpo_gamma=settings.simpo_gamma,
        f_divergence_type=settings.f_divergence_type,
        f_alpha_divergence_coef=settings.f_alpha_divergence_coef,
        chosen_lengths=policy.chosen.num_tokens,
        rejected_lengths=policy.rejected.num_tokens,
        pair_weight=weight,
        chosen_nll=nll,
        wpo_weight=wpo,
    )


def pair_forward(
    policy: torch.nn.Module, reference: Reference, batch: PairBatch, settings: LossSettings, *, chunk_size: int = 0
) -> PairResult:
    """Policy and reference log-probs of a pair batch's 2B rows, and the per-pair loss. `chunk_size`: how the
    policy's log-probs are computed (`logprobs.forward_logps`); the reference computes its own its way."""
    rows, tokens = forward_logps_and_tokens(policy, batch, chunk_size, with_weighting=settings.use_weighting)
    policy_logps = PairLogps.of(batch, rows)
    reference_logps = PairLogps.of(batch, reference.logps(batch))
    loss = pair_loss(settings, policy_logps, reference_logps, batch.weights())
    return PairResult(loss, policy_logps, reference_logps, tokens)
