"""What the tests hold the code to, spelled out here rather than imported from the code under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_lightning.builtin import preference_rows

# DESIGN.md's metric names (TRL's); a rename in the code must fail the tests.
PREFERENCE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)
TRAINING_METRICS = {
    "loss",
    *PREFERENCE_METRICS,
    "learning_rate",
    "grad_norm",
    "samples_per_second",
    "tokens_per_second",
    "peak_memory_gb",
}
# Online runs add DESIGN.md's objective/* names, and the share of wall time spent sampling and scoring.
OBJECTIVE_METRICS = {
    "objective/scores_chosen",
    "objective/scores_rejected",
    "objective/scores_margin",
    "objective/kl",
    "objective/eos_rate",
}
TIME_SHARES = {"time/generation_share", "time/scoring_share"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run_values(model: Path, data: Path, output_dir: Path, **overrides) -> dict:
    """Hyperparameters for a seconds-long CPU run of the tiny model."""
    values = dict(
        model_name=str(model),
        dataset_name=str(data),
        max_length=48,
        learning_rate=1e-3,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return values


def stepwise_run_values(model: Path, data: Path, output_dir: Path, **overrides) -> dict:
    """A tiny run that reports every optimizer step and validates every 3, for step-by-step checks."""
    values = dict(batch_size=4, max_prompt_length=16, report_every_n_steps=1, val_check_interval=3)
    return tiny_run_values(model, data, output_dir, **{**values, **overrides})


def online_demo_values(model: Path, output_dir: Path, **overrides) -> dict:
    """The built-in online demo, shortened: 60 steps that make the tiny policy earn the scripted reward."""
    values = dict(
        model_name=str(model),
        dataset_name="builtin:describe-prompts",
        reward_model="dpo_lightning.builtin:sentiment_reward",
        max_length=48,
        max_prompt_length=16,
        max_new_tokens=16,
        batch_size=8,
        learning_rate=5e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_steps=60,
        val_check_interval=30,
        report_every_n_steps=10,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return values


def checkpoints_by_step(output_dir: Path) -> dict[int, Path]:
    """A run's complete checkpoints (those with metadata.json), by the step each holds."""
    found = {}
    for folder in (output_dir / "checkpoints").iterdir():
        if (folder / "metadata.json").is_file():
            found[json.loads((folder / "metadata.json").read_text())["steps_completed"]] = folder
    return found


def run_steps(output_dir) -> dict[tuple[str, int], dict]:
    """A run's metrics.jsonl as (group, step) -> metrics."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["group"], r["step"]): r["metrics"] for r in rows}


COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen")


def assert_same_runs(got: dict, expected: dict, extra=("grad_norm", "padding_share")) -> None:
    """Two runs' reports (`run_steps`) agree at every step on the DPO metrics and `extra` (fp32, relative 1e-5)."""
    assert set(got) == set(expected)
    for key, metrics in expected.items():
        for name in COMPARED + tuple(extra):
            if name in metrics:
                assert got[key][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6), (key, name)


def uneven_pairs(count: int) -> list[dict]:
    """The built-in pairs, lengthened by a varying number of words, so that batches need padding."""
    rows = preference_rows(seed=4)["train"][:count]
    return [
        {**row, "chosen": row["chosen"] + " And warm." * (i % 5), "rejected": row["rejected"] + " So cold." * (i % 3)}
        for i, row in enumerate(rows)
    ]
