"""What a run survives, each fault made for real: a pickle planted in a checkpoint, a diverging learning rate, two
runs in one folder, checkpoint files cut short or with flipped bytes, a dataset rewritten under a checkpoint, a
run record from before a key existed, a full filesystem (a small tmpfs), signals in the final validation and a
second Ctrl-C, a final/ being replaced, torn checkpoint folders. Each ends in what README's "What a run
survives" table says: one line and a non-zero exit, or a resume to the uninterrupted run's weights and reports,
and nothing already written lost. (A graceful stop's reports: test_combinations.py; FSDP: test_fsdp.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from contract import checkpoints_by_step, stepwise_run_values, write_jsonl
from safetensors.torch import load_file

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import run_local
from dpo_lightning.integrity import replace_folder

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"samples_per_second", "tokens_per_second", "peak_memory_gb", "time/generation_share", "time/scoring_share"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("faults") / "pairs.jsonl", preference_rows(seed=6)["train"][:60])


def _values(tiny_model, pairs, out: Path, **overrides) -> dict:
    """Six steps of four pairs, reports every two, checkpoints every two, validation every three."""
    values = dict(max_steps=6, checkpoint_every_n_steps=2, report_every_n_steps=2, keep_last_n_checkpoints=3)
    return stepwise_run_values(tiny_model, pairs, out, **{**values, **overrides})


def _entry(values: dict, moment: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """entrypoint.py (or tests/crash.py with a fault `moment`) on local-tiny.yaml and `values`."""
    script = [str(ROOT / "tests" / "crash.py"), moment] if moment else [str(ROOT / "entrypoint.py")]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}
    args = ["--config", "experiments/local-tiny.yaml", *[f"--{k}={v}" for k, v in values.items()]]
    return subprocess.run(
        [sys.executable, *script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _one_error_line(done: subprocess.CompletedProcess, *words: str) -> str:
    """The run's only line that is not a log line; it names `words`, and no traceback was printed."""
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line[:2].isdigit()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _reports(out: Path) -> list[tuple[str, int, dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["group"], r["step"], {k: v for k, v in r["metrics"].items() if k not in TIMINGS}) for r in rows]


