"""One run, top to bottom: check -> data (which decides the mode) -> models -> Trainer -> fit (or resume) ->
validate -> finish.

What happens around the run (its report sinks, checkpoint storage, preemption) comes in through a `Session`:
`session.TrainingSession` over Determined's Core API on a cluster and off it, or none for a fast dev run,
which writes nothing.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import lightning as L
import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.console import interactive
from dpo_lightning.data import check_source
from dpo_lightning.data.datamodule import DPODataModule
from dpo_lightning.data.fingerprint import data_change
from dpo_lightning.data.mode import known_mode, needs_judge
from dpo_lightning.dpo.objective import LossSettings
from dpo_lightning.errors import UserError
from dpo_lightning.integrity import writing
from dpo_lightning.layout import FSDP_STATE, METRICS, REFERENCE, RUN_CONFIG, read_run_record, run_record, write_json
from dpo_lightning.lightning_compat import progress_bar
from dpo_lightning.memory import release_free_memory
from dpo_lightning.models import (
    ModelSource,
    RewardModel,
    load_policy,
    load_reference,
    load_tokenizer,
    resolve_model,
)
from dpo_lightning.models.lora import check_lora
from dpo_lightning.online.judges import check_judge, load_judge
from dpo_lightning.online.vllm_sampler import VLLMSampler, check_vllm
from dpo_lightning.training.checkpoints import is_sharded_checkpoint, lightning_state_path
from dpo_lightning.training.dpo_module import DPOModule, OnlineDPOModule
from dpo_lightning.training.loggers import build_loggers, check_loggers
from dpo_lightning.training.module import TrainingModule, periodic_validation
from dpo_lightning.training.publish import check_push
from dpo_lightning.training.references import make_reference
from dpo_lightning.training.reward_module import RewardModelModule
from dpo_lightning.training.sinks import (
    JsonlSink,
    LightningLoggerSink,
    ReportSink,
    log_validation,
    print_report,
    truncate_reports,
)
from dpo_lightning.training.strategies import build_strategy, check_strategy, launcher_layout, trainer_precision

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Raised after the interrupt checkpoint is written, to leave `fit` without another validation."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"{reason} at step {step}; checkpoint saved")
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class StartPoint:
    """A checkpoint to start from: all of its state (resume) or only its policy weights (warm start)."""

    path: Path
    step: int
    weights_only: bool = False
    skipped: tuple[Path, ...] = ()  # newer checkpoints found damaged, removed once a new one is complete


class Session(Protocol):
    """What a run reports to and checkpoints through."""

    sinks: list[ReportSink]
    callbacks: list[L.Callback]
    record: dict  # the run record each checkpoint holds (the run adds its data's fingerprint)
    write_files: bool  # metrics.jsonl, run_config.json, final/ under output_dir
    on_cluster: bool  # Determined's TensorBoard writes the metrics there

    def finish(self, trainer: L.Trainer, module: TrainingModule) -> Path:
        """After the last step: the final checkpoint (all ranks call it); returns its folder."""


def build_trainer(
    cfg: DPOConfig, policy, *, has_validation: bool, callbacks: list, fast_dev_run: bool, logger: list | bool = False
) -> L.Trainer:
    """The Lightning Trainer of a run: one device per process, our own checkpoints and validation cadence."""
    devices, num_nodes = launcher_layout()
    return L.Trainer(
        accelerator="auto",
        strategy=build_strategy(cfg, policy),
        devices=devices,
        num_nodes=num_nodes,
        precision=trainer_precision(cfg),
        max_steps=cfg.max_steps,
        max_epochs=cfg.num_epochs if cfg.max_steps < 0 else None,
        accumulate_grad_batches=cfg.gradient_accumulation_steps,
        # periodic validation counts optimizer steps, not batches (`lightning_compat.validate_on_steps`)
        val_check_interval=sys.maxsize,
        check_val_every_n_epoch=None,
        limit_val_batches=None if has_validation else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # the module decides when to report; Lightning must not drop those logs
        use_distributed_sampler=False,  # our sampler shards by rank and can resume mid-epoch
        enable_checkpointing=False,  # checkpoints follow our layout, through the session
        logger=logger,
        default_root_dir=cfg.output_dir,
        # a bar redraws in place on a terminal; in a log it would be a line per redraw (the reports mark progress)
        callbacks=[*callbacks, progress_bar()] if interactive() else callbacks,
        enable_progress_bar=interactive(),
        enable_model_summary=False,  # a table of the module's parts; the run's log names the models it loads
        fast_dev_run=fast_dev_run,
    )


def check_same_data(start: StartPoint | None, fingerprint: dict) -> None:
    """A resume must train on the data its checkpoint trained on (`fingerprint.data_change`)."""
    if start is None or start.weights_only:
        return
    record = read_run_record(start.path / RUN_CONFIG) or {}
    change = data_change(record.get("data"), fingerprint)
    if change:
        raise UserError(f"cannot resume from {start.path}: {change}; restore that data or give another output_dir")


def validates_again(cfg: DPOConfig, step: int, has_validation: bool) -> bool:
    """Whether a run resumed from the checkpoint of `step` validates at that step again: the periodic validation
    written after its checkpoint, or the final one of a run that ends there."""
    return has_validation and (periodic_validation(cfg, step) or 0 < cfg.max_steps <= step)


def drop_reports_past(metrics_file: Path, step: int, revalidated: bool, logger_sink: LightningLoggerSink) -> None:
    """After a crash, each report once in every sink: metrics.jsonl loses what the resumed run reports again
    (the CSV logger drops the same rows itself, TensorBoard purges by step), and the training report of
    `step` itself, when TensorBoard's purge took it, is written to TensorBoard again."""
    kept = truncate_reports(metrics_file, step, revalidated)
    purged = [logger for logger in logger_sink.trainer.loggers if getattr(logger, "purges_from", None) == step]
    for report in kept:
        if report.step == step and purged:
            logger_sink(report, loggers=purged)


