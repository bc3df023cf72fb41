"""End to end with Lightning's CPU trainer: a tiny random Qwen2 saved to disk and loaded back through the
real loading path, trained on a small learnable preference task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from contract import TRAINING_METRICS, tiny_run_values, write_jsonl
from transformers import AutoModelForCausalLM

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import run_local

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """The built-in task as a JSONL file: pleasant (chosen) vs unpleasant (rejected) descriptions."""
    rows = preference_rows(seed=1)
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows["train"] + rows["test"])


def _config(tiny_model: Path, pairs_file: Path, output_dir: Path, **overrides):
    values = dict(val_fraction=0.2, max_prompt_length=24, batch_size=8, num_epochs=2, warmup_ratio=0.1)
    values.update(report_every_n_steps=5, val_check_interval=1000)
    return make_config(tiny_run_values(tiny_model, pairs_file, output_dir, **{**values, **overrides}))


def _read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_learns_the_preference_and_exports(tiny_model, pairs_file, tmp_path):
    cfg = _config(tiny_model, pairs_file, tmp_path / "run")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    outcome = run_local(cfg)

    assert not outcome.interrupted
    module = outcome.module
    policy_moved = max((p - initial[n]).abs().max().item() for n, p in module.policy.state_dict().items())
    reference_moved = max((p - initial[n]).abs().max().item() for n, p in module.reference.model.state_dict().items())
    assert policy_moved > 1e-3
    assert reference_moved == 0.0
    assert not module.reference.training and all(not p.requires_grad for p in module.reference.parameters())

    reports = _read_metrics(tmp_path / "run")
    validation = [r for r in reports if r["group"] == "validation"]
    training = [r for r in reports if r["group"] == "training"]
    assert validation and validation[-1]["step"] == outcome.trainer.global_step
    # held-out prompts (no prompt on both sides): chance is 0.5, an untrained policy scores 0
    assert validation[-1]["metrics"]["rewards/accuracies"] >= 0.9
    assert validation[-1]["metrics"]["rewards/margins"] > 0
    assert training[0]["step"] == 5 and [r["step"] for r in training] == sorted(r["step"] for r in training)
    assert TRAINING_METRICS <= set(training[0]["metrics"])
    assert all(isinstance(v, float) for v in training[0]["metrics"].values())
    assert training[-1]["metrics"]["loss"] < training[0]["metrics"]["loss"]

    final = tmp_path / "run" / "final"
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, module.policy.state_dict()[name])
    record = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert record["config"]["beta"] == cfg.beta and record["versions"]["torch"]
    assert (final / "run_config.json").is_file() and (final / "tokenizer_config.json").is_file()


def _entrypoint(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "entrypoint.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_fast_dev_run_runs_one_train_and_one_validation_batch(tiny_model, pairs_file, tmp_path):
    proc = _entrypoint(
        "--fast-dev-run",
        "--model_name",
        str(tiny_model),
        "--dataset_name",
        str(pairs_file),
        "--output_dir",
        str(tmp_path / "out"),
        "--batch_size",
        "4",
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "[training step 1]" in out and "[validation step 1]" in out
    assert not (tmp_path / "out" / "final").exists()  # a dev run writes nothing


def test_hub_model_without_network_fails_fast_with_one_line(tmp_path):
    started = time.monotonic()
    proc = _entrypoint("--fast-dev-run", "--output_dir", str(tmp_path / "out"))
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    # one line per missing thing (the text and the reward model too, where not cached: test_first_hour.py)
    assert lines and all(line.startswith("error: ") for line in lines) and "Traceback" not in err, err
    model = [line for line in lines if "Qwen/Qwen2.5-0.5B-Instruct" in line]
    assert len(model) == 1 and "--model_name" in model[0]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_exits_zero(tiny_model, pairs_file, tmp_path, signum):
    output_dir = tmp_path / "run"
    proc = _entrypoint(
        "--config",
        "experiments/local-tiny.yaml",
        "--model_name",
        str(tiny_model),
        "--dataset_name",
        str(pairs_file),
        "--output_dir",
        str(output_dir),
        "--num_epochs",
        "50",
        "--batch_size",
        "2",
        "--report_every_n_steps",
        "1",
        "--checkpoint_every_n_steps",
        "0",
        "--val_check_interval",
        "100000",
    )
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    checkpoints = [p for p in (output_dir / "checkpoints").iterdir() if p.is_dir()]
    assert len(checkpoints) == 1
    ckpt = checkpoints[0]
    meta = json.loads((ckpt / "metadata.json").read_text())
    assert meta["steps_completed"] >= 2 and meta["trial_id"] is None
    state = torch.load(ckpt / "trainer" / "lightning.pt", weights_only=False)
    assert state["global_step"] == meta["steps_completed"] and state["state_dict"] == {}  # weights live once
    sampler = state["DPODataModule"]["train_sampler"]
    assert state["optimizer_states"] and sampler["position"] == meta["steps_completed"] * 2  # batch_size 2
    assert (ckpt / "trainer" / "rank-00000.pt").is_file()
    AutoModelForCausalLM.from_pretrained(ckpt)  # the policy loads from the checkpoint root
    assert not (output_dir / "final").exists()  # interrupted: no export, no extra validation
    steps = [r["step"] for r in _read_metrics(output_dir) if r["group"] == "validation"]
    assert meta["steps_completed"] not in steps
