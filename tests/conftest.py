"""Fixtures shared by the training tests: one tiny random Qwen2 saved to disk per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_lightning.builtin import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)
