"""The preference-loss registry and the objective built from it: each loss's name, paper and the options it takes
are declared once here, next to its function (`pair_losses`), and the configuration's checks read them from here (a
foundation module, so that they can).

A run's objective is one loss or a weighted sum of several (`loss_type` a comma-separated list, `loss_weights`
their weights, as TRL's lists), on the log-ratios of the policy to the reference or, under f-DPO, on their
f-divergence scores, each pair optionally weighted by WPO. Inputs are summed completion log-probs of the chosen and
rejected completions under the policy (pc, pr) and the frozen reference (rc, rr), each (B,).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpo_lightning import pair_losses as pl
from dpo_lightning.errors import ConfigError
from dpo_lightning.pair_losses import PairTerms


class LossOutput(NamedTuple):
    losses: torch.Tensor  # (B,) per-pair loss, not reduced
    chosen_rewards: torch.Tensor  # (B,) beta * (policy_chosen_logps - ref_chosen_logps), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (policy_rejected_logps - ref_rejected_logps), detached
    nll: torch.Tensor | None = None  # () the chosen-token NLL, when a term of the objective reads it
    extras: dict[str, torch.Tensor] | None = None  # (B,) per-pair metrics of the losses that define their own


class LossSpec(NamedTuple):
    """A loss of the registry: its function, its paper, and the options it reads besides beta."""

    fn: Callable[..., torch.Tensor]
    paper: str
    label_smoothing: str = "unused"  # "unused", "optional" or "required" (> 0)
    options: tuple[str, ...] = ()  # further configuration keys its function takes by name
    f_divergence: bool = False  # defined on any f-divergence's scores of the log-ratios, not only reverse KL's
    scope: str = "pair"  # "pair", or "micro-batch" when a pair's loss depends on the others' (sorts, token means)
    sorts: bool = False  # pairs change places (so WPO's per-pair weights cannot follow them)
    reference: str = "needed"  # "needed", "none" (reference-free: no reference is loaded) or "either" (sft)
    rewards: str = "log-ratio"  # its implicit reward: beta x the "log-ratio", the "policy" log-prob, or "per-token"
    nll: bool = False  # reads the chosen completions' mean token NLL
    metrics: Callable[[PairTerms], dict[str, torch.Tensor]] | None = None  # its own per-pair metrics, by name:
    metric_names: tuple[str, ...] = ()  # (fixed before the first step, so that every rank and resume has them)


_FREE = {"reference": "none", "nll": True}
# Every loss users may choose, in the order shown to them: TRL 1.16 DPOTrainer's fifteen, then three without a
# reference.
LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(pl.sigmoid_loss, "DPO, Rafailov et al. 2023 (cDPO with label_smoothing)", "optional", (), True),
    "ipo": LossSpec(pl.ipo_loss, "IPO, Azar et al. 2023", f_divergence=True),
    "hinge": LossSpec(pl.hinge_loss, "SLiC, Zhao et al. 2023", f_divergence=True),
    "robust": LossSpec(pl.robust_loss, "rDPO, Chowdhury et al. 2024", "optional", f_divergence=True),
    "exo_pair": LossSpec(pl.exo_pair_loss, "EXO, Ji et al. 2024", "required", f_divergence=True),
    "nca_pair": LossSpec(pl.nca_pair_loss, "NCA, Chen et al. 2024"),
    "bco_pair": LossSpec(pl.bco_pair_loss, "BCO, Jung et al. 2024"),
    "sppo_hard": LossSpec(pl.sppo_hard_loss, "SPPO, Wu et al. 2024"),
    "aot": LossSpec(pl.aot_loss, "AOT, Melnyk et al. 2024", "optional", scope="micro-batch", sorts=True),
    "aot_unpaired": LossSpec(
        pl.aot_unpaired_loss, "AOT, Melnyk et al. 2024", "optional", scope="micro-batch", sorts=True
    ),
    "apo_zero": LossSpec(pl.apo_zero_loss, "APO, D'Oosterlinck et al. 2024"),
    "apo_down": LossSpec(pl.apo_down_loss, "APO, D'Oosterlinck et al. 2024"),
    "discopop": LossSpec(
        pl.discopop_loss, "DiscoPOP, Chris Lu et al. 2024", options=("discopop_tau",), f_divergence=True
    ),
    "sft": LossSpec(
        pl.sft_loss,
        "SFT on the chosen completions (RPO, Pang et al. 2024)",
        f_divergence=True,
        scope="micro-batch",
        reference="either",
        nll=True,
    ),
    "sigmoid_norm": LossSpec(pl.sigmoid_norm_loss, "length-normalised DPO (TRL)", f_divergence=True),
    # reference-free (TRL's experimental CPOTrainer and ORPOTrainer): no reference model is loaded
    "simpo": LossSpec(
        pl.simpo_loss, "SimPO, Meng et al. 2024", "optional", ("simpo_gamma", "cpo_alpha"), **_FREE, rewards="per-token"
    ),
    "cpo": LossSpec(pl.cpo_loss, "CPO, Xu et al. 2024", "optional", ("cpo_alpha",), **_FREE, rewards="policy"),
    "orpo": LossSpec(
        pl.orpo_loss,
        "ORPO, Hong et al. 2024",
        **_FREE,
        rewards="per-token",
        metrics=pl.orpo_metrics,
        metric_names=("log_odds_ratio", "log_odds_chosen"),
    ),
}
LOSS_TYPES = tuple(LOSSES)
REFERENCE_FREE = frozenset(name for name, spec in LOSSES.items() if spec.reference == "none")
USES_LABEL_SMOOTHING = frozenset(name for name, spec in LOSSES.items() if spec.label_smoothing != "unused")
F_DIVERGENCE_LOSSES = frozenset(name for name, spec in LOSSES.items() if spec.f_divergence)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# the losses' own options (`LossSpec.options`, label_smoothing) and their defaults, which are the configuration's
OPTION_DEFAULTS = {"label_smoothing": 0.0, "discopop_tau": 0.05, "cpo_alpha": 1.0, "simpo_gamma": 0.5}
Terms = tuple[tuple[str, float], ...]  # (loss name, weight) of each term of the objective


# ----------------------------------------------------------------------------- f-divergences


def f_divergence_scores(log_ratio: torch.Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f-DPO (Wang et al., 2023, arXiv 2309.16240): the score f'(t) of the ratio t = exp(log_ratio) that takes the
    log-ratio's place when the policy is regularised by the f-divergence `kind` instead of the reverse KL."""
    if kind == "reverse_kl":  # f'(t) = log t + 1; the constant cancels in every loss that allows f-divergences
        return log_ratio
    if kind == "forward_kl":  # f'(t) = 1 - 1 / t
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":  # f'(t) = log(2t / (1 + t)) = log 2 + log sigmoid(log t)
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence":  # f'(t) = (t^(alpha - 1) - 1) / (alpha - 1), log t at alpha = 1
        if abs(alpha - 1.0) < 1e-6:
            return log_ratio
        # as TRL: the exponent clamped so that exp stays finite (80 in fp32 and bf16, 11 in fp16)
        limit = 11.0 if log_ratio.dtype == torch.float16 else 80.0
        exponent = torch.clamp(((alpha - 1.0) * log_ratio).float(), max=limit)
        return ((torch.exp(exponent) - 1.0) / (alpha - 1.0)).to(log_ratio.dtype)
    raise ValueError(f"unknown f_divergence_type {kind!r}; valid choices: {', '.join(F_DIVERGENCES)}")


