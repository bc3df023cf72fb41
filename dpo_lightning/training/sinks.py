"""Where reports go. Every report, training or validation, passes through one list of sinks on global rank 0
(`TrainingModule.sinks`), so adding a logger is adding a sink.

A sink is any callable taking a `Report`. Here: metrics.jsonl (`JsonlSink`), one log line per validation
(`log_validation`), stdout for fast dev runs (`print_report`), and Lightning's own loggers
(`LightningLoggerSink`, TensorBoard or CSV under `<output_dir>/lightning_logs/`). Determined's sink lives with
the bridge (`determined.session`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple, Protocol

import lightning as L

from dpo_lightning.integrity import writing

log = logging.getLogger(__name__)


class Report(NamedTuple):
    group: str  # "training" | "validation"
    step: int  # optimizer steps completed
    metrics: dict[str, float]  # bare names (loss, rewards/chosen, ...), plain floats


class ReportSink(Protocol):
    def __call__(self, report: Report) -> None: ...


class JsonlSink:
    """Appends each report to metrics.jsonl as {"step", "group", "metrics"}."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, report: Report) -> None:
        kept = "the reports before it are intact (a torn last line is dropped on resume)"
        with writing(f"the {report.group} report of step {report.step}", self.path, kept):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(_line(report))


def kept_on_resume(group: str, step: int, resumed_step: int, revalidated: bool) -> bool:
    """Whether a report written before a crash stays when the run resumes from the checkpoint of
    `resumed_step`: training reports up to that step (each is written before its step's checkpoint), and
    validations before it, or at it when the resumed run does not validate there again (`revalidated`: a
    checkpoint is written before its step's validation)."""
    if group == "training":
        return step <= resumed_step
    return step < resumed_step or (step == resumed_step and not revalidated)


def truncate_reports(path: Path, resumed_step: int, revalidated: bool) -> list[Report]:
    """Rewrite metrics.jsonl without what a resumed run reports again (`kept_on_resume`), atomically; returns
    the reports kept."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by the crash
        if kept_on_resume(row["group"], row["step"], resumed_step, revalidated):
            kept.append(Report(row["group"], row["step"], row["metrics"]))
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(_line(report) for report in kept))
    partial.replace(path)
    return kept


def _line(report: Report) -> str:
    return json.dumps({"step": report.step, "group": report.group, "metrics": report.metrics}) + "\n"


def print_report(report: Report) -> None:
    """Reports on stdout, for runs that write nothing (fast dev runs)."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in report.metrics.items())
    print(f"[{report.group} step {report.step}] {shown}", flush=True)


SUMMARY_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "accuracy",
    "margin",
    "objective/scores",
    "objective/kl",
    "objective/eos_rate",
    "generation/win_rate",
)


def log_validation(report: Report) -> None:
    """One log line per validation with the headline metrics (all of them go to metrics.jsonl)."""
    if report.group != "validation":
        return
    shown = ", ".join(f"{name} {report.metrics[name]:.4g}" for name in SUMMARY_METRICS if name in report.metrics)
    log.info("validation at step %d: %s", report.step, shown)


class LightningLoggerSink:
    """The Trainer's loggers, with names prefixed `train/` and `val/` so that the two `loss` curves do not
    collide, at the report's optimizer step."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer

    def __call__(self, report: Report, loggers: list | None = None) -> None:
        prefix = "train" if report.group == "training" else "val"
        metrics = {f"{prefix}/{name}": value for name, value in report.metrics.items()}
        for logger in self.trainer.loggers if loggers is None else loggers:
            where = Path(getattr(logger, "log_dir", None) or self.trainer.default_root_dir)
            with writing(f"the {report.group} report of step {report.step}", where, "metrics.jsonl is intact"):
                logger.log_metrics(metrics, step=report.step)
                logger.save()
