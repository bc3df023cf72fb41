"""Runs combination-matrix configurations (tests/test_matrix.py) in this process, one after another: each
straight to the end, then again from what a crash after its first checkpoint leaves, and resumed. Under
torchrun every rank runs every configuration, the ranks of one launch sharing one process group.

usage: matrix_driver.py PLAN.json   (a list of {"name", "values", "crash_after"}; writes into each output_dir)

Next to each configuration's `straight/` and `resumed/` folders it writes `outcome.json`: the step the second
run resumed from, or the error that stopped the configuration (under torchrun an error stops the launch,
since the other ranks would wait for the failed one).
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import local_start_point, run_local
from dpo_lightning.layout import CHECKPOINTS, FINAL, find_resume_checkpoint, read_metadata

STRAIGHT, RESUMED, OUTCOME = "straight", "resumed", "outcome.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_chief() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def leave_as_a_crash_would(straight: Path, crashed: Path, step: int) -> None:
    """`straight`'s folder as a crash after the checkpoint of `step` leaves it: later checkpoints and final/
    never completed, while metrics.jsonl (and any tracker) already holds the reports past `step`."""
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / FINAL)
    for folder in (crashed / CHECKPOINTS).iterdir():
        metadata = read_metadata(folder)
        if metadata is None or metadata["steps_completed"] > step:
            shutil.rmtree(folder)


def run_configuration(name: str, values: dict, crash_after: int) -> dict:
    """The straight run, the crash copy and the resumed run of one configuration; what the resume started from."""
    root = Path(values["output_dir"])
    run_local(make_config({**values, "output_dir": str(root / STRAIGHT)}))
    _barrier()
    if _is_chief():
        leave_as_a_crash_would(root / STRAIGHT, root / RESUMED, crash_after)
    _barrier()
    cfg = make_config({**values, "output_dir": str(root / RESUMED)})
    start = local_start_point(cfg, None)
    run_local(cfg)
    assert find_resume_checkpoint(root / RESUMED) is not None
    return {"name": name, "resumed_from": None if start is None else start.step}


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    for entry in plan:
        root = Path(entry["values"]["output_dir"])
        root.mkdir(parents=True, exist_ok=True)
        try:
            outcome = run_configuration(entry["name"], entry["values"], entry["crash_after"])
        except Exception:
            outcome = {"name": entry["name"], "error": traceback.format_exc()}
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                (root / OUTCOME).write_text(json.dumps(outcome))
                raise
        if _is_chief():
            (root / OUTCOME).write_text(json.dumps(outcome))
        _barrier()


if __name__ == "__main__":
    main()
