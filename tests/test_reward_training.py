"""Reward-model training (`mode: reward`): the Bradley-Terry loss, a run that learns the built-in preference on
held-out things, its checkpoint scored back through every loading path, the checkpoint judging an online run,
the error for prompt-only data, and exact resume after an interruption."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from contract import tiny_run_values, write_jsonl
from fake_core import FakeCore
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo_lightning.builtin import BUILTIN_DATASET, BUILTIN_PROMPTS, preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.data.reward_text import encode_for_reward
from dpo_lightning.determined import bridge
from dpo_lightning.errors import UserError
from dpo_lightning.losses import bradley_terry_loss
from dpo_lightning.models import REWARD_MARKER
from dpo_lightning.online.judges import ClassifierJudge, RewardModelJudge, judge_kind, load_judge
from dpo_lightning.training.run import train

SEED = 42  # the built-in pairs are drawn with the run's seed; the held-out checks redraw them with it
REWARD_METRICS = {"loss", "accuracy", "margin", "scores/chosen", "scores/rejected"}


def _reward_values(tiny_model: Path, output_dir: Path, **overrides) -> dict:
    values = dict(mode="reward", seed=SEED, batch_size=8, max_prompt_length=16, warmup_steps=2)
    return tiny_run_values(tiny_model, BUILTIN_DATASET, output_dir, **{**values, **overrides})


def _reports(output_dir: Path, group: str) -> dict[int, dict[str, float]]:
    """The last report of each step in `group` from metrics.jsonl."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["metrics"] for r in map(json.loads, lines) if r["group"] == group}


# ----------------------------------------------------------------------------- the loss


def test_bradley_terry_loss_values_shape_and_gradient():
    chosen = torch.tensor([0.0, 2.0 + math.log(3.0), -1.0, -30.0, 7.0])
    rejected = torch.tensor([0.0, 2.0, 4.0, 20.0, -5.0])
    losses = bradley_terry_loss(chosen, rejected)
    assert losses.shape == (5,) and losses.dtype == torch.float32
    # -log sigmoid(m): m = 0 -> ln 2; m = ln 3 -> ln(1 + 1/3); m = -5 -> ln(1 + e^5); m = -50 -> 50 (no overflow);
    # m = 12 -> log1p(e^-12)
    expected = torch.tensor(
        [math.log(2.0), math.log(4.0 / 3.0), math.log1p(math.exp(5.0)), 50.0, math.log1p(math.exp(-12.0))]
    )
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=0)
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4]))).all()
    # bf16 scores are computed in fp32
    assert bradley_terry_loss(chosen.bfloat16(), rejected.bfloat16()).dtype == torch.float32

    chosen = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    rejected = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    bradley_terry_loss(chosen, rejected).sum().backward()
    margin = (chosen - rejected).detach().float()
    closed_form = -(1 - torch.sigmoid(margin))  # d/dr_c; d/dr_r is its negative
    torch.testing.assert_close(chosen.grad.float(), closed_form, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rejected.grad.float(), -closed_form, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- one trained reward model


@pytest.fixture(scope="module")
def reward_run(tiny_model, tmp_path_factory):
    """30 steps of lr 1e-3 on the built-in pairs, validated on the held-out things at 0, 10, 20 and 30.
    Measured: held-out accuracy 0.22 at step 0 (the random head), 1.0 from step 10 on."""
    output_dir = tmp_path_factory.mktemp("reward-run") / "out"
    values = dict(max_steps=30, val_check_interval=10, validate_at_start=True, report_every_n_steps=5)
    outcome = bridge.run_local(make_config(_reward_values(tiny_model, output_dir, **values)))
    assert not outcome.interrupted
    return output_dir, outcome


def test_reward_training_learns_the_held_out_preference(reward_run):
    output_dir, outcome = reward_run
    validation, training = _reports(output_dir, "validation"), _reports(output_dir, "training")
    assert sorted(validation) == [0, 10, 20, 30]
    assert sorted(training) == [5, 10, 15, 20, 25, 30]
    assert REWARD_METRICS <= set(validation[0]) and REWARD_METRICS <= set(training[5])
    assert {"learning_rate", "grad_norm"} <= set(training[5])

    start, end = validation[0], validation[30]
    # the untrained head is no judge (measured 0.22); the trained one ranks every held-out pair right (1.0)
    assert start["accuracy"] <= 0.75 and abs(start["margin"]) < 0.5
    assert end["accuracy"] >= 0.95 and end["margin"] > 3.0
    assert end["loss"] < 0.1 and start["loss"] > 0.5  # ln 2 = 0.69 at margin 0
    assert training[30]["loss"] < training[5]["loss"]
    assert end["margin"] == pytest.approx(end["scores/chosen"] - end["scores/rejected"], abs=1e-4)


def _held_out_texts() -> tuple[list[str], list[str]]:
    """Held-out prompts with completions of several lengths, so that batched scoring pads."""
    rows = preference_rows(SEED)["test"][:3]
    prompts = [r["prompt"] for r in rows for _ in range(3)]
    completions = [c for r in rows for c in (r["chosen"], r["rejected"], "It is.")]
    completions[-1] = "The " + rows[-1]["chosen"] + " Very much so, truly."
    return prompts, completions


def test_checkpoint_reloads_and_scores_the_same(reward_run, tmp_path):
    output_dir, outcome = reward_run
    final = output_dir / "final"
    assert json.loads((final / REWARD_MARKER).read_text())["kind"] == "dpo_lightning.RewardModel"
    assert judge_kind(str(final)) == "project"
    trained = outcome.module.reward_model.model.state_dict()
    saved = load_file(final / "model.safetensors")
    assert set(saved) <= set(trained) and "score.weight" in saved
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)

    # independent scores: Hugging Face's own class on the saved folder, one text at a time (no padding)
    prompts, completions = _held_out_texts()
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    ids = encode_for_reward(tokenizer, prompts, completions, max_length=1024)
    assert len({len(x) for x in ids}) > 1  # the batches below are padded
    with torch.no_grad():
        expected = torch.stack([model(input_ids=torch.tensor([x])).logits[0, 0] for x in ids]).float()

    project = load_judge(str(final), batch_size=4)
    assert isinstance(project, RewardModelJudge)
    plain_folder = tmp_path / "as-plain"
    shutil.copytree(final, plain_folder)
    (plain_folder / REWARD_MARKER).unlink()
    plain = load_judge(str(plain_folder), batch_size=4)
    assert isinstance(plain, ClassifierJudge)
    torch.testing.assert_close(project.score(prompts, completions), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.score(prompts, completions), expected, rtol=1e-5, atol=1e-5)

    # the reloaded judge ranks the held-out pairs (things never trained on) as training measured
    rows = preference_rows(SEED)["test"]
    prompts = [r["prompt"] for r in rows]
    chosen = project.score(prompts, [r["chosen"] for r in rows])
    rejected = project.score(prompts, [r["rejected"] for r in rows])
    assert len(rows) == 96 and (chosen > rejected).float().mean().item() >= 0.9


