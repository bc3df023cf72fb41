"""TrainingModule: what every trained model's LightningModule shares, the optimizer and schedule, gradient
clipping, and reports at the configured cadence through one list of sinks.

Subclasses (`dpo_module.py`, `reward_module.py`) say which submodule is trained (`trained`), build their
metrics and define one shared step for training and validation.
"""

from __future__ import annotations

import logging
import resource

import lightning as L
import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.lightning_compat import validate_now, validate_on_steps
from dpo_lightning.models.sharding import is_sharded, reshard
from dpo_lightning.training.fsdp import load_sharded_weights
from dpo_lightning.training.health import TrainingHealth
from dpo_lightning.training.optim import adamw, decay_groups, lr_lambda, warmup_steps_for
from dpo_lightning.training.sinks import Report, ReportSink
from dpo_lightning.training.strategies import clip_gradients, decoder_layer_classes, is_fsdp
from dpo_lightning.training.window import load_window_state, window_state

log = logging.getLogger(__name__)


def short_window_scale(accumulation_steps: int, micro_batches: int) -> float:
    """The factor that turns the sum of `micro_batches` losses each divided by `accumulation_steps` into
    their mean (1 for a full window)."""
    if micro_batches <= 0 or micro_batches >= accumulation_steps:
        return 1.0
    return accumulation_steps / micro_batches


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU (GB = 1e9 bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def periodic_validation(cfg: DPOConfig, step: int) -> bool:
    """Whether optimizer step `step` ends with one of the run's periodic validations."""
    return step > 0 and step % cfg.val_check_interval == 0


class TrainingModule(L.LightningModule):
    """The optimizer, schedule, clipping and reporting of every trained model."""

    DESCRIPTION = "model"  # what the trained model is called in log lines
    PROGRESS_BAR = ("loss", "rewards/accuracies")  # shown as <prefix>_loss and <prefix>_acc

    def __init__(self, cfg: DPOConfig, sinks: list[ReportSink] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.sinks: list[ReportSink] = list(sinks or [])
        self.last_validated_step = -1
        self._grad_norms: list[float] = []
        self._seen_step = 0
        self._window_micro_batches = 0  # backward passes since the last optimizer step
        self.sharded_weights_from = None  # a sharded checkpoint whose trained weights a warm start takes
        self._schedule: dict[str, int] = {}  # the learning-rate schedule's warmup and total steps
        self._saved_schedule: dict[str, int] | None = None  # a resumed checkpoint's
        self.health = TrainingHealth()  # non-finite values stop the run; vanished gradients are warned about
        # Checkpoints keep the trained weights once, in Hugging Face format beside the trainer state, and frozen
        # models are rebuilt from the configuration: the Lightning state restored on resume holds no weights.
        self.strict_loading = False

    @property
    def trained(self) -> torch.nn.Module:
        """The submodule the optimizer trains and checkpoints save."""
        raise NotImplementedError

    def save_pretrained(self, folder, state_dict: dict | None) -> None:
        """The trained model in Hugging Face format (rank 0, with the full `state_dict` under FSDP)."""
        self.trained.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)

    def frozen_networks(self) -> list[torch.nn.Module]:
        """Networks beside the trained one that run forward passes (a reference): FSDP shards them too."""
        return []

    def synced_reference(self) -> torch.nn.Module | None:
        """A reference network that moves as the policy trains (TR-DPO), which checkpoints therefore keep."""
        return None

    def configure_model(self) -> None:
        # Under FSDP2 each network is sharded here, once the device mesh exists and before the optimizer sees
        # the parameters; elsewhere the models stay as loaded. A warm start's sharded weights load either way.
        if is_fsdp(self.trainer) and not is_sharded(self.trained):  # a validate after fit calls this again
            strategy = self.trainer.strategy
            strategy.shard(self.trained, decoder_layer_classes(self.trained))
            for network in self.frozen_networks():
                strategy.shard(network, decoder_layer_classes(network))
        if self.sharded_weights_from is not None:
            load_sharded_weights(self.trained, self.sharded_weights_from)
            self.sharded_weights_from = None

    def reshard(self) -> None:
        """Free the gathered parameters a forward without backward leaves whole (FSDP's root units)."""
        if is_fsdp(self.trainer):
            for network in (self.trained, *self.frozen_networks()):
                reshard(network)

    def report_windows(self) -> dict[str, torch.nn.Module]:
        """The metric containers whose training report window a checkpoint keeps."""
        return {"train_metrics": self.train_metrics}

    def rank_state_dict(self) -> dict:
        """Per-rank state a resumed run needs beside the RNG: the open report window (what each rank's metrics
        and gradient norms hold since the last report), and what subclasses add (a sampling stream)."""
        windows = {name: window_state(metrics) for name, metrics in self.report_windows().items()}
        return {"report_window": {"metrics": windows, "grad_norms": list(self._grad_norms)}}

    def load_rank_state_dict(self, state: dict) -> None:
        window = state.get("report_window")
        if window is None:
            return
        containers = self.report_windows()
        for name, saved in window["metrics"].items():
            load_window_state(containers[name], saved, self.device)
        self._grad_norms = list(window["grad_norms"])

    def extra_report(self, group: str) -> dict[str, float]:
        """Metrics beyond the main group's, added to each report (every rank calls this together)."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The trained weights are at the checkpoint's root in Hugging Face format, once; under FSDP every rank
        # keeps its own shard in the Lightning state instead, since no rank holds the whole model.
        if not is_fsdp(self.trainer):
            checkpoint["state_dict"] = {}
        checkpoint["lr_schedule"] = dict(self._schedule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._saved_schedule = checkpoint.get("lr_schedule")  # compared with this run's at train start

    def _continue_schedule(self) -> None:
        """A resumed run whose length changed (max_steps or num_epochs raised) keeps the warmup it already did:
        its schedule decays over the new total from the checkpoint's step, instead of warming up again at
        its new ratio. One whose learning_rate changed (after a divergence) continues the same schedule at the
        new peak rate. Each is said in one line."""
        saved, self._saved_schedule = self._saved_schedule, None
        if saved is None:
            return
        scheduler = self.lr_schedulers()
        length_changed = saved["total_steps"] != self._schedule["total_steps"]
        rate_changed = any(base != self.cfg.learning_rate for base in scheduler.base_lrs)
        if not (length_changed or rate_changed):
            return
        old_rate = scheduler.base_lrs[0]
        if length_changed:
            total, warmup = self._schedule["total_steps"], saved["warmup_steps"]
            self._schedule = {"warmup_steps": warmup, "total_steps": total}
            scheduler.lr_lambdas = [lr_lambda(self.cfg.lr_scheduler, warmup, total) for _ in scheduler.base_lrs]
        scheduler.base_lrs = [self.cfg.learning_rate for _ in scheduler.base_lrs]  # every group shares one rate
        # the restored optimizer holds the old schedule's rate for the next step: set the new one now
        groups = scheduler.optimizer.param_groups
        for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = base
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        if length_changed:
            log.info(
                "the run now ends at step %d instead of %d: the learning-rate schedule (%s) keeps its %d warmup "
                "steps and now spans to step %d",
                self._schedule["total_steps"],
                saved["total_steps"],
                self.cfg.lr_scheduler,
                self._schedule["warmup_steps"],
                self._schedule["total_steps"],
            )
        if rate_changed:
            log.info("learning_rate is now %.3g (the checkpoint trained at %.3g)", self.cfg.learning_rate, old_rate)
        log.info("the rate for step %d is %.3g", self.global_step + 1, scheduler._last_lr[0])

    def release(self) -> None:
        """Let go of what the run holds beside its models (a sampling engine) once training and validation are
        over."""

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        cfg = self.cfg
        optimizer = adamw(
            decay_groups(self.trained, cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
        )
        total = int(self.trainer.estimated_stepping_batches)
        self._schedule = {"warmup_steps": warmup_steps_for(cfg, total), "total_steps": total}
        schedule = lr_lambda(cfg.lr_scheduler, self._schedule["warmup_steps"], total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_after_backward(self) -> None:
        self._window_micro_batches += 1

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning divides every micro-batch's loss by gradient_accumulation_steps; a window the epoch's end cut
        # short has fewer micro-batches, and its update must still be their mean, not a fraction of it.
        done, self._window_micro_batches = self._window_micro_batches, 0
        scale = short_window_scale(self.cfg.gradient_accumulation_steps, done)
        if scale != 1.0:
            for param in self.trained.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.health.saw_loss(loss)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Clip here rather than through the Trainer so that the pre-clip norm is measured once and reported; a
        # non-finite loss or norm stops the run here, before the update would spoil the weights.
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = float(clip_gradients(self.trainer, self, max_norm))
        self.health.check(self.global_step + 1, norm, self.trainer.strategy)
        self._grad_norms.append(norm)

    # ------------------------------------------------------------------ reporting

    def on_train_start(self) -> None:
        self._seen_step = self.global_step  # a resumed run starts past step 0
        if not self.trainer.fast_dev_run:
            validate_on_steps(self.trainer, lambda step: periodic_validation(self.cfg, step))
        self._continue_schedule()
        trainer = self.trainer
        if (
            self.cfg.validate_at_start
            and self.global_step == 0
            and trainer.limit_val_batches
            and not trainer.fast_dev_run
        ):
            validate_now(trainer)  # the baseline: the policy before its first update

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.report_finished_step()

    def report_finished_step(self) -> None:
        """The training report of the optimizer step just finished, when one is due; once per step. The
        checkpoint callback calls it before it saves, so that no checkpoint is complete before its step's
        report is written (a crash in between would lose the report for good)."""
        step = self.global_step
        if step == self._seen_step:  # mid-accumulation, or already reported
            return
        self._seen_step = step
        if step % self.cfg.report_every_n_steps == 0:
            self._report_training(in_step_hook=True)

    def on_train_epoch_end(self) -> None:
        self.flush_training_report(in_step_hook=False)

    def flush_training_report(self, in_step_hook: bool = True) -> None:
        """Report the optimizer steps since the last report, if any (before a stop, at epoch end)."""
        if self.train_metrics.updates and self._grad_norms:
            self._report_training(in_step_hook=in_step_hook)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.val_metrics.updates:
            return
        self.last_validated_step = self.global_step
        metrics = self.val_metrics.report()
        metrics.update(self.extra_report("validation"))
        self.reshard()
        self._emit("validation", metrics, in_step_hook=False)

    def _report_training(self, in_step_hook: bool) -> None:
        metrics = self.train_metrics.report()
        metrics.update(self.extra_report("training"))
        grad_norms = torch.tensor(self._grad_norms or [float("nan")], device=self.device)
        metrics["grad_norm"] = self.trainer.strategy.reduce(grad_norms.mean(), reduce_op="mean").item()
        metrics["learning_rate"] = self.lr_schedulers().get_last_lr()[0]
        metrics["peak_memory_gb"] = peak_memory_gb(self.device)
        self._grad_norms.clear()
        self._emit("training", metrics, in_step_hook)

    def _emit(self, group: str, metrics: dict[str, float], in_step_hook: bool) -> None:
        """Show the headline numbers in the progress bar and hand the report to every sink (rank 0)."""
        prefix = "train" if group == "training" else "val"
        loss, accuracy = self.PROGRESS_BAR
        bar = {f"{prefix}_loss": metrics[loss], f"{prefix}_acc": metrics[accuracy]}
        # Lightning accepts only epoch-level logs from epoch hooks; either way the value is shown once, as is.
        self.log_dict(bar, on_step=in_step_hook, on_epoch=not in_step_hook, prog_bar=True, logger=False, batch_size=1)
        if self.trainer.is_global_zero:
            report = Report(group, self.global_step, metrics)
            for sink in self.sinks:
                sink(report)
