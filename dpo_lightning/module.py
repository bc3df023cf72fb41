"""Lightning modules: DPOModule (offline pairs), OnlineDPOModule (pairs sampled and scored as it trains).

Both share one step for training and validation, and the optimizer and reporting of `TrainingModule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch

from dpo_lightning.callbacks import validate_now
from dpo_lightning.config import DPOConfig
from dpo_lightning.data.collate import PairCollator
from dpo_lightning.evaluation import compare_generations
from dpo_lightning.logprobs import SequenceLogps, forward_logps
from dpo_lightning.losses import LossOutput, compute_loss
from dpo_lightning.metrics import PreferenceMetrics, peak_memory_gb
from dpo_lightning.online import (
    SAMPLES_PER_PROMPT,
    SampleMetrics,
    SamplingRNG,
    apply_missing_eos_penalty,
    order_pairs,
    pair_items,
    prompt_rows,
    sample_completions,
    sampling_config,
    stop_token_ids,
)
from dpo_lightning.strategies import clip_gradients, is_fsdp

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


def weighted_mean(losses: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean loss over the pairs that count (weight 1); 0, still attached to the graph, when none does, so
    that every rank's backward pass, and DDP's gradient all-reduce with it, still runs."""
    if weight is None:
        return losses.mean()
    weight = weight.to(losses)
    return (losses * weight).sum() / weight.sum().clamp(min=1.0)


class TrainingModule(L.LightningModule):
    """What every trained model shares: the optimizer and schedule, clipping, and reports at the configured
    cadence. Subclasses name the trained submodule (`TRAINED`), build the metrics and define the steps."""

    TRAINED = "policy"
    PROGRESS_BAR = ("loss", "rewards/accuracies")  # shown as <prefix>_loss and <prefix>_acc

    def __init__(self, cfg: DPOConfig, reporters: list[Reporter] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.reporters = list(reporters or [])
        self.last_validated_step = -1
        self._grad_norms: list[float] = []
        self._seen_step = 0
        # Checkpoints keep the trained weights once, in Hugging Face format beside the trainer state, and frozen
        # models are rebuilt from the configuration: the Lightning state restored on resume holds no weights.
        self.strict_loading = False

    @property
    def trained(self) -> torch.nn.Module:
        return getattr(self, self.TRAINED)

    def save_pretrained(self, folder, state_dict: dict | None) -> None:
        """The trained model in Hugging Face format (rank 0, with the full `state_dict` under FSDP)."""
        self.trained.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)

    def rank_state_dict(self) -> dict:
        """Per-rank state a resumed run needs beside the RNG (each rank's sampling stream, for one)."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass

    def extra_report(self, group: str) -> dict[str, float]:
        """Metrics beyond the main group's, added to each report (every rank calls this together)."""
        return {}

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        cfg = self.cfg
        optimizer = torch.optim.AdamW(
            decay_groups(self.trained, cfg.weight_decay),
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
        trainer = self.trainer
        if (
            self.cfg.validate_at_start
            and self.global_step == 0
            and trainer.limit_val_batches
            and not trainer.fast_dev_run
        ):
            validate_now(trainer)  # the baseline: the policy before its first update

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
        metrics = self.val_metrics.report()
        metrics.update(self.extra_report("validation"))
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
        """Hand a report to Lightning's logger and progress bar and, on rank 0, to the reporters."""
        prefix = "train" if group == "training" else "val"
        # Lightning accepts only epoch-level logs from epoch hooks; either way the value is logged once, as is.
        on_step = in_step_hook
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()}, on_step=on_step, on_epoch=not on_step)
        # short names for the progress bar only; the logger already has them under prefix/
        loss, accuracy = self.PROGRESS_BAR
        bar = {f"{prefix}_loss": metrics[loss], f"{prefix}_acc": metrics[accuracy]}
        self.log_dict(bar, on_step=on_step, on_epoch=not on_step, prog_bar=True, logger=False)
        if self.trainer.is_global_zero:
            for reporter in self.reporters:
                reporter(group, self.global_step, metrics)


