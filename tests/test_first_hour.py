"""What a user meets in the first hour: a signal stops a run at any moment, a finished run is not run again,
and the configuration a run uses is named at its start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from contract import tiny_run_values, write_jsonl

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config, parse_overrides
from dpo_lightning.determined.bridge import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("first-hour") / "pairs.jsonl", preference_rows(seed=2)["train"][:24])


def _cli(values: dict) -> list[str]:
    return [part for key, value in values.items() for part in (f"--{key}", str(value))]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_loading_stops_the_run_with_one_line(tiny_model, pairs, tmp_path, signum):
    out = tmp_path / "run"
    values = tiny_run_values(tiny_model, pairs, out, max_prompt_length=16, max_steps=200)
    command = [sys.executable, "entrypoint.py", "--config", "experiments/local-tiny.yaml", *_cli(values)]
    # the way a shell starts a background job: SIGINT ignored, which the run must not inherit
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines = []
    for line in process.stderr:  # wait for the run to be under way (the configuration line), then signal it
        lines.append(line)
        if "configuration:" in line:
            break
    started = time.monotonic()
    process.send_signal(signum)
    _, rest = process.communicate(timeout=60)
    assert time.monotonic() - started < 20
    assert process.returncode == 128 + signum
    last = (lines + rest.splitlines())[-1].strip()
    assert last.startswith(f"interrupted by {signal.Signals(signum).name}"), rest[-2000:]
    assert not (out / "final").exists() and not list(out.glob("checkpoints/*/metadata.json"))


def test_a_finished_run_run_again_says_so_and_touches_nothing(tiny_model, pairs, tmp_path, capsys):
    values = tiny_run_values(tiny_model, pairs, tmp_path / "run", max_prompt_length=16, max_steps=3)
    overrides = parse_overrides(_cli(values))
    assert run(ROOT / "experiments/local-tiny.yaml", overrides) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    final_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "final").iterdir()}
    capsys.readouterr()

    assert run(ROOT / "experiments/local-tiny.yaml", overrides) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "already complete at step 3" in said[0] and "max_steps" in said[0], said
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "final").iterdir()} == final_files

    # asking for more steps continues it
    more = parse_overrides(_cli({**values, "max_steps": 5}))
    assert run(ROOT / "experiments/local-tiny.yaml", more) == 0
    assert "already complete" not in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() != metrics


@pytest.mark.parametrize("first_steps", [10, 4], ids=["several-epochs", "mid-epoch"])
def test_an_extended_run_given_its_first_command_again_is_complete_and_untouched(
    tiny_model, pairs, tmp_path, capsys, first_steps
):
    """Trained to step 10 (or 4) with num_epochs 1 and max_steps, the same command without max_steps (num_epochs
    1: one epoch of 3 steps) says the run is complete, touches nothing and exits 0, where it used to fail with
    Lightning's traceback or validate and export again; a num_epochs past the checkpoint continues it."""
    base = tiny_run_values(
        tiny_model, pairs, tmp_path / "run", max_prompt_length=16, num_epochs=1, batch_size=4, val_fraction=0.5
    )
    assert run(ROOT / "experiments/local-tiny.yaml", parse_overrides(_cli({**base, "max_steps": first_steps}))) == 0
    out = tmp_path / "run"
    metrics = (out / "metrics.jsonl").read_bytes()
    files = {p: p.stat().st_mtime_ns for p in [*(out / "final").iterdir(), *(out / "checkpoints").rglob("*")]}
    record = json.loads(next((out / "checkpoints").glob("*/run_config.json")).read_text())
    per_epoch = record["optimizer_steps_per_epoch"]
    assert per_epoch < first_steps
    capsys.readouterr()

    assert run(ROOT / "experiments/local-tiny.yaml", parse_overrides(_cli(base))) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1, said
    assert f"already complete at step {first_steps}, past the step {per_epoch} this configuration ends at" in said[0]
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert {p: p.stat().st_mtime_ns for p in files} == files

    epochs = first_steps // per_epoch + 1
    assert run(ROOT / "experiments/local-tiny.yaml", parse_overrides(_cli({**base, "num_epochs": epochs}))) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == epochs * per_epoch and "already complete" not in capsys.readouterr().out


