"""The Determined experiment files, startup hook and .detignore: valid, complete and consistent.

Every experiment file must pass Determined 0.38.1's own schemas (through the shared checker beside the
repository, when there is one), list every DPOConfig field as a hyperparameter, and build a valid config
from a point of its search space.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpo_lightning.config import FIELDS, make_config
from dpo_lightning.losses import LOSSES

REPO = Path(__file__).resolve().parent.parent
CHECKER = REPO.parent / "shared" / "tools" / "check_expconf.py"
ENTRYPOINT = "python3 -m determined.launch.torch_distributed python3 entrypoint.py"
EXPERIMENT_FILES = sorted([REPO / "experiment.yaml", *(REPO / "experiments").glob("*.yaml")])
SEARCH_TYPES = ("log", "double", "int", "categorical", "const")


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def _load(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path.name}: not a mapping"
    return document


def _by_searcher(name: str) -> list[dict]:
    return [doc for doc in map(_load, EXPERIMENT_FILES) if doc.get("searcher", {}).get("name") == name]


def _is_space(value) -> bool:
    return isinstance(value, dict) and value.get("type") in SEARCH_TYPES


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _point_in(space: dict):
    """One value inside a Determined hyperparameter space (the low end, or the first choice)."""
    kind = space["type"]
    if kind == "const":
        return space["val"]
    if kind == "categorical":
        return space["vals"][0]
    if kind == "log":
        return space["base"] ** space["minval"]
    return space["minval"]  # int, double


def test_experiment_files_are_collected():
    names = _ids(EXPERIMENT_FILES)
    for expected in ("experiment.yaml", "experiments/local-tiny.yaml", "experiments/fsdp.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=_ids(EXPERIMENT_FILES))
def test_passes_determined_schema(path):
    if not CHECKER.is_file():
        pytest.skip(f"Determined schema checker not found at {CHECKER}")
    missing = [m for m in ("jsonschema", "yaml") if not _importable(m)]
    if missing:  # the checker is here, so skipping would hide an invalid file
        pytest.fail(f"the schema check needs {', '.join(missing)}: pip install -r requirements-dev.txt")
    result = subprocess.run(
        [sys.executable, str(CHECKER), str(path)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=_ids(EXPERIMENT_FILES))
def test_hyperparameters_are_exactly_the_config_fields(path):
    hparams = _load(path).get("hyperparameters") or {}
    missing = sorted(set(FIELDS) - set(hparams))
    unknown = sorted(set(hparams) - set(FIELDS))
    assert not missing and not unknown, f"{path.name}: missing {missing}, unknown {unknown}"


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=_ids(EXPERIMENT_FILES))
def test_hyperparameters_build_a_valid_config(path):
    hparams = _load(path)["hyperparameters"]
    values = {k: _point_in(v) if _is_space(v) and k != "columns" else v for k, v in hparams.items()}
    cfg = make_config(values)
    assert cfg.model_name == hparams["model_name"]


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=_ids(EXPERIMENT_FILES))
def test_launches_through_determined_torch_distributed(path):
    document = _load(path)
    assert str(document.get("entrypoint", "")).startswith(ENTRYPOINT)
    assert isinstance(document.get("resources", {}).get("slots_per_trial"), int)
    assert document.get("name") and document.get("description")


def test_adaptive_asha_search_runs_on_optimizer_steps():
    searches = _by_searcher("adaptive_asha")
    assert searches, "no experiment file uses the adaptive_asha searcher"
    for document in searches:
        searcher, hparams = document["searcher"], document["hyperparameters"]
        # searching over losses, the searcher compares a metric every loss defines alike, not their losses
        comparable = "rewards/accuracies" if _is_space(hparams["loss_type"]) else "loss"
        assert searcher["metric"] == comparable and searcher["smaller_is_better"] is (comparable == "loss")
        # the bridge adds `steps_completed` (the optimizer step) to every validation report
        assert searcher["time_metric"] == "steps_completed"
        max_steps = hparams["max_steps"]
        assert isinstance(max_steps, int) and max_steps > 0
        assert searcher["max_time"] == max_steps
        # Determined puts rung k of n at max_time / divisor**(n - 1 - k); the first must see a validation
        first_rung = int(max_steps / searcher.get("divisor", 4) ** (searcher.get("max_rungs", 5) - 1))
        assert 0 < hparams["val_check_interval"] <= first_rung
        assert _is_space(hparams["beta"]) and _is_space(hparams["learning_rate"])
        if _is_space(hparams["loss_type"]):  # each value a loss that needs no other option and has a reference
            for name in hparams["loss_type"]["vals"]:
                make_config({"loss_type": name})
                assert LOSSES[name].reference == "needed" and LOSSES[name].rewards == "log-ratio", name


def test_single_searcher_files_watch_validation_loss():
    for document in _by_searcher("single"):
        assert document["searcher"]["metric"] == "loss", document["name"]
        assert not any(_is_space(v) for k, v in document["hyperparameters"].items() if k != "columns")


def test_fsdp_file_shards_over_several_gpus():
    document = _load(REPO / "experiments" / "fsdp.yaml")
    assert document["hyperparameters"]["strategy"] == "fsdp"
    assert document["resources"]["slots_per_trial"] > 1


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the image's python3: reports versions, records what pip was asked to do.
case "$*" in
  *"import torch"*) [ -n "$FAKE_TORCH" ] && echo "$FAKE_TORCH" || exit 1 ;;
  *"import determined"*) echo 0.38.1 ;;
  "-m pip"*)
    echo "$*" > "$RECORD/args"
    prev=""
    for arg in "$@"; do
      [ "$prev" = "-c" ] && cp "$arg" "$RECORD/constraints"
      [ "$prev" = "-r" ] && cp "$arg" "$RECORD/requirements"
      prev="$arg"
    done ;;
  *) exit 3 ;;
esac
"""


