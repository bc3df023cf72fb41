"""Preference losses for DPO and its close relatives, as pure functions of sequence log-probs, and their
registry: each loss's name, paper and the options it takes are declared once here, next to its function, and
the configuration's checks read them from here (a foundation module, so that they can).

Every loss takes the summed log-probabilities of the chosen and rejected completions under the policy (pc, pr)
and the frozen reference model (rc, rr), each of shape (B,), and beta (the implicit reward's temperature:
smaller ties the policy to the reference more loosely), and returns a per-pair loss of shape (B,) with the
implicit rewards. Reduction over the batch is left to the caller so that it can weight or mask pairs.

The formulas agree with eric-mitchell/direct-preference-optimization and TRL 1.16's ``DPOTrainer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpo_lightning.errors import ConfigError


class LossOutput(NamedTuple):
    losses: torch.Tensor  # (B,) per-pair loss, not reduced
    chosen_rewards: torch.Tensor  # (B,) beta * (policy_chosen_logps - ref_chosen_logps), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (policy_rejected_logps - ref_rejected_logps), detached


def _pair_scores(pc, pr, rc, rr, beta):
    """(log-ratios of chosen, of rejected, and their rewards): what every pairwise loss below starts from."""
    chosen, rejected = pc - rc, pr - rr
    # Rewards are metrics only; detaching keeps a caller from back-propagating through them by accident.
    # They use the summed (not length-averaged) log-ratios for every loss so that logs are comparable.
    return chosen, rejected, (beta * chosen.detach(), beta * rejected.detach())


def sigmoid_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al., 2023, eq. 7), -log sigmoid(beta * h) with h the chosen minus the rejected log-ratio;
    with eps > 0 conservative DPO: the cross-entropy against the soft labels (1 - eps, eps), whose optimum is a
    finite margin."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    h = chosen - rejected
    # logsigmoid rather than log(sigmoid(.)): a large |beta * h| would otherwise give log(0) = -inf
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return LossOutput(losses, *rewards)


def ipo_loss(pc, pr, rc, rr, beta: float, chosen_lengths, rejected_lengths) -> LossOutput:
    """IPO (Azar et al., 2023, eq. 17 with tau = beta) on per-token averaged log-ratios: the squared distance of
    their difference from the target margin 1 / (2 beta)."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    # The squared loss would otherwise grow with completion length, tying a good beta to the data's lengths;
    # TRL averages per token too, on the IPO authors' word that the paper's results used this form.
    # clamp(min=1) keeps an empty completion from dividing by zero; the cast keeps the inputs' dtype.
    chosen_avg = chosen / chosen_lengths.to(chosen.dtype).clamp(min=1)
    rejected_avg = rejected / rejected_lengths.to(rejected.dtype).clamp(min=1)
    return LossOutput((chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2, *rewards)


def hinge_loss(pc, pr, rc, rr, beta: float) -> LossOutput:
    """SLiC's hinge (Zhao et al., 2023) on the DPO logits, max(0, 1 - beta * h): the margin is reached at a
    log-ratio gap of 1 / beta."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    # Pairs already past the margin contribute no gradient, unlike the sigmoid loss which never saturates.
    return LossOutput(torch.relu(1 - beta * (chosen - rejected)), *rewards)


def robust_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """rDPO (Chowdhury et al., 2024, arXiv 2403.00409) for labels flipped with probability eps in [0, 0.5):
    subtracting the flipped-label term and dividing by (1 - 2 eps) makes it an unbiased estimate of the
    clean-label DPO loss (cDPO's soft labels bias it)."""
    # At eps = 0.5 the labels carry no information and the normaliser divides by zero; past it the loss would
    # reward preferring the rejected completion.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing for the robust loss must lie in [0, 0.5), got {label_smoothing}")
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    h = chosen - rejected
    clean_term = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    flipped_term = -label_smoothing * F.logsigmoid(-beta * h)
    return LossOutput((clean_term - flipped_term) / (1 - 2 * label_smoothing), *rewards)


def exo_pair_loss(pc, pr, rc, rr, beta: float, label_smoothing: float) -> LossOutput:
    """EXO (Ji et al., 2024, arXiv 2402.00856, eq. 16): the reverse KL from the policy's pair distribution,
    softmax(beta * log-ratios), to the labels (1 - eps, eps); eps must be > 0."""
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing for exo_pair must lie in (0, 1), got {label_smoothing}")
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    h = beta * (chosen - rejected)
    win = torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-label_smoothing))
    lose = torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(label_smoothing))
    return LossOutput(win + lose, *rewards)


def nca_pair_loss(pc, pr, rc, rr, beta: float) -> LossOutput:
    """NCA (Chen et al., 2024, arXiv 2402.05369): each completion's own reward against zero, the chosen pushed
    up, both pushed down by half, so the chosen likelihood does not fall with the rejected one."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    losses = -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    return LossOutput(losses, *rewards)


def bco_pair_loss(pc, pr, rc, rr, beta: float) -> LossOutput:
    """BCO on pairs (Jung et al., 2024, arXiv 2404.04656, without its running reward shift): the chosen
    completion classified good and the rejected bad, each by its own reward."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    return LossOutput(-F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected), *rewards)


def sppo_hard_loss(pc, pr, rc, rr, beta: float) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al., 2024, arXiv 2405.00675, eq. 4.7 with P = 1 and 0): each
    log-ratio regressed to +-1 / (2 beta)."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    return LossOutput((chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2, *rewards)


