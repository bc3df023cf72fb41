"""Every use of Lightning's loop internals, in one place (checked against lightning 2.6.6).

Each function stands in for a public behaviour that Lightning has no public API for;
`tests/test_lightning_compat.py` fails if that behaviour changes, so an upgrade that breaks one breaks a test
here rather than a run silently.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L


def validate_now(trainer: L.Trainer) -> None:
    """Run a full validation from inside `fit`, as the training loop runs one between two batches.

    Stands in for: "validate at this point of fit" (a baseline before the first step; on resume, the
    validation due at the checkpoint's step, which Lightning would skip). It runs the fit loop's validation
    loop afresh, not as a restart: on resume the restored state of the last validation before the checkpoint
    would otherwise make Lightning skip it.
    """
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.restarting = False
    trainer.validating = True
    val_loop.run()
    trainer.training = True


def validate_on_steps(trainer: L.Trainer, due: Callable[[int], bool]) -> None:
    """From now on the fit loop validates where it would between two batches, but after the batches that finish
    an optimizer step `step` for which `due(step)`, once per step (not at the current step: a resumed run's
    due validation is its own).

    Stands in for: "validate every N optimizer steps". Lightning counts `val_check_interval` in batches, which
    drift from optimizer steps once an epoch ends mid-accumulation (its last, partial group is a step).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    last = {"step": trainer.global_step}

    def should_check_val(data_fetcher) -> bool:
        step = trainer.global_step
        if step == last["step"] or not due(step):
            return False
        last["step"] = step
        return True

    epoch_loop._should_check_val_fx = should_check_val


def micro_batches_done(trainer: L.Trainer) -> int:
    """Micro-batches of the current epoch whose training step has run, the current one included once its
    step has run (from `on_train_batch_end` on).

    Stands in for: "how far into the epoch training is", which the data sampler cannot tell, since the
    DataLoader (and Lightning's prefetch) reads batches ahead of the step that uses them.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def progress_bar() -> L.Callback:
    """Lightning's progress bar without its logger version (`v_num`) and, in a run bounded by max_steps, without
    an epoch total (Lightning shows `Epoch 0/-2` there, from max_epochs = -1).

    Stands in for: "a progress bar whose epoch and total make sense"; the Rich bar builds its description in a
    private method (`_get_train_description`), overridden here.
    """
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    class WithoutVersion:
        def get_metrics(self, trainer, pl_module):
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

    if not _RICH_AVAILABLE:
        return type("ProgressBar", (WithoutVersion, TQDMProgressBar), {})()

    class StepBoundedRichBar(WithoutVersion, RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            if self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
                description = f"Epoch {current_epoch}"
                return f"{description:{len(self.validation_description)}}"
            return super()._get_train_description(current_epoch)

    return StepBoundedRichBar()
