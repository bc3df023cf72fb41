"""Preference losses for DPO and its close relatives, as pure functions of sequence log-probs.

Every loss takes the summed log-probabilities of the chosen and rejected completions under the policy and
the frozen reference model, each of shape (B,), and returns a per-pair loss of shape (B,) together with the
implicit rewards. Reduction over the batch is left to the caller so that it can weight or mask pairs.

The formulas agree with eric-mitchell/direct-preference-optimization and TRL 1.16's ``DPOTrainer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpo_lightning.config import LOSS_TYPES, USES_LABEL_SMOOTHING
from dpo_lightning.errors import ConfigError

# The configuration names the loss choices (`config.LOSS_TYPES`, checked before any loss runs); the registry
# below holds one function for each, as a test checks.
__all__ = ["LOSS_TYPES", "USES_LABEL_SMOOTHING", "LossOutput", "compute_loss", "weighted_mean"]


class LossOutput(NamedTuple):
    losses: torch.Tensor  # (B,) per-pair loss, not reduced
    chosen_rewards: torch.Tensor  # (B,) beta * (policy_chosen_logps - ref_chosen_logps), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (policy_rejected_logps - ref_rejected_logps), detached


def _log_ratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def _rewards(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # Rewards are metrics only; detaching keeps a caller from back-propagating through them by accident.
    # They use the summed (not length-averaged) log-ratios for every loss so that logs are comparable.
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """The DPO loss, optionally conservative (cDPO) via label smoothing.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: (B,) summed log-probs of the rejected completions under the policy.
        ref_chosen_logps: (B,) summed log-probs of the chosen completions under the reference model.
        ref_rejected_logps: (B,) summed log-probs of the rejected completions under the reference model.
        beta: temperature of the implicit reward; smaller means a looser tie to the reference model.
        label_smoothing: assumed probability eps that a preference label is flipped.

    Returns:
        LossOutput with (B,) losses, chosen rewards and rejected rewards.
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = chosen_logratios - rejected_logratios
    # Eq. 7 of Rafailov et al. (2023). With eps > 0 this is the cross-entropy against soft labels
    # (1 - eps, eps), as in the reference implementation; its optimum is then a finite margin.
    # logsigmoid rather than log(sigmoid(.)): a large |beta * h| would otherwise give log(0) = -inf.
    clean_term = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
    flipped_term = -label_smoothing * F.logsigmoid(-beta * logits)
    losses = clean_term + flipped_term
    return LossOutput(losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> LossOutput:
    """The IPO loss of Azar et al. (2023) on per-token averaged log-ratios.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: (B,) summed log-probs of the rejected completions under the policy.
        ref_chosen_logps: (B,) summed log-probs of the chosen completions under the reference model.
        ref_rejected_logps: (B,) summed log-probs of the rejected completions under the reference model.
        beta: the regularisation parameter tau of the paper; the target margin is 1 / (2 * beta).
        chosen_lengths: (B,) number of completion tokens of each chosen completion (int or float).
        rejected_lengths: (B,) number of completion tokens of each rejected completion (int or float).

    Returns:
        LossOutput with (B,) losses, chosen rewards and rejected rewards.
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    # The squared loss would otherwise grow with completion length, tying a good beta to the data's lengths;
    # TRL averages per token too, on the IPO authors' word that the paper's results used this form.
    # clamp(min=1) keeps an empty completion from dividing by zero; the cast keeps the inputs' dtype.
    chosen_avg = chosen_logratios / chosen_lengths.to(chosen_logratios.dtype).clamp(min=1)
    rejected_avg = rejected_logratios / rejected_lengths.to(rejected_logratios.dtype).clamp(min=1)
    # Eq. 17 of Azar et al. (2023), with tau = beta.
    losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    return LossOutput(losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> LossOutput:
    """The SLiC hinge loss (Zhao et al., 2023) on the DPO logits.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: (B,) summed log-probs of the rejected completions under the policy.
        ref_chosen_logps: (B,) summed log-probs of the chosen completions under the reference model.
        ref_rejected_logps: (B,) summed log-probs of the rejected completions under the reference model.
        beta: scales the logits; the margin is reached at a log-ratio gap of 1 / beta.

    Returns:
        LossOutput with (B,) losses, chosen rewards and rejected rewards.
    """
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = chosen_logratios - rejected_logratios
    # Pairs already past the margin contribute no gradient, unlike the sigmoid loss which never saturates.
    losses = torch.relu(1 - beta * logits)
    return LossOutput(losses, *_rewards(chosen_logratios, rejected_logratios, beta))


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """The robust DPO loss (rDPO, Chowdhury et al., 2024) for labels flipped with probability eps.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        policy_rejected_logps: (B,) summed log-probs of the rejected completions under the policy.
        ref_chosen_logps: (B,) summed log-probs of the chosen completions under the reference model.
        ref_rejected_logps: (B,) summed log-probs of the rejected completions under the reference model.
        beta: temperature of the implicit reward.
        label_smoothing: the label-flip rate eps, in [0, 0.5).

    Returns:
        LossOutput with (B,) losses, chosen rewards and rejected rewards.
    """
    # At eps = 0.5 the labels carry no information and the normaliser below divides by zero; past it the
    # loss would reward preferring the rejected completion.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing for the robust loss must lie in [0, 0.5), got {label_smoothing}")
    chosen_logratios, rejected_logratios = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = chosen_logratios - rejected_logratios
    # Chowdhury et al. (2024), arXiv 2403.00409: subtracting the flipped-label term and dividing by
    # (1 - 2 eps) makes the loss an unbiased estimate of the clean-label DPO loss; cDPO's soft labels bias it.
    clean_term = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
    flipped_term = -label_smoothing * F.logsigmoid(-beta * logits)
    losses = (clean_term - flipped_term) / (1 - 2 * label_smoothing)
    return LossOutput(losses, *_rewards(chosen_logratios, rejected_logratios, beta))


class _LossSpec(NamedTuple):
    fn: Callable[..., LossOutput]
    uses_lengths: bool = False


# Which losses take label_smoothing is the configuration's to say (`config.USES_LABEL_SMOOTHING`: it refuses
# label_smoothing with the others before anything runs); this registry only maps names to functions.
_REGISTRY: dict[str, _LossSpec] = {
    "sigmoid": _LossSpec(sigmoid_loss),
    "ipo": _LossSpec(ipo_loss, uses_lengths=True),
    "hinge": _LossSpec(hinge_loss),
    "robust": _LossSpec(robust_loss),
}


def _spec(name: str) -> _LossSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown loss_type {name!r}; valid choices: {', '.join(LOSS_TYPES)}") from None


def compute_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> LossOutput:
    """Compute the loss named ``loss_type`` on (B,) log-prob tensors.

    ``label_smoothing`` reaches only the losses in USES_LABEL_SMOOTHING and is ignored by the others, so one
    config can switch loss types freely; ``chosen_lengths`` and ``rejected_lengths`` ((B,) token counts) are
    required by ``ipo`` and ignored otherwise.
    """
    spec = _spec(loss_type)
    kwargs: dict[str, object] = {"beta": beta}
    if loss_type in USES_LABEL_SMOOTHING:
        kwargs["label_smoothing"] = label_smoothing
    if spec.uses_lengths:
        # A silent default length would change the loss's scale, so refuse rather than guess.
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
        kwargs["chosen_lengths"] = chosen_lengths
        kwargs["rejected_lengths"] = rejected_lengths
    return spec.fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **kwargs)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """The reward model's pairwise loss, -log sigmoid(r(x, y_w) - r(x, y_l)).

    Bradley-Terry: P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)) (DPO paper eq. 1); the loss is its
    negative log-likelihood (eq. 2). Shapes: (B,) scores in, (B,) per-pair losses out.
    """
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float())


def weighted_mean(losses: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean loss over the pairs that count (weight 1); 0, still attached to the graph, when none does, so
    that every rank's backward pass, and DDP's gradient all-reduce with it, still runs.

    losses: (B,); weight: (B,) or None (every pair counts)."""
    if weight is None:
        return losses.mean()
    weight = weight.to(losses)
    return (losses * weight).sum() / weight.sum().clamp(min=1.0)


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    """The chosen completions' mean token negative log-likelihood over a batch (RPO's term; TRL's `sft` loss):
    -sum of their token log-probs / their token count, pairs of weight 0 left out."""
    weight = pair_weight.to(chosen_logps.dtype)
    return -(chosen_logps * weight).sum() / (chosen_tokens * weight).sum().clamp(min=1)
