"""Fixtures shared by the training tests: one tiny random Qwen2 saved to disk per session, and one run of the
shortened online demo on it, for the tests that only read what a trained run wrote."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Every cache the code under test writes (built-in model, precomputed log-probs, Hugging Face hub and dataset
# caches) points into one temporary folder for the session, set before anything is imported: the tests pass on
# a fresh machine and never fill, or rely on, the user's caches. Subprocesses inherit it.
_CACHES = Path(tempfile.mkdtemp(prefix="dpo-lightning-test-caches-"))
for _name, _sub in (("DPO_LIGHTNING_CACHE", "dpo_lightning"), ("HF_HOME", "huggingface")):
    os.environ[_name] = str(_CACHES / _sub)
os.environ["HF_DATASETS_CACHE"] = str(_CACHES / "huggingface" / "datasets")

import pytest  # noqa: E402
from contract import online_demo_values  # noqa: E402

from dpo_lightning.builtin import build_tiny_model  # noqa: E402
from dpo_lightning.config import make_config  # noqa: E402
from dpo_lightning.determined.bridge import run_local  # noqa: E402


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
