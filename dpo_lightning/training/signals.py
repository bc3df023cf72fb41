"""A clean stop on SIGINT/SIGTERM: finish the optimizer step, checkpoint, exit 0; a second SIGINT aborts."""

from __future__ import annotations

import logging
import signal
from typing import Any

from dpo_lightning.console import Interrupted

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
            raise Interrupted(signum, "a second time, before the checkpoint of this step was written")
        self.received = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint after the current optimizer step", self.received)

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