# ----------------------------------------------------------------------------- the configuration's terms


def _names(loss_type: str) -> list[str]:
    return [name.strip() for name in str(loss_type).split(",") if name.strip()]


def objective_terms(loss_type: str, loss_weights: str = "", rpo_alpha: float = 0.0) -> Terms:
    """(name, weight) of each term: `loss_type`'s names with `loss_weights` (all 1 when empty), and `sft` weighted
    `rpo_alpha` when that is > 0 (RPO's shorthand). Assumes `objective_problem` found nothing."""
    names = _names(loss_type)
    weights = [float(w) for w in str(loss_weights).split(",") if w.strip()] or [1.0] * len(names)
    terms = tuple(zip(names, weights, strict=True))
    return terms + ((("sft", rpo_alpha),) if rpo_alpha > 0 else ())


def _terms_problem(loss_type: str, loss_weights: str, rpo_alpha: float) -> str | None:
    names = _names(loss_type)
    unknown = [name for name in names if name not in LOSSES]
    if unknown or not names:
        bad = unknown[0] if unknown else loss_type
        return f"unknown loss_type '{bad}'; valid choices: {', '.join(LOSS_TYPES)} (one, or several comma-separated)"
    if len(set(names)) < len(names):
        return f"loss_type '{loss_type}' names a loss twice; give each loss once, with its weight in loss_weights"
    weights = [w.strip() for w in str(loss_weights).split(",") if w.strip()]
    if weights and len(weights) != len(names):
        return f"loss_weights has {len(weights)} weights for the {len(names)} losses of loss_type '{loss_type}'"
    for weight in weights:
        try:
            value = float(weight)
        except ValueError:
            return f"loss_weights: '{weight}' is not a number (comma-separated weights, one per loss_type)"
        if not math.isfinite(value) or value < 0:
            return f"loss_weights must be finite and >= 0, got {weight}"
    if rpo_alpha > 0 and "sft" in names:
        return "rpo_alpha is the weight of an sft term; with sft in loss_type, set its weight in loss_weights instead"
    return None


