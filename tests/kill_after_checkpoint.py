"""entrypoint.py, except that global rank 0 SIGKILLs itself right after the checkpoint of step N is complete.

usage (under torchrun): kill_after_checkpoint.py N ENTRYPOINT_ARGS...
The launcher then stops the other ranks; what is on disk is what a crash at that moment leaves.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from dpo_lightning.training import session

ENTRYPOINT = Path(__file__).resolve().parents[1] / "entrypoint.py"


def main() -> None:
    kill_at = int(sys.argv[1])
    save = session.TrainingSession.save

    def save_then_die(self, trainer, module, step, **kwargs):
        path = save(self, trainer, module, step, **kwargs)
        if step == kill_at and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    session.TrainingSession.save = save_then_die
    sys.argv = [str(ENTRYPOINT), *sys.argv[2:]]
    runpy.run_path(str(ENTRYPOINT), run_name="__main__")


if __name__ == "__main__":
    main()
