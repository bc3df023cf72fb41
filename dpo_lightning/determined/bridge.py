"""The bridge to Determined's Core API, and the only module that imports `determined`.

On a cluster the trial's hyperparameters are the configuration, checkpoints go to the experiment's
checkpoint storage and the master may preempt the run; off-cluster `det.core.init()` falls back to its dummy
context, so the same code stores checkpoints under `<output_dir>/checkpoints/` and resumes from there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
from pathlib import Path

from dpo_lightning.config import (
    RESUMABLE_CHANGES,
    DPOConfig,
    load_config,
    make_config,
    record_diff,
    resolve_hparams,
)
from dpo_lightning.console import process_rank
from dpo_lightning.determined.session import core_session
from dpo_lightning.errors import ConfigError, UserError
from dpo_lightning.integrity import FILES, DamagedCheckpoint, RunLock
from dpo_lightning.layout import (
    CHECKPOINTS,
    COMPLETED,
    FINAL,
    RUN_CONFIG,
    ResumeChoice,
    checkpoint_problem,
    choose_checkpoint,
    read_metadata,
    read_run_record,
)
from dpo_lightning.memory import tune_cpu_allocator
from dpo_lightning.training.checkpoints import check_loadable
from dpo_lightning.training.run import StartPoint, TrainOutcome, train
from dpo_lightning.training.strategies import launched_world_size

log = logging.getLogger(__name__)


def trial_info():
    """The cluster's trial info, or None off-cluster (and in non-trial tasks such as notebooks)."""
    import determined as det

    info = det.get_cluster_info()
    return info if info is not None and info.task_type == "TRIAL" else None


def distributed_context():
    """Determined's view of the launcher's processes; None for a single process."""
    if launched_world_size() <= 1:
        return None
    import os

    from determined.core import DistributedContext

    # Determined's launcher names the chief in DET_CHIEF_IP; plain multi-node torchrun names it MASTER_ADDR
    return DistributedContext.from_torch_distributed(
        chief_ip=os.environ.get("DET_CHIEF_IP") or os.environ.get("MASTER_ADDR")
    )


def cluster_config(hparams: dict, overrides: dict) -> DPOConfig:
    """The trial's hyperparameters (command-line overrides on top) through the same checks as local runs."""
    values = dict(hparams)
    values.update(overrides)
    return make_config(resolve_hparams(values))


# ----------------------------------------------------------------------------- where to start


def start_point(folder: Path, *, trial_id: int | None, skipped: tuple[Path, ...] = ()) -> StartPoint:
    """A full resume when the checkpoint is this trial's own; weights only when another trial wrote it. The
    checkpoint must be intact (`layout.checkpoint_problem`)."""
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise DamagedCheckpoint(f"damaged checkpoint {folder}: {problem}")
    check_loadable(folder)
    metadata = read_metadata(folder)
    if FILES not in metadata:
        log.info("checkpoint %s was written before checkpoints recorded checksums: its files are not verified", folder)
    same_trial = metadata.get("trial_id") == trial_id
    if not same_trial:
        log.info("warm start from checkpoint of trial %s: policy weights only", metadata.get("trial_id"))
    return StartPoint(folder, metadata["steps_completed"], weights_only=not same_trial, skipped=skipped)


def check_same_run(folder: Path, cfg: DPOConfig) -> None:
    """A resumed run must train what the checkpoint trained; only RESUMABLE_CHANGES may differ. A record from
    an older version is read with the schema's defaults for the keys it lacks, said in one line."""
    record = read_run_record(folder / RUN_CONFIG)
    if record is None:
        raise UserError(f"cannot resume from {folder}: its {RUN_CONFIG} is missing or unreadable")
    saved = record["config"]
    diff = record_diff(saved, cfg)
    if diff.changed:
        current, defaults = cfg.to_dict(), DPOConfig().to_dict()
        before = {k: repr(saved[k]) if k in saved else f"{defaults[k]!r}, the default" for k in diff.changed}
        shown = ", ".join(f"{k} ({before[k]} -> {current[k]!r})" for k in diff.changed)
        raise UserError(
            f"cannot resume from {folder}: the configuration differs in {shown}; only "
            f"{', '.join(RESUMABLE_CHANGES)} may change on resume; restore those values or pick a new output_dir"
        )
    if diff.defaulted:
        log.info(
            "%s (run record format %s) predates %s: read with their defaults, as this run has them",
            folder.name,
            record.get("format", 1),
            ", ".join(diff.defaulted),
        )
    if diff.dropped:
        log.warning("%s's run record sets %s, which this version no longer has", folder.name, ", ".join(diff.dropped))


