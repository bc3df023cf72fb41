"""Run record, checkpoints and the final export, laid out as DESIGN.md's Contracts say.

A checkpoint is a directory: the policy in Hugging Face format at its root, `run_config.json`, `trainer/`
with what exact resume needs, and `metadata.json` written last. A directory without `metadata.json` is
incomplete and never resumed from. Checkpoints are written through Determined's sharded `store_path`
protocol (determined_bridge.py): every rank writes its part into the directory, then Determined writes
metadata.json; on a cluster the directory is named by the checkpoint's uuid, off-cluster too (under
`<output_dir>/checkpoints/`).
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
from dpo_lightning.strategies import full_trained_state, is_fsdp

RUN_CONFIG = "run_config.json"
METADATA = "metadata.json"
CHECKPOINTS = "checkpoints"
LIGHTNING_STATE = "trainer/lightning.pt"
FSDP_STATE = "trainer/fsdp"
RANK_STATE = "trainer/rank-{rank:05d}.pt"
FORMAT = 1
_LIBRARIES = ("torch", "lightning", "transformers", "datasets", "tokenizers", "torchmetrics", "determined")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"dpo_lightning": __version__}
    for name in _LIBRARIES:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_record(cfg: DPOConfig) -> dict[str, Any]:
    """What evaluation and resume need to know about a run: its configuration, versions and commit."""
    return {"config": cfg.to_dict(), "versions": library_versions(), "git_commit": _git_commit()}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def checkpoint_metadata(step: int, trial_id: int | None) -> dict[str, Any]:
    """What every rank passes to `store_path`; Determined writes it to metadata.json once all ranks are done."""
    return {"steps_completed": int(step), "trial_id": trial_id, "format": FORMAT}


def write_checkpoint(folder: Path, *, trainer, module, tokenizer, record: dict[str, Any]) -> None:
    """This rank's part of a checkpoint into `folder`; every rank calls it, in step (FSDP gathers inside).

    Rank 0 writes the trained model (the policy, or a RewardModel) in Hugging Face format, the tokenizer and
    run_config.json at the root, and the Lightning state (optimizer, scheduler, loops, data position) without
    weights; every rank writes its own RNG state and the module's per-rank state (its sampling stream). Under
    FSDP every rank also writes its shard of the weights and optimizer state.
    """
    folder = Path(folder)
    trained_state = full_trained_state(trainer, module)
    state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    (folder / "trainer").mkdir(parents=True, exist_ok=True)
    if is_fsdp(trainer):
        trainer.strategy.save_checkpoint(state, folder / FSDP_STATE)
    elif trainer.is_global_zero:
        state["state_dict"] = {}  # the weights are at the checkpoint root, once
        torch.save(state, folder / LIGHTNING_STATE)
    if trainer.is_global_zero:
        module.save_pretrained(folder, trained_state)
        tokenizer.save_pretrained(folder)
        write_json(folder / RUN_CONFIG, record)
    rank_state = {"rng": rng_state(), "module": module.rank_state_dict()}
    torch.save(rank_state, folder / RANK_STATE.format(rank=trainer.global_rank))


def lightning_state_path(folder: Path) -> Path:
    """What `Trainer.fit(ckpt_path=...)` restores from: a file, or FSDP's sharded directory."""
    sharded = folder / FSDP_STATE
    return sharded if sharded.is_dir() else folder / LIGHTNING_STATE


def restore_rank_state(folder: Path, rank: int, module) -> bool:
    """Put back this rank's RNG state and the module's per-rank state; False when the checkpoint has none for
    this rank."""
    path = folder / RANK_STATE.format(rank=rank)
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)
    set_rng_state(state["rng"])
    module.load_rank_state_dict(state.get("module", {}))
    return True


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """A checkpoint's metadata, or None when the checkpoint is incomplete (metadata.json missing or torn)."""
    try:
        metadata = json.loads((folder / METADATA).read_text())
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) and isinstance(metadata.get("steps_completed"), int) else None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(steps_completed, folder) of every complete checkpoint directly under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        metadata = read_metadata(folder) if folder.is_dir() else None
        if metadata is not None:
            found.append((metadata["steps_completed"], folder))
    return sorted(found, key=lambda item: (item[0], item[1].stat().st_mtime))


def find_resume_checkpoint(path: Path) -> Path | None:
    """The checkpoint to resume from: `path` itself, or the newest complete one under `path` or its
    `checkpoints/` folder (so an output directory works too)."""
    if read_metadata(path) is not None:
        return path
    for root in (path / CHECKPOINTS, path):
        found = complete_checkpoints(root)
        if found:
            return found[-1][1]
    return None


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns what was deleted."""
    old = [folder for _, folder in complete_checkpoints(root)[:-keep]]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def export_final(output_dir: Path, checkpoint: Path) -> Path:
    """`output_dir/final/`: the policy, tokenizer and run_config.json of `checkpoint`, replaced atomically."""
    final = output_dir / "final"
    staging = output_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging, ignore=shutil.ignore_patterns("trainer", METADATA))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final
