"""What a run writes where: the on-disk layout every layer agrees on (training writes it; evaluation, resume
and the Determined bridge read it), as the README's "Outputs and checkpoints" describes.

A checkpoint is a directory: the trained model in Hugging Face format at its root, `run_config.json`,
`trainer/` with what exact resume needs, and `metadata.json` written last. A directory without
`metadata.json` is incomplete and never resumed from. Off-cluster checkpoints live under
`<output_dir>/checkpoints/`, the final model under `<output_dir>/final/`, and every report in
`<output_dir>/metrics.jsonl`.
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from dpo_lightning import __version__

RUN_CONFIG = "run_config.json"
METADATA = "metadata.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
COMPLETED = "completed.json"  # in final/: the step the finished run ended at (a re-run then says it is done)
MERGED = "merged"  # under final/: a LoRA run's adapters merged into the base (export_merged)
METRICS = "metrics.jsonl"
LIGHTNING_STATE = "trainer/lightning.pt"
FSDP_STATE = "trainer/fsdp"
RANK_STATE = "trainer/rank-{rank:05d}.pt"
REFERENCE = "trainer/reference"  # a TR-DPO run's reference as it has moved, in Hugging Face format
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


def run_record(cfg) -> dict[str, Any]:
    """What evaluation and resume need to know about a run: its configuration, versions and commit."""
    return {"config": cfg.to_dict(), "versions": library_versions(), "git_commit": _git_commit()}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


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


def read_run_record(path: Path) -> dict[str, Any] | None:
    """A run_config.json's contents, or None when it is missing, unreadable or holds no configuration."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("config"), dict) else None
