"""A run's link to a Determined Core API context: the `training.session.Storage` of its checkpoints,
metrics, progress and preemption.

The context is duck-typed (`.train`, `.checkpoint`, `.preempt`): Determined's real one on a cluster, its
dummy one off-cluster (checkpoints under `<output_dir>/checkpoints/`), a strict fake in the tests. Only
`bridge.py` builds one, so only that module imports `determined`. What the Core API asks of the calls
(rank 0 reports, every rank in `store_path` and `should_preempt`) is kept by the session that calls them.
"""

from __future__ import annotations

import logging
import math

from dpo_lightning.config import DPOConfig
from dpo_lightning.training.run import StartPoint
from dpo_lightning.training.session import TrainingSession
from dpo_lightning.training.sinks import Report

log = logging.getLogger(__name__)

# The validation metric adaptive_asha's `time_metric` names: how far a trial has trained.
TIME_METRIC = "steps_completed"


def plain_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Finite Python floats only: the master stores JSON, which has no NaN or infinity."""
    plain = {}
    for name, value in metrics.items():
        value = float(value)
        if math.isfinite(value):
            plain[name] = value
        else:
            log.warning("metric %s is %s; not reported to Determined", name, value)
    return plain


class CoreStorage:
    """Checkpoints through the sharded `store_path` protocol, reports and preemption of a Core API context."""

    def __init__(self, core) -> None:
        self.core = core

    def store_path(self, metadata: dict):
        return self.core.checkpoint.store_path(metadata, shard=True)

    def report(self, report: Report) -> None:
        values = plain_metrics(report.metrics)
        if report.group == "training":
            self.core.train.report_training_metrics(steps_completed=report.step, metrics=values)
        else:
            values[TIME_METRIC] = float(report.step)
            self.core.train.report_validation_metrics(steps_completed=report.step, metrics=values)

    def report_progress(self, fraction: float) -> None:
        self.core.train.report_progress(fraction)

    def should_preempt(self) -> bool:
        return self.core.preempt.should_preempt()


def core_session(
    core,
    cfg: DPOConfig,
    *,
    trial_id: int | None = None,
    on_cluster: bool = False,
    start: StartPoint | None = None,
    command: str | None = None,
) -> TrainingSession:
    """The training session of one trial, checkpointing and reporting through `core`."""
    return TrainingSession(
        CoreStorage(core), cfg, trial_id=trial_id, on_cluster=on_cluster, start=start, command=command
    )
