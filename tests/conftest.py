"""Fixtures shared by the training tests: one tiny random Qwen2 saved to disk per session, and one run of the
shortened online demo on it, for the tests that only read what a trained run wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
from contract import online_demo_values

from dpo_lightning.builtin import build_tiny_model
from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import run_local


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def online_demo(tiny_model, tmp_path_factory) -> Path:
    """The output folder of the shortened online demo (60 steps toward `sentiment_reward`, validated at steps
    0, 30 and 60), trained once per session."""
    out = tmp_path_factory.mktemp("online-demo") / "run"
    run_local(make_config(online_demo_values(tiny_model, out, validate_at_start=True)))
    return out
