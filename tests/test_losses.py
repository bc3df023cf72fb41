"""Tests for dpo_lightning.losses against values worked out by hand with plain `math`.

The main batch below has, per pair, chosen log-ratio (pc - rc) = [2, -2, 0, -100] and rejected log-ratio
(pr - rr) = [-1, 1, -100, 0], so the DPO logits are h = [3, -3, 100, -100] and, with beta = 0.5,
beta * h = [1.5, -1.5, 50, -50]: both signs, and |beta * h| = 50 where a naive log(sigmoid(.)) breaks.
"""

import math

import pytest
import torch

from dpo_lightning import pair_losses
from dpo_lightning.errors import ConfigError, UserError
from dpo_lightning.losses import LOSS_TYPES, LOSSES, USES_LABEL_SMOOTHING, LossOutput, compute_loss


def _named(name: str):
    """The registry's loss `name` as a function of the four log-prob tensors, through `compute_loss`."""
    return lambda *logps, **options: compute_loss(name, *logps, **options)


sigmoid_loss, robust_loss, hinge_loss, ipo_loss = (_named(n) for n in ("sigmoid", "robust", "hinge", "ipo"))

BETA = 0.5
PC, RC = [-10.0, -20.0, -5.0, -100.0], [-12.0, -18.0, -5.0, 0.0]
PR, RR = [-15.0, -16.0, -105.0, -3.0], [-14.0, -17.0, -5.0, -3.0]
CHOSEN_LR, REJECTED_LR = [2.0, -2.0, 0.0, -100.0], [-1.0, 1.0, -100.0, 0.0]
BETA_H = [1.5, -1.5, 50.0, -50.0]


def nls(x: float) -> float:
    """-logsigmoid(x) = log(1 + exp(-x)), by hand."""
    return math.log1p(math.exp(-x))


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def batch() -> tuple[torch.Tensor, ...]:
    return t(PC), t(PR), t(RC), t(RR)


def check(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, t(expected), rtol=1e-5, atol=atol)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25])
def test_sigmoid_values_with_label_smoothing(eps):
    out = sigmoid_loss(*batch(), beta=BETA, label_smoothing=eps)
    # -(1 - eps) logsigmoid(x) - eps logsigmoid(-x) = (1 - eps) nls(x) + eps nls(-x)
    check(out.losses, [(1 - eps) * nls(x) + eps * nls(-x) for x in BETA_H])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25])
def test_robust_values(eps):
    out = robust_loss(*batch(), beta=BETA, label_smoothing=eps)
    # (-(1 - eps) logsigmoid(x) + eps logsigmoid(-x)) / (1 - 2 eps)
    #   = ((1 - eps) nls(x) - eps nls(-x)) / (1 - 2 eps)
    check(out.losses, [((1 - eps) * nls(x) - eps * nls(-x)) / (1 - 2 * eps) for x in BETA_H], atol=1e-5)


