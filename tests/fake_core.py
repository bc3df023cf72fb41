"""A strict stand-in for Determined's Core API context: it enforces what the real master and the real
context enforce, and records every call so that tests can check the bridge's behaviour.

Enforced, as Determined 0.38.1 does or its master would:
- metrics are reported from rank 0 only, as a dict of finite Python floats (JSON without NaN), with an int
  `steps_completed`; the same (group, step) reported twice must carry the same values;
- progress is a float in [0, 1], from rank 0;
- `store_path` is called with `shard=True` by every rank in step, with the same metadata on every rank;
  the metadata holds an int `steps_completed` that increases from one checkpoint to the next; the folder is
  named by a uuid and `metadata.json` is written last, by rank 0, after every rank has left the block;
- `should_preempt()` is called by every rank the same number of times (WorkersAskChief).

In several processes (under torchrun) the ranks talk through the already initialised torch.distributed
process group, the way Determined's own DistributedContext talks through its sockets.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CoreRuleBroken(AssertionError):
    """The bridge did something the real Core API or master would refuse."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def _allgather(value: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


@dataclass
class FakeTrain:
    reports: list[tuple[str, int, dict[str, float]]] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)

    def _check(self, group: str, steps_completed: Any, metrics: Any) -> None:
        if _rank() != 0:
            raise CoreRuleBroken(f"{group} metrics reported from rank {_rank()}; only the chief reports")
        if type(steps_completed) is not int or steps_completed < 0:
            raise CoreRuleBroken(f"steps_completed must be a non-negative int, got {steps_completed!r}")
        if not isinstance(metrics, dict) or not metrics:
            raise CoreRuleBroken(f"metrics must be a non-empty dict, got {metrics!r}")
        for name, value in metrics.items():
            if type(value) is not float or not math.isfinite(value):
                raise CoreRuleBroken(f"metric {name} must be a finite Python float, got {value!r}")
        json.dumps(metrics, allow_nan=False)
        for g, step, previous in self.reports:
            if (g, step) == (group, steps_completed) and previous != metrics:
                raise CoreRuleBroken(f"{group} metrics at step {step} reported twice with other values")

    def report_training_metrics(self, steps_completed: int, metrics: dict[str, Any], batch_metrics=None) -> None:
        self._check("training", steps_completed, metrics)
        self.reports.append(("training", steps_completed, dict(metrics)))

    def report_validation_metrics(self, steps_completed: int, metrics: dict[str, Any]) -> None:
        self._check("validation", steps_completed, metrics)
        self.reports.append(("validation", steps_completed, dict(metrics)))

    def report_progress(self, progress: float) -> None:
        if _rank() != 0:
            raise CoreRuleBroken("progress reported from a worker; only the chief reports")
        if type(progress) is not float or not 0.0 <= progress <= 1.0:
            raise CoreRuleBroken(f"progress must be a float in [0, 1], got {progress!r}")
        self.progress.append(progress)

    def group(self, group: str) -> dict[int, dict[str, float]]:
        """The last report of each step in `group` (as Determined keeps it)."""
        return {step: metrics for g, step, metrics in self.reports if g == group}


def _merge(into: dict[str, Any], other: dict[str, Any], where: str = "") -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key, {}), dict):
            _merge(into.setdefault(key, {}), value, f"{where}{key}.")
        elif key in into and into[key] != value:
            raise CoreRuleBroken(
                f"ranks passed different checkpoint metadata for {where}{key}: {into[key]!r}, {value!r}"
            )
        else:
            into[key] = value


@dataclass
class FakeCheckpoint:
    storage: Path
    stored: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @contextlib.contextmanager
    def store_path(self, metadata: dict[str, Any] | None = None, *, shard: bool = False):
        if not shard:
            raise CoreRuleBroken("store_path without shard=True: every rank must take part in a checkpoint")
        metadata = metadata if metadata is not None else {}
        step = metadata.get("steps_completed")
        if type(step) is not int:
            raise CoreRuleBroken(f"checkpoint metadata needs an int steps_completed, got {step!r}")
        if self.stored and step <= self.stored[-1][1]["steps_completed"]:
            raise CoreRuleBroken(f"checkpoint at step {step} after one at {self.stored[-1][1]['steps_completed']}")
        storage_id = _allgather(str(uuid.uuid4()))[0]  # the chief's uuid, as Determined broadcasts it
        path = self.storage / storage_id
        path.mkdir(parents=True, exist_ok=True)
        yield path, storage_id
        # every rank has left the block: its files are written. As Determined does, the ranks' metadata (the
        # caller's dicts, as they are now) merge, and a key two ranks set to different values is an error.
        everyone = _allgather(metadata)
        metadata = {}
        for rank_metadata in everyone:
            _merge(metadata, rank_metadata)
        if _rank() == 0:
            (path / "metadata.json").write_text(json.dumps(metadata))
        _allgather(None)
        self.stored.append((storage_id, metadata))

    @contextlib.contextmanager
    def restore_path(self, storage_id: str):
        path = self.storage / storage_id
        if not (path / "metadata.json").is_file():
            raise CoreRuleBroken(f"restore_path({storage_id}): no such complete checkpoint")
        yield path


@dataclass
class FakePreempt:
    preempt_on_call: int | None = None  # should_preempt() answers True from this (1-based) call on
    calls: int = 0

    def should_preempt(self, auto_ack: bool = True) -> bool:
        self.calls += 1
        counts = _allgather(self.calls)
        if len(set(counts)) != 1:
            raise CoreRuleBroken(f"should_preempt called out of step across ranks: {counts}")
        return self.preempt_on_call is not None and self.calls >= self.preempt_on_call


class FakeCore:
    """`core` as `det.core.init()` returns it, for one trial run."""

    def __init__(self, storage: Path, *, preempt_on_call: int | None = None, after: FakeCore | None = None) -> None:
        """`after`: the same trial's previous run; the master keeps its metrics and checkpoints."""
        self.train = FakeTrain()
        self.checkpoint = FakeCheckpoint(Path(storage))
        self.preempt = FakePreempt(preempt_on_call)
        if after is not None:
            self.train.reports = list(after.train.reports)
            self.checkpoint.stored = list(after.checkpoint.stored)

    def latest_checkpoint(self) -> str | None:
        return self.checkpoint.stored[-1][0] if self.checkpoint.stored else None


def straight_and_resumed(cfg, root: Path, stop_at: int) -> tuple[FakeCore, FakeCore]:
    """The same trial run straight through, and preempted after `stop_at` steps then resumed from its checkpoint
    as Determined would resume it: (the straight run's core, the resumed run's core), for comparing them."""
    from dpo_lightning.determined import bridge

    def trial(core, start=None):
        return bridge.run_trial(core, cfg, start=start, trial_id=1, on_cluster=True)

    straight = FakeCore(root / "straight")
    total = trial(straight).trainer.global_step
    first = FakeCore(root / "resumed", preempt_on_call=stop_at)
    assert trial(first).trainer.global_step == stop_at
    second = FakeCore(root / "resumed", after=first)
    with contextlib.ExitStack() as stack:
        start = bridge.cluster_start_point(second, second.latest_checkpoint(), 1, stack)
        assert trial(second, start=start).trainer.global_step == total
    return straight, second