def _run_hook(tmp_path: Path, torch_version: str, **extra_env: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "DET_PYTHON_EXECUTABLE": str(fake), "FAKE_TORCH": torch_version, "RECORD": str(tmp_path)}
    env.update(extra_env)
    # Determined sources the hook from a shell running with `set -e`
    script = f"set -e; source {REPO / 'startup-hook.sh'}; echo hook-done"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env=env)


def test_startup_hook_is_executable_bash():
    hook = REPO / "startup-hook.sh"
    assert hook.is_file() and os.access(hook, os.X_OK)
    assert hook.read_text().startswith("#!/usr/bin/env bash")
    result = subprocess.run(["bash", "-n", str(hook)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in hook.read_text()


def test_startup_hook_installs_requirements_pinned_to_the_image_torch(tmp_path):
    result = _run_hook(tmp_path, "2.6.0+cu124")
    assert result.returncode == 0 and "hook-done" in result.stdout, result.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["-m", "pip", "install"] and "-c" in args and "-r" in args
    constraints = (tmp_path / "constraints").read_text().split()
    assert constraints == ["torch==2.6.0+cu124", "determined==0.38.1"]
    requirements = _expanded((tmp_path / "requirements").read_text())
    assert "lightning" in requirements and "determined" not in requirements  # the harness present wins
    assert not list(REPO.glob("tmp.*")), "the hook's requirements file is left in the context"


def _expanded(requirements: str) -> str:
    """A requirements file's text with its `-r FILE` lines (relative to the repository) replaced by FILE's."""
    lines = []
    for line in requirements.splitlines():
        if line.startswith("-r "):
            lines.append(_expanded((REPO / line.split()[1]).read_text()))
        elif not line.startswith("#"):
            lines.append(line)
    return "\n".join(lines)


def test_startup_hook_adds_the_extra_requirement_files_named_in_the_environment(tmp_path):
    result = _run_hook(tmp_path, "2.6.0+cu124", DPO_LIGHTNING_EXTRA_REQUIREMENTS="requirements-vllm.txt")
    assert result.returncode == 0, result.stderr
    requirements = _expanded((tmp_path / "requirements").read_text())
    assert "vllm>=" in requirements and "lightning" in requirements and "determined" not in requirements
    missing = _run_hook(tmp_path, "2.6.0+cu124", DPO_LIGHTNING_EXTRA_REQUIREMENTS="nope.txt")
    assert missing.returncode != 0 and "nope.txt" in missing.stderr.strip().splitlines()[-1]


def test_startup_hook_fails_in_one_line_without_torch(tmp_path):
    result = _run_hook(tmp_path, "")
    assert result.returncode != 0 and "hook-done" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch" in lines[0], result.stderr
    assert not (tmp_path / "args").exists()


def test_detignore_keeps_the_context_small():
    lines = {line.strip() for line in (REPO / ".detignore").read_text().splitlines()}
    assert {"outputs/", ".venv/"} <= lines