def resolve_sources(cfg: DPOConfig) -> tuple[ModelSource, ModelSource | None]:
    """Cheap checks of every path and model name, before anything is loaded: everything that is missing or
    unusable (the strategy, the dataset, the models, the reward model, LoRA's and vLLM's packages) is said at
    once, one line each, rather than one per attempt."""
    found: dict[str, ModelSource | None] = {"policy": None, "reference": None}

    def policy() -> None:
        found["policy"] = resolve_model(cfg.model_name, "model_name")
        if cfg.sampler == "vllm":
            check_vllm(cfg, found["policy"])

    def reference() -> None:
        if cfg.ref_model_name:
            found["reference"] = resolve_model(cfg.ref_model_name, "ref_model_name")

    def judge() -> None:  # with `mode: auto` choosing online from a table, the data says so: `judge_needed_by_data`
        if cfg.reward_model and needs_judge(known_mode(cfg), cfg.generation_eval_every):
            check_judge(cfg.reward_model, trust_remote_code=cfg.trust_remote_code)

    checks = (
        lambda: check_strategy(cfg),
        lambda: check_source(cfg),
        policy,
        reference,
        judge,
        lambda: check_lora(cfg),
        lambda: check_loggers(cfg),
        lambda: check_push(cfg),
    )
    problems = [problem for problem in map(_problem, checks) if problem]
    if problems:
        raise UserError("\n".join(problems))
    return found["policy"], found["reference"]


def _problem(check) -> str | None:
    try:
        check()
    except UserError as exc:
        return str(exc)
    return None


def judge_needed_by_data(cfg: DPOConfig, mode: str) -> bool:
    """Whether the judge is needed only because `mode: auto` chose online from the data (else `resolve_sources`
    checked it, or no judge is needed)."""
    return needs_judge(mode, cfg.generation_eval_every) and not needs_judge(known_mode(cfg), cfg.generation_eval_every)


def warn_off_sync_checkpoints(cfg: DPOConfig) -> None:
    """A resume from a checkpoint between two vLLM syncs samples differently from the uninterrupted run."""
    if cfg.sampler == "vllm" and cfg.vllm_sync_every > 1 and cfg.checkpoint_every_n_steps % cfg.vllm_sync_every:
        log.warning(
            "checkpoint_every_n_steps (%d) is not a multiple of vllm_sync_every (%d): a run resumed from such a "
            "checkpoint syncs the engine at once, so its samples differ from the uninterrupted run's until the "
            "next sync",
            cfg.checkpoint_every_n_steps,
            cfg.vllm_sync_every,
        )


