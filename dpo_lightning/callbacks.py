"""Small pieces around a run: a clean stop on SIGINT/SIGTERM and the local metrics sinks."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StopSignals:
    """Turns SIGINT and SIGTERM into a request to stop after the current optimizer step.

    Installed at train start, after Lightning's own handlers, because Lightning's SIGTERM handler would end
    the run at the next batch without a checkpoint. A second SIGINT aborts at once.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after the current optimizer step", self.received)

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class JsonlReporter:
    """Appends each report to metrics.jsonl as {"step", "group", "metrics"}."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, group: str, step: int, metrics: dict[str, float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "group": group, "metrics": metrics}) + "\n")


def print_reporter(group: str, step: int, metrics: dict[str, float]) -> None:
    """Reports on stdout, for runs that write nothing (fast dev runs)."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    print(f"[{group} step {step}] {shown}", flush=True)


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


def log_validation(group: str, step: int, metrics: dict[str, float]) -> None:
    """One log line per validation with the headline metrics (all of them go to metrics.jsonl)."""
    if group != "validation":
        return
    shown = ", ".join(f"{name} {metrics[name]:.4g}" for name in SUMMARY_METRICS if name in metrics)
    log.info("validation at step %d: %s", step, shown)


def validate_now(trainer) -> None:
    """Run a full validation from inside `fit`, as Lightning's training loop runs one between two batches.

    A fresh loop run, not a restart: on resume the restored state of the last validation before the
    checkpoint would otherwise make Lightning skip it.
    """
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.restarting = False
    trainer.validating = True
    val_loop.run()
    trainer.training = True