def test_robust_without_smoothing_is_plain_dpo():
    check(robust_loss(*batch(), beta=BETA).losses, [nls(x) for x in BETA_H])
    torch.testing.assert_close(
        robust_loss(*batch(), beta=BETA, label_smoothing=0.0).losses, sigmoid_loss(*batch(), beta=BETA).losses
    )


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_rejects_label_smoothing_outside_range(eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(*batch(), beta=BETA, label_smoothing=eps)


@pytest.mark.parametrize("name", ["sigmoid", "robust"])
def test_extreme_logits_stay_finite(name):
    # beta * h = +-500: sigmoid(-500) underflows fp32 to 0, so a naive log(sigmoid(.)) would give inf here.
    pc, pr = t([0.0, -1000.0]).requires_grad_(True), t([-1000.0, 0.0]).requires_grad_(True)
    zeros = torch.zeros(2)
    out = compute_loss(name, pc, pr, zeros, zeros, beta=0.5)
    out.losses.sum().backward()
    check(out.losses, [nls(500.0), 500.0])  # nls(500) ~ 7e-218, 0 in fp32
    check(pc.grad, [-0.0, -0.5])
    check(pr.grad, [0.0, 0.5])


def test_hinge_values():
    # relu(1 - beta * h) for beta * h = [1.5, -1.5, 50, -50]
    check(hinge_loss(*batch(), beta=BETA).losses, [0.0, 2.5, 0.0, 51.0])


def test_ipo_values():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    lc, lr = torch.tensor([2, 4, 50, 10]), torch.tensor([1, 2, 25, 4])
    out = ipo_loss(*batch(), beta=beta, chosen_lengths=lc, rejected_lengths=lr)
    # (2/2 - -1/1 - 2)^2 = 0, (-2/4 - 1/2 - 2)^2 = 9, (0/50 - -100/25 - 2)^2 = 4, (-100/10 - 0/4 - 2)^2 = 144
    check(out.losses, [0.0, 9.0, 4.0, 144.0])
    assert out.losses.dtype == torch.float32


def test_ipo_length_averaging():
    kw = dict(beta=0.1)
    lengths = t([3.0, 5.0, 8.0, 1.0])
    base = ipo_loss(*batch(), chosen_lengths=lengths, rejected_lengths=lengths + 1, **kw).losses
    pc, pr, rc, rr = batch()
    doubled = ipo_loss(
        2 * pc, 2 * pr, 2 * rc, 2 * rr, chosen_lengths=2 * lengths, rejected_lengths=2 * lengths + 2, **kw
    ).losses
    torch.testing.assert_close(doubled, base, rtol=1e-5, atol=1e-5)
    # Not a no-op: changing the lengths alone changes the loss.
    other = ipo_loss(*batch(), chosen_lengths=2 * lengths, rejected_lengths=lengths, **kw).losses
    assert not torch.allclose(other, base)


def test_ipo_zero_lengths_are_clamped_to_one():
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    out = ipo_loss(*batch(), beta=0.5, chosen_lengths=zeros, rejected_lengths=zeros)
    # lengths 1: (lr_c - lr_r - 1)^2 with lr_c - lr_r = h = [3, -3, 100, -100]
    check(out.losses, [4.0, 16.0, 99.0**2, 101.0**2])
    ones_out = ipo_loss(*batch(), beta=0.5, chosen_lengths=ones, rejected_lengths=ones)
    torch.testing.assert_close(out.losses, ones_out.losses)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust"])
def test_rewards_are_summed_log_ratios_and_detached(name):
    pc, pr, rc, rr = batch()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    lengths = {"chosen_lengths": t([4.0] * 4), "rejected_lengths": t([2.0] * 4)}
    out = compute_loss(name, pc, pr, rc, rr, beta=BETA, label_smoothing=0.1, **lengths)
    assert isinstance(out, LossOutput)
    check(out.chosen_rewards, [BETA * x for x in CHOSEN_LR])
    check(out.rejected_rewards, [BETA * x for x in REJECTED_LR])
    assert out.losses.grad_fn is not None
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize(
    ("name", "expected"), [("sigmoid", math.log(2)), ("robust", math.log(2)), ("hinge", 1.0), ("ipo", 25.0)]
)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25])
def test_loss_at_reference_policy(name, expected, eps):
    # Policy == reference: h = 0, so -logsigmoid(0) = ln 2 whatever eps, relu(1) = 1, (0 - 1/(2*0.1))^2 = 25.
    logps_c, logps_r = t([-3.0, -40.0, -7.5]), t([-9.0, -1.0, -7.5])
    lengths = t([5.0, 1.0, 12.0])
    out = compute_loss(
        name, logps_c, logps_r, logps_c.clone(), logps_r.clone(),
        beta=0.1, label_smoothing=eps, chosen_lengths=lengths, rejected_lengths=lengths,
    )  # fmt: skip
    check(out.losses, [expected] * 3)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gradient_signs_and_no_gradient_into_reference(name, eps):
    # beta * h = [0, 0.25, -0.5]: inside the hinge margin, and below IPO's target margin of 1 / (2 beta) = 1.
    pc = t([-5.0, -4.5, -6.0]).requires_grad_(True)
    pr = t([-7.0, -7.0, -6.0]).requires_grad_(True)
    rc, rr = t([-5.0, -5.0, -5.0]), t([-7.0, -7.0, -7.0])
    lengths = torch.ones(3, dtype=torch.long)
    out = compute_loss(
        name, pc, pr, rc, rr, beta=BETA, label_smoothing=eps, chosen_lengths=lengths, rejected_lengths=lengths
    )
    out.losses.sum().backward()
    assert (pc.grad < 0).all(), pc.grad
    assert (pr.grad > 0).all(), pr.grad
    assert rc.grad is None and rr.grad is None


def test_sigmoid_gradient_matches_paper():
    # d/d pc of -logsigmoid(beta * h) = -beta * sigmoid(-beta * h) = -beta / (1 + exp(beta * h)),
    # the gradient of Eq. 7 given in Sec. 4 of the DPO paper; d/d pr is its negation.
    pc, pr, rc, rr = batch()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    sigmoid_loss(pc, pr, rc, rr, beta=BETA).losses.sum().backward()
    magnitude = [BETA / (1 + math.exp(x)) for x in BETA_H]
    check(pc.grad, [-m for m in magnitude], atol=1e-7)
    check(pr.grad, magnitude, atol=1e-7)


