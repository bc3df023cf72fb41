"""Chunked log-probs (dpo/chunked.py) against the plain full-logits path and against autograd's own gradient.

In fp32 the chunked path must give the plain path's log-probs, logits/* sums, losses, rewards and gradients on
the same batch (relative 1e-5) for every loss type and chunk size; its backward must equal the gradient autograd
derives from log_softmax (float64 gradcheck), with and without a bias.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import random_pairs, random_qwen2

from dpo_lightning.data.batch import PairBatch
from dpo_lightning.dpo.chunked import ChunkedTokenLogps, body_and_head
from dpo_lightning.dpo.logprobs import PairLogps, forward_logps
from dpo_lightning.dpo.objective import LossSettings, pair_loss
from dpo_lightning.losses import LOSS_TYPES, USES_LABEL_SMOOTHING


def _batch(seed: int = 1) -> PairBatch:
    """Four pairs of different prompt and completion lengths (so there is padding)."""
    return PairBatch.from_pairs(*random_pairs(seed, (3, 7, 1, 5), (4, 2, 9, 1), (6, 3, 2, 8)), pad_token_id=0)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Relative 1e-5 of each gradient's scale: elements near 0 differ by summation order alone."""
    assert set(got) == set(expected)
    for name, grad in expected.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_logps_equal_the_plain_path_with_gradients(chunk_size):
    plain_model = random_qwen2()
    chunked_model = copy.deepcopy(plain_model)
    batch = _batch()
    weights = torch.linspace(-1.0, 2.0, batch.num_rows)  # any downstream use of the per-row sums
    plain = forward_logps(plain_model, batch)
    chunked = forward_logps(chunked_model, batch, chunk_size=chunk_size)
    for name in ("logps", "num_tokens", "logits_sum"):
        torch.testing.assert_close(getattr(chunked, name), getattr(plain, name), rtol=1e-5, atol=1e-6, msg=name)
    (plain.logps * weights).sum().backward()
    (chunked.logps * weights).sum().backward()
    expected, got = _grads(plain_model), _grads(chunked_model)
    assert "model.embed_tokens.weight" in got  # the tied head's gradient arrives
    _assert_same_gradients(got, expected)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_gives_the_same_loss_rewards_and_gradients_chunked(loss_type):
    """The policy moved off its reference, so that losses and rewards are not trivially ln 2 and 0."""
    reference = random_qwen2(seed=0)
    policy = random_qwen2(seed=3)
    twin = copy.deepcopy(policy)
    batch = _batch(seed=5)
    settings = LossSettings(loss_type, beta=0.3, label_smoothing=0.1 if loss_type in USES_LABEL_SMOOTHING else 0.0)
    with torch.no_grad():
        ref = PairLogps.of(batch, forward_logps(reference, batch))
    outs = []
    for model, chunk_size in ((policy, 0), (twin, 4)):
        logps = PairLogps.of(batch, forward_logps(model, batch, chunk_size=chunk_size))
        out = pair_loss(settings, logps, ref)
        out.losses.mean().backward()
        outs.append((out, logps))
    (plain, plain_logps), (chunked, chunked_logps) = outs
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(chunked, field), getattr(plain, field), rtol=1e-5, atol=1e-6, msg=field)
    for role in ("chosen", "rejected"):
        torch.testing.assert_close(getattr(chunked_logps, role).logits_sum, getattr(plain_logps, role).logits_sum)
    assert plain.losses.abs().sum() > 0
    _assert_same_gradients(_grads(twin), _grads(policy))


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_backward_is_autograds_gradient(with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 11, (7,), generator=g)

    def chunked(hidden, weight, bias):
        return ChunkedTokenLogps.apply(hidden, weight, bias, labels, 3)[0]

    inputs = (hidden, weight, bias)
    assert torch.autograd.gradcheck(chunked, inputs, eps=1e-6, atol=1e-8)
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    expected = torch.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(chunked(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_models_whose_logits_are_not_the_head_of_the_hidden_states_use_the_plain_path():
    assert body_and_head(random_qwen2()) is not None
    capped = random_qwen2()
    capped.config.final_logit_softcapping = 30.0
    assert body_and_head(capped) is None
    batch = _batch()
    torch.testing.assert_close(forward_logps(capped, batch, chunk_size=4).logps, forward_logps(capped, batch).logps)


def test_bf16_autocast_on_cpu_stays_close_to_the_plain_path():
    model = random_qwen2()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = forward_logps(model, batch).logps
        chunked = forward_logps(model, batch, chunk_size=4).logps
    chunked.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # bf16 has 8 bits of mantissa: the two paths round differently, but agree to a few parts in a hundred
    torch.testing.assert_close(chunked, plain, rtol=5e-2, atol=5e-2)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    from dpo_lightning.config import make_config
    from dpo_lightning.models import ModelSource, load_policy

    source = ModelSource(str(tiny_model), True)
    plain = load_policy(make_config({"model_name": str(tiny_model)}), source)
    checkpointed = load_policy(make_config({"model_name": str(tiny_model), "gradient_checkpointing": True}), source)
    flags = [
        any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) for model in (plain, checkpointed)
    ]
    assert flags == [False, True]
    batch = _batch()
    for model in (plain, checkpointed):
        model.train()
        forward_logps(model, batch, chunk_size=8).logps.sum().backward()
    _assert_same_gradients(_grads(checkpointed), _grads(plain))
