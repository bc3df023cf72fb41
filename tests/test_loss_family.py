"""The rest of the loss family against computations written here: the micro-batch losses (aot, aot_unpaired,
sft), f-DPO's divergences, weighted lists of losses, WPO's pair weights and LD-DPO's token weights, each by hand
from log-probs (and, for WPO and LD-DPO, from a tiny model's full logits, sequence by sequence), on every log-prob
path: plain and chunked, padded and packed, live and precomputed reference.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import random_pairs, random_qwen2

from dpo_lightning.config import make_config
from dpo_lightning.data.batch import PairBatch
from dpo_lightning.dpo.logprobs import PairLogps, forward_logps, forward_logps_and_tokens
from dpo_lightning.dpo.objective import LossSettings, pair_loss
from dpo_lightning.dpo.precomputed import PrecomputedReference, reference_pass
from dpo_lightning.dpo.reference import FrozenReference
from dpo_lightning.errors import ConfigError
from dpo_lightning.losses import compute_loss, weighted_mean


def nls(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log1p(math.exp(-x)) if x > -30 else -x


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# five pairs of moderate log-probs: policy (pc, pr), reference (rc, rr); no two margins or log-ratios tie, so
# that the sorts are differentiable here
PC, PR = [-3.0, -5.0, -2.5, -7.2, -4.0], [-4.0, -2.0, -6.0, -6.5, -4.5]
RC, RR = [-3.5, -4.0, -2.0, -6.0, -5.0], [-3.0, -3.3, -5.2, -7.9, -4.1]
BETA = 0.7


def logps():
    return t(PC), t(PR), t(RC), t(RR)


def by_hand_aot(eps: float, counted: list[int], paired: bool) -> float:
    """AOT's mean loss over the counted pairs: sorted policy margins against sorted reference margins (paired), or
    sorted chosen log-ratios against sorted rejected log-ratios (unpaired)."""
    if paired:
        first = sorted(PC[i] - PR[i] for i in counted)
        second = sorted(RC[i] - RR[i] for i in counted)
    else:
        first = sorted(PC[i] - RC[i] for i in counted)
        second = sorted(PR[i] - RR[i] for i in counted)
    terms = [(1 - eps) * nls(BETA * (a - b)) + eps * nls(-BETA * (a - b)) for a, b in zip(first, second, strict=True)]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("paired", [True, False], ids=["aot", "aot_unpaired"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_aot_sorts_the_counted_pairs_of_the_micro_batch(paired, eps):
    name = "aot" if paired else "aot_unpaired"
    out = compute_loss(name, *logps(), beta=BETA, label_smoothing=eps)
    assert out.losses.mean().item() == pytest.approx(by_hand_aot(eps, [0, 1, 2, 3, 4], paired), rel=1e-6)
    # a pair of weight 0 (a tie, a padding pair) takes no place in the order
    weight = t([1, 1, 0, 1, 1])
    out = compute_loss(name, *logps(), beta=BETA, label_smoothing=eps, pair_weight=weight)
    expected = by_hand_aot(eps, [0, 1, 3, 4], paired)
    assert weighted_mean(out.losses, weight).item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(by_hand_aot(eps, [0, 1, 2, 3, 4], paired), rel=1e-3)  # it mattered


@pytest.mark.parametrize("paired", [True, False], ids=["aot", "aot_unpaired"])
def test_aot_gradient_matches_central_differences_by_hand(paired):
    pc, pr = t(PC).requires_grad_(True), t(PR).requires_grad_(True)
    name = "aot" if paired else "aot_unpaired"
    compute_loss(name, pc, pr, t(RC), t(RR), beta=BETA, label_smoothing=0.1).losses.mean().backward()
    h = 1e-4
    for values, grad in ((PC, pc.grad), (PR, pr.grad)):
        for i in range(len(values)):
            saved = values[i]
            values[i] = saved + h
            up = by_hand_aot(0.1, list(range(5)), paired)
            values[i] = saved - h
            down = by_hand_aot(0.1, list(range(5)), paired)
            values[i] = saved
            assert grad[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-3, abs=1e-6)


def test_sft_is_the_given_chosen_nll_for_every_pair_and_reaches_its_gradient():
    nll = torch.tensor(2.5, requires_grad=True)
    out = compute_loss("sft", *logps(), beta=BETA, chosen_nll=nll)
    torch.testing.assert_close(out.losses, torch.full((5,), 2.5))
    out.losses.mean().backward()
    assert nll.grad.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="chosen_nll"):
        compute_loss("sft", *logps(), beta=BETA)


F_SCORES = {
    "reverse_kl": lambda u: u,
    "forward_kl": lambda u: 1 - math.exp(-u),
    "js_divergence": lambda u: math.log(2) - nls(u),
    "alpha_divergence": lambda u: (math.exp(-0.5 * u) - 1) / -0.5,  # alpha 0.5: (t^(alpha - 1) - 1) / (alpha - 1)
}
# per pair, from the chosen and rejected scores c, r, the token counts lc, lr and beta b
F_LOSSES = {
    "sigmoid": lambda c, r, lc, lr, b: nls(b * (c - r)),
    "hinge": lambda c, r, lc, lr, b: max(0.0, 1 - b * (c - r)),
    "ipo": lambda c, r, lc, lr, b: (c / lc - r / lr - 1 / (2 * b)) ** 2,
    "sigmoid_norm": lambda c, r, lc, lr, b: nls(b * (c / lc - r / lr)),
    "robust": lambda c, r, lc, lr, b: ((1 - 0.1) * nls(b * (c - r)) - 0.1 * nls(-b * (c - r))) / 0.8,
}
LC, LR = [3.0, 1.0, 2.0, 7.0, 4.0], [2.0, 4.0, 1.0, 1.0, 5.0]


@pytest.mark.parametrize("divergence", sorted(F_SCORES))
@pytest.mark.parametrize("name", sorted(F_LOSSES))
def test_f_divergences_replace_the_log_ratios_with_their_scores(name, divergence):
    smoothing = 0.1 if name == "robust" else 0.0
    out = compute_loss(
        name, *logps(), beta=BETA, label_smoothing=smoothing, f_divergence_type=divergence,
        chosen_lengths=t(LC), rejected_lengths=t(LR),
    )  # fmt: skip
    expected = []
    for i in range(5):
        c, r = F_SCORES[divergence](PC[i] - RC[i]), F_SCORES[divergence](PR[i] - RR[i])
        expected.append(F_LOSSES[name](c, r, LC[i], LR[i], BETA))
    torch.testing.assert_close(out.losses, t(expected), rtol=1e-5, atol=1e-6)
    # rewards stay beta x the log-ratios whatever the divergence (TRL's metrics)
    torch.testing.assert_close(out.chosen_rewards, BETA * (t(PC) - t(RC)))
    # the gradient in the policy's log-probs, against central differences of the formula by hand
    pc, pr = t(PC).requires_grad_(True), t(PR).requires_grad_(True)
    compute_loss(
        name, pc, pr, t(RC), t(RR), beta=BETA, label_smoothing=smoothing, f_divergence_type=divergence,
        chosen_lengths=t(LC), rejected_lengths=t(LR),
    ).losses.sum().backward()  # fmt: skip
    h = 1e-4
    for i in range(5):
        score = F_SCORES[divergence]
        for grad, shift in ((pc.grad, (h, 0.0)), (pr.grad, (0.0, h))):

            def at(sign: float, i=i, shift=shift, score=score) -> float:
                c, r = PC[i] - RC[i] + sign * shift[0], PR[i] - RR[i] + sign * shift[1]
                return F_LOSSES[name](score(c), score(r), LC[i], LR[i], BETA)

            assert grad[i].item() == pytest.approx((at(1) - at(-1)) / (2 * h), rel=1e-3, abs=1e-5), (name, i)


def test_alpha_divergence_at_alpha_one_is_the_reverse_kl():
    kw = dict(beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    torch.testing.assert_close(
        compute_loss("sigmoid", *logps(), **kw).losses, compute_loss("sigmoid", *logps(), beta=BETA).losses
    )


def test_a_weighted_list_of_losses_is_the_weighted_sum_of_each_and_wpo_scales_every_pair():
    lengths = dict(chosen_lengths=t(LC), rejected_lengths=t(LR))
    nll = t(1.75)
    terms = (("sigmoid", 0.8), ("sft", 0.2), ("ipo", 0.5))
    out = compute_loss(terms, *logps(), beta=BETA, chosen_nll=nll, **lengths)
    expected = []
    for i in range(5):
        c, r = PC[i] - RC[i], PR[i] - RR[i]
        expected.append(0.8 * nls(BETA * (c - r)) + 0.2 * 1.75 + 0.5 * F_LOSSES["ipo"](c, r, LC[i], LR[i], BETA))
    torch.testing.assert_close(out.losses, t(expected), rtol=1e-5, atol=1e-6)
    wpo = t([0.5, 1.0, 0.25, 0.1, 0.9])
    weighted = compute_loss(terms, *logps(), beta=BETA, chosen_nll=nll, wpo_weight=wpo, **lengths)
    torch.testing.assert_close(weighted.losses, t(expected) * wpo, rtol=1e-5, atol=1e-6)
    # the gradient: each term's, weighted (d/d pc of 0.8 sigmoid + 0.5 ipo; the NLL is a given constant here)
    pc = t(PC).requires_grad_(True)
    compute_loss(
        terms, pc, t(PR), t(RC), t(RR), beta=BETA, chosen_nll=nll, wpo_weight=wpo, **lengths
    ).losses.sum().backward()
    for i in range(5):
        c, r = PC[i] - RC[i], PR[i] - RR[i]
        by_hand = (
            0.8 * -BETA / (1 + math.exp(BETA * (c - r))) + 0.5 * 2 * (c / LC[i] - r / LR[i] - 1 / (2 * BETA)) / LC[i]
        )
        assert pc.grad[i].item() == pytest.approx(wpo[i].item() * by_hand, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"loss_type": "sigmoid,sft", "loss_weights": "1"}, "loss_weights has 1 weights for the 2 losses"),
        ({"loss_type": "sigmoid,nope"}, "unknown loss_type 'nope'; valid choices: sigmoid, ipo"),
        ({"loss_type": "ipo,ipo"}, "names a loss twice"),
        ({"loss_type": "sigmoid,sft", "loss_weights": "1,-2"}, "loss_weights must be finite and >= 0"),
        ({"loss_type": "bco_pair", "f_divergence_type": "js_divergence"}, "not for bco_pair"),
        ({"f_divergence_type": "kl"}, "unknown f_divergence_type 'kl'; valid choices: reverse_kl"),
        ({"f_alpha_divergence_coef": 0.3}, "only used by f_divergence_type alpha_divergence"),
        ({"loss_type": "aot_unpaired", "use_weighting": True}, "sorts pairs"),
        ({"loss_type": "sft", "rpo_alpha": 0.5}, "rpo_alpha is the weight of an sft term"),
        ({"ld_alpha": 1.5}, "ld_alpha must be in [0, 1]"),
        ({"loss_type": "hinge,exo_pair"}, "loss_type exo_pair needs label_smoothing > 0"),
    ],
)
def test_objective_mistakes_are_refused_in_one_line(values, words):
    with pytest.raises(ConfigError, match=None) as info:
        make_config(values)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_lists_of_losses_are_read_from_yaml_lists_and_rpo_alpha_is_an_sft_term():
    cfg = make_config({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]})
    assert LossSettings.of(cfg).terms == (("sigmoid", 0.8), ("sft", 0.2))
    assert LossSettings.of(make_config({"rpo_alpha": 0.5})).terms == (("sigmoid", 1.0), ("sft", 0.5))


# ----------------------------------------------------------------------------- WPO and LD-DPO on every path


def _pairs(packed: bool) -> PairBatch:
    prompts, chosen, rejected = random_pairs(7, (3, 5, 1), (4, 2, 6), (6, 3, 2))
    return PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0, packed=packed)


def _by_hand(model, ld_alpha: float):
    """Per row (2B): the summed completion log-probs, their LD-weighted sums and the WPO aligned sums, from each
    sequence's own full logits."""
    prompts, chosen, rejected = random_pairs(7, (3, 5, 1), (4, 2, 6), (6, 3, 2))
    sums, weighted, aligned = [], [], []
    with torch.no_grad():
        for prompt, completion, other in [
            *zip(prompts, chosen, rejected, strict=True),
            *zip(prompts, rejected, chosen, strict=True),
        ]:
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, :-1].double()
            probs = torch.softmax(logits, dim=-1)
            token = torch.log(probs.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :, 0])
            square = torch.log((probs**2).sum(-1))[len(prompt) - 1 :]
            shared = min(len(completion), len(other))
            sums.append(token.sum())
            weighted.append(token[:shared].sum() + ld_alpha * token[shared:].sum())
            aligned.append((token - square).sum())
    return torch.stack(sums).float(), torch.stack(weighted).float(), torch.stack(aligned).float()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("chunk_size", [0, 4], ids=["plain", "chunked"])
