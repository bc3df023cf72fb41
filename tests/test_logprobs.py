"""Tests for dpo_lightning.logprobs: the one-token shift, prompt and padding masks (pad = EOS), a real model.

Expected values come from `reference_logp`, a plain loop in float64: a causal LM's logits at position t
predict token t+1, so a sequence with prompt length P and real length L scores the completion tokens
ids[P .. L-1] with logits[P-1 .. L-2].
"""

import math
from types import SimpleNamespace

import pytest
import torch

from dpo_lightning.data.batch import SequenceBatch
from dpo_lightning.data.collate import PairCollator
from dpo_lightning.dpo.logprobs import SequenceLogps, forward_logps, token_logps

V = 7
EOS = 0


class GivenLogits(torch.nn.Module):
    """A causal LM whose logits are given, whatever its inputs: the plain path of `forward_logps` on them."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, **inputs):
        return SimpleNamespace(logits=self.logits)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> SequenceLogps:
    """`forward_logps` of right-padded rows whose model gives `logits`."""
    batch = SequenceBatch(input_ids, torch.ones_like(input_ids), completion_mask)
    return forward_logps(GivenLogits(logits), batch)


def reference_logp(logits: torch.Tensor, ids, prompt_len: int, length: int) -> float:
    """Sum over t = prompt_len-1 .. length-2 of log_softmax(logits[t])[ids[t+1]], in float64."""
    total = 0.0
    for t in range(prompt_len - 1, length - 1):
        total += torch.log_softmax(logits[t].double(), dim=-1)[int(ids[t + 1])].item()
    return total


def one_row(ids: list[int], prompt_len: int, width: int | None = None, pad: int = EOS):
    """input_ids (1, T) and completion_mask (1, T) for one right-padded sequence."""
    width = width or len(ids)
    padded = torch.tensor([ids + [pad] * (width - len(ids))])
    mask = torch.zeros(1, width, dtype=torch.long)
    mask[0, prompt_len : len(ids)] = 1
    return padded, mask


def test_token_logps_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, V) * 4
    labels = torch.randint(0, V, (3, 5))
    expected = torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    actual = token_logps(logits, labels)[0]
    assert actual.shape == (3, 5) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=1e-5)


def test_token_logps_bf16_logits_give_fp32():
    logits = torch.randn(2, 3, V).bfloat16()
    labels = torch.randint(0, V, (2, 3))
    actual = token_logps(logits, labels)[0]
    assert actual.dtype == torch.float32
    expected = torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(actual, expected.float(), rtol=1e-5, atol=1e-5)


def test_one_token_shift():
    """logits[t] puts 8 on ids[t+1], 0 elsewhere: only the shifted reading gives 8 - log(e^8 + V - 1)."""
    ids = [3, 1, 4, 2, 5]
    logits = torch.zeros(1, len(ids), V)
    for t in range(len(ids) - 1):
        logits[0, t, ids[t + 1]] = 8.0
    input_ids, mask = one_row(ids, prompt_len=2)  # completion ids[2:] = [4, 2, 5], scored at t = 1, 2, 3
    out = sequence_logps(logits, input_ids, mask)
    per_token = 8.0 - math.log(math.exp(8.0) + V - 1)  # about -0.002
    assert out.logps.item() == pytest.approx(3 * per_token, rel=1e-5, abs=1e-5)
    # Reading logits[t] as scoring ids[t] (no shift) gives about -18; a mask one position late drops a token.
    no_shift = sum(torch.log_softmax(logits[0, t].double(), -1)[ids[t]].item() for t in range(2, 5))
    late_mask = sum(torch.log_softmax(logits[0, t].double(), -1)[ids[t + 1]].item() for t in range(2, 4))
    assert no_shift < -15 and abs(out.logps.item() - no_shift) > 15
    assert abs(out.logps.item() - late_mask) > 1e-3
    assert out.num_tokens.item() == 3


def test_prompt_masking():
    torch.manual_seed(1)
    ids, prompt_len = [3, 1, 4, 2, 5, 6], 3
    logits = torch.randn(1, len(ids), V)
    input_ids, mask = one_row(ids, prompt_len)
    base = sequence_logps(logits, input_ids, mask).logps
    assert base.item() == pytest.approx(reference_logp(logits[0], ids, prompt_len, len(ids)), rel=1e-5)

    changed_logits = logits.clone()
    changed_logits[0, : prompt_len - 1] = torch.randn(prompt_len - 1, V) * 50  # predict prompt tokens only
    changed_ids = input_ids.clone()
    changed_ids[0, :prompt_len] = torch.tensor([6, 6, 6])
    torch.testing.assert_close(sequence_logps(changed_logits, changed_ids, mask).logps, base)

    # The last prompt position predicts the first completion token: it must count.
    scored = logits.clone()
    scored[0, prompt_len - 1] += torch.arange(V) * 3.0
    assert abs(sequence_logps(scored, input_ids, mask).logps.item() - base.item()) > 1e-3


def test_padding_masking():
    torch.manual_seed(2)
    ids, prompt_len, width = [3, 1, 4, 2], 2, 7
    input_ids, mask = one_row(ids, prompt_len, width)
    logits = torch.randn(1, width, V)
    base = sequence_logps(logits, input_ids, mask)
    assert base.logps.item() == pytest.approx(reference_logp(logits[0], ids, prompt_len, len(ids)), rel=1e-5)

    noisy_logits, noisy_ids = logits.clone(), input_ids.clone()
    # logits from the last real token on, and the padded ids, get arbitrary values
    noisy_logits[0, len(ids) - 1 :] = torch.randn(width - len(ids) + 1, V) * 100
    noisy_ids[0, len(ids) :] = torch.tensor([5, 6, 1])
    out = sequence_logps(noisy_logits, noisy_ids, mask)
    torch.testing.assert_close(out.logps, base.logps)
    torch.testing.assert_close(out.logits_sum, base.logits_sum)
    assert out.num_tokens.item() == base.num_tokens.item() == 2


def test_pad_equal_to_eos_scores_the_completion_eos_only():
    """Completion [1, 2, EOS] then two pad tokens that are also EOS: three tokens scored, the EOS included."""
    torch.manual_seed(3)
    collator = PairCollator(pad_token_id=EOS)
    batch = collator(
        [
            {"prompt_ids": [3, 4], "chosen_ids": [1, 2, EOS], "rejected_ids": [5, EOS]},
            {"prompt_ids": [3, 4, 6, 5], "chosen_ids": [2, EOS], "rejected_ids": [6, 1, EOS]},
        ]
    )
    input_ids = batch.input_ids
    logits = torch.randn(*input_ids.shape, V) * 2
    logits[..., EOS] += 1.0  # make EOS terms sizeable so that dropping or adding one shows
    out = sequence_logps(logits, input_ids, batch.completion_mask)
    # (prompt_len, length) of rows chosen 0, chosen 1, rejected 0, rejected 1
    rows = [(2, 5), (4, 6), (2, 4), (4, 7)]
    for i, (prompt_len, length) in enumerate(rows):
        expected = reference_logp(logits[i], input_ids[i], prompt_len, length)
        assert out.logps[i].item() == pytest.approx(expected, rel=1e-5), i
        assert out.num_tokens[i].item() == length - prompt_len
    # Row 0 is padded with two EOS: scoring them too, or dropping the real EOS, changes the sum.
    width = input_ids.shape[1]
    assert width == 7 and input_ids[0, 4:].tolist() == [EOS, EOS, EOS]
    with_padding = reference_logp(logits[0], input_ids[0], 2, width)
    without_eos = reference_logp(logits[0], input_ids[0], 2, 4)
    assert abs(out.logps[0].item() - with_padding) > 1e-3
    assert abs(out.logps[0].item() - without_eos) > 1e-3


def test_gradient_flows_to_scored_logits_only():
    torch.manual_seed(4)
    ids, prompt_len, width = [3, 1, 4, 2], 2, 6
    input_ids, mask = one_row(ids, prompt_len, width)
    logits = torch.randn(1, width, V, requires_grad=True)
    out = sequence_logps(logits, input_ids, mask)
    assert out.logps.requires_grad
    assert not out.logits_sum.requires_grad and out.logits_sum.grad_fn is None
    out.logps.sum().backward()
    grad_norm = logits.grad[0].abs().sum(-1)
    scored = list(range(prompt_len - 1, len(ids) - 1))  # positions 1, 2
    assert (grad_norm[scored] > 0).all()
    others = [t for t in range(width) if t not in scored]
    assert (grad_norm[others] == 0).all()
    # d logp / d logits[t] = onehot(target) - softmax(logits[t]): the target's gradient is positive.
    assert logits.grad[0, 1, ids[2]] > 0 and logits.grad[0, 2, ids[3]] > 0


# ----------------------------------------------------------------------------- a real tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lightning.builtin import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"), seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_forward_logps_matches_per_sequence_model(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # the built-in tokenizer pads with EOS: the hard case
    items = [
        {"prompt_ids": [11, 12, 13], "chosen_ids": [40, 41, 42, 43, eos], "rejected_ids": [50, eos]},
        {"prompt_ids": [21, 22, 23, 24, 25, 26], "chosen_ids": [60, eos], "rejected_ids": [70, 71, 72, eos]},
    ]
    batch = PairCollator(pad_token_id=tokenizer.pad_token_id)(items)
    with torch.no_grad():
        out = forward_logps(model, batch)
    assert out.logps.shape == out.num_tokens.shape == out.logits_sum.shape == (4,)

    rows = [(it["prompt_ids"], it[key]) for key in ("chosen_ids", "rejected_ids") for it in items]
    for i, (prompt, completion) in enumerate(rows):
        ids = prompt + completion
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        positions = range(len(prompt) - 1, len(ids) - 1)
        logp = torch.log_softmax(logits, dim=-1)
        expected = sum(logp[t, ids[t + 1]] for t in positions)
        expected_logits_sum = sum(logits[t].mean() for t in positions)
        torch.testing.assert_close(out.logps[i], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits_sum[i], expected_logits_sum, rtol=1e-5, atol=1e-4)
        assert out.num_tokens[i].item() == len(completion)
