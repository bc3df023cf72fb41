"""Local-run callbacks: periodic checkpoints and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import lightning as L

from dpo_lightning.checkpoints import prune_checkpoints, save_checkpoint

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Raised after the interrupt checkpoint is written, to leave `fit` without another validation."""

    def __init__(self, checkpoint: Path, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}")
        self.checkpoint = checkpoint
        self.step = step


class LocalCheckpointing(L.Callback):
    """Checkpoints every `checkpoint_every_n_steps` and, on SIGINT or SIGTERM, at the end of the current
    optimizer step; then stops with `TrainingInterrupted`.

    The handlers are installed at train start, after Lightning's own, because Lightning's SIGTERM handler
    would otherwise end the run at the next batch without a checkpoint. A second SIGINT aborts at once.
    """

    def __init__(self, root: Path, tokenizer, record: dict[str, Any], every_n_steps: int, keep_last: int):
        self.root = root
        self.tokenizer = tokenizer
        self.record = record
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._seen_step = 0

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after the current optimizer step", self.signal_name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:
            return
        self._seen_step = step
        # Every rank must agree, or one rank would enter the checkpoint while another trains on.
        stop = trainer.strategy.reduce_boolean_decision(self.signal_name is not None, all=False)
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if not (stop or periodic):
            return
        path = self.save(trainer, pl_module, step)
        if stop:
            raise TrainingInterrupted(path, step)

    def save(self, trainer: L.Trainer, pl_module, step: int) -> Path:
        path = self.root / f"step-{step:08d}"
        # Local runs: rank 0 writes; the sharded multi-rank protocol belongs to the Determined bridge.
        if trainer.is_global_zero:
            path = save_checkpoint(self.root, step, trainer, pl_module, self.tokenizer, self.record)
            prune_checkpoints(self.root, self.keep_last)
            log.info("checkpoint saved: %s", path)
        trainer.strategy.barrier("checkpoint")
        return path


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
