"""Two processes on CPU (gloo): plain torchrun, Determined's real launcher run off-cluster, and the strict
fake Core API context under torchrun. Each step is reported once, checkpoints are written by the sharded
protocol (every rank writes its part), and every process exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from contract import stepwise_run_values, write_jsonl

from dpo_lightning.builtin import preference_rows

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tools" / "det_launch_local.py"  # Determined's own launcher, off a cluster
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dist") / "pairs.jsonl", preference_rows(seed=5)["train"][:80])


def _env() -> dict[str, str]:
    # python3 on PATH is this interpreter (Determined's launcher runs `python3 entrypoint.py`)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": path}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _values(tiny_model: Path, data: Path, output_dir: Path, max_steps: int, **overrides) -> dict:
    values = stepwise_run_values(
        tiny_model, data, output_dir, max_steps=max_steps, checkpoint_every_n_steps=2, **overrides
    )
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def _args(tiny_model: Path, data: Path, output_dir: Path, max_steps: int) -> list[str]:
    return [f"--{k}={v}" for k, v in _values(tiny_model, data, output_dir, max_steps).items()]


def _reports(output_dir: Path) -> list[tuple[str, int]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["group"], r["step"]) for r in map(json.loads, lines)]


def _checkpoints(output_dir: Path) -> dict[int, Path]:
    found = {}
    for folder in (output_dir / "checkpoints").iterdir():
        metadata = json.loads((folder / "metadata.json").read_text())
        found[metadata["steps_completed"]] = folder
    return found


def _assert_sharded(folder: Path) -> None:
    """Rank 0 wrote the policy and the Lightning state, each rank its own RNG state."""
    assert (folder / "model.safetensors").is_file() and (folder / "trainer" / "lightning.pt").is_file()
    assert (folder / "trainer" / "rank-00000.pt").is_file() and (folder / "trainer" / "rank-00001.pt").is_file()


def test_torchrun_two_processes_then_resume(tiny_model, data, tmp_path):
    out = tmp_path / "run"
    entry = [str(ROOT / "entrypoint.py"), "--config", "experiments/local-tiny.yaml"]
    _run([*TORCHRUN, *entry, *_args(tiny_model, data, out, 4)])
    assert _reports(out) == [
        ("training", 1),
        ("training", 2),
        ("training", 3),
        ("validation", 3),
        ("training", 4),
        ("validation", 4),
    ]
    checkpoints = _checkpoints(out)
    assert sorted(checkpoints) == [2, 4]
    for folder in checkpoints.values():
        _assert_sharded(folder)

    _run([*TORCHRUN, *entry, *_args(tiny_model, data, out, 6)])  # resumes from step 4 on both ranks
    assert _reports(out)[6:] == [("training", 5), ("training", 6), ("validation", 6)]
    assert sorted(_checkpoints(out)) == [4, 6]  # keep_last_n_checkpoints: 2
    assert (out / "final" / "model.safetensors").is_file()


def test_determined_launcher_off_cluster(tiny_model, data, tmp_path):
    """README's `python tools/det_launch_local.py 2 -- python3 entrypoint.py ...`: two processes under Determined's
    own launcher, each thing logged once (rank 0 speaks; the launcher prefixes lines by rank)."""
    out = tmp_path / "run"
    launcher = [sys.executable, str(LAUNCHER), "2", "--", "python3", "entrypoint.py"]
    done = _run([*launcher, "--config", "experiments/local-tiny.yaml", *_args(tiny_model, data, out, 4)])
    lines = (done.stdout + done.stderr).splitlines()
    assert not [line for line in lines if line.startswith("[rank=1]")], done.stderr[-2000:]
    info = [line.split(" INFO ", 1)[1] for line in lines if " INFO " in line]
    assert info and len(info) == len(set(info))
    reports = _reports(out)
    assert len(reports) == len(set(reports)) and ("training", 4) in reports and ("validation", 4) in reports
    checkpoints = _checkpoints(out)
    assert sorted(checkpoints) == [2, 4]
    for folder in checkpoints.values():
        _assert_sharded(folder)  # both processes wrote their part


def test_the_local_launcher_says_how_to_call_it():
    done = subprocess.run([sys.executable, str(LAUNCHER)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("usage: det_launch_local.py SLOTS --")


def test_fake_core_rank_rules_and_preemption_under_torchrun(tiny_model, data, tmp_path):
    values = _values(tiny_model, data, tmp_path / "out", 20, preempt_check_every_n_steps=5)
    logs = tmp_path / "logs"
    logs.mkdir()
    script = str(ROOT / "tests" / "fake_trial.py")
    _run([*TORCHRUN, script, json.dumps(values), str(tmp_path / "storage"), str(logs), "2"])

    chief, worker = (json.loads((logs / f"rank-{r}.json").read_text()) for r in (0, 1))
    for seen in (chief, worker):
        assert seen["interrupted"] and seen["step"] == 10  # asked at steps 5 and 10; preempted at 10
        assert seen["preempt_calls"] == 2
        assert [m["steps_completed"] for _, m in seen["stored"]] == [2, 4, 6, 8, 10]
    assert chief["stored"] == worker["stored"]  # one checkpoint per step, entered by both ranks
    assert worker["reports"] == [] and worker["progress"] == []  # only the chief reports
    steps = [step for group, step, _ in chief["reports"] if group == "training"]
    assert steps == list(range(1, 11))
    assert 10 not in [step for group, step, _ in chief["reports"] if group == "validation"]
