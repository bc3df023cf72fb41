"""entrypoint.py, with a fault injected at a chosen moment: what is on disk afterwards is what that fault leaves
there for real (a SIGKILL, a signal, a full filesystem), and the exit is the real script's.

usage: crash.py MOMENT ENTRYPOINT_ARGS...
  checkpoint:N         SIGKILL right after the checkpoint of step N is complete (global rank 0; under torchrun
                       the launcher stops the other ranks)
  report:N             SIGKILL right after step N's training report is in metrics.jsonl
  writing:N:WHEN       SIGKILL while the checkpoint of step N is being written: WHEN is `state` (the trainer
                       state saved, the rank files not yet) or `files` (every file written, metadata.json not yet)
  signal:N:SIG         send SIG (SIGTERM, SIGINT) to this process right after step N's optimizer step
  signal-writing:N:SIG send SIG while the checkpoint of step N is being written
  twice:N              SIGINT after step N, and a second SIGINT as its checkpoint starts to be written
  final-validation:SIG send SIG as the run's final validation starts
  fill-disk:export     fill the output folder's filesystem as the final export starts
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import lightning as L

from dpo_lightning.training import checkpoints, session, sinks

ENTRYPOINT = Path(__file__).resolve().parents[1] / "entrypoint.py"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _send(name: str) -> None:
    os.kill(os.getpid(), getattr(signal, name))


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def after_checkpoint(step: int) -> None:
    save = session.TrainingSession.save

    def save_then_die(self, trainer, module, at, **kwargs):
        path = save(self, trainer, module, at, **kwargs)
        if at == step and trainer.is_global_zero:
            _die()
        return path

    session.TrainingSession.save = save_then_die


def after_report(step: int) -> None:
    write = sinks.JsonlSink.__call__

    def write_then_die(self, report):
        write(self, report)
        if report.group == "training" and report.step == step:
            _die()

    sinks.JsonlSink.__call__ = write_then_die


def while_writing(step: int, when: str, act) -> None:
    """`act()` on global rank 0 inside the checkpoint of `step`: after the trainer state (`state`) or after every
    file (`files`)."""
    if when == "state":
        original = checkpoints.torch.save  # the rank file comes after Lightning's state

        def save(obj, path, *args, **kwargs):
            if str(path).endswith("rank-00000.pt") and f"step{step}" in _current:
                act()
            return original(obj, path, *args, **kwargs)

        checkpoints.torch.save = save
    write = session.record_checksums

    def record(folder, metadata, trainer):
        if when == "files" and metadata.get("steps_completed") == step and trainer.is_global_zero:
            act()
        return write(folder, metadata, trainer)

    session.record_checksums = record
    save_checkpoint = session.TrainingSession.save

    def save_marked(self, trainer, module, at, **kwargs):
        _current.add(f"step{at}")
        try:
            return save_checkpoint(self, trainer, module, at, **kwargs)
        finally:
            _current.discard(f"step{at}")

    session.TrainingSession.save = save_marked


_current: set[str] = set()


def after_step(step: int, act) -> None:
    original = session.CheckpointCallback.on_train_batch_end

    def hook(self, trainer, pl_module, *args):
        if trainer.global_step == step and not getattr(self, "_fault_done", False) and _is_rank_zero():
            self._fault_done = True
            act()
        return original(self, trainer, pl_module, *args)

    session.CheckpointCallback.on_train_batch_end = hook


def twice(step: int) -> None:
    after_step(step, lambda: _send("SIGINT"))
    save = session.TrainingSession.save

    def save_interrupted(self, trainer, module, at, **kwargs):
        if at == step:
            _send("SIGINT")
        return save(self, trainer, module, at, **kwargs)

    session.TrainingSession.save = save_interrupted


def at_final_validation(name: str) -> None:
    validate = L.Trainer.validate

    def validate_signalled(self, *args, **kwargs):
        if _is_rank_zero():
            _send(name)
        return validate(self, *args, **kwargs)

    L.Trainer.validate = validate_signalled


def fill_disk_at_export() -> None:
    export = session.export_final

    def export_on_full_disk(output_dir, checkpoint, **kwargs):
        with open(Path(output_dir) / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass  # the filesystem is full now
        return export(output_dir, checkpoint, **kwargs)

    session.export_final = export_on_full_disk


def install(moment: str) -> None:
    kind, *args = moment.split(":")
    if kind == "checkpoint":
        after_checkpoint(int(args[0]))
    elif kind == "report":
        after_report(int(args[0]))
    elif kind == "writing":
        while_writing(int(args[0]), args[1], _die)
    elif kind == "signal":
        after_step(int(args[0]), lambda: _send(args[1]))
    elif kind == "signal-writing":
        while_writing(int(args[0]), "files", lambda: _send(args[1]))
    elif kind == "twice":
        twice(int(args[0]))
    elif kind == "final-validation":
        at_final_validation(args[0])
    elif kind == "fill-disk":
        fill_disk_at_export()
    else:
        raise SystemExit(f"unknown moment {moment}")


def main() -> None:
    install(sys.argv[1])
    sys.argv = [str(ENTRYPOINT), *sys.argv[2:]]
    runpy.run_path(str(ENTRYPOINT), run_name="__main__")


if __name__ == "__main__":
    main()
