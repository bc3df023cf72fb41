"""`tools/det_launch_local.py`: Determined's own launcher runs a two-process trial on this machine, as README
says, with no cluster and nothing outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from contract import tiny_run_values, write_jsonl

from dpo_lightning.builtin import preference_rows
from dpo_lightning.layout import RANK_STATE, complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def test_determined_s_launcher_runs_two_processes_off_cluster(tiny_model, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(seed=3)["train"][:16])
    values = tiny_run_values(tiny_model, pairs, tmp_path / "out", max_prompt_length=16, max_steps=2, batch_size=2)
    args = [part for key, value in values.items() for part in (f"--{key}", str(value))]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    entry = ["python3", "entrypoint.py", "--config", "experiments/local-tiny.yaml", *args]
    command = [sys.executable, "tools/det_launch_local.py", "2", "--", *entry]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (step, folder), *_ = reversed(complete_checkpoints(tmp_path / "out" / "checkpoints"))
    assert step == 2
    assert all((folder / RANK_STATE.format(rank=rank)).is_file() for rank in (0, 1))  # two processes wrote
    # each thing said once: rank 0 logs, the other ranks only errors (the launcher prefixes lines by rank)
    lines = (done.stdout + done.stderr).splitlines()
    assert not [line for line in lines if line.startswith("[rank=1]")], done.stderr[-2000:]
    info = [line.split(" INFO ", 1)[1] for line in lines if " INFO " in line]
    assert info and len(info) == len(set(info))


def test_the_launcher_says_how_to_call_it():
    done = subprocess.run([sys.executable, "tools/det_launch_local.py"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("usage: det_launch_local.py SLOTS --")
