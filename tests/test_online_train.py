"""Online DPO end to end on CPU: the mode follows the data, the held-out reward rises, an interrupted run
resumes exactly (sampling stream included), and an all-tie micro-batch keeps DDP ranks in step."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contract import (
    OBJECTIVE_METRICS,
    TIME_SHARES,
    TRAINING_METRICS,
    stepwise_run_values,
    write_jsonl,
)
from fake_core import FakeCore
from safetensors.torch import load_file

from dpo_lightning.builtin import THINGS, preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.data.datamodule import DPODataModule
from dpo_lightning.determined import bridge
from dpo_lightning.errors import UserError
from dpo_lightning.integrity import file_checksums
from dpo_lightning.models import load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]
REWARD = "dpo_lightning.builtin:sentiment_reward"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rows = [{"prompt": f"Describe the {thing}.\n"} for thing in THINGS] * 2
    return write_jsonl(tmp_path_factory.mktemp("online") / "prompts.jsonl", rows)


def _online(tiny_model: Path, data: Path, output_dir: Path, **overrides) -> dict:
    values = dict(
        reward_model=REWARD,
        max_length=40,
        max_prompt_length=16,
        max_new_tokens=8,
        val_fraction=0.2,
        temperature=1.0,
        preempt_check_every_n_steps=1,
    )
    return stepwise_run_values(tiny_model, data, output_dir, **{**values, **overrides})


def _mode(tiny_model: Path, **values) -> str:
    cfg = make_config({"model_name": str(tiny_model), **values})
    return DPODataModule(cfg, load_tokenizer(resolve_model(cfg.model_name))).mode


# ----------------------------------------------------------------------------- the mode follows the data


def test_mode_auto_trains_prompts_online_and_pairs_offline(tiny_model, prompts, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(seed=1)["train"][:20])
    assert _mode(tiny_model, dataset_name=str(prompts), reward_model=REWARD) == "online"
    # pairs train offline even when a reward model is configured (experiment.yaml sets one)
    assert _mode(tiny_model, dataset_name=str(pairs), reward_model=REWARD) == "offline"
    assert _mode(tiny_model, dataset_name="builtin:describe-prompts", reward_model=REWARD) == "online"
    # forced online on pairs: their prompts, each once
    assert _mode(tiny_model, dataset_name=str(pairs), reward_model=REWARD, mode="online") == "online"
    text = tmp_path / "speeches.txt"
    text.write_text("ALICE:\nWhat light is this?\nIt is the east.\n\nBOB:\nSoft, it is the sun.\n" * 5)
    assert _mode(tiny_model, dataset_name=str(text), reward_model=REWARD, val_fraction=0.0) == "online"


def test_forced_online_on_pairs_uses_each_prompt_once(tiny_model, tmp_path):
    rows = preference_rows(seed=1)["train"][:24]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = make_config(
        {"model_name": str(tiny_model), "dataset_name": str(pairs), "reward_model": REWARD, "mode": "online"}
        | {"val_fraction": 0.0}
    )
    tokenizer = load_tokenizer(resolve_model(cfg.model_name))
    data = DPODataModule(cfg, tokenizer).prepare()
    assert set(data.train.column_names) == {"prompt_ids", "prompt_json"}
    assert sorted(json.loads(p) for p in data.train["prompt_json"]) == sorted({r["prompt"] for r in rows})


def test_chat_prompts_get_the_generation_prompt(tiny_model, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Describe the {t}."}]} for t in THINGS[:10]]
    data_file = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = make_config(
        {"model_name": str(tiny_model), "dataset_name": str(data_file), "reward_model": REWARD, "val_fraction": 0}
    )
    tokenizer = load_tokenizer(resolve_model(cfg.model_name))
    first = DPODataModule(cfg, tokenizer).prepare().train[0]
    messages = json.loads(first["prompt_json"])
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(first["prompt_ids"]) == expected
    assert expected.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"reward_model": None}, "online DPO needs a reward_model"),
        ({"mode": "offline"}, "mode offline trains on preference pairs"),
        ({"mode": "reward"}, "mode reward trains on preference pairs"),
        ({"max_new_tokens": 60}, "must be <= max_length"),
    ],
    ids=["no-reward-model", "offline-on-prompts", "reward-on-prompts", "too-long"],
)
def test_prompt_data_errors_are_one_line(tiny_model, prompts, values, needle):
    base = {"dataset_name": str(prompts), "reward_model": REWARD, "max_length": 64, "max_prompt_length": 16}
    with pytest.raises(UserError) as caught:
        _mode(tiny_model, **{**base, **values})
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_bad_reward_function_fails_before_models_load(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "entrypoint.py"), "--config", "experiments/online-tiny.yaml"]
        + ["--reward_model", "no_such_pkg.rewards:score", "--output_dir", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if not line[:2].isdigit()]  # all but the log lines
    assert len(errors) == 1 and errors[0].startswith("error: reward_model") and "no_such_pkg" in errors[0]
    assert "Traceback" not in done.stderr and "scored by" not in done.stderr  # the models never loaded
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- learning


def _reports(output_dir: Path, group: str) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics"] for r in rows if r["group"] == group}


def test_online_loop_raises_the_held_out_reward(online_demo):
    """The built-in demo, shortened: the mean reward of the policy's samples on prompts it never trains on."""
    out = online_demo
    validation, training = _reports(out, "validation"), _reports(out, "training")
    assert sorted(validation) == [0, 30, 60]
    assert {10, 20, 30, 40, 50, 60} <= set(training)  # and the epoch ends
    for metrics in training.values():
        assert TRAINING_METRICS | OBJECTIVE_METRICS | TIME_SHARES <= set(metrics)
        shares = [metrics[name] for name in TIME_SHARES]
        assert all(0 < share < 1 for share in shares) and sum(shares) < 1
        assert metrics["objective/sampler_logp_diff"] == 0.0  # HF generate samples the policy itself
    assert OBJECTIVE_METRICS <= set(validation[60]) and not TIME_SHARES & set(validation[60])
    before, after = validation[0], validation[60]
    # at step 0 the policy is its reference: no KL, and DPO's loss is ln 2 on every untied pair
    assert before["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert before["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert after["objective/scores"] > before["objective/scores"] + 2.0, (before, after)
    assert after["objective/kl"] > 0
    assert (out / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- resume


def _trial(core, cfg, *, start=None):
    return bridge.run_trial(core, cfg, start=start, trial_id=1, on_cluster=True)


def test_interrupted_online_run_resumes_exactly(tiny_model, prompts, tmp_path):
    """Preempted mid-epoch and resumed: every step's samples, scores and losses are the straight run's."""
    cfg = make_config(_online(tiny_model, prompts, tmp_path / "out", max_steps=14, learning_rate=3e-3))
    straight = FakeCore(tmp_path / "straight")
    _trial(straight, cfg)

    first = FakeCore(tmp_path / "resumed", preempt_on_call=5)
    assert _trial(first, cfg).trainer.global_step == 5
    second = FakeCore(tmp_path / "resumed", after=first)
    with contextlib.ExitStack() as stack:
        start = bridge.cluster_start_point(second, second.latest_checkpoint(), 1, stack)
        resumed = _trial(second, cfg, start=start)
    assert resumed.trainer.global_step == 14

    expected, got = straight.train.group("training"), second.train.group("training")
    assert sorted(got) == sorted(expected) == list(range(1, 15))
    names = ("loss", "objective/scores", "objective/kl", "objective/tie_rate", "objective/completion_length")
    for step in expected:
        # a step whose pairs all tied has no DPO metrics (NaN, not reported): the same steps in both runs
        assert set(got[step]) == set(expected[step]), step
        for name in [n for n in names if n in expected[step]]:
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-9), (step, name)
    assert sorted(second.train.group("validation")) == sorted(straight.train.group("validation"))
    for step, metrics in straight.train.group("validation").items():
        assert second.train.group("validation")[step]["objective/scores"] == pytest.approx(metrics["objective/scores"])
    files = [core.latest_checkpoint() for core in (straight, second)]
    straight_weights = load_file(tmp_path / "straight" / files[0] / "model.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / files[1] / "model.safetensors")
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-6, atol=1e-7)


def test_without_the_sampling_stream_a_resumed_run_samples_differently(tiny_model, prompts, tmp_path):
    """The check above is not vacuous: dropping the saved sampling state changes what is sampled."""
    cfg = make_config(_online(tiny_model, prompts, tmp_path / "out", max_steps=8))
    straight = FakeCore(tmp_path / "straight")
    _trial(straight, cfg)
    first = FakeCore(tmp_path / "resumed", preempt_on_call=4)
    _trial(first, cfg)
    latest = tmp_path / "resumed" / first.latest_checkpoint()
    state = torch.load(latest / "trainer" / "rank-00000.pt", weights_only=False)
    state["module"] = {}
    torch.save(state, latest / "trainer" / "rank-00000.pt")
    metadata = json.loads((latest / "metadata.json").read_text())  # its checksum, as if written so
    metadata["files"]["trainer/rank-00000.pt"] = file_checksums(latest / "trainer")["rank-00000.pt"]
    (latest / "metadata.json").write_text(json.dumps(metadata))
    second = FakeCore(tmp_path / "resumed", after=first)
    with contextlib.ExitStack() as stack:
        start = bridge.cluster_start_point(second, second.latest_checkpoint(), 1, stack)
        _trial(second, cfg, start=start)
    expected, got = straight.train.group("training"), second.train.group("training")
    assert any(got[s]["objective/scores"] != expected[s]["objective/scores"] for s in range(5, 9))


# ----------------------------------------------------------------------------- DDP


def test_all_tie_micro_batches_keep_ddp_ranks_in_step(tiny_model, prompts, tmp_path):
    """Rank 1's reward is constant, so every one of its pairs is a tie: it still joins every all-reduce."""
    out = tmp_path / "ddp"
    values = _online(tiny_model, prompts, out, max_steps=4, reward_model="reward_scripts:ties_on_rank_one")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "entrypoint.py"), "--config", "experiments/online-tiny.yaml"]
    command += [f"--{k}={v}" for k, v in values.items() if v is not None]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    training = {r["step"]: r["metrics"] for r in rows if r["group"] == "training"}
    assert sorted(training) == [1, 2, 3, 4]
    for metrics in training.values():
        # rank 1's 4 prompts per step are all ties, so at least half the prompts tie
        assert metrics["objective/ties"] >= 4 and metrics["objective/tie_rate"] >= 0.5