def load_models(cfg: DPOConfig, policy_source: ModelSource, ref_source: ModelSource | None, start: StartPoint | None):
    """The policy (from the checkpoint when starting from one) and its reference network, frozen.

    The reference is the configured one: `ref_model_name`, else the initial policy `model_name`, never the
    checkpoint's trained weights; only a TR-DPO run resumes its reference as it had moved (trainer/reference/).
    A sharded (FSDP) checkpoint's weights are read after sharding (`TrainingModule.configure_model`, or
    Lightning's restore): the policy is built from `model_name` here.
    """
    if start is None or is_sharded_checkpoint(start.path):
        policy = load_policy(cfg, policy_source)
        initial = policy if ref_source is None else None
    elif cfg.lora_r > 0:  # a LoRA checkpoint holds the adapters; the base is read from model_name again
        policy = load_policy(cfg, policy_source, adapters=str(start.path))
        initial = None
    else:
        policy = load_policy(cfg, ModelSource(str(start.path), True))
        initial = None
    if LossSettings.of(cfg).reference_free:
        return policy, None  # SimPO, CPO, ORPO: no reference at all
    if cfg.lora_r > 0 and ref_source is None:
        return policy, None  # the reference is the policy with its adapters disabled: no second model
    if cfg.sync_ref_model and start is not None and not start.weights_only:
        ref_source, initial = synced_reference_source(start.path), None
    return policy, load_reference(cfg, ref_source or policy_source, initial_policy=initial)


def synced_reference_source(checkpoint: Path) -> ModelSource:
    """Where a TR-DPO run's checkpoint keeps its reference as it had moved."""
    folder = checkpoint / REFERENCE
    if not (folder / "config.json").is_file():
        raise UserError(f"{checkpoint} has no {REFERENCE}/ (the TR-DPO reference sync_ref_model resumes from)")
    return ModelSource(str(folder), True)


def build_module(
    cfg: DPOConfig,
    mode: str,
    sources: tuple[ModelSource, ModelSource | None],
    start: StartPoint | None,
    datamodule: DPODataModule,
    sinks: list[ReportSink],
) -> TrainingModule:
    """The LightningModule of the run's mode, with its models loaded."""
    tokenizer = datamodule.tokenizer
    sharded_start = start is not None and is_sharded_checkpoint(start.path)
    if mode == "reward":
        # a sharded (FSDP) checkpoint holds the trained weights as shards, read after sharding (Lightning's
        # restore, or `sharded_weights_from`): the model is built afresh here, as the policy is
        if start is None or sharded_start:
            model = RewardModel.from_causal_lm(
                sources[0],
                dtype=torch.float32,  # trained weights stay fp32; `precision` sets the compute dtype
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                pad_token_id=tokenizer.pad_token_id,
                head_seed=cfg.seed,
            )
        else:
            model = RewardModel.from_pretrained(start.path, attn_implementation=cfg.attn_implementation)
        return _warm_started(RewardModelModule(cfg, model, sinks=sinks), start)
    policy, reference_model = load_models(cfg, *sources, start)
    reference, pending = make_reference(cfg, reference_model, datamodule, policy)
    del reference_model  # with cached log-probs, the network is let go here
    if cfg.precompute_ref_logps and pending is None:
        release_free_memory()  # its weights, before training allocates its own
    judge = None
    if needs_judge(mode, cfg.generation_eval_every):
        judge = load_judge(
            cfg.reward_model,
            dtype=cfg.frozen_dtype,
            batch_size=cfg.reward_batch_size,
            max_length=cfg.reward_max_length,
            trust_remote_code=cfg.trust_remote_code,
        )
        log.info("completions scored by %s", judge.description)
    if mode == "online":
        sampler = VLLMSampler.of(cfg, sources[0]) if cfg.sampler == "vllm" else None
        module = OnlineDPOModule(cfg, policy, reference, judge, tokenizer, sinks=sinks, sampler=sampler)
    else:
        module = DPOModule(cfg, policy, reference, sinks=sinks, judge=judge, tokenizer=tokenizer, pending=pending)
    return _warm_started(module, start)


