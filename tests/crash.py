"""entrypoint.py, except that global rank 0 SIGKILLs itself at a chosen moment: what is on disk is then what a
crash there leaves (under torchrun the launcher stops the other ranks).

usage: crash.py checkpoint:N|report:N ENTRYPOINT_ARGS...
  checkpoint:N  right after the checkpoint of step N is complete
  report:N      right after step N's training report is in metrics.jsonl
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from dpo_lightning.training import session, sinks

ENTRYPOINT = Path(__file__).resolve().parents[1] / "entrypoint.py"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    moment, step = sys.argv[1].split(":")
    kill_at = int(step)
    if moment == "checkpoint":
        save = session.TrainingSession.save

        def save_then_die(self, trainer, module, step, **kwargs):
            path = save(self, trainer, module, step, **kwargs)
            if step == kill_at and trainer.is_global_zero:
                _die()
            return path

        session.TrainingSession.save = save_then_die
    else:
        write = sinks.JsonlSink.__call__

        def write_then_die(self, report):
            write(self, report)
            if report.group == "training" and report.step == kill_at:
                _die()

        sinks.JsonlSink.__call__ = write_then_die
    sys.argv = [str(ENTRYPOINT), *sys.argv[2:]]
    runpy.run_path(str(ENTRYPOINT), run_name="__main__")


if __name__ == "__main__":
    main()