def test_ld_tails_and_wpo_sums_equal_the_full_logits_by_hand_on_every_path(packed, chunk_size):
    model = random_qwen2(seed=2)
    batch = _pairs(packed)
    rows, _ = forward_logps_and_tokens(model, batch, chunk_size, with_weighting=True)
    sums, weighted, aligned = _by_hand(model, ld_alpha=0.3)
    torch.testing.assert_close(rows.logps, sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.logps - 0.7 * rows.tail, weighted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.aligned, aligned, rtol=1e-5, atol=1e-5)
    assert not rows.aligned.requires_grad  # WPO's weights are constants of the step


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("chunk_size", [0, 4], ids=["plain", "chunked"])
def test_the_objective_with_wpo_and_ld_gives_the_same_loss_and_gradients_on_every_path(packed, chunk_size):
    """Against the plain padded path, every option at once: a list of losses, WPO, LD-DPO."""
    settings = LossSettings("sigmoid,sft", beta=0.3, loss_weights="1,0.4", use_weighting=True, ld_alpha=0.5)
    reference = FrozenReference(random_qwen2(seed=0))
    results = []
    for this_packed, this_chunk in ((False, 0), (packed, chunk_size)):
        policy = random_qwen2(seed=3)
        batch = _pairs(this_packed)
        policy_logps = PairLogps.of(batch, forward_logps_and_tokens(policy, batch, this_chunk, with_weighting=True)[0])
        out = pair_loss(settings, policy_logps, PairLogps.of(batch, reference.logps(batch)))
        out.losses.mean().backward()
        grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (expected, expected_grads), (got, got_grads) = results
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))


