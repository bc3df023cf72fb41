"""DPOModule: the policy, its frozen reference, one shared step for training and validation."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.logprobs import forward_logps
from dpo_lightning.losses import LossOutput, compute_loss
from dpo_lightning.metrics import PreferenceMetrics, peak_memory_gb
from dpo_lightning.strategies import clip_gradients

# A reporter receives (group, step, metrics) on global rank 0: metrics.jsonl, stdout, Determined.
Reporter = Callable[[str, int, dict[str, float]], None]


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup, then decay."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor


def warmup_steps_for(cfg: DPOConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying biases and norm gains only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class DPOModule(L.LightningModule):
    def __init__(
        self,
        cfg: DPOConfig,
        policy: torch.nn.Module,
        reference: torch.nn.Module,
        reporters: list[Reporter] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.policy = policy
        self.reference = reference
        self.reporters = list(reporters or [])
        self.train_metrics = PreferenceMetrics()
        self.val_metrics = PreferenceMetrics()
        self.last_validated_step = -1
        self._grad_norms: list[float] = []
        self._seen_step = 0
        # Checkpoints keep the policy's weights once, in Hugging Face format beside the trainer state, and the
        # reference is rebuilt from the configuration: the Lightning state restored on resume holds no weights.
        self.strict_loading = False

    # ------------------------------------------------------------------ step

    def train(self, mode: bool = True):
        # Lightning flips every submodule to train mode at fit start; the reference must stay in eval.
        super().train(mode)
        self.reference.eval()
        return self

    def shared_step(self, batch: dict[str, torch.Tensor], metrics: PreferenceMetrics) -> torch.Tensor:
        """Policy and reference log-probs over the 2B rows, the loss, and the metrics' update."""
        policy = forward_logps(self.policy, batch)
        with torch.no_grad():
            reference = forward_logps(self.reference, batch)
        out: LossOutput = compute_loss(
            self.cfg.loss_type,
            *policy.logps.chunk(2),
            *reference.logps.float().chunk(2),
            beta=self.cfg.beta,
            label_smoothing=self.cfg.label_smoothing,
            chosen_lengths=policy.num_tokens.chunk(2)[0],
            rejected_lengths=policy.num_tokens.chunk(2)[1],
        )
        metrics.update(out, policy, batch["attention_mask"], batch.get("pair_weight"))
        return out.losses.mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, self.train_metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.shared_step(batch, self.val_metrics)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            decay_groups(self.policy, cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
        )
        total = int(self.trainer.estimated_stepping_batches)
        schedule = lr_lambda(cfg.lr_scheduler, warmup_steps_for(cfg, total), total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Clip here rather than through the Trainer so that the pre-clip norm is measured once and reported.
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = clip_gradients(self._trainer, self, max_norm)
        self._grad_norms.append(float(norm))

    # ------------------------------------------------------------------ reporting

    def on_train_start(self) -> None:
        self._seen_step = self.global_step  # a resumed run starts past step 0

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.global_step
        if step == self._seen_step:  # mid-accumulation: no optimizer step finished
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
        self._emit("validation", self.val_metrics.report(), in_step_hook=False)

    def _report_training(self, in_step_hook: bool) -> None:
        metrics = self.train_metrics.report()
        grad_norms = torch.tensor(self._grad_norms or [float("nan")], device=self.device)
        metrics["grad_norm"] = self.trainer.strategy.reduce(grad_norms.mean(), reduce_op="mean").item()
        metrics["learning_rate"] = self.lr_schedulers().get_last_lr()[0]
        metrics["peak_memory_gb"] = peak_memory_gb(self.device)
        self._grad_norms.clear()
        self._emit("training", metrics, in_step_hook)

    def _emit(self, group: str, metrics: dict[str, float], in_step_hook: bool) -> None:
        """Hand a report to Lightning's logger and progress bar and, on rank 0, to the reporters."""
        prefix = "train" if group == "training" else "val"
        # Lightning accepts only epoch-level logs from epoch hooks; either way the value is logged once, as is.
        on_step = in_step_hook
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, on_step=on_step, on_epoch=not on_step)
        # short names for the progress bar only; the logger already has them under prefix/
        bar = {f"{prefix}_loss": metrics["loss"], f"{prefix}_acc": metrics["rewards/accuracies"]}
        self.log_dict(bar, on_step=on_step, on_epoch=not on_step, prog_bar=True, logger=False)
        if self.trainer.is_global_zero:
            for reporter in self.reporters:
                reporter(group, self.global_step, metrics)
