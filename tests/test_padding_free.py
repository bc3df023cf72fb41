"""Padding-free batches (`padding_free: true`): a micro-batch's sequences packed into one row, position ids
restarting per sequence. The layout by hand, then the same log-probs, gradients and training runs as padded
batches."""

from __future__ import annotations

import copy

import pytest
import torch
from contract import assert_same_runs, online_demo_values, run_steps, stepwise_run_values, uneven_pairs, write_jsonl
from tiny_models import random_pairs, random_qwen2

from dpo_lightning.config import make_config
from dpo_lightning.data.batch import PairBatch
from dpo_lightning.determined.bridge import run_local
from dpo_lightning.dpo.logprobs import forward_logps, forward_logps_and_tokens, token_logps


def test_the_packed_layout_by_hand():
    batch = PairBatch.from_pairs([[1, 2], [3]], [[4], [5, 6]], [[7, 8, 9], [10]], pad_token_id=0, packed=True)
    # sequences: chosen 0 = 1 2 4 | chosen 1 = 3 5 6 | rejected 0 = 1 2 7 8 9 | rejected 1 = 3 10
    assert batch.input_ids.tolist() == [[1, 2, 4, 3, 5, 6, 1, 2, 7, 8, 9, 3, 10]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1]]
    assert batch.num_rows == 4 and batch.num_pairs == 2 and batch.row_lengths().tolist() == [3, 3, 5, 2]
    rows, positions, sequences = batch.scored_positions()
    assert positions.tolist() == [1, 3, 4, 7, 8, 9, 11]  # each the position before a completion token
    assert sequences.tolist() == [0, 1, 1, 2, 2, 2, 3] and rows.tolist() == [0] * 7
    assert batch.padding_share() == pytest.approx(1 - 13 / 20)  # padded: 4 rows of 5
    assert "attention_mask" not in batch.model_inputs() and batch.split(torch.arange(4.0))[1].tolist() == [2.0, 3.0]


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_packed_log_probs_and_gradients_equal_the_padded_ones(chunk_size):
    prompts, chosen, rejected = random_pairs(1, (3, 7, 1), (4, 2, 9), (6, 3, 2))
    padded = PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0)
    packed = PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0, packed=True)
    model = random_qwen2()
    twin = copy.deepcopy(model)
    weights = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.0, 0.7])
    expected = forward_logps(model, padded, chunk_size)
    got = forward_logps(twin, packed, chunk_size)
    for name in ("logps", "num_tokens", "logits_sum"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-5, msg=name)
    (expected.logps * weights).sum().backward()
    (got.logps * weights).sum().backward()
    for (name, param), twin_param in zip(model.named_parameters(), twin.parameters(), strict=True):
        scale = float(param.grad.abs().max())
        torch.testing.assert_close(twin_param.grad, param.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@torch.no_grad()
def test_per_token_log_probs_in_scored_order_on_every_path():
    # what a sampler's own per-token log-probs are compared with: sequence by sequence, each in token order
    prompts, chosen, rejected = random_pairs(2, (3, 1), (4, 2), (1, 3))
    model = random_qwen2()
    padded = PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0)
    expected = []  # each sequence alone, unpadded, through the full logits
    for prompt, completion in zip([*prompts, *prompts], [*chosen, *rejected], strict=True):
        ids = torch.tensor([prompt + completion])
        per_token = token_logps(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0][0]
        expected.append(per_token[len(prompt) - 1 :])
    expected = torch.cat(expected)
    for packed in (False, True):
        batch = PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0, packed=packed)
        for chunk_size in (0, 3):
            sums, tokens = forward_logps_and_tokens(model, batch, chunk_size)
            torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sums.logps, forward_logps(model, padded).logps, rtol=1e-5, atol=1e-5)
            assert tokens.numel() == sum(len(c) for c in [*chosen, *rejected])


def test_padding_free_training_equals_padded_training_step_by_step(tiny_model, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", uneven_pairs(40))
    runs = {}
    for name, packed in (("padded", False), ("packed", True)):
        values = stepwise_run_values(
            tiny_model, pairs, tmp_path / name, max_steps=6, max_length=128, padding_free=packed
        )
        run_local(make_config(values))
        runs[name] = run_steps(tmp_path / name)
    assert ("validation", 6) in runs["padded"] and runs["padded"][("training", 1)]["padding_share"] > 0.05
    assert_same_runs(runs["packed"], runs["padded"])


def test_padding_free_online_steps_equal_padded_ones(tiny_model, tmp_path):
    runs = {}
    for name, packed in (("padded", False), ("packed", True)):
        values = online_demo_values(tiny_model, tmp_path / name, max_steps=4, report_every_n_steps=1)
        run_local(make_config({**values, "val_check_interval": 2, "padding_free": packed}))
        runs[name] = run_steps(tmp_path / name)
    assert_same_runs(runs["packed"], runs["padded"])
    for key, metrics in runs["padded"].items():  # the same samples were drawn and judged
        assert runs["packed"][key]["objective/scores"] == metrics["objective/scores"], key
