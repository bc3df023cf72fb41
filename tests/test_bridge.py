"""The Determined bridge, driven in-process by a strict fake Core API context (tests/fake_core.py):
metrics, sharded checkpoints, preemption, exact resume, warm start, invalid hyperparameters."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import determined as det
import pytest
import torch
from contract import PREFERENCE_METRICS, TRAINING_METRICS, stepwise_run_values, write_jsonl
from fake_core import FakeCore
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.data.datamodule import DPODataModule
from dpo_lightning.determined import bridge
from dpo_lightning.models import load_tokenizer, resolve_model

BATCH = 4  # stepwise_run_values' batch_size


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = preference_rows(seed=4)["train"][:60]
    return write_jsonl(tmp_path_factory.mktemp("bridge") / "pairs.jsonl", rows)


def _values(tiny_model, data, output_dir, **overrides) -> dict:
    values = dict(val_fraction=0.2, preempt_check_every_n_steps=1, lr_scheduler="cosine", warmup_steps=2)
    return stepwise_run_values(tiny_model, data, output_dir, **{**values, **overrides})


@pytest.fixture(scope="module")
def steps_per_epoch(tiny_model, data, tmp_path_factory) -> int:
    cfg = make_config(_values(tiny_model, data, tmp_path_factory.mktemp("count")))
    train_pairs = len(DPODataModule(cfg, load_tokenizer(resolve_model(cfg.model_name))).prepare().train)
    return math.ceil(train_pairs / BATCH)


def _trial(core, cfg, *, start=None, trial_id=1):
    return bridge.run_trial(core, cfg, start=start, trial_id=trial_id, on_cluster=True)


def _resume_point(core, trial_id, stack, latest=None):
    return bridge.cluster_start_point(core, latest or core.latest_checkpoint(), trial_id, stack)


def test_reports_checkpoints_and_progress(tiny_model, data, tmp_path):
    cfg = make_config(_values(tiny_model, data, tmp_path / "out", max_steps=8, checkpoint_every_n_steps=4))
    core = FakeCore(tmp_path / "storage")
    outcome = _trial(core, cfg, trial_id=7)

    assert not outcome.interrupted and outcome.trainer.global_step == 8
    training, validation = core.train.group("training"), core.train.group("validation")
    assert sorted(training) == list(range(1, 9))  # the first report is step 1; every step once
    assert TRAINING_METRICS <= set(training[1])
    assert sorted(validation) == [3, 6, 8]  # every 3 steps and at the end
    assert all(validation[s]["steps_completed"] == float(s) for s in validation)  # adaptive_asha's time_metric
    assert set(PREFERENCE_METRICS) <= set(validation[3])
    assert core.train.progress and core.train.progress[-1] == 1.0

    # every 4 steps; the last step once (never a second checkpoint at step 8)
    assert [m["steps_completed"] for _, m in core.checkpoint.stored] == [4, 8]
    assert all(m["trial_id"] == 7 for _, m in core.checkpoint.stored)
    final = tmp_path / "storage" / core.latest_checkpoint()
    assert {"metadata.json", "config.json", "model.safetensors", "run_config.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()
    }
    assert (final / "trainer" / "lightning.pt").is_file() and (final / "trainer" / "rank-00000.pt").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(final)  # what `det checkpoint download` gives
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, outcome.module.policy.state_dict()[name], rtol=0, atol=0)
    # on a cluster nothing is written beside the checkpoints (the task container's disk is not kept)
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "final").exists()


def test_preemption_checkpoints_and_stops_without_validating(tiny_model, data, tmp_path):
    cfg = make_config(_values(tiny_model, data, tmp_path / "out", max_steps=20, preempt_check_every_n_steps=2))
    core = FakeCore(tmp_path / "storage", preempt_on_call=3)  # asked at steps 2, 4, 6: stop at 6
    outcome = _trial(core, cfg)

    assert outcome.interrupted and outcome.trainer.global_step == 6
    assert core.preempt.calls == 3
    assert [m["steps_completed"] for _, m in core.checkpoint.stored] == [6]
    assert 6 not in core.train.group("validation")  # no extra validation on the way out
    assert max(core.train.group("training")) == 6


def _weights(core, storage: Path) -> dict[str, torch.Tensor]:
    return load_file(storage / core.latest_checkpoint() / "model.safetensors")


@pytest.mark.parametrize(
    ("where", "accumulation"), [("epoch-boundary", 1), ("mid-epoch", 1), ("mid-epoch", 2)], ids=str
)
def test_interrupted_and_resumed_run_equals_a_straight_run(
    tiny_model, data, tmp_path, steps_per_epoch, where, accumulation
):
    per_epoch = steps_per_epoch // accumulation
    total = 2 * per_epoch + 2  # crosses two epoch boundaries
    stop_at = per_epoch if where == "epoch-boundary" else per_epoch // 2 + 1
    values = _values(tiny_model, data, tmp_path / "out", max_steps=total, gradient_accumulation_steps=accumulation)
    cfg = make_config(values)

    straight = FakeCore(tmp_path / "straight")
    _trial(straight, cfg)

    first = FakeCore(tmp_path / "resumed", preempt_on_call=stop_at)
    assert _trial(first, cfg).trainer.global_step == stop_at
    second = FakeCore(tmp_path / "resumed", after=first)
    with contextlib.ExitStack() as stack:
        start = _resume_point(second, 1, stack)
        assert start.step == stop_at and not start.weights_only
        resumed = _trial(second, cfg, start=start)
    assert resumed.trainer.global_step == total

    expected, got = straight.train.group("training"), second.train.group("training")
    assert sorted(got) == sorted(expected) == list(range(1, total + 1))
    for step in expected:
        for name in ("loss", "logps/chosen", "rewards/margins", "learning_rate"):
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-9), (step, name)
    assert min(s for _, s, _ in second.train.reports[len(first.train.reports) :]) > stop_at - 1
    # a validation due at the interrupted step runs on resume, so none is lost
    expected_val, got_val = straight.train.group("validation"), second.train.group("validation")
    assert sorted(got_val) == sorted(expected_val)
    for step in expected_val:
        assert got_val[step]["loss"] == pytest.approx(expected_val[step]["loss"], rel=1e-6), step
    expected_weights, got_weights = _weights(straight, tmp_path / "straight"), _weights(second, tmp_path / "resumed")
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, rtol=1e-6, atol=1e-7)


def test_warm_start_from_another_trial_loads_weights_only(tiny_model, data, tmp_path):
    cfg = make_config(_values(tiny_model, data, tmp_path / "out", max_steps=6, learning_rate=3e-3))
    donor = FakeCore(tmp_path / "storage")
    _trial(donor, cfg, trial_id=1)

    other = FakeCore(tmp_path / "storage")  # another trial: its own metrics and checkpoints
    with contextlib.ExitStack() as stack:
        start = _resume_point(other, 2, stack, latest=donor.latest_checkpoint())
        assert start.weights_only
        outcome = _trial(other, cfg, start=start, trial_id=2)
    assert outcome.trainer.global_step == 6  # a fresh schedule, not the donor's step count
    reports = [r for r in other.train.reports if r[0] == "training"]
    assert reports[0][1] == 1
    # step 1 is measured before its update: a fresh policy equals its reference (margin 0); this one is trained
    assert reports[0][2]["rewards/margins"] > 0.01


# ----------------------------------------------------------------------------- on a (simulated) cluster


class _Trial(SimpleNamespace):
    pass


def _on_cluster(monkeypatch, core, hparams, latest=None, trial_id=11):
    info = _Trial(trial=SimpleNamespace(hparams=hparams, trial_id=trial_id), latest_checkpoint=latest)
    monkeypatch.setattr(bridge, "trial_info", lambda: info)

    @contextlib.contextmanager
    def init(**kwargs):
        yield core

    monkeypatch.setattr(det.core, "init", init)


def test_cluster_run_takes_hparams_and_resumes_from_latest_checkpoint(tiny_model, data, tmp_path, monkeypatch):
    hparams = _values(tiny_model, data, tmp_path / "out", max_steps=6)
    first = FakeCore(tmp_path / "storage", preempt_on_call=4)
    _on_cluster(monkeypatch, first, hparams)
    assert bridge.run(Path("ignored.yaml"), {}) == 0
    [(storage_id, metadata)] = first.checkpoint.stored
    files = metadata.pop("files")  # every file the checkpoint holds, with its size and sha256
    assert metadata == {"steps_completed": 4, "trial_id": 11, "format": 2}
    written = sorted(
        str(p.relative_to(tmp_path / "storage" / storage_id))
        for p in (tmp_path / "storage" / storage_id).rglob("*")
        if p.is_file()
    )
    assert sorted(files) == [name for name in written if name != "metadata.json"]
    model = tmp_path / "storage" / storage_id / "model.safetensors"
    assert files["model.safetensors"] == {
        "bytes": model.stat().st_size,
        "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
    }

    second = FakeCore(tmp_path / "storage", after=first)
    _on_cluster(monkeypatch, second, hparams, latest=first.latest_checkpoint())
    assert bridge.run(Path("ignored.yaml"), {}) == 0
    new = second.train.reports[len(first.train.reports) :]
    assert min(step for group, step, _ in new if group == "training") == 5
    assert [m["steps_completed"] for _, m in second.checkpoint.stored] == [4, 6]


def test_invalid_hyperparameters_raise_invalid_hp_inside_the_core_context(tiny_model, data, tmp_path, monkeypatch):
    hparams = _values(tiny_model, data, tmp_path / "out", max_length=16, max_prompt_length=32)
    entered = []

    @contextlib.contextmanager
    def init(**kwargs):
        entered.append(True)
        yield FakeCore(tmp_path / "storage")

    monkeypatch.setattr(bridge, "trial_info", lambda: _Trial(trial=SimpleNamespace(hparams=hparams, trial_id=1)))
    monkeypatch.setattr(det.core, "init", init)
    with pytest.raises(det.InvalidHP, match="max_prompt_length"):
        bridge.run(Path("ignored.yaml"), {})
    assert entered  # raised inside the block, where Determined turns it into an early exit


# ----------------------------------------------------------------------------- local runs


def _local(tiny_model, data, output_dir, **overrides):
    return make_config(_values(tiny_model, data, output_dir, **overrides))


def _local_steps(output_dir: Path, group: str = "training") -> list[int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["group"] == group]


def test_local_run_resumes_from_newest_complete_checkpoint(tiny_model, data, tmp_path):
    out = tmp_path / "out"
    bridge.run_local(_local(tiny_model, data, out, max_steps=4, checkpoint_every_n_steps=2))
    checkpoints = [p for p in (out / "checkpoints").iterdir() if p.is_dir()]
    assert len(checkpoints) == 2  # steps 2 and 4, keep_last_n_checkpoints=2
    # a torn newest checkpoint (no metadata.json) is never resumed from
    newest = max(checkpoints, key=lambda p: json.loads((p / "metadata.json").read_text())["steps_completed"])
    (newest / "metadata.json").unlink()

    outcome = bridge.run_local(_local(tiny_model, data, out, max_steps=6, checkpoint_every_n_steps=2))
    assert outcome.trainer.global_step == 6
    assert _local_steps(out) == [1, 2, 3, 4, 5, 6]  # resumed after step 2; what the first launch wrote past it went
    assert (out / "final" / "model.safetensors").is_file()


def test_explicit_resume_path_and_config_mismatch(tiny_model, data, tmp_path):
    first = tmp_path / "first"
    bridge.run_local(_local(tiny_model, data, first, max_steps=3))
    (checkpoint,) = [p for p in (first / "checkpoints").iterdir() if p.is_dir()]

    changed = _local(tiny_model, data, tmp_path / "second", max_steps=5, beta=0.5, seed=7)
    with pytest.raises(bridge.UserError) as failure:
        bridge.run_local(changed, resume=str(checkpoint))
    message = str(failure.value)
    assert "beta (0.1 -> 0.5)" in message and "seed" in message and "\n" not in message

    with pytest.raises(bridge.UserError, match="no complete checkpoint"):
        bridge.run_local(changed, resume=str(tmp_path / "nowhere"))

    longer = _local(tiny_model, data, tmp_path / "second", max_steps=5)  # only the run length differs
    outcome = bridge.run_local(longer, resume=str(first))  # an output folder works too
    assert outcome.trainer.global_step == 5 and _local_steps(tmp_path / "second") == [4, 5]


def test_a_run_names_its_configuration_file_and_overrides():
    from dpo_lightning.determined.bridge import configuration_line

    line = configuration_line(Path("experiment.yaml"), {"model_name": "./m", "dataset_name": "./d.jsonl"})
    assert line.startswith("configuration: experiment.yaml, with model_name=./m, dataset_name=./d.jsonl from the")
    assert "every other key from the file" in line
    assert configuration_line(Path("x.yaml"), {}) == "configuration: x.yaml (no command-line overrides)"
