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
from typing import Any, NamedTuple

from dpo_lightning import __version__
from dpo_lightning.integrity import FILES, DamagedCheckpoint, checksum_problem

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
FORMAT = 2  # checkpoint metadata: 2 records every file's checksum (FILES)
RECORD_FORMAT = 2  # run_config.json: 2 adds `format` and `data` (the training data's fingerprint)
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


def run_record(cfg, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What evaluation and resume need to know about a run: its configuration, versions, commit and the
    fingerprint of its training data (`data`), in format RECORD_FORMAT (a record without `format` is 1)."""
    return {
        "format": RECORD_FORMAT,
        "config": cfg.to_dict(),
        "versions": library_versions(),
        "git_commit": _git_commit(),
        "data": data,
    }


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


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not an intact checkpoint, or None: its metadata.json missing or torn (its writing was
    interrupted), or a file that differs from the checksum metadata.json records. A checkpoint written before
    checksums were recorded (format 1) is taken as it is."""
    metadata = read_metadata(folder)
    if metadata is None:
        return "its writing was interrupted (no complete metadata.json)"
    recorded = metadata.get(FILES)
    return None if recorded is None else checksum_problem(folder, recorded)


class ResumeChoice(NamedTuple):
    """The checkpoint a run resumes from (None: start afresh), and the newer ones it skipped, with why."""

    folder: Path | None
    skipped: list[tuple[Path, str]]


def choose_checkpoint(path: Path) -> ResumeChoice:
    """The newest intact checkpoint at `path`: `path` itself when it is a checkpoint, else among its
    `checkpoints/` folder's (every folder there) or the complete checkpoints directly under it. Raises
    `DamagedCheckpoint` when `path` is a checkpoint that is not intact, or holds checkpoints none of which is:
    such a folder never silently restarts from step 0."""
    path = Path(path)
    if (path / METADATA).is_file():
        problem = checkpoint_problem(path)
        if problem:
            raise DamagedCheckpoint(f"damaged checkpoint {path}: {problem}; resume from another one")
        return ResumeChoice(path, [])
    for root, every in ((path / CHECKPOINTS, True), (path, False)):
        candidates = _candidates(root, every)
        skipped = []
        for folder in candidates:
            problem = checkpoint_problem(folder)
            if problem is None:
                return ResumeChoice(folder, skipped)
            skipped.append((folder, problem))
        if skipped:
            newest, why = skipped[0]
            raise DamagedCheckpoint(
                f"{root} holds {len(skipped)} checkpoint folder(s) and none is intact (newest, {newest.name}: {why}); "
                f"move {root} away to start afresh, or give another output_dir"
            )
    return ResumeChoice(None, [])


def _candidates(root: Path, every: bool) -> list[Path]:
    """Checkpoint folders under `root`, newest first: complete ones by step, and with `every` the torn ones
    (no metadata.json) too, by time."""
    if not root.is_dir():
        return []
    complete = [folder for _, folder in reversed(complete_checkpoints(root))]
    if not every:
        return complete
    torn = sorted(
        (f for f in root.iterdir() if f.is_dir() and read_metadata(f) is None), key=lambda f: -f.stat().st_mtime
    )
    return complete + torn


def find_resume_checkpoint(path: Path) -> Path | None:
    """The checkpoint to resume from (`choose_checkpoint`), or None."""
    return choose_checkpoint(path).folder


def read_run_record(path: Path) -> dict[str, Any] | None:
    """A run_config.json's contents, or None when it is missing, unreadable or holds no configuration."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("config"), dict) else None
