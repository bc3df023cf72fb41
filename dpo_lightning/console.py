"""How the scripts talk to a terminal: one log format for every run, set up once by each script."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """INFO by default; DPO_LIGHTNING_LOG_LEVEL picks another level."""
    level = os.environ.get("DPO_LIGHTNING_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