def test_reward_checkpoint_judges_an_online_run(reward_run, tiny_model, tmp_path):
    final = reward_run[0] / "final"
    output_dir = tmp_path / "online"
    values = dict(
        model_name=str(tiny_model),
        dataset_name=BUILTIN_PROMPTS,
        mode="auto",
        reward_model=str(final),
        max_steps=2,
        batch_size=4,
        max_new_tokens=4,
        max_length=48,
        max_prompt_length=16,
        report_every_n_steps=1,
        learning_rate=1e-4,
        output_dir=str(output_dir),
    )
    outcome = bridge.run_local(make_config(values))
    assert not outcome.interrupted and outcome.trainer.global_step == 2
    assert isinstance(outcome.module.judge, RewardModelJudge)
    training, validation = _reports(output_dir, "training"), _reports(output_dir, "validation")
    assert sorted(training) == [1, 2] and sorted(validation) == [2]
    for metrics in (*training.values(), *validation.values()):
        assert math.isfinite(metrics["objective/scores"])
    assert (output_dir / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "source",
    ["jsonl", "csv", BUILTIN_PROMPTS],
)
def test_reward_mode_on_prompts_alone_fails_with_one_line(tiny_model, tmp_path, source):
    rows = [{"prompt": f"Describe the thing {i}.\n"} for i in range(8)]
    if source == "jsonl":
        dataset_name = str(write_jsonl(tmp_path / "prompts.jsonl", rows))
    elif source == "csv":
        dataset_name = str(tmp_path / "prompts.csv")
        Path(dataset_name).write_text("prompt\n" + "".join(f'"{r["prompt"]}"\n' for r in rows))
    else:
        dataset_name = source
    cfg = make_config(_reward_values(tiny_model, tmp_path / "out", dataset_name=dataset_name))
    with pytest.raises(UserError) as failure:
        train(cfg)  # fails on the data, before any model loads
    message = str(failure.value)
    assert "\n" not in message and message.startswith(dataset_name)
    assert not (tmp_path / "out").exists()
    assert "mode reward" in message and "preference pairs" in message


# ----------------------------------------------------------------------------- exact resume


def test_interrupted_and_resumed_reward_run_equals_a_straight_run(tiny_model, tmp_path):
    total, stop_at = 8, 3  # mid-epoch (an epoch is 47 steps); the validation due at step 4 runs after the resume
    values = dict(
        max_steps=total, learning_rate=1e-4, report_every_n_steps=1, val_check_interval=4, preempt_check_every_n_steps=1
    )
    cfg = make_config(_reward_values(tiny_model, tmp_path / "out", **values))

    def trial(core, start=None):
        return bridge.run_trial(core, cfg, start=start, trial_id=1, on_cluster=True)

    straight = FakeCore(tmp_path / "straight")
    trial(straight)
    first = FakeCore(tmp_path / "resumed", preempt_on_call=stop_at)
    assert trial(first).trainer.global_step == stop_at
    second = FakeCore(tmp_path / "resumed", after=first)
    with contextlib.ExitStack() as stack:
        start = bridge.cluster_start_point(second, second.latest_checkpoint(), 1, stack)
        assert start.step == stop_at and not start.weights_only
        assert trial(second, start=start).trainer.global_step == total

    expected, got = straight.train.group("training"), second.train.group("training")
    assert sorted(got) == sorted(expected) == list(range(1, total + 1))
    assert 0.05 < expected[total]["loss"] < expected[1]["loss"]  # still learning: the comparison means something
    for step in expected:
        for name in ("loss", "accuracy", "margin", "learning_rate"):
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-9), (step, name)
    expected_val, got_val = straight.train.group("validation"), second.train.group("validation")
    assert sorted(got_val) == sorted(expected_val) == [4, 8]
    for step in expected_val:
        assert got_val[step]["loss"] == pytest.approx(expected_val[step]["loss"], rel=1e-6), step

    def weights(core, storage):
        folder = storage / core.latest_checkpoint()
        assert (folder / REWARD_MARKER).is_file()
        return load_file(folder / "model.safetensors")

    expected_weights, got_weights = weights(straight, tmp_path / "straight"), weights(second, tmp_path / "resumed")
    assert set(got_weights) == set(expected_weights)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, rtol=1e-6, atol=1e-7)
