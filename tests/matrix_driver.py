"""Runs combination-matrix configurations (tests/test_matrix.py) in this process, one after another: each
straight to the end, then again from what a crash after its first checkpoint leaves, and resumed. Under
torchrun every rank runs every configuration, and the runs after the first reuse the process group the
first one set up.

usage: matrix_driver.py PLAN.json   (a list of {"name", "values", "crash_after", and optionally "phases":
        ["straight"] or ["resumed"] for one of the two runs only}; writes into each output_dir)

Next to each configuration's `straight/` and `resumed/` folders it writes `outcome.json`: the step the second
run resumed from, or the error that stopped the configuration (under torchrun an error stops the launch,
since the other ranks would wait for the failed one; each rank's error is then in error-rank-N.txt).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import local_start_point, resume_choice, run_local
from dpo_lightning.layout import CHECKPOINTS, FINAL, read_metadata

STRAIGHT, RESUMED, OUTCOME = "straight", "resumed", "outcome.json"


def _is_chief() -> bool:
    # from the launcher, not the process group: a run may end with none (vLLM's engine tears its own down)
    return int(os.environ.get("RANK", "0")) == 0


def _chief_then_all(work, done: Path, timeout_s: float = 300.0) -> None:
    """`work` on the chief; every process goes on once it has finished (a marker file, not a collective)."""
    if _is_chief():
        work()
        done.touch()
        return
    deadline = time.monotonic() + timeout_s
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the chief did not finish {done.name} in {timeout_s:.0f} s")
        time.sleep(0.1)


def leave_as_a_crash_would(straight: Path, crashed: Path, step: int) -> None:
    """`straight`'s folder as a crash after the checkpoint of `step` leaves it: later checkpoints and final/
    never completed, while metrics.jsonl (and any tracker) already holds the reports past `step`."""
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / FINAL)
    for folder in (crashed / CHECKPOINTS).iterdir():
        metadata = read_metadata(folder)
        if metadata is None or metadata["steps_completed"] > step:
            shutil.rmtree(folder)


def run_straight(values: dict, crash_after: int) -> None:
    """The straight run, then a copy of its folder as a crash after the checkpoint of `crash_after` leaves it."""
    root = Path(values["output_dir"])
    run_local(make_config({**values, "output_dir": str(root / STRAIGHT)}))
    _chief_then_all(lambda: leave_as_a_crash_would(root / STRAIGHT, root / RESUMED, crash_after), root / "crashed")


def run_resumed(values: dict) -> int | None:
    """The crashed copy resumed to the end; the step it resumed from."""
    cfg = make_config({**values, "output_dir": str(Path(values["output_dir"]) / RESUMED)})
    start = local_start_point(cfg, resume_choice(cfg, None))
    run_local(cfg)
    return None if start is None else start.step


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    for entry in plan:
        root = Path(entry["values"]["output_dir"])
        root.mkdir(parents=True, exist_ok=True)
        phases = entry.get("phases", ["straight", "resumed"])
        outcome = {"name": entry["name"]}
        try:
            if "straight" in phases:
                run_straight(entry["values"], entry["crash_after"])
            if "resumed" in phases:
                outcome["resumed_from"] = run_resumed(entry["values"])
        except Exception:
            outcome["error"] = traceback.format_exc()
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                (root / f"error-rank-{os.environ['RANK']}.txt").write_text(outcome["error"])
                raise
        if _is_chief() and ("resumed" in phases or "error" in outcome):
            (root / OUTCOME).write_text(json.dumps(outcome))


if __name__ == "__main__":
    main()
