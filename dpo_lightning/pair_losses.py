"""The preference losses themselves: each a small pure function of a batch's `PairTerms`, with its paper.

Every function returns the per-pair loss (B,), unreduced, so that the caller can weight, mask and combine pairs;
the implicit rewards are computed once, by `losses.compute_loss`, for every loss alike. The formulas agree with
eric-mitchell/direct-preference-optimization and TRL 1.16's `DPOTrainer` (and its experimental CPO and ORPO
trainers for the reference-free ones).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairTerms(NamedTuple):
    """What a loss reads of B pairs, each (B,) unless said otherwise."""

    chosen: torch.Tensor  # the chosen log-ratio, policy minus reference (its f-divergence score under f-DPO)
    rejected: torch.Tensor  # the rejected log-ratio (or its score)
    policy_chosen: torch.Tensor  # the policy's summed log-probs of the chosen completions
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor  # the reference's (aot; unused by the reference-free losses)
    ref_rejected: torch.Tensor
    chosen_lengths: torch.Tensor | None = None  # completion token counts
    rejected_lengths: torch.Tensor | None = None
    pair_weight: torch.Tensor | None = None  # 0 for pairs that count nowhere (ties, padding); None: all count
    chosen_nll: torch.Tensor | None = None  # () the chosen completions' mean token NLL over the counted pairs

    def per_token(self, values: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """`values` divided by their completions' token counts (clamped to 1, so an empty completion is 0)."""
        if lengths is None:
            raise ValueError("this loss needs the completions' token counts (chosen_lengths, rejected_lengths)")
        return values / lengths.to(values.dtype).clamp(min=1)

    def nll(self) -> torch.Tensor:
        if self.chosen_nll is None:
            raise ValueError("this loss needs the chosen completions' mean token NLL (chosen_nll)")
        return self.chosen_nll