def resume_choice(cfg: DPOConfig, resume: str | None) -> ResumeChoice:
    """`--resume PATH` (a checkpoint or an output folder), else output_dir: its newest intact checkpoint, each
    newer one skipped said in one line."""
    choice = choose_checkpoint(Path(resume).expanduser() if resume is not None else Path(cfg.output_dir))
    if resume is not None and choice.folder is None:
        raise UserError(f"--resume: no complete checkpoint at {resume} (a checkpoint has metadata.json)")
    for folder, why in choice.skipped:
        log.warning("skipped checkpoint %s: %s", folder, why)
    return choice


def local_start_point(cfg: DPOConfig, choice: ResumeChoice) -> StartPoint | None:
    """The start point of the chosen checkpoint (None: none), once its run is known to be this one."""
    if choice.folder is None:
        return None
    check_same_run(choice.folder, cfg)
    start = start_point(choice.folder, trial_id=None, skipped=tuple(folder for folder, _ in choice.skipped))
    log.info("resuming from %s (step %d)", choice.folder, start.step)
    return start


def cluster_start_point(core, latest_checkpoint: str | None, trial_id: int, stack: contextlib.ExitStack):
    """The trial's latest checkpoint, made local on every rank for as long as `stack` is open."""
    if latest_checkpoint is None:
        return None
    folder = Path(stack.enter_context(core.checkpoint.restore_path(latest_checkpoint)))
    return start_point(folder, trial_id=trial_id)


# ----------------------------------------------------------------------------- runs


def run_trial(
    core,
    cfg: DPOConfig,
    *,
    start: StartPoint | None,
    trial_id: int | None,
    on_cluster: bool,
    announce: str | None = None,
    command: str | None = None,
) -> TrainOutcome:
    """Train through a Core API context (real, dummy or fake)."""
    session = core_session(core, cfg, trial_id=trial_id, on_cluster=on_cluster, start=start, command=command)
    outcome = train(cfg, session=session, start=start, announce=announce)
    if outcome.interrupted:
        log.info("stopped at step %d with a checkpoint; run again to resume", outcome.trainer.global_step)
    return outcome


def run_local(
    cfg: DPOConfig,
    *,
    resume: str | None = None,
    announce: str | None = None,
    command: str | None = None,
    choice: ResumeChoice | None = None,
) -> TrainOutcome:
    """Off-cluster: Determined's dummy context, checkpoints under `<output_dir>/checkpoints/`, resumed from
    `resume` or else from the newest intact checkpoint there (`choice`, when already made)."""
    lock = RunLock(Path(cfg.output_dir)).acquire() if process_rank() == 0 else None  # before anything loads
    try:
        choice = choice if choice is not None else resume_choice(cfg, resume)
        start = local_start_point(cfg, choice)  # a mismatched resume fails here, before anything loads
        return _run_local(cfg, start, announce=announce, command=command)
    finally:
        if lock is not None:
            lock.release()


def _run_local(cfg: DPOConfig, start: StartPoint | None, *, announce: str | None, command: str | None):

    import determined as det

    # the dummy context logs every report at INFO; the progress bar and metrics.jsonl already show them
    logging.getLogger("determined").setLevel(logging.WARNING)
    storage = str((Path(cfg.output_dir) / CHECKPOINTS).resolve())
    with det.core.init(distributed=distributed_context(), checkpoint_storage=storage) as core:
        return run_trial(core, cfg, start=start, trial_id=None, on_cluster=False, announce=announce, command=command)


def completed_step(cfg: DPOConfig, folder: Path | None) -> tuple[int, int | None] | None:
    """(the step at which `cfg.output_dir` holds a finished run of this configuration, the step this configuration
    ends at, when known), or None. A run is finished when its newest checkpoint is at or past the configuration's
    end and final/ was exported from it, or past the end at all: a run extended (max_steps raised) and then
    given its first, shorter command again has nothing left to do, and must not be touched."""
    output = Path(cfg.output_dir)
    if folder is None:
        return None
    step = read_metadata(folder)["steps_completed"]
    check_same_run(folder, cfg)  # a changed configuration is an error before it is a finished run
    saved = read_run_record(folder / RUN_CONFIG) or {}
    end = configured_end(cfg, saved)
    try:
        finished = json.loads((output / FINAL / COMPLETED).read_text()).get("steps_completed")
    except (OSError, ValueError, AttributeError):
        finished = None
    if end is not None:
        return (step, end) if step > end or (step == end and finished == step) else None
    if finished != step:
        return None  # resumed past the last export and stopped again
    config = saved.get("config", {})  # a checkpoint from before runs recorded their steps per epoch
    same_epochs = config.get("max_steps") == -1 and config.get("num_epochs") == cfg.num_epochs
    return (step, None) if cfg.max_steps <= 0 and same_epochs else None