def test_wpo_and_ld_change_the_loss_as_their_formulas_say():
    """pair_loss with WPO equals the unweighted loss times exp(mean aligned log-prob) of both completions, and
    with ld_alpha the loss of the LD-weighted sums, here computed from the by-hand values."""
    model, reference = random_qwen2(seed=3), FrozenReference(random_qwen2(seed=0))
    batch = _pairs(False)
    rows = forward_logps_and_tokens(model, batch, 0, with_weighting=True)[0]
    policy, ref = PairLogps.of(batch, rows), PairLogps.of(batch, reference.logps(batch))
    plain = pair_loss(LossSettings(beta=0.3), policy, ref).losses
    sums, _, aligned = _by_hand(model, 1.0)
    per_row = torch.exp(aligned / batch.row_lengths().new_tensor([4, 2, 6, 6, 3, 2]).float())
    wpo = per_row[:3] * per_row[3:]
    torch.testing.assert_close(pair_loss(LossSettings(beta=0.3, use_weighting=True), policy, ref).losses, plain * wpo)
    _, policy_ld, _ = _by_hand(model, 0.25)
    _, ref_ld, _ = _by_hand(reference.model, 0.25)
    expected = compute_loss("sigmoid", policy_ld[:3], policy_ld[3:], ref_ld[:3], ref_ld[3:], beta=0.3).losses
    got = pair_loss(LossSettings(beta=0.3, ld_alpha=0.25), policy, ref).losses
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain)