# ----------------------------------------------------------------------------- generation metrics in validation


def test_offline_validation_adds_generation_metrics_every_k_validations(tiny_model, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(seed=2)["train"][:80])
    out = tmp_path / "run"
    values = stepwise_run_values(
        tiny_model,
        pairs,
        out,
        max_steps=12,
        val_check_interval=3,
        val_fraction=0.4,
        reward_model=REWARD,
        generation_eval_every=2,
        generation_eval_prompts=4,
        max_new_tokens=4,
    )
    cfg = make_config(values)
    held_out_prompts = len(DPODataModule(cfg, load_tokenizer(resolve_model(cfg.model_name))).prepare().val_prompts)
    assert held_out_prompts == 3  # distinct prompts of the validation pairs, at most generation_eval_prompts
    bridge.run_local(cfg)
    validation = _reports(out, "validation")
    with_generation = sorted(step for step, m in validation.items() if "generation/win_rate" in m)
    assert sorted(validation) == [3, 6, 9, 12]
    assert with_generation == [6, 12]  # the 2nd and 4th validations (step // 3 even)
    metrics = validation[12]
    assert metrics["generation/wins"] + metrics["generation/losses"] + metrics["generation/ties"] == held_out_prompts
    assert "objective/scores" not in metrics  # an offline run: no online sampling metrics


def test_generation_metrics_need_a_reward_model():
    with pytest.raises(UserError, match="generation_eval_every needs a reward_model"):
        make_config({"generation_eval_every": 2})