def label_smoothing_problem(names: Sequence[str], label_smoothing: float) -> str | None:
    """What is wrong with `label_smoothing` for the losses `names` (of LOSSES), or None."""
    if not 0.0 <= label_smoothing < 0.5:
        return f"label_smoothing must be in [0, 0.5), got {label_smoothing}"
    for name in names:
        if LOSSES[name].label_smoothing == "required" and label_smoothing == 0:
            return f"loss_type {name} needs label_smoothing > 0 (its epsilon; its paper suggests 1e-3)"
    if label_smoothing > 0 and not any(LOSSES[name].label_smoothing != "unused" for name in names):
        users = ", ".join(sorted(USES_LABEL_SMOOTHING))
        return f"label_smoothing is only used by loss_type {users}; loss_type '{','.join(names)}' would ignore it"
    return None


def objective_problem(cfg) -> str | None:
    """What is wrong with the objective a configuration asks for (its loss_type, loss_weights, rpo_alpha,
    label_smoothing, f-divergence and WPO options), or None; one line naming the key and the valid choices."""
    problem = _terms_problem(cfg.loss_type, cfg.loss_weights, cfg.rpo_alpha)
    if problem:
        return problem
    names = [name for name, _ in objective_terms(cfg.loss_type, cfg.loss_weights, cfg.rpo_alpha)]
    problem = label_smoothing_problem(names, cfg.label_smoothing)
    if problem:
        return problem
    if cfg.f_divergence_type not in F_DIVERGENCES:
        return f"unknown f_divergence_type '{cfg.f_divergence_type}'; valid choices: {', '.join(F_DIVERGENCES)}"
    others = [name for name in names if name not in F_DIVERGENCE_LOSSES]
    if cfg.f_divergence_type != "reverse_kl" and others:
        allowed = ", ".join(name for name in LOSS_TYPES if name in F_DIVERGENCE_LOSSES)
        return (
            f"f_divergence_type {cfg.f_divergence_type} is defined only for loss_type {allowed} (the f-DPO "
            f"reparameterisation cancels only in a chosen-minus-rejected difference); not for {', '.join(others)}"
        )
    if cfg.f_divergence_type != "alpha_divergence" and cfg.f_alpha_divergence_coef != 0.5:
        return "f_alpha_divergence_coef is only used by f_divergence_type alpha_divergence; it would be ignored"
    sorting = [name for name in names if LOSSES[name].sorts]
    if cfg.use_weighting and sorting:
        return f"use_weighting (WPO) weights each pair, but loss_type {', '.join(sorting)} sorts pairs over the batch"
    for option in ("cpo_alpha", "simpo_gamma"):
        if getattr(cfg, option) < 0:
            return f"{option} must be >= 0, got {getattr(cfg, option)}"
        if getattr(cfg, option) != OPTION_DEFAULTS[option] and not any(option in LOSSES[n].options for n in names):
            users = ", ".join(n for n in LOSS_TYPES if option in LOSSES[n].options)
            return f"{option} is only used by loss_type {users}; loss_type '{cfg.loss_type}' would ignore it"
    return _reference_free_problem(cfg, names)


def _reference_free_problem(cfg, names: Sequence[str]) -> str | None:
    """A reference-free objective loads no reference: what needs one cannot go with it."""
    free = [name for name in names if LOSSES[name].reference == "none"]
    needing = [name for name in names if LOSSES[name].reference == "needed"]
    if free and (needing or len(free) > 1):
        return (
            f"loss_type {free[0]} trains without a reference and cannot be summed with {(needing or free[1:])[0]} "
            "(only sft combines with every loss)"
        )
    if needing:
        return None
    free = free or list(names)  # sft alone needs no reference either
    for key, words in (
        ("ref_model_name", "names a reference"),
        ("precompute_ref_logps", "precomputes a reference's log-probs"),
        ("sync_ref_model", "moves a reference"),
        ("generation_eval_every", "compares samples with the reference's"),
    ):
        if getattr(cfg, key):
            return f"loss_type {free[0]} loads no reference, but {key} {words} (unset {key})"
    return None  # online training is refused by the mode's rules (config.checks.mode_problem)