class DPOModule(TrainingModule):
    """DPO on preference pairs from a dataset: the policy and its frozen reference, one shared step."""

    def __init__(
        self,
        cfg: DPOConfig,
        policy: torch.nn.Module,
        reference: torch.nn.Module,
        reporters: list[Reporter] | None = None,
        judge=None,
        tokenizer=None,
    ) -> None:
        super().__init__(cfg, reporters)
        self.policy = policy
        self.reference = reference
        self.train_metrics = PreferenceMetrics()
        self.val_metrics = PreferenceMetrics()
        # generation metrics every `generation_eval_every` validations: a RewardScorer, not a submodule, so no
        # strategy wraps, shards or saves it
        self.judge = judge
        self.tokenizer = tokenizer

    def on_fit_start(self) -> None:
        if self.judge is not None:
            self.judge.to(self.device)

    def on_validation_start(self) -> None:
        self.on_fit_start()

    def extra_report(self, group: str) -> dict[str, float]:
        if group != "validation" or not self._generation_due():
            return {}
        batches = self.trainer.datamodule.generation_batches()
        if not batches:
            return {}
        result = compare_generations(
            self.policy,
            self.reference,
            self.tokenizer,
            batches,
            self.judge.score,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            seed=sampling_seed(self.cfg.seed, 0, "validation"),  # every rank the same draws: one verdict
            device=self.device,
        )
        return {f"generation/{name}": float(value) for name, value in result.metrics.items()}

    def _generation_due(self) -> bool:
        """Every `generation_eval_every`-th validation counted by step (so a resumed run keeps the rhythm),
        and the validation after the last step."""
        every = self.cfg.generation_eval_every
        if every <= 0 or self.judge is None or self.trainer.sanity_checking:
            return False
        final = not self.trainer.training and self.trainer.state.fn == "validate"
        return final or (self.global_step // self.cfg.val_check_interval) % every == 0

    # ------------------------------------------------------------------ step

    def train(self, mode: bool = True):
        # Lightning flips every submodule to train mode at fit start; the reference must stay in eval.
        super().train(mode)
        self.reference.eval()
        return self

    def pair_forward(self, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, SequenceLogps, SequenceLogps]:
        """Policy and reference log-probs over the 2B rows (B chosen, then B rejected) and the per-pair loss."""
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
        return out, policy, reference

    def shared_step(self, batch: dict[str, torch.Tensor], metrics: PreferenceMetrics) -> torch.Tensor:
        """The loss of one micro-batch of pairs, and the metrics' update."""
        out, policy, _ = self.pair_forward(batch)
        metrics.update(out, policy, batch["attention_mask"], batch.get("pair_weight"))
        return weighted_mean(out.losses, batch.get("pair_weight"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, self.train_metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.shared_step(batch, self.val_metrics)


class OnlineDPOModule(DPOModule):
    """Online DPO: each step samples two completions per prompt from the current policy, has the reward model
    score them and trains on the ordered pairs with the offline loss, log-prob and metric code. Validation
    does the same on held-out prompts without training, from a fresh fixed random stream each time, so that
    successive validations sample alike and their scores compare the policies, not the draws."""

    def __init__(self, cfg: DPOConfig, policy, reference, reward, tokenizer, reporters: list[Reporter] | None = None):
        super().__init__(cfg, policy, reference, reporters, judge=reward, tokenizer=tokenizer)
        self.collate_pairs = PairCollator(tokenizer.pad_token_id)
        self.generation = sampling_config(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            eos_ids=stop_token_ids(policy, tokenizer),
            pad_id=tokenizer.pad_token_id,
        )
        self.train_samples = SampleMetrics()
        self.val_samples = SampleMetrics()
        self.sampling_rng = SamplingRNG(cfg.seed)
        self._val_rng = SamplingRNG(cfg.seed)

    def setup(self, stage: str) -> None:
        # each rank its own stream (the same stream everywhere would sample the same completions for the
        # same prompt); a restored state, loaded later, replaces it
        self.sampling_rng.seed = sampling_seed(self.cfg.seed, self.global_rank, "train")

    def on_validation_epoch_start(self) -> None:
        self._val_rng = SamplingRNG(sampling_seed(self.cfg.seed, self.global_rank, "validation"))

    def rank_state_dict(self) -> dict:
        return {"sampling_rng": self.sampling_rng.state_dict()}

    def load_rank_state_dict(self, state: dict) -> None:
        if "sampling_rng" in state:
            self.sampling_rng.load_state_dict(state["sampling_rng"])

    def sample_pairs(self, batch: dict, rng: SamplingRNG, samples: SampleMetrics):
        """Sample, score and order: the pair batch (2P rows) and what the objective metrics need."""
        timer = samples.timer
        with timer.measure("generation", self.device):
            with rng.active(self.device):
                completions = sample_completions(
                    self.policy,
                    batch["input_ids"],
                    batch["attention_mask"],
                    self.generation,
                    synced_gpus=is_fsdp(self.trainer) and self.trainer.world_size > 1,
                )
        texts = self.tokenizer.batch_decode(completions.ids, skip_special_tokens=True)
        prompts = [prompt for prompt in batch["prompts"] for _ in range(SAMPLES_PER_PROMPT)]
        with timer.measure("scoring", self.device):
            scores = self.judge.score(prompts, texts).float()
        scores = apply_missing_eos_penalty(scores, completions.has_eos, self.cfg.missing_eos_penalty)
        chosen, rejected, tie = order_pairs(scores.view(-1, SAMPLES_PER_PROMPT))
        pairs = self.collate_pairs(
            pair_items(prompt_rows(batch["input_ids"], batch["attention_mask"]), completions, chosen, rejected)
        )
        weight = batch.get("prompt_weight", torch.ones(len(batch["prompts"]))).float().cpu()
        pairs["pair_weight"] = weight * (~tie).float()
        per_prompt = scores.view(-1, SAMPLES_PER_PROMPT)
        index = torch.arange(len(chosen))
        sampled = {
            "scores": scores,
            "pair_scores": (per_prompt[index, chosen], per_prompt[index, rejected]),
            "has_eos": completions.has_eos,
            "lengths": torch.tensor([len(ids) for ids in completions.ids], dtype=torch.float32),
            "tie": tie,
            "chosen": chosen,
            "prompt_weight": weight,
        }
        return {name: value.to(self.device) for name, value in pairs.items()}, sampled

    def online_step(self, batch: dict, metrics: PreferenceMetrics, samples: SampleMetrics, rng: SamplingRNG):
        pairs, sampled = self.sample_pairs(batch, rng, samples)
        out, policy, reference = self.pair_forward(pairs)
        metrics.update(out, policy, pairs["attention_mask"], pairs["pair_weight"])
        # per-sample KL estimate, back in prompt-major order: rows are the P chosen, then the P rejected
        log_ratio = (policy.logps.detach() - reference.logps.float()).cpu()
        by_role = torch.stack(log_ratio.chunk(2), dim=1)  # (P, 2): chosen, rejected
        first_chosen = (sampled.pop("chosen") == 0).unsqueeze(1)
        kl = torch.where(first_chosen, by_role, by_role.flip(1)).flatten()
        samples.update(kl=kl, **sampled)
        return weighted_mean(out.losses, pairs["pair_weight"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.online_step(batch, self.train_metrics, self.train_samples, self.sampling_rng)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.online_step(batch, self.val_metrics, self.val_samples, self._val_rng)

    def extra_report(self, group: str) -> dict[str, float]:
        samples = self.train_samples if group == "training" else self.val_samples
        return {**samples.report(with_time=group == "training"), **super().extra_report(group)}


def sampling_seed(seed: int, rank: int, purpose: str) -> int:
    """A seed per (run seed, rank, purpose): training and validation streams never share draws."""
    return (seed * 1_000_003 + rank * 7919 + (0 if purpose == "train" else 104_729)) % (2**63)
