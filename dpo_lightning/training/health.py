"""A run that diverged stops; one that stopped learning is told so.

A non-finite loss or gradient norm on any rank stops the run before that step's optimizer update (so the
weights, and the last checkpoint, are the last good ones) with one line naming the step and the metric; a
gradient norm of exactly 0 for `DEAD_AFTER_STEPS` steps in a row while the loss is not 0 (weights blown up
into saturation) is warned about once.
"""

from __future__ import annotations

import logging
import math

import torch

from dpo_lightning.errors import UserError
from dpo_lightning.training.strategies import all_gather_objects

log = logging.getLogger(__name__)

DEAD_AFTER_STEPS = 10  # optimizer steps in a row with a gradient norm of exactly 0
WHAT_NEXT = "resume from the last good checkpoint with a lower learning_rate (--learning_rate on the command line)"


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm: the run stops, its last checkpoint is the last good state."""

    exit_code = 3


def divergence_message(step: int, per_rank: list[tuple[bool, float]]) -> str:
    """One line naming the step, the metric and (with several processes) the ranks where it went non-finite;
    `per_rank` holds each rank's (loss finite, gradient norm)."""
    bad_loss = [rank for rank, (finite, _) in enumerate(per_rank) if not finite]
    bad_norm = [(rank, norm) for rank, (_, norm) in enumerate(per_rank) if not math.isfinite(norm)]
    where = (lambda ranks: f" on rank {', '.join(map(str, ranks))}") if len(per_rank) > 1 else (lambda ranks: "")
    if bad_loss:
        what = f"the loss is not finite{where(bad_loss)}"
    else:
        what = f"grad_norm is {bad_norm[0][1]}{where([rank for rank, _ in bad_norm])}"
    return (
        f"training diverged at step {step}: {what}; the run stopped before that update, nothing was exported and "
        f"the newest checkpoint holds the last good state: {WHAT_NEXT}"
    )


class TrainingHealth:
    """Per optimizer step: whether every micro-batch's loss was finite, and how long the gradient norm has been
    exactly 0."""

    def __init__(self) -> None:
        self._finite: torch.Tensor | None = None  # all losses of this step finite (a tensor: no sync per batch)
        self._last_loss: torch.Tensor | None = None
        self.zero_steps = 0
        self.warned = False

    def saw_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        self._last_loss = loss.detach()

    def check(self, step: int, norm: float, strategy) -> None:
        """Before the update of optimizer step `step` (every rank, in step): stop on a non-finite value on any
        rank; warn once when the gradients have vanished."""
        finite = True if self._finite is None else bool(self._finite)
        self._finite = None
        bad = not finite or not math.isfinite(norm)
        if strategy.reduce_boolean_decision(bad, all=False):
            raise TrainingDiverged(divergence_message(step, all_gather_objects((finite, float(norm)))))
        self.zero_steps = self.zero_steps + 1 if norm == 0.0 else 0
        if self.zero_steps >= DEAD_AFTER_STEPS and not self.warned and self._last_loss is not None:
            loss = float(self._last_loss)
            if loss != 0.0:
                self.warned = True
                log.warning(
                    "grad_norm has been exactly 0 for %d steps (since step %d) while the loss is %.4g: the policy "
                    "has stopped learning (its weights have likely saturated); %s",
                    self.zero_steps,
                    step - self.zero_steps + 1,
                    loss,
                    WHAT_NEXT,
                )