def configured_end(cfg: DPOConfig, record: dict) -> int | None:
    """The optimizer step a run of `cfg` ends at: max_steps, else num_epochs times the steps per epoch its
    checkpoint recorded (None when it did not)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = record.get("optimizer_steps_per_epoch")
    return cfg.num_epochs * per_epoch if isinstance(per_epoch, int) else None


def tune_allocator(cfg: DPOConfig) -> None:
    """The CPU allocator's speed settings (`memory.tune_cpu_allocator`), before the first large allocation;
    not under FSDP, whose point is memory: its gathers and reductions allocate buffers of many sizes, which a
    heap that never trims keeps as fragments (measured on cpu-small, 2 processes: FSDP's peak per process was
    1.16-1.22x DDP's with the settings, 0.73x without; benchmarks/fsdp_memory.py)."""
    if cfg.strategy != "fsdp":
        tune_cpu_allocator()


def _flags(overrides: dict) -> list[str]:
    return [part for key, value in overrides.items() for part in (f"--{key}", str(value))]


def configuration_line(config_path: Path, overrides: dict) -> str:
    """What a run's configuration is made of, so that a user who overrode two keys sees that the file supplies
    every other one (learning rate, precision, accumulation)."""
    if not overrides:
        return f"configuration: {config_path} (no command-line overrides)"
    given = ", ".join(f"{key}={value}" for key, value in overrides.items())
    return f"configuration: {config_path}, with {given} from the command line; every other key from the file"


def release_process_group() -> None:
    """Tear the launcher's process group down before the interpreter exits, as PyTorch asks: left to interpreter
    shutdown, a finished two-process gloo run was seen to abort in one process ("terminate called without an
    active exception") after its last checkpoint was complete."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(config_path: Path, overrides: dict, *, fast_dev_run: bool = False, resume: str | None = None) -> int:
    """The entrypoint's whole job: pick the configuration and the start point, then train. (After an error the
    process group is left to exit: a rank that raised must not wait on the others.)"""
    code = _run(config_path, overrides, fast_dev_run=fast_dev_run, resume=resume)
    release_process_group()
    return code


def _run(config_path: Path, overrides: dict, *, fast_dev_run: bool, resume: str | None) -> int:
    info = trial_info()
    if info is None:
        cfg = load_config(config_path, overrides)
        announce = configuration_line(config_path, overrides)
        command = shlex.join(["python", "entrypoint.py", "--config", str(config_path), *_flags(overrides)])
        if fast_dev_run:  # one batch each way, nothing written, nothing resumed
            tune_allocator(cfg)
            train(cfg, fast_dev_run=True, announce=announce)
            return 0
        # the lock comes first: a second run must not even read a folder that another one is writing
        lock = RunLock(Path(cfg.output_dir)).acquire() if process_rank() == 0 else None
        try:
            return _local_run(cfg, resume, announce=announce, command=command)
        finally:
            if lock is not None:
                lock.release()
    if resume is not None or fast_dev_run:
        raise UserError("--resume and --fast-dev-run are for local runs; on a cluster the trial resumes itself")
    return _cluster_run(info, overrides)


def _local_run(cfg: DPOConfig, resume: str | None, *, announce: str, command: str) -> int:
    """A local run, unless its output_dir already holds this configuration's finished run."""
    choice = resume_choice(cfg, resume)
    done = None if resume is not None else completed_step(cfg, choice.folder)
    if done is not None:
        step, end = done
        past = f", past the step {end} this configuration ends at" if end is not None and step > end else ""
        print(
            f"{cfg.output_dir} is already complete at step {step}{past}: nothing was changed; raise max_steps "
            "(or num_epochs) to continue it, or give another output_dir to start afresh"
        )
        return 0
    tune_allocator(cfg)
    run_local(cfg, resume=resume, announce=announce, command=command, choice=choice)
    return 0  # finished, or stopped with a checkpoint saved


def _cluster_run(info, overrides: dict) -> int:
    import determined as det

    with det.core.init(distributed=distributed_context()) as core:
        try:
            cfg = cluster_config(info.trial.hparams, overrides)
        except ConfigError as exc:  # inside the block: Determined ends the trial early rather than retrying
            raise det.InvalidHP(str(exc)) from None
        tune_allocator(cfg)
        with contextlib.ExitStack() as stack:
            start = cluster_start_point(core, info.latest_checkpoint, info.trial.trial_id, stack)
            run_trial(core, cfg, start=start, trial_id=info.trial.trial_id, on_cluster=True)
    return 0
