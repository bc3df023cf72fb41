"""The DPO LightningModules: DPOModule (offline pairs from a dataset) and OnlineDPOModule (pairs sampled from
the policy and judged as it trains). Both share one step for training and validation: `dpo.pair_forward`
against the run's `Reference`."""

from __future__ import annotations

import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.data.batch import PairBatch, PromptBatch
from dpo_lightning.dpo.metrics import PreferenceMetrics
from dpo_lightning.dpo.objective import LossSettings, PairResult, pair_forward
from dpo_lightning.dpo.precomputed import PrecomputedReference
from dpo_lightning.dpo.reference import FrozenReference, Reference, SyncedReference
from dpo_lightning.losses import weighted_mean
from dpo_lightning.memory import release_free_memory
from dpo_lightning.online.comparison import compare_generations
from dpo_lightning.online.judges import Judge
from dpo_lightning.online.metrics import SampleMetrics
from dpo_lightning.online.pairing import SampledPairs, sample_log_ratios, sample_pairs, sampler_logp_diff
from dpo_lightning.online.sampling import HFSampler, Sampler, SamplingRNG, SamplingSettings
from dpo_lightning.training.module import TrainingModule
from dpo_lightning.training.references import PendingPrecompute, compute_pending
from dpo_lightning.training.sinks import ReportSink


def sampling_seed(seed: int, rank: int, purpose: str) -> int:
    """A seed per (run seed, rank, purpose): training and validation streams never share draws."""
    return (seed * 1_000_003 + rank * 7919 + (0 if purpose == "train" else 104_729)) % (2**63)


class DPOModule(TrainingModule):
    """DPO on preference pairs from a dataset: the policy against its reference, one shared step."""

    DESCRIPTION = "policy"

    def __init__(
        self,
        cfg: DPOConfig,
        policy: torch.nn.Module,
        reference: Reference,
        sinks: list[ReportSink] | None = None,
        judge: Judge | None = None,
        tokenizer=None,
        pending: PendingPrecompute | None = None,
    ) -> None:
        super().__init__(cfg, sinks)
        self.policy = policy
        self.reference = reference
        self.pending = pending  # reference log-probs to precompute once the ranks have met
        self.loss_settings = LossSettings.of(cfg)
        self.chunk_size = cfg.logps_chunk_size
        self.train_metrics = PreferenceMetrics(self.loss_settings.metric_names)
        self.val_metrics = PreferenceMetrics(self.loss_settings.metric_names)
        # generation metrics every `generation_eval_every` validations: a Judge, not a submodule, so no strategy
        # wraps, shards or saves it
        self.judge = judge
        self.tokenizer = tokenizer

    @property
    def trained(self) -> torch.nn.Module:
        return self.policy

    def frozen_networks(self) -> list[torch.nn.Module]:
        return [self.reference.model] if isinstance(self.reference, FrozenReference) else []

    def synced_reference(self) -> torch.nn.Module | None:
        return self.reference.model if isinstance(self.reference, SyncedReference) else None

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if isinstance(self.reference, SyncedReference):
            # inside this hook Lightning has not yet counted the step just taken
            self.reference.after_step(self.policy, self.global_step + 1)

    def on_fit_start(self) -> None:
        if self.pending is not None:
            self._precompute_reference()
        if self.judge is not None:
            self.judge.to(self.device)

    def _precompute_reference(self) -> None:
        """Compute the pending reference log-probs (every rank its share, the reference placed and sharded like
        the policy), then let the reference network go before the first step."""
        compute_pending(self.pending, self.reference, self.trainer, self.cfg)
        self.pending = None
        if isinstance(self.reference, torch.nn.Module):
            del self.reference  # a registered submodule: unregistered before a plain object takes its name
        self.reference = PrecomputedReference()
        release_free_memory()

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
            self.judge,
            SamplingSettings.of(self.cfg, self.policy, self.tokenizer),
            seed=sampling_seed(self.cfg.seed, 0, "validation"),  # every rank the same draws: one verdict
            logps_chunk_size=self.chunk_size,
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

    def shared_step(self, batch: PairBatch, metrics: PreferenceMetrics) -> torch.Tensor:
        """The loss of one micro-batch of pairs, and the metrics' update."""
        result = pair_forward(self.policy, self.reference, batch, self.loss_settings, chunk_size=self.chunk_size)
        return self.objective(result, batch, metrics)

    def objective(self, result: PairResult, batch: PairBatch, metrics: PreferenceMetrics) -> torch.Tensor:
        """The micro-batch's loss, the pairs' weighted mean of the configured objective (its sft term, or
        rpo_alpha's, reported as nll_loss); the metrics' update."""
        if result.loss.nll is not None:
            chosen = result.policy.chosen
            metrics.update_nll(result.loss.nll, (chosen.num_tokens * batch.weights()).sum())
        metrics.update(result.loss, result.policy, batch)
        return weighted_mean(result.loss.losses, batch.pair_weight)

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, self.train_metrics)

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        self.shared_step(batch, self.val_metrics)


