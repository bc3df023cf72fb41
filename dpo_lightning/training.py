"""A local run, top to bottom: check -> data -> models -> Trainer -> fit -> validate -> export."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import lightning as L

from dpo_lightning.callbacks import JsonlReporter, LocalCheckpointing, TrainingInterrupted, print_reporter
from dpo_lightning.checkpoints import RUN_CONFIG, export_final, run_record, write_json
from dpo_lightning.config import DPOConfig
from dpo_lightning.data import check_source
from dpo_lightning.data.datamodule import DPODataModule
from dpo_lightning.models import load_policy, load_reference, load_tokenizer, resolve_model
from dpo_lightning.module import DPOModule

log = logging.getLogger(__name__)


def launcher_layout() -> tuple[int | str, int]:
    """(devices, num_nodes) from a torchrun-style launcher's environment, else Lightning's defaults."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", int(os.environ["WORLD_SIZE"]) // local))
        return local, nodes
    return "auto", 1


def build_trainer(cfg: DPOConfig, *, has_validation: bool, callbacks: list, fast_dev_run: bool) -> L.Trainer:
    """Lightning counts validation intervals in batches; the config counts optimizer steps."""
    devices, num_nodes = launcher_layout()
    return L.Trainer(
        accelerator="auto",
        devices=devices,
        num_nodes=num_nodes,
        precision=cfg.precision,
        max_steps=cfg.max_steps,
        max_epochs=cfg.num_epochs if cfg.max_steps < 0 else None,
        accumulate_grad_batches=cfg.gradient_accumulation_steps,
        val_check_interval=cfg.val_check_interval * cfg.gradient_accumulation_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=None if has_validation else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # the module decides when to report; Lightning must not drop those logs
        use_distributed_sampler=False,  # our sampler shards by rank and can resume mid-epoch
        enable_checkpointing=False,  # checkpoints follow our layout (callbacks.LocalCheckpointing)
        default_root_dir=cfg.output_dir,
        callbacks=callbacks,
        fast_dev_run=fast_dev_run,
    )


def resolve_sources(cfg: DPOConfig):
    """Cheap checks of every path and model name, before anything is loaded."""
    check_source(cfg)
    policy_source = resolve_model(cfg.model_name, "model_name")
    ref_source = resolve_model(cfg.ref_model_name, "ref_model_name") if cfg.ref_model_name else None
    return policy_source, ref_source


class TrainOutcome(NamedTuple):
    module: DPOModule
    trainer: L.Trainer
    interrupted: bool


def train(cfg: DPOConfig, *, fast_dev_run: bool = False) -> TrainOutcome:
    """Train on this machine (or under torchrun), validate at the end and export the final policy."""
    # The frozen reference is in eval mode on purpose; Lightning would warn about it at every fit.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    policy_source, ref_source = resolve_sources(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(policy_source, cfg.trust_remote_code)
    datamodule = DPODataModule(cfg, tokenizer)
    datamodule.prepare()  # data errors surface before the models load

    output_dir = Path(cfg.output_dir)
    record = run_record(cfg)
    policy = load_policy(cfg, policy_source)
    reference = load_reference(cfg, policy, ref_source)
    reporters = [print_reporter] if fast_dev_run else [JsonlReporter(output_dir / "metrics.jsonl")]
    module = DPOModule(cfg, policy, reference, reporters=reporters)
    callbacks = []
    if not fast_dev_run:
        callbacks.append(
            LocalCheckpointing(
                output_dir / "checkpoints", tokenizer, record, cfg.checkpoint_every_n_steps, cfg.keep_last_n_checkpoints
            )
        )
    trainer = build_trainer(
        cfg, has_validation=datamodule.has_validation, callbacks=callbacks, fast_dev_run=fast_dev_run
    )
    if trainer.is_global_zero and not fast_dev_run:
        write_json(output_dir / RUN_CONFIG, record)

    try:
        trainer.fit(module, datamodule=datamodule)
    except TrainingInterrupted as stop:
        log.warning("%s; exiting", stop)
        return TrainOutcome(module, trainer, interrupted=True)

    if datamodule.has_validation and not fast_dev_run and module.last_validated_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero and not fast_dev_run:
        final = export_final(output_dir, module.policy, tokenizer, record)
        log.info("final policy saved to %s", final)
    return TrainOutcome(module, trainer, interrupted=False)


def run_local(cfg: DPOConfig, *, fast_dev_run: bool = False) -> int:
    """The process exit status of a local run: 0 when finished or interrupted with a checkpoint saved."""
    train(cfg, fast_dev_run=fast_dev_run)
    return 0


def configure_logging() -> None:
    level = os.environ.get("DPO_LIGHTNING_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