def _warm_started(module: TrainingModule, start: StartPoint | None) -> TrainingModule:
    """A warm start from a sharded checkpoint takes its trained weights once the module is sharded."""
    if start is not None and start.weights_only and is_sharded_checkpoint(start.path):
        module.sharded_weights_from = start.path / FSDP_STATE
    return module


class TrainOutcome(NamedTuple):
    module: TrainingModule
    trainer: L.Trainer
    interrupted: bool


def train(
    cfg: DPOConfig,
    *,
    session: Session | None = None,
    start: StartPoint | None = None,
    fast_dev_run: bool = False,
    announce: str | None = None,
) -> TrainOutcome:
    """Train, validate at the end and hand the final state to the session. `announce` (what the configuration
    is made of) is logged once the cheap checks have passed, so that bad input gets its error lines alone."""
    # The frozen reference is in eval mode on purpose; Lightning would warn about it at every fit. Our sampler
    # restores the data position itself, which Lightning cannot see when it warns about mid-epoch resumes.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning's own calls into torch's deprecated pytree API, and its advice to sync epoch-level logs across
    # processes: the progress bar's values are already reduced over ranks (every report is)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True")
    # a non-finite loss reaches the metrics before the step's check stops the run, which says it in one line
    warnings.filterwarnings("ignore", message=r"Encountered `nan` values in tensor")
    sources = resolve_sources(cfg)
    if announce:
        log.info("%s", announce)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(sources[0], cfg.trust_remote_code)
    datamodule = DPODataModule(cfg, tokenizer)
    datamodule.prepare()  # data errors surface before the models load
    check_same_data(start, datamodule.fingerprint())  # and data changed under a checkpoint too
    mode = datamodule.mode
    log.info("mode: %s%s", mode, " (chosen by the data)" if cfg.mode == "auto" else "")
    if judge_needed_by_data(cfg, mode):  # checked before any model loads
        check_judge(cfg.reward_model, trust_remote_code=cfg.trust_remote_code)
    warn_off_sync_checkpoints(cfg)

    output_dir = Path(cfg.output_dir)
    write_files = session is not None and session.write_files and not fast_dev_run
    on_cluster = session is not None and getattr(session, "on_cluster", False)
    sinks = list(session.sinks) if session is not None else []
    if write_files:
        sinks += [JsonlSink(output_dir / METRICS), log_validation]
    if fast_dev_run:
        sinks.append(print_report)
    module = build_module(cfg, mode, sources, start, datamodule, sinks)
    resumed_step = None if start is None or start.weights_only else start.step
    revalidated = resumed_step is not None and validates_again(cfg, resumed_step, datamodule.has_validation)
    loggers = (
        []
        if fast_dev_run
        else build_loggers(
            cfg, on_cluster=on_cluster, write_files=write_files, resumed_step=resumed_step, revalidated=revalidated
        )
    )
    trainer = build_trainer(
        cfg,
        module.trained,
        has_validation=datamodule.has_validation,
        callbacks=list(session.callbacks) if session is not None else [],
        fast_dev_run=fast_dev_run,
        logger=loggers,
    )
    logger_sink = LightningLoggerSink(trainer)
    module.sinks.append(logger_sink)
    if session is not None:
        session.record["data"] = datamodule.fingerprint()  # each checkpoint's run record holds it
    if write_files and trainer.is_global_zero:
        with writing("the run record", output_dir / RUN_CONFIG, "nothing else was written yet"):
            write_json(output_dir / RUN_CONFIG, run_record(cfg, datamodule.fingerprint()))
        if resumed_step is not None:
            drop_reports_past(output_dir / METRICS, resumed_step, revalidated, logger_sink)

    resume_from = None if start is None or start.weights_only else str(lightning_state_path(start.path))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        if datamodule.has_validation and not fast_dev_run and module.last_validated_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
    except TrainingInterrupted as stop:
        log.warning("%s; exiting", stop)
        return TrainOutcome(module, trainer, interrupted=True)
    finally:
        module.release()
    if session is not None and not fast_dev_run:
        session.finish(trainer, module)
    return TrainOutcome(module, trainer, interrupted=False)
