"""How the scripts talk to a terminal: one log format for every run, set up once by each script."""

from __future__ import annotations

import logging
import os
import signal


def configure_logging() -> None:
    """INFO by default; DPO_LIGHTNING_LOG_LEVEL picks another level."""
    level = os.environ.get("DPO_LIGHTNING_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if level == "INFO":
        # Lightning's start-up notes (accelerators found, an advertising tip, why fit stopped) say nothing the
        # run's own log does not; DPO_LIGHTNING_LOG_LEVEL=DEBUG shows them
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside training's own handling (loading, data preparation, evaluation)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def install_interrupt_handlers() -> None:
    """Make SIGINT and SIGTERM stop the script wherever it is, even where the launching shell left them ignored
    (a background job's SIGINT), until training installs its own step-finishing handler."""

    def interrupt(signum, frame) -> None:
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)