def _reseal(folder: Path, name: str) -> None:
    """Record `name`'s present bytes in the checkpoint's metadata.json, as an attacker who also rewrites the
    checksums would: only what loading refuses stands in the way then."""
    metadata = json.loads((folder / "metadata.json").read_text())
    path = folder / name
    metadata["files"][name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (folder / "metadata.json").write_text(json.dumps(metadata))


@pytest.fixture(scope="module")
def straight(tiny_model, pairs, tmp_path_factory) -> Path:
    """The uninterrupted six-step run every resumed run here must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert _entry(_values(tiny_model, pairs, out)).returncode == 0
    return out


def _killed_after_step_4(tiny_model, pairs, out: Path, **overrides) -> dict[int, Path]:
    """The six-step run SIGKILLed once its step-4 checkpoint is complete: its checkpoints (steps 2 and 4)."""
    assert _entry(_values(tiny_model, pairs, out, **overrides), moment="checkpoint:4").returncode == -9
    return checkpoints_by_step(out)


def _assert_equals_straight(out: Path, straight: Path) -> None:
    assert _reports(out) == _reports(straight)
    got, want = load_file(out / "final" / "model.safetensors"), load_file(straight / "final" / "model.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------- 1. planted code


class Payload:
    """What an attacker plants: unpickling it creates a file (where a real one would run a shell)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("name", ["trainer/rank-00000.pt", "trainer/lightning.pt"])
@pytest.mark.parametrize("how", ["automatic", "--resume"])
def test_a_pickle_planted_in_a_checkpoint_never_runs(tiny_model, pairs, tmp_path, name, how):
    out = tmp_path / "run"
    assert _entry(_values(tiny_model, pairs, out, max_steps=4)).returncode == 0
    newest = checkpoints_by_step(out)[4]
    marker = tmp_path / "PLANTED-CODE-RAN"
    torch.save({"state": Payload(marker)}, newest / name)
    _reseal(newest, name)
    torch.load(newest / name, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()

    resume = {"resume": str(newest)} if how == "--resume" else {}
    done = _entry({**_values(tiny_model, pairs, out), **resume})
    assert done.returncode == 2
    _one_error_line(done, "damaged checkpoint", name, "nothing in it was run")
    assert not marker.exists()
    assert "mode:" not in done.stderr  # refused before the data and the models load


def test_a_sharded_checkpoint_with_planted_objects_is_refused_unrun(tmp_path):
    """torch's own reader unpickles a distributed checkpoint's `.metadata` and its non-tensor items with plain
    pickle; this project's reader and planner refuse both, as they refuse any object but the format's own."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from dpo_lightning.integrity import DamagedCheckpoint
    from dpo_lightning.training.fsdp import load_sharded

    marker = tmp_path / "PLANTED-CODE-RAN"
    state = {"state_dict": {"w": torch.randn(3, 4)}, "extra": {"lr": 0.1}}
    dcp.save(state, checkpoint_id=str(tmp_path / "good"))
    restored = {"state_dict": {"w": torch.zeros(3, 4)}, "extra": {"lr": 0.0}}
    load_sharded(restored, tmp_path / "good")  # the format's own content loads
    assert torch.equal(restored["state_dict"]["w"], state["state_dict"]["w"]) and restored["extra"]["lr"] == 0.1

    shutil.copytree(tmp_path / "good", tmp_path / "metadata")
    (tmp_path / "metadata" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DamagedCheckpoint, match="not a checkpoint's metadata"):
        load_sharded(restored, tmp_path / "metadata")
    dcp.save({**state, "extra": {"lr": Payload(marker)}}, checkpoint_id=str(tmp_path / "item"))
    with pytest.raises(DamagedCheckpoint, match="extra.lr is not a plain value"):
        load_sharded(restored, tmp_path / "item")
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. divergence


def test_a_diverging_run_stops_at_the_step_and_exports_nothing(tiny_model, pairs, tmp_path):
    out = tmp_path / "run"
    done = _entry(_values(tiny_model, pairs, out, learning_rate=1e30, checkpoint_every_n_steps=1))
    assert done.returncode == 3
    line = _one_error_line(done, "training diverged at step", "not finite", "lower learning_rate")
    step = int(line.split("at step ")[1].split(":")[0])
    assert not (out / "final").exists()
    assert sorted(checkpoints_by_step(out)) == list(range(max(1, step - 3), step))  # the last good ones, kept
    weights = load_file(checkpoints_by_step(out)[step - 1] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    reports = [s for _, s, _ in _reports(out)] if (out / "metrics.jsonl").exists() else []
    assert all(s < step for s in reports)  # nothing reported at or past the step that diverged


def test_a_policy_whose_gradients_vanish_is_warned_about(tiny_model, pairs, tmp_path):
    done = _entry(_values(tiny_model, pairs, tmp_path / "run", learning_rate=1e3, max_steps=16))
    assert done.returncode == 0
    warnings = [line for line in done.stderr.splitlines() if "stopped learning" in line]
    assert len(warnings) == 1 and "grad_norm has been exactly 0 for 10 steps" in warnings[0]


def test_a_run_resumes_from_its_last_good_checkpoint_at_a_lower_learning_rate(tiny_model, pairs, straight, tmp_path):
    """What README tells a user after a divergence works: the schedule goes on, at the new rate."""
    out = tmp_path / "run"
    _killed_after_step_4(tiny_model, pairs, out, learning_rate=5e-3)
    assert _entry(_values(tiny_model, pairs, out)).returncode == 0  # learning_rate 1e-3 now
    rates = {step: m["learning_rate"] for group, step, m in _reports(out) if group == "training"}
    straight_rates = {step: m["learning_rate"] for group, step, m in _reports(straight) if group == "training"}
    assert rates[6] == pytest.approx(straight_rates[6]) and rates[2] == pytest.approx(5 * straight_rates[2])


# ----------------------------------------------------------------------------- 3. one run per folder


def test_a_second_run_in_the_same_folder_is_refused_and_the_first_is_untouched(tiny_model, pairs, tmp_path):
    out = tmp_path / "run"
    values = _values(tiny_model, pairs, out, max_steps=100000, checkpoint_every_n_steps=4, val_check_interval=100000)
    script = [sys.executable, str(ROOT / "entrypoint.py"), "--config", "experiments/local-tiny.yaml"]
    args = [f"--{k}={v}" for k, v in values.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([*script, *args], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _checkpoints_or_none(out):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    for other in (values, {**values, "beta": 0.5}):  # the same settings, or others
        second = _entry(other, timeout=60)
        assert second.returncode == 2
        _one_error_line(second, str(out), "in use by another run", f"pid {first.pid}")
        assert "mode:" not in second.stderr  # refused before the data and the models
    assert first.poll() is None  # the first run trains on
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0
    steps = [step for group, step, _ in _reports(out) if group == "training"]
    assert steps == list(range(2, steps[-1] + 1, 2))  # one run's reports, each once
    stopped_at = max(checkpoints_by_step(out))

    # a run killed with SIGKILL holds nothing: the next one there starts at once
    killed = subprocess.Popen([*script, *args], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    while max(checkpoints_by_step(out)) <= stopped_at:
        assert killed.poll() is None and time.monotonic() < deadline + 120
        time.sleep(0.2)
    killed.kill()
    killed.wait()
    resumed = _entry({**values, "max_steps": max(checkpoints_by_step(out)) + 2})
    assert resumed.returncode == 0 and "in use" not in resumed.stderr, resumed.stderr[-2000:]


def _checkpoints_or_none(out: Path) -> dict[int, Path]:
    return checkpoints_by_step(out) if (out / "checkpoints").is_dir() else {}


# ----------------------------------------------------------------------------- 4, 5. damaged checkpoints


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
    path.write_bytes(bytes(data))


DAMAGE = {
    "model.safetensors cut": ("model.safetensors", _cut),
    "lightning.pt cut": ("trainer/lightning.pt", _cut),
    "rank file cut": ("trainer/rank-00000.pt", _cut),
    "64 bytes flipped": ("model.safetensors", _flip),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(
    tiny_model, pairs, straight, tmp_path, damage, caplog
):
    out = tmp_path / "run"
    damaged = _killed_after_step_4(tiny_model, pairs, out)[4]
    name, spoil = DAMAGE[damage]
    spoil(damaged / name)
    with caplog.at_level("WARNING", logger="dpo_lightning.determined.bridge"):
        run_local(make_config(_values(tiny_model, pairs, out)))  # resumes from step 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped checkpoint")]
    assert len(skipped) == 1 and str(damaged) in skipped[0] and name in skipped[0]
    _assert_equals_straight(out, straight)
    assert not damaged.exists()  # removed once a later checkpoint was complete


def test_a_folder_whose_every_checkpoint_is_damaged_is_refused(tiny_model, pairs, tmp_path):
    out = tmp_path / "run"
    assert _entry(_values(tiny_model, pairs, out, max_steps=4)).returncode == 0
    for folder in checkpoints_by_step(out).values():
        _flip(folder / "model.safetensors")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    done = _entry(_values(tiny_model, pairs, out))
    assert done.returncode == 2
    _one_error_line(done, "none is intact", "model.safetensors does not match its checksum")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_torn_checkpoint_folders_are_removed_once_a_later_one_is_complete(tiny_model, pairs, straight, tmp_path):
    out = tmp_path / "run"
    torn = out / "checkpoints" / "torn-by-a-kill"
    shutil.copytree(_killed_after_step_4(tiny_model, pairs, out)[4], torn)
    (torn / "metadata.json").unlink()
    run_local(make_config(_values(tiny_model, pairs, out)))
    assert not torn.exists()
    _assert_equals_straight(out, straight)


# ----------------------------------------------------------------------------- 6. the data


def test_a_dataset_changed_under_a_checkpoint_is_refused(tiny_model, tmp_path):
    rows = preference_rows(seed=6)["train"][:60]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert _entry(_values(tiny_model, data, out, max_steps=4)).returncode == 0
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows[:30]]
    write_jsonl(data, swapped)
    done = _entry(_values(tiny_model, data, out))
    assert done.returncode == 2
    _one_error_line(done, "cannot resume", str(data), "changed since the checkpoint")
    assert "mode:" not in done.stderr  # refused before the models load


# ----------------------------------------------------------------------------- 8. older run records


def test_a_run_record_from_before_a_key_existed_resumes_with_its_default(tiny_model, pairs, straight, tmp_path, caplog):
    out = tmp_path / "run"
    for folder in _killed_after_step_4(tiny_model, pairs, out).values():
        record = json.loads((folder / "run_config.json").read_text())
        for key in ("discopop_tau", "simpo_gamma"):
            del record["config"][key]
        del record["format"]
        (folder / "run_config.json").write_text(json.dumps(record))
        _reseal(folder, "run_config.json")
    with pytest.raises(Exception, match=r"discopop_tau \(0.05, the default -> 0.2\)"):
        run_local(make_config(_values(tiny_model, pairs, out, discopop_tau=0.2)))
    with caplog.at_level("INFO", logger="dpo_lightning.determined.bridge"):
        run_local(make_config(_values(tiny_model, pairs, out)))
    assert any("predates discopop_tau, simpo_gamma: read with their defaults" in r.getMessage() for r in caplog.records)
    _assert_equals_straight(out, straight)


# ----------------------------------------------------------------------------- 9. full disks and signals


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 1.6 MB (tmpfs): room for the run's first checkpoint, not its second."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes_elsewhere(
    tiny_model, pairs, straight, small_disk, tmp_path
):
    out = small_disk / "run"
    done = _entry(_values(tiny_model, pairs, out, report_to="none"))
    assert done.returncode == 2
    _one_error_line(done, "no space left on the device writing the checkpoint of step 4", "step 2 is intact")
    assert (
        sorted(checkpoints_by_step(out)) == [2] and len(list((out / "checkpoints").iterdir())) == 1
    )  # the torn one went
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    assert _entry(_values(tiny_model, pairs, moved, report_to="none")).returncode == 0
    _assert_equals_straight(moved, straight)


def test_a_full_disk_at_the_export_keeps_the_old_final(tiny_model, pairs, tmp_path):
    out = tmp_path / "run"
    assert _entry(_values(tiny_model, pairs, out, max_steps=4)).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir() if p.is_file()}
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.copytree(out, mount / "run")
        done = _entry(_values(tiny_model, pairs, mount / "run"), moment="fill-disk:export")
        assert done.returncode == 2
        _one_error_line(done, "no space left on the device writing the final model", "final/ is as it was")
        after = {p.name: p.read_bytes() for p in (mount / "run" / "final").iterdir() if p.is_file()}
        assert after == before and not (mount / "run" / ".final.partial").exists()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_in_the_final_validation_is_one_line_and_a_rerun_finishes(
    tiny_model, pairs, straight, tmp_path, signal_name, code
):
    """Validation every 4 steps: the run's end (step 6) validates after training, where the signal lands."""
    out = tmp_path / "run"
    done = _entry(_values(tiny_model, pairs, out, val_check_interval=4), moment=f"final-validation:{signal_name}")
    assert done.returncode == code
    _one_error_line(done, f"interrupted by {signal_name}")
    assert not (out / "final").exists() and 6 in checkpoints_by_step(out)
    assert _entry(_values(tiny_model, pairs, out, val_check_interval=4)).returncode == 0
    assert [s for group, s, _ in _reports(out) if group == "validation"] == [4, 6]
    got, want = load_file(out / "final" / "model.safetensors"), load_file(straight / "final" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_second_ctrl_c_is_one_line_that_claims_no_checkpoint(tiny_model, pairs, straight, tmp_path):
    out = tmp_path / "run"
    done = _entry(_values(tiny_model, pairs, out), moment="twice:3")
    assert done.returncode == 130
    line = _one_error_line(done, "interrupted by SIGINT a second time", "before the checkpoint of this step")
    assert "checkpoint saved" not in done.stderr and "saved" not in line
    assert sorted(checkpoints_by_step(out)) == [2]
    assert _entry(_values(tiny_model, pairs, out)).returncode == 0
    _assert_equals_straight(out, straight)


def test_final_is_replaced_in_one_step_never_absent(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_text("0")
    seen_missing = []
    stop = threading.Event()

    def watch() -> None:
        # The name `final` must always open. (A lookup of final/model.safetensors may still meet the old folder
        # just as its leftover is removed: a reader inside the old folder, not an absent one.)
        while not stop.is_set():
            try:
                os.close(os.open(final, os.O_RDONLY | os.O_DIRECTORY))
            except FileNotFoundError:
                seen_missing.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for version in range(1, 300):
            staging = tmp_path / ".final.partial"
            staging.mkdir()
            (staging / "model.safetensors").write_text(str(version))
            replace_folder(staging, final)
    finally:
        stop.set()
        watcher.join()
    assert not seen_missing
    assert (final / "model.safetensors").read_text() == "299" and not (tmp_path / ".final.partial").exists()