def test_precomputed_reference_logps_are_stored_ld_weighted_and_give_the_live_loss():
    reference = FrozenReference(random_qwen2(seed=0))
    policy = random_qwen2(seed=3)
    batch = _pairs(False)
    stored = reference_pass(reference, [batch], device=torch.device("cpu"), autocast_dtype=None, ld_alpha=0.25)
    precomputed = copy.copy(batch)
    precomputed.ref_logps = torch.cat([stored[:, 0], stored[:, 1]])
    settings = LossSettings(beta=0.3, ld_alpha=0.25)
    policy_logps = PairLogps.of(batch, forward_logps(policy, batch))
    live = pair_loss(settings, policy_logps, PairLogps.of(batch, reference.logps(batch)))
    cached = pair_loss(settings, policy_logps, PairLogps.of(precomputed, PrecomputedReference().logps(precomputed)))
    torch.testing.assert_close(cached.losses, live.losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cached.chosen_rewards, live.chosen_rewards, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- reference-free


def log1mexp(x: float) -> float:
    return math.log(1 - math.exp(x))


FREE_BY_HAND = {
    # from the policy's summed log-probs c, r, token counts lc, lr, the chosen NLL n and beta b
    "cpo": lambda c, r, lc, lr, n, b: 0.9 * nls(b * (c - r)) + 0.1 * nls(-b * (c - r)) + 0.7 * n,
    "simpo": lambda c, r, lc, lr, n, b: (
        0.9 * nls(b * (c / lc - r / lr - 0.3 / b)) + 0.1 * nls(-b * (c / lc - r / lr - 0.3 / b)) + 0.7 * n
    ),
    "orpo": lambda c, r, lc, lr, n, b: n + b * nls((c / lc - r / lr) - (log1mexp(c / lc) - log1mexp(r / lr))),
}


@pytest.mark.parametrize("name", sorted(FREE_BY_HAND))
def test_reference_free_losses_match_their_formulas_and_ignore_the_reference(name):
    options = {} if name == "orpo" else {"label_smoothing": 0.1, "cpo_alpha": 0.7}
    options.update({"simpo_gamma": 0.3} if name == "simpo" else {})
    lengths = dict(chosen_lengths=t(LC), rejected_lengths=t(LR))
    pc, pr = t(PC).requires_grad_(True), t(PR).requires_grad_(True)
    out = compute_loss(name, pc, pr, t(RC), t(RR), beta=BETA, chosen_nll=t(1.5), **lengths, **options)
    expected = [FREE_BY_HAND[name](PC[i], PR[i], LC[i], LR[i], 1.5, BETA) for i in range(5)]
    torch.testing.assert_close(out.losses, t(expected), rtol=1e-5, atol=1e-6)
    other_reference = compute_loss(
        name, pc, pr, t(RC) - 3, t(RR) + 1, beta=BETA, chosen_nll=t(1.5), **lengths, **options
    )
    torch.testing.assert_close(other_reference.losses, out.losses, rtol=0, atol=0)
    # rewards: beta x the policy's log-probs, summed for CPO, per token for SimPO and ORPO (TRL's CPO, ORPO)
    per_token = name != "cpo"
    expected_rewards = [BETA * (PC[i] / LC[i] if per_token else PC[i]) for i in range(5)]
    torch.testing.assert_close(out.chosen_rewards, t(expected_rewards), rtol=1e-6, atol=1e-7)
    out.losses.sum().backward()
    h = 1e-4
    for i in range(5):
        up = FREE_BY_HAND[name](PC[i] + h, PR[i], LC[i], LR[i], 1.5, BETA)
        down = FREE_BY_HAND[name](PC[i] - h, PR[i], LC[i], LR[i], 1.5, BETA)
        assert pc.grad[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-3, abs=1e-6)


def test_orpo_reports_its_log_odds_by_hand():
    out = compute_loss("orpo", *logps(), beta=BETA, chosen_nll=t(1.0), chosen_lengths=t(LC), rejected_lengths=t(LR))
    log_odds = [(PC[i] / LC[i] - PR[i] / LR[i]) - (log1mexp(PC[i] / LC[i]) - log1mexp(PR[i] / LR[i])) for i in range(5)]
    torch.testing.assert_close(out.extras["log_odds_chosen"], t(log_odds), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.extras["log_odds_ratio"], t([-nls(x) for x in log_odds]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (
            {"loss_type": "simpo,sigmoid"},
            "loss_type simpo trains without a reference and cannot be summed with sigmoid",
        ),
        ({"loss_type": "orpo", "ref_model_name": "x"}, "loads no reference, but ref_model_name names a reference"),
        ({"loss_type": "cpo", "precompute_ref_logps": True}, "precompute_ref_logps precomputes"),
        ({"loss_type": "cpo", "sync_ref_model": True}, "sync_ref_model moves a reference"),
        ({"loss_type": "orpo", "mode": "online", "reward_model": "m"}, "offline only here"),
        ({"loss_type": "sigmoid", "cpo_alpha": 0.5}, "cpo_alpha is only used by loss_type simpo, cpo"),
        ({"loss_type": "cpo", "simpo_gamma": 1.0}, "simpo_gamma is only used by loss_type simpo"),
    ],
)
def test_reference_free_mistakes_are_refused_in_one_line(values, words):
    with pytest.raises(ConfigError) as info:
        make_config(values)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_reference_free_run_loads_no_reference_and_trains(tiny_model, tmp_path):
    """A SimPO run end to end: no reference network is loaded (the loader is made to fail if asked), the policy
    trains, and its reports hold nll_loss; an ORPO run reports its log odds."""
    from unittest import mock

    from contract import stepwise_run_values, write_jsonl

    from dpo_lightning.builtin import preference_rows
    from dpo_lightning.determined.bridge import run_local

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(seed=5)["train"][:16])
    for name in ("simpo", "orpo"):
        out = tmp_path / name
        values = stepwise_run_values(tiny_model, pairs, out, max_steps=2, loss_type=name, val_fraction=0.0)
        with mock.patch("dpo_lightning.training.run.load_reference", side_effect=AssertionError("a reference loaded")):
            run_local(make_config(values))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        training = [r["metrics"] for r in rows if r["group"] == "training"]
        assert len(training) == 2 and all(math.isfinite(m["loss"]) and "nll_loss" in m for m in training)
        assert ("log_odds_ratio" in training[0]) == (name == "orpo")