def apo_zero_loss(pc, pr, rc, rr, beta: float) -> LossOutput:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv 2408.06266, eq. 7): the chosen likelihood up and the rejected
    down, each against the reference; for chosen completions better than the policy's own."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    return LossOutput(1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected), *rewards)


def apo_down_loss(pc, pr, rc, rr, beta: float) -> LossOutput:
    """APO-down (D'Oosterlinck et al., 2024, arXiv 2408.06266, eq. 8): both likelihoods down, the rejected's
    more; for chosen completions worse than the policy's own."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    return LossOutput(torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected)), *rewards)


def discopop_loss(pc, pr, rc, rr, beta: float, discopop_tau: float) -> LossOutput:
    """DiscoPOP (Chris Lu et al., 2024, arXiv 2406.08414, eq. 5): the logistic loss -log sigmoid(beta * h) and the
    exponential exp(-beta * h), blended by sigmoid(beta * h / tau)."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    logits = beta * (chosen - rejected)
    blend = torch.sigmoid(logits / discopop_tau)
    # where the blend is 0 its exponential term is too (TRL multiplies, and an overflowed exp gives inf x 0 = nan)
    exponential = torch.where(blend > 0, torch.exp(-logits) * blend, torch.zeros_like(logits))
    return LossOutput(-F.logsigmoid(logits) * (1 - blend) + exponential, *rewards)


def sigmoid_norm_loss(pc, pr, rc, rr, beta: float, chosen_lengths, rejected_lengths) -> LossOutput:
    """The DPO loss on per-token log-ratios (length-normalised DPO, as in TRL's `sigmoid_norm`): each log-ratio
    divided by its completion's token count, so that long completions do not dominate the margin."""
    chosen, rejected, rewards = _pair_scores(pc, pr, rc, rr, beta)
    per_token = chosen / chosen_lengths.to(chosen.dtype).clamp(min=1)
    per_token = per_token - rejected / rejected_lengths.to(rejected.dtype).clamp(min=1)
    return LossOutput(-F.logsigmoid(beta * per_token), *rewards)


class LossSpec(NamedTuple):
    """A loss of the registry: its function, its paper, and the options it reads besides beta."""

    fn: Callable[..., LossOutput]
    paper: str
    label_smoothing: str = "unused"  # "unused", "optional" or "required" (> 0)
    uses_lengths: bool = False  # the completions' token counts
    uses_tau: bool = False  # discopop_tau


# Every loss users may choose, in the order shown to them.
LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, "DPO, Rafailov et al. 2023 (cDPO with label_smoothing)", "optional"),
    "ipo": LossSpec(ipo_loss, "IPO, Azar et al. 2023", uses_lengths=True),
    "hinge": LossSpec(hinge_loss, "SLiC, Zhao et al. 2023"),
    "robust": LossSpec(robust_loss, "rDPO, Chowdhury et al. 2024", "optional"),
    "exo_pair": LossSpec(exo_pair_loss, "EXO, Ji et al. 2024", "required"),
    "nca_pair": LossSpec(nca_pair_loss, "NCA, Chen et al. 2024"),
    "bco_pair": LossSpec(bco_pair_loss, "BCO, Jung et al. 2024"),
    "sppo_hard": LossSpec(sppo_hard_loss, "SPPO, Wu et al. 2024"),
    "apo_zero": LossSpec(apo_zero_loss, "APO, D'Oosterlinck et al. 2024"),
    "apo_down": LossSpec(apo_down_loss, "APO, D'Oosterlinck et al. 2024"),
    "discopop": LossSpec(discopop_loss, "DiscoPOP, Chris Lu et al. 2024", uses_tau=True),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, "length-normalised DPO (TRL)", uses_lengths=True),
}
LOSS_TYPES = tuple(LOSSES)
USES_LABEL_SMOOTHING = frozenset(name for name, spec in LOSSES.items() if spec.label_smoothing != "unused")


def label_smoothing_problem(loss_type: str, label_smoothing: float) -> str | None:
    """What is wrong with `label_smoothing` for `loss_type` (a name of LOSSES), or None."""
    if not 0.0 <= label_smoothing < 0.5:
        return f"label_smoothing must be in [0, 0.5), got {label_smoothing}"
    wanted = LOSSES[loss_type].label_smoothing
    if wanted == "required" and label_smoothing == 0:
        return f"loss_type {loss_type} needs label_smoothing > 0 (its epsilon; its paper suggests 1e-3)"
    if wanted == "unused" and label_smoothing > 0:
        users = ", ".join(sorted(USES_LABEL_SMOOTHING))
        return f"label_smoothing is only used by loss_type {users}; loss_type '{loss_type}' would ignore it"
    return None


def _spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
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
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> LossOutput:
    """Compute the loss named ``loss_type`` on (B,) log-prob tensors.

    ``label_smoothing`` reaches only the losses that declare it; ``chosen_lengths`` and ``rejected_lengths``
    ((B,) token counts) are required by the losses that declare `uses_lengths` and ignored otherwise.
    """
    spec = _spec(loss_type)
    kwargs: dict[str, object] = {"beta": beta}
    if spec.label_smoothing != "unused":
        kwargs["label_smoothing"] = label_smoothing
    if spec.uses_tau:
        kwargs["discopop_tau"] = discopop_tau
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