def test_a_mistyped_local_model_path_is_not_found_with_the_nearest_folder(tmp_path, monkeypatch):
    from dpo_lightning.errors import UserError
    from dpo_lightning.models import resolve_model

    (tmp_path / "outputs" / "builtin-tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as typo:
        resolve_model("outputs/builtin-tinyy", "model_path")
    assert (
        str(typo.value)
        == "model_path: model folder not found: outputs/builtin-tinyy; did you mean outputs/builtin-tiny?"
    )
    with pytest.raises(UserError, match=r"^model_name: model folder not found: outputs/x$"):
        resolve_model("outputs/x")  # `outputs` is a folder here, so this is a path, not a Hub organisation


def test_everything_missing_is_said_at_once_one_line_each(tmp_path):
    command = [sys.executable, "entrypoint.py", "--config", "experiments/local-tiny.yaml"]
    command += ["--model_name", str(tmp_path / "no-model"), "--ref_model_name", str(tmp_path / "no-ref")]
    command += ["--dataset_name", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), done.stderr
    assert "missing.jsonl" in lines[0] and "model_name" in lines[1] and "ref_model_name" in lines[2]
    assert not (tmp_path / "out").exists()


def test_the_default_run_without_network_lists_every_missing_resource_at_once(tmp_path):
    """experiment.yaml's run (tiny_shakespeare, so online: its reward model is needed too) on a machine without
    the Hub or the text's host: the text, the model and the reward model, one line each, in one attempt."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    env.update(DPO_LIGHTNING_CACHE=str(tmp_path / "cache"), DPO_LIGHTNING_TINY_SHAKESPEARE_URL="http://127.0.0.1:1/x")
    command = [sys.executable, "entrypoint.py", "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), done.stderr
    assert lines[0].startswith("error: dataset_name: could not download tiny_shakespeare from http://127.0.0.1:1/x")
    assert lines[1].startswith("error: model_name:") and lines[2].startswith("error: reward_model:")
    assert not (tmp_path / "out").exists()


def test_trackers_see_the_reports_of_metrics_jsonl_and_continue_on_resume(tiny_model, pairs, tmp_path, monkeypatch):
    import csv
    import json

    monkeypatch.setenv("WANDB_MODE", "offline")  # the real service is not contacted
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    values = tiny_run_values(tiny_model, pairs, out, max_prompt_length=16, max_steps=4, report_every_n_steps=1)
    values.update(report_to="tensorboard,csv,wandb", val_check_interval=2)
    assert run(ROOT / "experiments/local-tiny.yaml", parse_overrides(_cli(values))) == 0
    more = {**values, "max_steps": 6}
    assert run(ROOT / "experiments/local-tiny.yaml", parse_overrides(_cli(more))) == 0  # a resume, same folders

    reports = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with (out / "logs" / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(reports)  # one row per report, none repeated, across both launches
    for report, row in zip(reports, rows, strict=True):
        prefix = "train" if report["group"] == "training" else "val"
        assert int(row["step"]) == report["step"]
        assert float(row[f"{prefix}/loss"]) == pytest.approx(report["metrics"]["loss"], rel=1e-6)
    assert {p.name for p in (out / "logs").iterdir() if p.is_dir()} == {"tensorboard", "wandb"}
    assert len(list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # one folder, both launches
    offline_runs = list((out / "logs" / "wandb").glob("offline-run-*"))
    assert offline_runs and (out / "logs" / "wandb_id").read_text().strip() in offline_runs[0].name
    assert len({run.name.split("-")[-1] for run in offline_runs}) == 1  # the resumed launch continued the same run


def test_a_tracker_without_its_package_is_one_line(tiny_model, pairs, tmp_path):
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    values = tiny_run_values(tiny_model, pairs, tmp_path / "run", max_prompt_length=16, report_to="mlflow")
    command = [sys.executable, "entrypoint.py", "--config", "experiments/local-tiny.yaml", *_cli(values)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "error: report_to: mlflow needs its package: pip install mlflow (or leave it out of report_to)"
    )


def test_final_has_a_model_card_and_push_to_hub_uploads_it(tiny_model, pairs, tmp_path, monkeypatch):
    # the Hub client is a stand-in recording its calls (mocked transport): the real service is not contacted
    import json

    import huggingface_hub

    from dpo_lightning.training import publish

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(publish, "hub_reachable", lambda: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = tmp_path / "run"
    values = tiny_run_values(tiny_model, pairs, out, max_prompt_length=16, max_steps=3, push_to_hub="someone/tiny-dpo")
    assert run(ROOT / "experiments/local-tiny.yaml", parse_overrides(_cli(values))) == 0

    card = (out / "final" / "README.md").read_text()
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["group"] == "validation" and last["step"] == 3
    assert card.startswith("---\nbase_model: " + str(tiny_model)) and "library_name: transformers" in card
    assert "offline DPO on preference pairs" in card and "| loss_type | `sigmoid` |" in card
    assert f"| loss | {last['metrics']['loss']:.6g} |" in card and "## Final validation metrics (step 3)" in card
    assert "python " in card and "--push_to_hub someone/tiny-dpo" in card  # the command that trained it
    assert calls[0][:2] == ("create_repo", "someone/tiny-dpo") and calls[0][2]["exist_ok"] is True
    assert calls[1][:2] == ("upload_folder", "someone/tiny-dpo") and "README.md" in calls[1][2]
    assert "model.safetensors" in calls[1][2]


def test_push_to_hub_offline_fails_before_training_in_one_line(tiny_model, pairs, tmp_path):
    values = tiny_run_values(tiny_model, pairs, tmp_path / "run", max_prompt_length=16, push_to_hub="someone/x")
    command = [sys.executable, "entrypoint.py", "--config", "experiments/local-tiny.yaml", *_cli(values)]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert done.stderr.strip() == (
        "error: push_to_hub: cannot upload to someone/x (HF_HUB_OFFLINE is set); leave push_to_hub unset"
    )


def test_mistyped_dataset_and_config_paths_name_the_nearest_file(tmp_path, monkeypatch):
    from dpo_lightning.config import load_config
    from dpo_lightning.data import check_source
    from dpo_lightning.errors import ConfigError, UserError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text("")
    (tmp_path / "prompts.txt").write_text("To be.\n")
    (tmp_path / "run.yaml").write_text("hyperparameters: {}\n")
    for name, nearest in (("data/pair.jsonl", "data/pairs.jsonl"), ("promts.txt", "prompts.txt")):
        with pytest.raises(UserError) as info:
            check_source(make_config({"dataset_name": name}))
        assert str(info.value) == f"dataset file not found: {name}; did you mean {nearest}?"
    with pytest.raises(ConfigError) as info:
        load_config("rnu.yaml")
    assert str(info.value) == "config file not found: rnu.yaml; did you mean run.yaml?"
    with pytest.raises(UserError, match=r"^dataset file not found: data/other.jsonl$"):  # nothing close
        check_source(make_config({"dataset_name": "data/other.jsonl"}))


def test_a_run_logged_to_a_file_is_one_line_per_event(tiny_model, pairs, tmp_path):
    """With its output in a file (no terminal): no carriage-return bar redraws, no Lightning model summary, no
    library warnings about names the user cannot change (LoRA's is_gradient_checkpointing), just the log."""
    values = tiny_run_values(tiny_model, pairs, tmp_path / "run", max_prompt_length=16, max_steps=2, lora_r=4)
    command = [sys.executable, "entrypoint.py", "--config", "experiments/local-tiny.yaml", *_cli(values)]
    with (tmp_path / "log.txt").open("w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text
    for noise in ("Loading weights", "Writing model shards", "Generating train split", "| Name", "FutureWarning"):
        assert noise not in text, noise
    lines = text.strip().splitlines()
    assert lines and all(" INFO " in line or " WARNING " in line for line in lines), text[-3000:]
    assert any("final policy saved" in line for line in lines)


@pytest.mark.parametrize("quiet", [True, False])
def test_a_signal_while_the_interpreter_winds_down_is_one_line(quiet):
    """A Ctrl-C that lands in an atexit handler (a tracker flushing) ends the process with one line and exit 130
    once the scripts have said `quiet_shutdown`; without it Python prints the handler's traceback."""
    script = (
        "import atexit, os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # a background job may start with it ignored
        "from dpo_lightning.console import quiet_shutdown\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
        + ("quiet_shutdown()\n" if quiet else "")
        + "sys.exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if quiet:
        assert done.returncode == 130
        assert done.stderr.strip() == "interrupted by SIGINT while shutting down; what was saved before stays"
    else:  # what the scripts did before
        assert "Traceback" in done.stderr or "KeyboardInterrupt" in done.stderr
