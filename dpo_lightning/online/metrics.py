"""objective/* metrics of online DPO's samples, and the share of wall time spent sampling and scoring."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torchmetrics import MeanMetric, SumMetric

from dpo_lightning.online.sampling import SAMPLES_PER_PROMPT

SAMPLE_METRICS = (
    "objective/scores",
    "objective/scores_chosen",
    "objective/scores_rejected",
    "objective/scores_margin",
    "objective/kl",
    "objective/eos_rate",
    "objective/tie_rate",
    "objective/completion_length",
    "objective/sampler_logp_diff",
    "objective/judge_cut_rate",
)


class StepTimer:
    """Seconds spent generating and scoring since the last report (GPU work is waited for before reading)."""

    def __init__(self) -> None:
        self.seconds = {"generation": 0.0, "scoring": 0.0}

    @contextmanager
    def measure(self, phase: str, device: torch.device) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[phase] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


class SampleMetrics(torch.nn.Module):
    """objective/* metrics of the samples since the last report, synchronised across ranks on `report`.

    scores, kl, eos_rate and completion_length are means over every sample; scores_chosen/rejected/margin
    over the pairs that were trained on (ties excluded); tie_rate and ties over prompts. kl is the sampled
    estimate of KL(policy || reference) per completion: the mean of sum(log pi - log pi_ref) over its tokens.
    judge_cut_rate is the share of samples the judge saw with their prompt cut short (to its
    `reward_max_length`; the completion is always kept whole). sampler_logp_diff is a mean over sampled tokens
    of |log-prob the sampler reported - the training policy's|: 0 where the sampler is the policy itself, and
    how far a separate engine's weights or numerics have drifted from the policy's otherwise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.means = torch.nn.ModuleDict({name.replace("/", "__"): MeanMetric() for name in SAMPLE_METRICS})
        self.ties = SumMetric()
        self.timer = StepTimer()
        self.shares = torch.nn.ModuleDict({phase: MeanMetric() for phase in self.timer.seconds})
        self._started = time.perf_counter()

    def _update(self, name: str, values: torch.Tensor, weight: torch.Tensor) -> None:
        self.means[name.replace("/", "__")].update(values.float(), weight=weight.float())

    def update(
        self,
        scores: torch.Tensor,
        pair_scores: tuple[torch.Tensor, torch.Tensor],
        kl: torch.Tensor,
        has_eos: torch.Tensor,
        lengths: torch.Tensor,
        tie: torch.Tensor,
        prompt_weight: torch.Tensor,
        logp_diff: torch.Tensor,
        judge_cut: torch.Tensor | None = None,
    ) -> None:
        """One micro-batch: per-sample (N,) scores, kl, has_eos, lengths; per-prompt (P,) chosen and rejected
        scores, tie flags and weights (0 for the rows that only even out evaluation shards); per sampled token
        (K,) |sampler log-prob - policy log-prob|; per sample (N,) whether the judge saw its prompt cut short."""
        sample_weight = prompt_weight.repeat_interleave(SAMPLES_PER_PROMPT)
        pair_weight = prompt_weight * (~tie).float()
        self._update("objective/scores", scores, sample_weight)
        self._update("objective/kl", kl, sample_weight)
        self._update("objective/eos_rate", has_eos, sample_weight)
        self._update("objective/completion_length", lengths, sample_weight)
        cut = torch.zeros_like(scores) if judge_cut is None else judge_cut.to(scores.device)
        self._update("objective/judge_cut_rate", cut, sample_weight)
        self._update("objective/tie_rate", tie, prompt_weight)
        chosen, rejected = pair_scores
        self._update("objective/scores_chosen", chosen, pair_weight)
        self._update("objective/scores_rejected", rejected, pair_weight)
        self._update("objective/scores_margin", chosen - rejected, pair_weight)
        self.ties.update((tie.float() * prompt_weight).sum())
        self._update("objective/sampler_logp_diff", logp_diff, torch.ones_like(logp_diff))

    def report(self, with_time: bool) -> dict[str, float]:
        """Means since the last report as plain floats (every rank calls this together); then reset."""
        values = {name: self.means[name.replace("/", "__")].compute().item() for name in SAMPLE_METRICS}
        values["objective/ties"] = self.ties.compute().item()
        if with_time:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            for phase, seconds in self.timer.seconds.items():
                self.shares[phase].update(torch.tensor(seconds / elapsed))
                values[f"time/{phase}_share"] = self.shares[phase].compute().item()
        self.reset()
        return values

    def reset(self) -> None:
        for metric in [*self.means.values(), self.ties, *self.shares.values()]:
            metric.reset()
        self.timer.reset()
        self._started = time.perf_counter()