def test_output_dtype_follows_inputs():
    pc, pr, rc, rr = (x.double() for x in batch())
    out = ipo_loss(pc, pr, rc, rr, beta=BETA, chosen_lengths=t([2.0] * 4), rejected_lengths=t([1.0] * 4))
    assert out.losses.dtype == out.chosen_rewards.dtype == torch.float64
    # fp64 lengths must not promote an fp32 loss.
    lengths = torch.tensor([2.0] * 4, dtype=torch.float64)
    fp32_out = ipo_loss(*batch(), beta=BETA, chosen_lengths=lengths, rejected_lengths=lengths)
    assert fp32_out.losses.dtype == torch.float32


def test_registry_contents():
    """TRL 1.16's fifteen loss types and three reference-free ones, each with its paper; label smoothing and
    f-divergences where TRL takes them."""
    from dpo_lightning.losses import F_DIVERGENCE_LOSSES, REFERENCE_FREE

    assert LOSS_TYPES[:4] == ("sigmoid", "ipo", "hinge", "robust")
    trl_names = "sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero apo_down"
    assert set(LOSS_TYPES) == set(f"{trl_names} discopop sft sigmoid_norm simpo cpo orpo".split())
    assert USES_LABEL_SMOOTHING == frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo"})
    assert REFERENCE_FREE == {"simpo", "cpo", "orpo"}
    # TRL 1.16's DPOTrainer: f_divergence_loss_types
    assert F_DIVERGENCE_LOSSES == {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    assert all(spec.paper for spec in LOSSES.values())


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def discopop(h: float, tau: float = 0.05) -> float:
    """DiscoPOP by hand: logistic and exponential blended by sigmoid(h / tau), h = beta x (c - r)."""
    blend = sig(h / tau)
    return nls(h) * (1 - blend) + (math.exp(-h) * blend if blend > 0 else 0.0)


LC, LR = [3.0, 1.0, 2.0, 7.0], [2.0, 4.0, 1.0, 1.0]  # completion token counts, for the per-token losses
EXO_EPS = 1e-3
# TRL 1.16's formulas, by hand, per pair, from the log-ratios c (chosen) and r (rejected) and beta b
BY_HAND = {
    "nca_pair": lambda c, r, b, lc, lr: nls(b * c) + 0.5 * nls(-b * c) + 0.5 * nls(-b * r),
    "bco_pair": lambda c, r, b, lc, lr: nls(b * c) + nls(-b * r),
    "sppo_hard": lambda c, r, b, lc, lr: (c - 0.5 / b) ** 2 + (r + 0.5 / b) ** 2,
    "apo_zero": lambda c, r, b, lc, lr: 1 - sig(b * c) + sig(b * r),
    "apo_down": lambda c, r, b, lc, lr: sig(b * c) + 1 - sig(b * (c - r)),
    "sigmoid_norm": lambda c, r, b, lc, lr: nls(b * (c / lc - r / lr)),
    "discopop": lambda c, r, b, lc, lr: discopop(b * (c - r)),
    "exo_pair": lambda c, r, b, lc, lr: (
        sig(b * (c - r)) * (-nls(b * (c - r)) - math.log1p(-EXO_EPS))
        + sig(-b * (c - r)) * (-nls(-b * (c - r)) - math.log(EXO_EPS))
    ),
}


def _call(name: str, *logps: torch.Tensor, beta: float = BETA) -> LossOutput:
    lengths = {"chosen_lengths": t(LC), "rejected_lengths": t(LR)}
    smoothing = EXO_EPS if name == "exo_pair" else 0.0
    return compute_loss(name, *logps, beta=beta, label_smoothing=smoothing, chosen_nll=t(1.25), **lengths)


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_trl_pairwise_losses_match_their_formulas_by_hand(name):
    out = _call(name, *batch())
    expected = [BY_HAND[name](c, r, BETA, lc, lr) for c, r, lc, lr in zip(CHOSEN_LR, REJECTED_LR, LC, LR, strict=True)]
    check(out.losses, expected, atol=1e-5)
    check(out.chosen_rewards, [BETA * c for c in CHOSEN_LR])  # rewards are beta x log-ratio for every loss
    check(out.rejected_rewards, [BETA * r for r in REJECTED_LR])


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_trl_pairwise_loss_gradients_match_the_formulas_by_hand(name):
    """d loss / d policy log-probs, against the gradient of the formula by hand (central differences in
    float64), at moderate log-ratios where fp32 is exact to 1e-5."""
    pc, pr, rc, rr = t([-3.0, -5.0, -2.5]), t([-4.0, -2.0, -6.0]), t([-3.5, -4.0, -2.0]), t([-3.0, -3.0, -5.5])
    lc, lr = LC[:3], LR[:3]
    pc.requires_grad_(True), pr.requires_grad_(True)
    lengths = {"chosen_lengths": t(lc), "rejected_lengths": t(lr)}
    smoothing = EXO_EPS if name == "exo_pair" else 0.0
    compute_loss(name, pc, pr, rc, rr, beta=0.7, label_smoothing=smoothing, **lengths).losses.sum().backward()
    h = 1e-6
    for i in range(3):
        c, r = float(pc[i] - rc[i]), float(pr[i] - rr[i])
        dc = (BY_HAND[name](c + h, r, 0.7, lc[i], lr[i]) - BY_HAND[name](c - h, r, 0.7, lc[i], lr[i])) / (2 * h)
        dr = (BY_HAND[name](c, r + h, 0.7, lc[i], lr[i]) - BY_HAND[name](c, r - h, 0.7, lc[i], lr[i])) / (2 * h)
        assert pc.grad[i].item() == pytest.approx(dc, rel=1e-4, abs=1e-5), (name, i)
        assert pr.grad[i].item() == pytest.approx(dr, rel=1e-4, abs=1e-5), (name, i)


@pytest.mark.parametrize("name", [name for name in LOSS_TYPES if LOSSES[name].reference != "none"])
def test_every_loss_at_zero_log_ratio_has_zero_rewards_and_a_finite_loss(name):
    policy = t([-5.0, -6.0, -7.0, -8.0])
    out = _call(name, policy, policy - 1, policy.clone(), policy - 1)
    assert torch.isfinite(out.losses).all() and not out.chosen_rewards.any() and not out.rejected_rewards.any()


def test_compute_loss_dispatches_like_direct_calls():
    lc, lr = t([3.0, 1.0, 2.0, 7.0]), t([2.0, 4.0, 0.0, 1.0])
    kw = dict(beta=BETA, label_smoothing=0.2, chosen_lengths=lc, rejected_lengths=lr)
    pc, pr, rc, rr = batch()
    terms = pair_losses.PairTerms(pc - rc, pr - rr, pc, pr, rc, rr, lc, lr)
    expected = {
        "sigmoid": pair_losses.sigmoid_loss(terms, BETA, label_smoothing=0.2),
        "robust": pair_losses.robust_loss(terms, BETA, label_smoothing=0.2),
        # label_smoothing must not reach the losses that do not use it
        "hinge": pair_losses.hinge_loss(terms, BETA),
        "ipo": pair_losses.ipo_loss(terms, BETA),
    }
    for name, want in expected.items():
        torch.testing.assert_close(compute_loss(name, *batch(), **kw).losses, want, rtol=0, atol=0)
    # Smoothing does reach sigmoid: a different eps gives a different loss.
    assert not torch.equal(compute_loss("sigmoid", *batch(), beta=BETA).losses, expected["sigmoid"])


def test_unknown_loss_type_raises_config_error():
    with pytest.raises(ConfigError) as info:
        compute_loss("x", *batch(), beta=BETA)
    assert isinstance(info.value, UserError)
    assert str(info.value) == f"unknown loss_type 'x'; valid choices: {', '.join(LOSS_TYPES)}"
    assert "sigmoid, ipo, hinge, robust, exo_pair" in str(info.value)


def test_ipo_without_lengths_raises_value_error():
    with pytest.raises(ValueError, match="lengths"):
        compute_loss("ipo", *batch(), beta=BETA)
    with pytest.raises(ValueError, match="lengths"):
        compute_loss("ipo", *batch(), beta=BETA, chosen_lengths=t([1.0] * 4))


def test_rpo_term_is_the_chosen_completions_mean_token_nll():
    # TRL 1.16's `sft` loss: -mean of the chosen completion tokens' log-probs over the batch, computed here from
    # each chosen sequence's full logits on its own
    from tiny_models import random_pairs, random_qwen2

    from dpo_lightning.data.batch import PairBatch
    from dpo_lightning.dpo.logprobs import PairLogps, forward_logps
    from dpo_lightning.losses import chosen_nll

    prompts, chosen, rejected = random_pairs(4, (3, 2, 5), (4, 6, 1), (2, 2, 2))
    model = random_qwen2()
    batch = PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0)
    logps = PairLogps.of(batch, forward_logps(model, batch, chunk_size=3))
    token_logps = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, chosen, strict=True):
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            token_logps.append(logp.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :, 0])
    expected = -torch.cat(token_logps).mean()
    got = chosen_nll(logps.chosen.logps, logps.chosen.num_tokens, torch.ones(3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a pair of weight 0 (a tie, evaluation padding) is left out
    only_first = chosen_nll(logps.chosen.logps, logps.chosen.num_tokens, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(only_first, -token_logps[0].mean(), rtol=1e-5, atol=1e-6)


def test_discopop_temperature_reaches_the_loss():
    out = compute_loss("discopop", *batch(), beta=0.01, discopop_tau=2.0)  # beta x h = 0.03, -0.03, 1, -1
    check(out.losses, [discopop(0.01 * (c - r), tau=2.0) for c, r in zip(CHOSEN_LR, REJECTED_LR, strict=True)])
    assert not torch.allclose(out.losses, compute_loss("discopop", *batch(), beta=0.01).losses)
