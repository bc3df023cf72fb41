"""Run record, checkpoints and the final export, laid out as DESIGN.md's Contracts say.

A checkpoint is a directory: the policy in Hugging Face format at its root, `run_config.json`, `trainer/`
with what exact resume needs, and `metadata.json` written last. A directory without `metadata.json` is
incomplete and never resumed from; local checkpoints are staged under a temporary name and renamed into
place so that an interruption never leaves a half-written directory under a real name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from dpo_lightning import __version__
from dpo_lightning.config import DPOConfig

RUN_CONFIG = "run_config.json"
METADATA = "metadata.json"
TRAINER_STATE = "trainer/state.pt"
_LIBRARIES = ("torch", "lightning", "transformers", "datasets", "tokenizers", "torchmetrics", "determined")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"dpo_lightning": __version__}
    for name in _LIBRARIES:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_record(cfg: DPOConfig) -> dict[str, Any]:
    """What evaluation and resume need to know about a run: its configuration, versions and commit."""
    return {"config": cfg.to_dict(), "versions": _versions(), "git_commit": _git_commit()}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_pretrained(folder: Path, policy: torch.nn.Module, tokenizer, record: dict[str, Any]) -> None:
    policy.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_json(folder / RUN_CONFIG, record)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def trainer_state(trainer, datamodule) -> dict[str, Any]:
    """Optimizer, scheduler, loop progress, data position and RNG: everything but the weights.

    The policy's weights are stored once, as safetensors at the checkpoint root; the reference is rebuilt
    from the run's configuration, so neither goes into this file.
    """
    state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    state.pop("state_dict", None)
    sampler = getattr(datamodule, "train_sampler", None)
    state["data_sampler"] = sampler.state_dict() if sampler is not None else None
    state["rng"] = rng_state()
    return state


def save_checkpoint(root: Path, step: int, trainer, module, tokenizer, record: dict[str, Any]) -> Path:
    """A complete local checkpoint at `root/step-<step>`; returns its path."""
    final = root / f"step-{step:08d}"
    staging = root / f".step-{step:08d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(staging, module.policy, tokenizer, record)
    (staging / "trainer").mkdir(parents=True, exist_ok=True)
    torch.save(trainer_state(trainer, trainer.datamodule), staging / TRAINER_STATE)
    write_json(staging / METADATA, {"steps_completed": step, "trial_id": None, "format": 1})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root` that have metadata.json, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / METADATA).is_file()]
    return sorted(found, key=lambda p: json.loads((p / METADATA).read_text())["steps_completed"])


def prune_checkpoints(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def export_final(output_dir: Path, policy: torch.nn.Module, tokenizer, record: dict[str, Any]) -> Path:
    """The trained policy at `output_dir/final/`, replaced atomically."""
    final = output_dir / "final"
    staging = output_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(staging, policy, tokenizer, record)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final
