"""Prefix sharing (`data/prefix_sharing.py`): a pair laid out once as prompt, chosen, rejected gives exactly the
log-probs, losses and gradients of its two separate sequences (fp32, relative 1e-5), padded or packed, with the
full logits or the chunked head, under sdpa and eager attention.

Expected values come from the unshared layouts, which are themselves checked against TRL elsewhere; the mask and
the scoring are also checked by hand on a small pair.
"""

from __future__ import annotations

import copy

import pytest
import torch
from contract import assert_same_runs, online_demo_values, run_steps, stepwise_run_values, uneven_pairs, write_jsonl
from tiny_models import random_pairs, random_qwen2

from dpo_lightning.config import make_config
from dpo_lightning.data.batch import PairBatch
from dpo_lightning.data.prefix_sharing import CHOSEN, PAD, PROMPT, REJECTED, shared_attention
from dpo_lightning.determined.bridge import run_local
from dpo_lightning.dpo.logprobs import PairLogps, forward_logps
from dpo_lightning.dpo.objective import LossSettings, pair_loss
from dpo_lightning.errors import ConfigError

# four pairs: uneven prompts and completions, one empty prompt (its completions' first tokens are unscored)
PAIRS = random_pairs(5, (3, 7, 0, 5), (4, 2, 9, 1), (6, 3, 2, 8))


def test_a_pair_is_laid_out_once_with_the_rejected_completion_restarting_at_the_prompt_end():
    batch = PairBatch.from_pairs([[11, 12]], [[21, 22]], [[31, 32, 33]], pad_token_id=0, shared=True)
    assert batch.input_ids.tolist() == [[11, 12, 21, 22, 31, 32, 33]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert batch.segments.tolist() == [[PROMPT] * 2 + [CHOSEN] * 2 + [REJECTED] * 3]
    assert batch.row_lengths().tolist() == [4, 5] and batch.num_pairs == 1
    allowed = shared_attention(batch.segments, batch.groups, additive=False)[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # the rejected tokens see the prompt and themselves, never the chosen ones
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1],
    ]
    rows, positions, sequences, targets = batch.scored_tokens()
    # chosen 21 from position 1 (the prompt's end), 22 from 2; rejected 31 from 1 as well, then 32, 33
    assert positions.tolist() == [1, 2, 1, 4, 5] and targets.tolist() == [2, 3, 4, 5, 6]
    assert sequences.tolist() == [0, 0, 1, 1, 1]


def test_padding_and_other_pairs_are_never_attended():
    batch = PairBatch.from_pairs([[1], [2, 3]], [[4], [5]], [[6], [7]], pad_token_id=0, shared=True, packed=True)
    allowed = shared_attention(batch.segments, batch.groups, additive=False)[0, 0]
    first = (batch.groups[0] == 0).nonzero().flatten()
    second = (batch.groups[0] == 1).nonzero().flatten()
    assert not allowed[second][:, first].any() and not allowed[first][:, second].any()
    padded = PairBatch.from_pairs([[1], [2, 3]], [[4], [5]], [[6], [7]], pad_token_id=0, shared=True)
    assert padded.segments[0].tolist() == [PROMPT, CHOSEN, REJECTED, PAD]
    mask = shared_attention(padded.segments, padded.groups, additive=True)[0, 0]
    assert mask[3, 3] == 0 and (mask[3, :3] < -1e30).all() and (mask[:3, 3] < -1e30).all()


def _step(policy, reference, batch, chunk_size: int, loss_type: str):
    """(policy log-probs, losses, gradients) of one DPO loss on `batch`, the reference sharing the layout."""
    with torch.no_grad():
        ref = PairLogps.of(batch, forward_logps(reference, batch, chunk_size))
    logps = forward_logps(policy, batch, chunk_size)
    out = pair_loss(LossSettings(loss_type, beta=0.3), PairLogps.of(batch, logps), ref)
    out.losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return logps, out.losses.detach(), grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_size", [0, 5])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_shared_prompts_give_the_separate_sequences_log_probs_losses_and_gradients(attention, chunk_size, packed):
    policy, reference = random_qwen2(3, attn_implementation=attention), random_qwen2(0, attn_implementation=attention)
    separate = PairBatch.from_pairs(*PAIRS, pad_token_id=0, packed=packed)
    shared = PairBatch.from_pairs(*PAIRS, pad_token_id=0, packed=packed, shared=True)
    assert shared.attention_mask.sum() < separate.row_lengths().sum()  # the prompts are there once
    loss_type = "sigmoid,ipo"  # two losses, so that a mistake in either reward shows
    want, want_losses, want_grads = _step(copy.deepcopy(policy), reference, separate, chunk_size, loss_type)
    got, got_losses, got_grads = _step(policy, reference, shared, chunk_size, loss_type)
    for name in ("logps", "num_tokens", "logits_sum", "tail"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)
    assert want.num_tokens.tolist() == [4, 2, 8, 1, 6, 3, 1, 8]  # the empty prompt's first tokens unscored
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=1e-7)
    assert want_losses.abs().sum() > 0 and set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_shared_prompt_training_equals_unshared_training_step_by_step(tiny_model, tmp_path, padding_free):
    """Six steps with validation, the live reference and the chunked head: every report equals the unshared
    run's; the shared layout holds less padding where pairs are padded."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", uneven_pairs(40))
    runs = {}
    for name, shared in (("separate", False), ("shared", True)):
        values = stepwise_run_values(
            tiny_model, pairs, tmp_path / name, max_steps=6, max_length=128, logps_chunk_size=16
        )
        run_local(make_config({**values, "padding_free": padding_free, "prefix_sharing": shared}))
        runs[name] = run_steps(tmp_path / name)
    assert ("validation", 6) in runs["separate"]
    assert_same_runs(runs["shared"], runs["separate"], extra=("grad_norm",))


def test_shared_prompts_with_a_precomputed_reference_and_online_pairs_equal_the_unshared(
    tiny_model, tmp_path, monkeypatch
):
    """The precompute pass lays the pairs out shared too, and online DPO's sampled pairs share their prompt:
    the reports equal the unshared runs' (the same samples drawn and judged)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", uneven_pairs(24))
    for kind, values in (
        ("precomputed", stepwise_run_values(tiny_model, pairs, tmp_path / "p", max_steps=3, precompute_ref_logps=True)),
        ("online", {**online_demo_values(tiny_model, tmp_path / "o", max_steps=3, report_every_n_steps=1)}),
    ):
        runs = {}
        for shared in (False, True):
            out = tmp_path / f"{kind}-{shared}"
            monkeypatch.setenv("DPO_LIGHTNING_CACHE", str(tmp_path / f"cache-{shared}"))  # each run its own pass
            run_local(make_config({**values, "output_dir": str(out), "prefix_sharing": shared}))
            runs[shared] = run_steps(out)
        assert_same_runs(runs[True], runs[False], extra=("grad_norm",))
        if kind == "precomputed":
            assert len([p for p in (tmp_path / "cache-True").rglob("*") if p.is_file()]) == 1  # computed shared
        if kind == "online":
            for key, metrics in runs[False].items():
                assert runs[True][key]["objective/scores"] == metrics["objective/scores"], key


def test_what_prefix_sharing_cannot_do_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="prefix_sharing needs attn_implementation sdpa or eager"):
        make_config({"prefix_sharing": True, "attn_implementation": "flash_attention_2"})
    with pytest.raises(ConfigError, match="mode reward scores whole sequences"):
        make_config({"prefix_sharing": True, "mode": "reward"})
