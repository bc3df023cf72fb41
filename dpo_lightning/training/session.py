"""A run's checkpoints, reports and stops, whatever stores them: the session a run trains through
(`run.Session`), and the callback that checkpoints and stops it.

Where checkpoints and reports go is a `Storage`: Determined's Core API context on a cluster and off it
(`determined.session.CoreStorage`, the only adapter), a strict fake in the tests. Local runs, torchrun and
Determined trials all checkpoint through this code.

Rules the storage protocol sets (Determined's), and where they are kept here:
- reports go out from rank 0 only, `steps_completed` = optimizer steps (`report`, a report sink);
- `store_path(metadata)` is entered by every rank in step, `steps_completed` increasing, never twice for one
  step (`save`);
- `should_preempt()` is asked by every rank at the same steps (`CheckpointCallback._stop_reason`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import lightning as L

from dpo_lightning.config import DPOConfig
from dpo_lightning.integrity import writing
from dpo_lightning.layout import CHECKPOINTS, FINAL, MERGED, run_record
from dpo_lightning.lightning_compat import validate_now
from dpo_lightning.training.checkpoints import (
    add_full_weights,
    checkpoint_metadata,
    export_final,
    export_merged,
    has_full_weights,
    prune_checkpoints,
    record_checksums,
    restore_rank_state,
    write_checkpoint,
)
from dpo_lightning.training.module import periodic_validation
from dpo_lightning.training.publish import model_card, push_final, training_command
from dpo_lightning.training.run import StartPoint, TrainingInterrupted
from dpo_lightning.training.signals import StopSignals
from dpo_lightning.training.sinks import Report

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


class Storage(Protocol):
    """Where a run's checkpoints and reports go."""

    def store_path(self, metadata: dict) -> AbstractContextManager[tuple[Path, str]]:
        """A directory every rank writes its part of one checkpoint into, in step; complete (metadata.json
        written) once every rank has left the context. Yields (path, checkpoint id)."""
        ...

    def report(self, report: Report) -> None:
        """One report (global rank 0 only)."""
        ...

    def report_progress(self, fraction: float) -> None:
        """The share of training done (rank 0 only)."""
        ...

    def should_preempt(self) -> bool:
        """Whether the run must checkpoint and stop now (every rank asks, in step)."""
        ...


class TrainingSession:
    """Reports, checkpoints and the final state of one run (one trial), through a `Storage`."""

    def __init__(
        self,
        storage: Storage,
        cfg: DPOConfig,
        *,
        trial_id: int | None = None,
        on_cluster: bool = False,
        start: StartPoint | None = None,
        command: str | None = None,
    ) -> None:
        self.storage = storage
        self.command = command or training_command()  # for the model card: the command that trained it
        self.cfg = cfg
        self.trial_id = trial_id
        self.on_cluster = on_cluster
        self.start = start
        self.write_files = not on_cluster  # in a task container those files would vanish with it
        self.record = run_record(cfg)
        resumed = start is not None and not start.weights_only
        self.last_saved: tuple[int, Path] | None = (start.step, start.path) if resumed else None
        self.skipped: list[Path] = list(start.skipped) if start is not None else []  # damaged, removed later
        self.sinks = [self.report]
        self.last_validation: tuple[int, dict[str, float]] | None = None  # for the model card
        self.callbacks: list[L.Callback] = [CheckpointCallback(self)]
        self._last_progress = -math.inf

    # ------------------------------------------------------------------ metrics

    def report(self, report: Report) -> None:
        """A report sink (the module calls it on global rank 0 only)."""
        if report.group == "validation":
            self.last_validation = (report.step, dict(report.metrics))
        self.storage.report(report)

    def progress(self, trainer: L.Trainer, *, force: bool = False) -> None:
        """The share of training done, at most every PROGRESS_EVERY_S seconds (the WebUI's progress bar)."""
        now = time.monotonic()
        if not trainer.is_global_zero or (not force and now - self._last_progress < PROGRESS_EVERY_S):
            return
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.storage.report_progress(min(1.0, trainer.global_step / max(1, total)))
        self._last_progress = now

    # ------------------------------------------------------------------ checkpoints

    def save(self, trainer: L.Trainer, module, step: int, *, last: bool = False) -> Path:
        """A checkpoint of `step` through the sharded protocol; every rank calls it. Never two per step. Under
        FSDP only the `last` one holds the whole model in Hugging Face format beside the shards."""
        if self.last_saved is not None and self.last_saved[0] == step:
            path = self.last_saved[1]
            # saved before it was known to be the last (an epoch-bounded run); rank 0's view decides for all
            if last and self.write_files and not trainer.strategy.broadcast(has_full_weights(path)):
                add_full_weights(path, trainer=trainer, module=module)
            return path
        metadata = checkpoint_metadata(step, self.trial_id)
        previous = f"the checkpoint of step {self.last_saved[0]} is intact" if self.last_saved else "none came before"
        root = Path(self.cfg.output_dir) / CHECKPOINTS
        with writing(f"the checkpoint of step {step}", root, previous), self._torn_removed(trainer) as torn:
            with self.storage.store_path(metadata) as (path, storage_id):
                torn.append(Path(path))
                write_checkpoint(
                    Path(path),
                    trainer=trainer,
                    module=module,
                    tokenizer=trainer.datamodule.tokenizer,
                    record=self.record,
                    with_full_weights=last,
                )
                record_checksums(Path(path), metadata, trainer)  # metadata.json, written last, holds them
            torn.clear()
        self.last_saved = (step, Path(path))
        if trainer.is_global_zero:
            log.info("checkpoint %s saved at step %d (%s)", storage_id, step, path)
            if not self.on_cluster:  # on a cluster, checkpoint_storage's retention policy decides
                for old in prune_checkpoints(root, self.cfg.keep_last_n_checkpoints, self.skipped):
                    log.info("removed old, torn or damaged checkpoint %s", old)
                self.skipped = []
        return Path(path)

    @contextlib.contextmanager
    def _torn_removed(self, trainer: L.Trainer):
        """A checkpoint whose writing failed (a full disk) is removed at once, off-cluster, to free its space;
        yields the list the folder being written is put in until it is complete."""
        torn: list[Path] = []
        try:
            yield torn
        except BaseException:
            if torn and trainer.is_global_zero and not self.on_cluster:
                shutil.rmtree(torn[0], ignore_errors=True)
            raise

    def finish(self, trainer: L.Trainer, module) -> Path:
        """The final checkpoint and, off-cluster, a copy of its policy in `<output_dir>/final/`, with its model
        card (and merged model) written before it replaces the old final/ in one rename."""
        step = trainer.global_step
        path = self.save(trainer, module, step, last=True)
        if self.write_files and trainer.is_global_zero:

            def complete(staging: Path) -> None:
                if self.cfg.export_merged:
                    export_merged(staging, module.trained, trainer.datamodule.tokenizer)
                validated_at, metrics = self.last_validation or (step, None)
                card = model_card(
                    self.cfg,
                    mode=trainer.datamodule.mode,
                    step=step,
                    metrics=metrics if validated_at == step else None,
                    command=self.command,
                )
                (staging / "README.md").write_text(card)

            output_dir = Path(self.cfg.output_dir)
            kept = f"final/ is as it was, and the checkpoint of step {step} is complete: a re-run exports it"
            with writing("the final model", output_dir / FINAL, kept):
                final = export_final(output_dir, path, complete=complete)
            log.info("final %s saved to %s", module.DESCRIPTION, final)
            if self.cfg.export_merged:
                log.info("merged model (adapters merged into the base) saved to %s", final / MERGED)
            if self.cfg.push_to_hub:
                log.info("final %s uploaded to %s", module.DESCRIPTION, push_final(final, self.cfg.push_to_hub))
        self.progress(trainer, force=True)
        return path