def _soft_labels(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The cross-entropy of sigmoid(logits) against the labels (1 - eps, eps): -log sigmoid at eps = 0."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sigmoid_loss(p: PairTerms, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, eq. 7), -log sigmoid(beta * h) with h the chosen minus the rejected log-ratio;
    with eps > 0 conservative DPO: the cross-entropy against the soft labels (1 - eps, eps), whose optimum is a
    finite margin."""
    # logsigmoid rather than log(sigmoid(.)): a large |beta * h| would otherwise give log(0) = -inf
    return _soft_labels(beta * (p.chosen - p.rejected), label_smoothing)


def ipo_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """IPO (Azar et al., 2023, eq. 17 with tau = beta) on per-token averaged log-ratios: the squared distance of
    their difference from the target margin 1 / (2 beta)."""
    # The squared loss would otherwise grow with completion length, tying a good beta to the data's lengths;
    # TRL averages per token too, on the IPO authors' word that the paper's results used this form.
    margin = p.per_token(p.chosen, p.chosen_lengths) - p.per_token(p.rejected, p.rejected_lengths)
    return (margin - 1 / (2 * beta)) ** 2


def hinge_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """SLiC's hinge (Zhao et al., 2023) on the DPO logits, max(0, 1 - beta * h): the margin is reached at a
    log-ratio gap of 1 / beta."""
    # Pairs already past the margin contribute no gradient, unlike the sigmoid loss which never saturates.
    return torch.relu(1 - beta * (p.chosen - p.rejected))


def robust_loss(p: PairTerms, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """rDPO (Chowdhury et al., 2024, arXiv 2403.00409) for labels flipped with probability eps in [0, 0.5):
    subtracting the flipped-label term and dividing by (1 - 2 eps) makes it an unbiased estimate of the
    clean-label DPO loss (cDPO's soft labels bias it)."""
    # At eps = 0.5 the labels carry no information and the normaliser divides by zero; past it the loss would
    # reward preferring the rejected completion.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing for the robust loss must lie in [0, 0.5), got {label_smoothing}")
    h = beta * (p.chosen - p.rejected)
    clean_term = -(1 - label_smoothing) * F.logsigmoid(h)
    flipped_term = -label_smoothing * F.logsigmoid(-h)
    return (clean_term - flipped_term) / (1 - 2 * label_smoothing)


def exo_pair_loss(p: PairTerms, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO (Ji et al., 2024, arXiv 2402.00856, eq. 16): the reverse KL from the policy's pair distribution,
    softmax(beta * log-ratios), to the labels (1 - eps, eps); eps must be > 0."""
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing for exo_pair must lie in (0, 1), got {label_smoothing}")
    h = beta * (p.chosen - p.rejected)
    win = torch.sigmoid(h) * (F.logsigmoid(h) - math.log1p(-label_smoothing))
    lose = torch.sigmoid(-h) * (F.logsigmoid(-h) - math.log(label_smoothing))
    return win + lose


def nca_pair_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """NCA (Chen et al., 2024, arXiv 2402.05369): each completion's own reward against zero, the chosen pushed
    up, both pushed down by half, so the chosen likelihood does not fall with the rejected one."""
    chosen, rejected = beta * p.chosen, beta * p.rejected
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """BCO on pairs (Jung et al., 2024, arXiv 2404.04656, without its running reward shift): the chosen
    completion classified good and the rejected bad, each by its own reward."""
    return -F.logsigmoid(beta * p.chosen) - F.logsigmoid(-beta * p.rejected)


def sppo_hard_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al., 2024, arXiv 2405.00675, eq. 4.7 with P = 1 and 0): each
    log-ratio regressed to +-1 / (2 beta)."""
    return (p.chosen - 0.5 / beta) ** 2 + (p.rejected + 0.5 / beta) ** 2


def _sorted_among_counted(values: torch.Tensor, pair_weight: torch.Tensor | None) -> torch.Tensor:
    """`values` with the counted pairs' (weight > 0) sorted among themselves, the others left in place: a tie or
    a padding pair must not take a place in the order the optimal transport matches."""
    if pair_weight is None:
        return torch.sort(values).values
    counted = pair_weight > 0
    out = values.clone()
    out[counted] = torch.sort(values[counted]).values
    return out


def aot_loss(p: PairTerms, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT (Melnyk et al., 2024, arXiv 2406.05882), paired: the policy's chosen-minus-rejected margins, sorted
    over the micro-batch, against the reference's, sorted alike (first-order stochastic dominance), in the
    (label-smoothed) logistic loss. The order is the counted pairs' of one micro-batch on one rank, as in TRL."""
    delta = _sorted_among_counted(p.policy_chosen - p.policy_rejected, p.pair_weight)
    delta = delta - _sorted_among_counted(p.ref_chosen - p.ref_rejected, p.pair_weight)
    return _soft_labels(beta * delta, label_smoothing)


def aot_unpaired_loss(p: PairTerms, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT unpaired (Melnyk et al., 2024): the chosen log-ratios, sorted over the micro-batch, against the
    rejected ones, sorted alike, so that chosen and rejected need not come from the same prompt."""
    delta = _sorted_among_counted(p.chosen, p.pair_weight) - _sorted_among_counted(p.rejected, p.pair_weight)
    return _soft_labels(beta * delta, label_smoothing)


def apo_zero_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv 2408.06266, eq. 7): the chosen likelihood up and the rejected
    down, each against the reference; for chosen completions better than the policy's own."""
    return 1 - torch.sigmoid(beta * p.chosen) + torch.sigmoid(beta * p.rejected)


def apo_down_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al., 2024, arXiv 2408.06266, eq. 8): both likelihoods down, the rejected's
    more; for chosen completions worse than the policy's own."""
    return torch.sigmoid(beta * p.chosen) + 1 - torch.sigmoid(beta * (p.chosen - p.rejected))


def discopop_loss(p: PairTerms, beta: float, discopop_tau: float) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al., 2024, arXiv 2406.08414, eq. 5): the logistic loss -log sigmoid(beta * h) and the
    exponential exp(-beta * h), blended by sigmoid(beta * h / tau)."""
    logits = beta * (p.chosen - p.rejected)
    blend = torch.sigmoid(logits / discopop_tau)
    # where the blend is 0 its exponential term is too (TRL multiplies, and an overflowed exp gives inf x 0 = nan)
    exponential = torch.where(blend > 0, torch.exp(-logits) * blend, torch.zeros_like(logits))
    return -F.logsigmoid(logits) * (1 - blend) + exponential


def sft_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """Supervised fine-tuning on the chosen completions (as in RPO, Pang et al., 2024, arXiv 2404.19733): their
    mean token NLL over the micro-batch's counted pairs, the same value for every pair (TRL's `sft`)."""
    return p.nll().expand(p.chosen.shape[0])


def sigmoid_norm_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """The DPO loss on per-token log-ratios (length-normalised DPO, as in TRL's `sigmoid_norm`): each log-ratio
    divided by its completion's token count, so that long completions do not dominate the margin."""
    margin = p.per_token(p.chosen, p.chosen_lengths) - p.per_token(p.rejected, p.rejected_lengths)
    return -F.logsigmoid(beta * margin)


# ----------------------------------------------------------------------------- reference-free


def cpo_loss(p: PairTerms, beta: float, label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> torch.Tensor:
    """CPO (Xu et al., 2024, arXiv 2401.08417, eq. 3): the (label-smoothed) DPO loss on the policy's own summed
    log-prob margin, no reference, plus cpo_alpha times the chosen completions' NLL (behaviour cloning)."""
    return _soft_labels(beta * (p.policy_chosen - p.policy_rejected), label_smoothing) + cpo_alpha * p.nll()


def simpo_loss(
    p: PairTerms, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5, cpo_alpha: float = 1.0
) -> torch.Tensor:
    """SimPO (Meng et al., 2024, arXiv 2405.14734, eq. 6): the logistic loss on the policy's per-token log-prob
    margin minus the target margin gamma / beta, no reference; plus cpo_alpha times the chosen NLL as TRL's
    CPOTrainer adds it (the paper's SimPO is cpo_alpha 0)."""
    margin = p.per_token(p.policy_chosen, p.chosen_lengths) - p.per_token(p.policy_rejected, p.rejected_lengths)
    return _soft_labels(beta * (margin - simpo_gamma / beta), label_smoothing) + cpo_alpha * p.nll()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler's split at -ln 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds(p: PairTerms) -> torch.Tensor:
    """ORPO's log odds ratio of the chosen over the rejected completion, from per-token mean log-probs:
    log(odds(chosen) / odds(rejected)) with odds(y) = P(y) / (1 - P(y))."""
    chosen = p.per_token(p.policy_chosen, p.chosen_lengths)
    rejected = p.per_token(p.policy_rejected, p.rejected_lengths)
    return (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))


def orpo_loss(p: PairTerms, beta: float) -> torch.Tensor:
    """ORPO (Hong et al., 2024, arXiv 2403.07691, eq. 6): the chosen completions' NLL plus beta times the odds
    ratio loss -log sigmoid(log odds ratio), no reference."""
    return p.nll() - beta * F.logsigmoid(orpo_log_odds(p))


def orpo_metrics(p: PairTerms) -> dict[str, torch.Tensor]:
    """ORPO's own per-pair metrics, TRL's names: log sigmoid of the log odds ratio, and the log odds ratio."""
    log_odds = orpo_log_odds(p).detach()
    return {"log_odds_ratio": F.logsigmoid(log_odds), "log_odds_chosen": log_odds}
