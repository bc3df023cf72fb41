"""How the scripts talk to a terminal: one log format for every run, set up once by each script."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings


def process_rank() -> int:
    """This process's global rank under a launcher (torchrun, Determined's), 0 alone."""
    return int(os.environ.get("RANK", "0") or 0)


def interactive() -> bool:
    """Whether the console is a terminal: bars redraw in place there, and would be carriage-return lines in a log."""
    return sys.stderr.isatty()


def configure_logging() -> None:
    """INFO by default (DPO_LIGHTNING_LOG_LEVEL picks another level) on rank 0; other ranks speak only of
    errors, so that a multi-process run says each thing once. Where the console is not a terminal (a log file,
    a cluster's log), the libraries' progress bars are off: the log's own lines mark each phase."""
    level = os.environ.get("DPO_LIGHTNING_LOG_LEVEL", "INFO").upper() if process_rank() == 0 else "ERROR"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if level == "INFO":
        # Lightning's start-up notes (accelerators found, an advertising tip, why fit stopped) say nothing the
        # run's own log does not; DPO_LIGHTNING_LOG_LEVEL=DEBUG shows them
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    if process_rank() != 0:
        warnings.simplefilter("ignore")  # rank 0 says them
        for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning gives its loggers their own handlers
            logging.getLogger(name).setLevel(logging.ERROR)
    # peft asks transformers the old name on every LoRA run; nothing the user can change
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    if not interactive():
        quiet_progress_bars()


def quiet_progress_bars() -> None:
    """Turn off the progress bars of transformers ("Loading weights", "Writing model shards"), datasets
    ("Generating train split", "Map") and huggingface_hub (this project's own bars turn themselves off where
    there is no terminal: tqdm's disable=None)."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside training's own handling (loading, data preparation, the final validation and
    export, evaluation), or a second SIGINT during it. Not a KeyboardInterrupt: Lightning turns one of those into
    `sys.exit(1)` after its own message, where this passes through to the script's one line."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.detail = detail  # what the signal cut short, for the script's line
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def install_interrupt_handlers() -> None:
    """Make SIGINT and SIGTERM stop the script wherever it is, even where the launching shell left them ignored
    (a background job's SIGINT), until training installs its own step-finishing handler."""

    def interrupt(signum, frame) -> None:
        raise Interrupted(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, interrupt)


def quiet_shutdown() -> None:
    """From here to the process's end (atexit handlers: trackers flushing, process groups closing), a SIGINT or
    SIGTERM ends it at once with one line and the signal's exit code, instead of a traceback from whichever
    handler it interrupted."""

    def leave(signum, frame) -> None:
        name = signal.Signals(signum).name
        print(f"interrupted by {name} while shutting down; what was saved before stays", file=sys.stderr)
        sys.stderr.flush()
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, leave)
