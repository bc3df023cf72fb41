"""The Lightning module's optimisation pieces: schedule, weight-decay groups, accumulation, precision."""

from __future__ import annotations

import json
import math

import pytest
import torch
from contract import tiny_run_values, write_jsonl
from tiny_models import random_qwen2

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import run_local
from dpo_lightning.training.module import short_window_scale
from dpo_lightning.training.optim import adamw, decay_groups, lr_lambda, warmup_steps_for


def test_schedules_by_hand():
    """warmup 2 of 10 steps: factors 0, 0.5, then 1 (constant); 1 - (s-2)/8 (linear); (1 + cos(pi (s-2)/8)) / 2."""
    constant, linear, cosine = (lr_lambda(name, 2, 10) for name in ("constant", "linear", "cosine"))
    assert [constant(s) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert [linear(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert cosine(2) == pytest.approx(1.0) and cosine(10) == pytest.approx(0.0, abs=1e-12)
    assert cosine(4) == pytest.approx((1 + math.cos(math.pi * 2 / 8)) / 2)
    assert lr_lambda("cosine", 0, 10)(0) == pytest.approx(1.0)  # no warmup: the first step runs at the peak


def test_warmup_steps_override_ratio():
    assert warmup_steps_for(make_config({"warmup_ratio": 0.1}), 95) == 10  # ceil(9.5)
    assert warmup_steps_for(make_config({"warmup_ratio": 0.1, "warmup_steps": 3}), 95) == 3


def test_weight_decay_skips_biases_and_norms_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decayed, plain = decay_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3  # bias, norm weight, norm bias


def test_weight_decay_choice_does_not_depend_on_shape():
    # a sharded parameter's local shape is not the model's (flattened 1-D shards, for one): the choice must hold
    model = random_qwen2(num_hidden_layers=1, tie_word_embeddings=False)
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {n for n, p in model.named_parameters() if not n.endswith("bias") and "norm" not in n}
    decayed, _ = decay_groups(model, 0.1)
    assert {names[id(p)] for p in decayed["params"]} == expected
    assert any("q_proj.bias" in n for n in names.values())  # the model has biases to leave out
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(param.detach().flatten()))
    flat_names = {id(p): n for n, p in model.named_parameters()}
    decayed, _ = decay_groups(model, 0.1)
    assert {flat_names[id(p)] for p in decayed["params"]} == expected


def test_a_tied_weight_is_in_the_optimizer_once():
    model = random_qwen2(num_hidden_layers=1)  # tied embeddings: the head's weight is the embedding's
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = [p for group in decay_groups(model, 0.1) for p in group["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))


def test_optimizer_is_fused_on_cpu():
    groups = decay_groups(torch.nn.Linear(3, 4), 0.1)
    assert adamw(groups, lr=1e-3).defaults["fused"] is True


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    rows = preference_rows(seed=2)["train"][:64]
    return tiny_model, write_jsonl(tmp_path_factory.mktemp("module") / "pairs.jsonl", rows)


def _run(setup, tmp_path, **overrides):
    model, data = setup
    base = dict(val_fraction=0.0, batch_size=4, max_prompt_length=16, report_every_n_steps=1)
    values = tiny_run_values(model, data, tmp_path, **{**base, **overrides})
    outcome = run_local(make_config(values))
    reports = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return outcome, reports


def test_gradient_accumulation_counts_optimizer_steps(setup, tmp_path):
    outcome, reports = _run(
        setup, tmp_path, gradient_accumulation_steps=3, max_steps=4, lr_scheduler="linear", warmup_steps=1
    )
    assert outcome.trainer.global_step == 4
    assert outcome.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 12  # 3 micro-batches a step
    training = [r for r in reports if r["group"] == "training"]
    assert [r["step"] for r in training] == [1, 2, 3, 4]
    # each report averages the 3 micro-batches (12 pairs) of its step; the lr is the one for the next step
    lrs = [r["metrics"]["learning_rate"] for r in training]
    assert lrs == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3, 0.0])
    assert all(r["metrics"]["grad_norm"] > 0 for r in training)


def test_no_validation_when_fraction_is_zero(setup, tmp_path):
    outcome, reports = _run(setup, tmp_path, max_steps=2)
    assert {r["group"] for r in reports} == {"training"}
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_bf16_mixed_keeps_fp32_master_weights(setup, tmp_path):
    outcome, reports = _run(setup, tmp_path, precision="bf16-mixed", dtype="bfloat16", max_steps=2)
    assert all(p.dtype == torch.float32 for p in outcome.module.policy.parameters())
    assert all(p.dtype == torch.bfloat16 for p in outcome.module.reference.parameters())
    assert all(math.isfinite(r["metrics"]["loss"]) for r in reports)


def test_chunked_and_plain_log_probs_train_alike_step_by_step(setup, tmp_path):
    """The default chunked head and the plain full-logits path, same data and seed: every step's report agrees."""
    runs = []
    for name, chunk in (("plain", 0), ("chunked", 8)):
        _, reports = _run(setup, tmp_path / name, max_steps=4, logps_chunk_size=chunk)
        runs.append({r["step"]: r["metrics"] for r in reports if r["group"] == "training"})
    plain, chunked = runs
    assert sorted(plain) == sorted(chunked) == [1, 2, 3, 4]
    assert plain[4]["loss"] < plain[1]["loss"]  # it trains: the comparison is not of four identical steps
    for step, metrics in plain.items():
        for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "grad_norm"):
            assert chunked[step][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), (step, name)


def test_an_accumulation_window_cut_short_by_the_epoch_still_averages_its_micro_batches(tiny_model, tmp_path):
    # 4 pairs, batch 4, accumulation 4: the epoch's one micro-batch is its whole window; the update must be the
    # same as without accumulation (before, each micro-batch was divided by 4 whatever the window held)
    from safetensors.torch import load_file

    rows = preference_rows(seed=2)["train"][:4]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    results = {}
    for accumulation in (1, 4):
        out = tmp_path / f"acc{accumulation}"
        values = tiny_run_values(tiny_model, data, out, batch_size=4, gradient_accumulation_steps=accumulation)
        values.update(max_prompt_length=16, val_fraction=0.0, num_epochs=1, report_every_n_steps=1, max_grad_norm=0)
        run_local(make_config(values))
        report = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert report["step"] == 1
        results[accumulation] = (report["metrics"]["grad_norm"], load_file(out / "final" / "model.safetensors"))
    assert results[4][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, tensor in results[1][1].items():
        torch.testing.assert_close(results[4][1][name], tensor, rtol=1e-5, atol=1e-7)


def test_short_window_scale():
    assert short_window_scale(4, 4) == 1.0 and short_window_scale(4, 1) == 4.0 and short_window_scale(4, 3) == 4 / 3
    assert short_window_scale(1, 1) == 1.0 and short_window_scale(4, 0) == 1.0


def test_rpo_alpha_adds_the_reported_nll_to_the_loss(tiny_model, tmp_path):
    rows = preference_rows(seed=2)["train"][:24]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    baseline = {}
    for alpha in (0.0, 0.5):
        out = tmp_path / f"rpo{alpha}"
        values = tiny_run_values(tiny_model, data, out, rpo_alpha=alpha, max_prompt_length=16, max_steps=1)
        values.update(validate_at_start=True, val_fraction=0.25)
        run_local(make_config(values))
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert first["group"] == "validation" and first["step"] == 0
        baseline[alpha] = first["metrics"]
    assert "nll_loss" not in baseline[0.0] and baseline[0.5]["nll_loss"] > 0
    # the same policy on the same pairs: the loss differs by exactly alpha times the NLL
    assert baseline[0.5]["loss"] == pytest.approx(baseline[0.0]["loss"] + 0.5 * baseline[0.5]["nll_loss"], rel=1e-5)