class CheckpointCallback(L.Callback):
    """Per optimizer step: progress, the stop decision, periodic checkpoints; on resume, the RNG state."""

    def __init__(self, session: TrainingSession) -> None:
        self.session = session
        self.signals = StopSignals()
        self._seen_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._seen_step = trainer.global_step
        self.signals.install()
        # so that a later command can tell whether its num_epochs ends before this run's step (`completed_step`);
        # an epoch whose last accumulation group is partial still ends with an optimizer step
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        self.session.record["optimizer_steps_per_epoch"] = per_epoch
        start = self.session.start
        if start is not None and not start.weights_only:
            if not restore_rank_state(start.path, trainer.global_rank, pl_module):
                log.warning("rank %d: checkpoint has no RNG state for this rank; continuing", trainer.global_rank)
            if self._validation_due(trainer, start.step):
                validate_now(trainer)

    def _validation_due(self, trainer: L.Trainer, step: int) -> bool:
        """Checkpoints are written before their step's validation; Lightning skips that validation on resume."""
        has_validation = trainer.datamodule is not None and trainer.datamodule.has_validation
        return has_validation and periodic_validation(self.session.cfg, step)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.signals.restore()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.signals.restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # mid-accumulation: no optimizer step finished
            return
        self._seen_step = step
        self.session.progress(trainer)
        reason = self._stop_reason(trainer, step)
        every = self.session.cfg.checkpoint_every_n_steps
        # The last step is saved here, not after `fit`: once `fit` returns, Lightning's loop state marks the
        # epoch finished, and a run resumed from there with a larger max_steps would skip the rest of it.
        last = 0 < trainer.max_steps <= step
        if reason or last or (every > 0 and step % every == 0):
            # this step's report is written before its checkpoint is complete. After a stop the steps since the
            # last report stay in the open window, which the checkpoint keeps (`rank_state_dict`): the resumed
            # run reports them at the next report step, as the uninterrupted run does.
            pl_module.report_finished_step()
            self.session.save(trainer, pl_module, step, last=last)
        if reason:
            self.session.progress(trainer, force=True)
            raise TrainingInterrupted(step, reason)

    def _stop_reason(self, trainer: L.Trainer, step: int) -> str | None:
        # Every rank must agree, or one rank would enter the checkpoint while another trains on.
        if trainer.strategy.reduce_boolean_decision(self.signals.received is not None, all=False):
            return "stopped by a signal"
        if step % self.session.cfg.preempt_check_every_n_steps == 0 and self.session.storage.should_preempt():
            return "preempted"
        return None