class OnlineDPOModule(DPOModule):
    """Online DPO: each step samples two completions per prompt from the current policy, has the judge score
    them and trains on the ordered pairs with the offline loss, log-prob and metric code. Validation does the
    same on held-out prompts without training, from a fresh fixed random stream each time, so that successive
    validations sample alike and their scores compare the policies, not the draws."""

    def __init__(
        self,
        cfg: DPOConfig,
        policy: torch.nn.Module,
        reference: Reference,
        judge: Judge,
        tokenizer,
        sinks: list[ReportSink] | None = None,
        sampler: Sampler | None = None,
    ):
        super().__init__(cfg, policy, reference, sinks, judge=judge, tokenizer=tokenizer)
        self.sampler = sampler if sampler is not None else HFSampler(policy)
        self.sampling = SamplingSettings.of(cfg, policy, tokenizer)
        self.train_samples = SampleMetrics()
        self.val_samples = SampleMetrics()
        self.sampling_rng = SamplingRNG(cfg.seed)
        self._val_rng = SamplingRNG(cfg.seed)
        self._engine_step: int | None = None  # the optimizer step whose weights the sampler holds

    def sync_sampler(self) -> None:
        """Hand the policy's current weights to the sampler (a no-op for HF generate, which samples the policy
        itself); started on the rank's device the first time."""
        if self._engine_step == self.global_step:
            return
        self.sampler.start(self.device)
        self.sampler.sync(self.policy)
        self._engine_step = self.global_step

    def release(self) -> None:
        self.sampler.close()
        self._engine_step = None

    def on_train_start(self) -> None:
        self.sync_sampler()  # after a resume restored the policy, before the baseline validation samples
        super().on_train_start()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.global_step != self._engine_step and self.global_step % self.cfg.vllm_sync_every == 0:
            self.sync_sampler()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if not self.trainer.sanity_checking:
            self.sync_sampler()  # validation measures the current policy, whatever vllm_sync_every says

    def setup(self, stage: str) -> None:
        # each rank its own stream (the same stream everywhere would sample the same completions for the
        # same prompt); a restored state, loaded later, replaces it
        self.sampling_rng.seed = sampling_seed(self.cfg.seed, self.global_rank, "train")

    def on_validation_epoch_start(self) -> None:
        self._val_rng = SamplingRNG(sampling_seed(self.cfg.seed, self.global_rank, "validation"))

    def report_windows(self) -> dict[str, torch.nn.Module]:
        return {**super().report_windows(), "train_samples": self.train_samples}

    def rank_state_dict(self) -> dict:
        return {**super().rank_state_dict(), "sampling_rng": self.sampling_rng.state_dict()}

    def load_rank_state_dict(self, state: dict) -> None:
        super().load_rank_state_dict(state)
        if "sampling_rng" in state:
            self.sampling_rng.load_state_dict(state["sampling_rng"])

    def sample_pairs(self, batch: PromptBatch, rng: SamplingRNG, samples: SampleMetrics) -> SampledPairs:
        """Sample, judge and order: the pair batch (2P rows) and what the objective metrics need."""
        return sample_pairs(
            self.sampler,
            self.judge,
            self.tokenizer,
            batch,
            self.sampling,
            rng,
            missing_eos_penalty=self.cfg.missing_eos_penalty,
            timer=samples.timer,
            device=self.device,
            packed=self.cfg.padding_free,
            shared=self.cfg.prefix_sharing,
        )

    def online_step(self, batch: PromptBatch, metrics: PreferenceMetrics, samples: SampleMetrics, rng: SamplingRNG):
        sampled = self.sample_pairs(batch, rng, samples)
        result = pair_forward(
            self.policy, self.reference, sampled.pairs, self.loss_settings, chunk_size=self.chunk_size
        )
        loss = self.objective(result, sampled.pairs, metrics)
        samples.update(
            scores=sampled.scores,
            pair_scores=sampled.pair_scores,
            kl=sample_log_ratios(result, sampled.chosen),
            has_eos=sampled.has_eos,
            lengths=sampled.lengths,
            tie=sampled.tie,
            prompt_weight=sampled.prompt_weight,
            logp_diff=sampler_logp_diff(sampled, result.policy_tokens),
            judge_cut=sampled.judge_cut,
        )
        return loss

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        return self.online_step(batch, self.train_metrics, self.train_samples, self.sampling_rng)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.online_step(batch, self.val_metrics, self.val_samples, self._val_rng)

    def extra_report(self, group: str) -> dict[str, float]:
        samples = self.train_samples if group == "training" else self.val_samples
        return {**samples.report(with_time=group == "training"), **super().extra_report(group)}