def reference_free_loss(loss_type: str) -> str | None:
    """The loss of `loss_type` that makes an objective reference-free (its first such name), or None; names
    the registry lacks are left to `objective_problem`."""
    names = [name for name in _names(loss_type) if name in LOSSES]
    if not names or any(LOSSES[name].reference == "needed" for name in names):
        return None
    return next((name for name in names if LOSSES[name].reference == "none"), names[0])


# ----------------------------------------------------------------------------- the objective


def _spec(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss_type {name!r}; valid choices: {', '.join(LOSS_TYPES)}") from None


def compute_loss(
    loss_type: str | Terms,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    pair_weight: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    wpo_weight: torch.Tensor | None = None,
    **options: float,
) -> LossOutput:
    """The per-pair loss (B,) of one loss, or the weighted sum of several ((name, weight), ...), on (B,) log-probs.

    ``options`` (label_smoothing, discopop_tau, cpo_alpha, simpo_gamma; `OPTION_DEFAULTS` where not given) reach
    only the losses that declare them; ``chosen_lengths`` and ``rejected_lengths`` ((B,) token counts) are needed
    by the per-token losses, ``chosen_nll`` (the chosen completions' mean token NLL) by those that declare `nll`,
    ``pair_weight`` ((B,), 0 for pairs that count nowhere) by the sorting losses, which order the counted pairs
    only. ``wpo_weight`` (B,) multiplies every pair's loss (WPO). Reference-free losses ignore the reference's.
    """
    terms = ((loss_type, 1.0),) if isinstance(loss_type, str) else tuple(loss_type)
    unknown = set(options) - set(OPTION_DEFAULTS)
    if unknown:
        raise TypeError(f"compute_loss() got unexpected loss options {sorted(unknown)}")
    options = {**OPTION_DEFAULTS, **options}
    chosen, rejected = policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps
    pairs = PairTerms(
        f_divergence_scores(chosen, f_divergence_type, f_alpha_divergence_coef),
        f_divergence_scores(rejected, f_divergence_type, f_alpha_divergence_coef),
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        pair_weight,
        chosen_nll,
    )
    losses, extras = torch.zeros_like(chosen), {}
    for name, weight in terms:
        spec = _spec(name)
        wanted = spec.options + (("label_smoothing",) if spec.label_smoothing != "unused" else ())
        losses = losses + weight * spec.fn(pairs, beta, **{key: options[key] for key in wanted})
        extras.update(spec.metrics(pairs) if spec.metrics is not None else {})
    if wpo_weight is not None:
        losses = losses * wpo_weight
    chosen_rewards, rejected_rewards = _rewards(terms, pairs, beta)
    return LossOutput(losses, chosen_rewards, rejected_rewards, chosen_nll, extras or None)


def _rewards(terms: Terms, pairs: PairTerms, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards of the objective's first term that has its own (sft has none): beta x the summed log-
    ratios for DPO's family, so that logs compare across losses; beta x the policy's own (summed, or per-token)
    log-probs for the reference-free ones, as TRL's CPO and ORPO trainers log them. Metrics only, so detached."""
    kind = next((LOSSES[name].rewards for name, _ in terms if LOSSES[name].reference != "either"), "log-ratio")
    if kind == "log-ratio":
        chosen, rejected = pairs.policy_chosen - pairs.ref_chosen, pairs.policy_rejected - pairs.ref_rejected
    elif kind == "policy":
        chosen, rejected = pairs.policy_chosen, pairs.policy_rejected
    else:
        chosen = pairs.per_token(pairs.policy_chosen, pairs.chosen_lengths)
        rejected = pairs.per_token(pairs.policy_rejected, pairs.rejected_lengths)
    return beta * chosen.detach(), beta * rejected.detach()


def is_reference_free(terms: Terms) -> bool:
    """Whether an objective's terms need no reference at all (so that none is loaded)."""
    return all(LOSSES[name].reference != "needed" for name, _ in terms)


def wpo_weights(aligned_sums: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """WPO (Zhou et al., 2024, arXiv 2406.11827, eq. 2): each completion's weight, exp of its mean aligned token
    log-prob (log p(y_t) - log sum_v p(v)^2, detached), from their sums (N,) and token counts (N,)."""
    return torch.exp(aligned_sums.detach() / num_tokens.to(aligned_sums.dtype).clamp(min=1))


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
