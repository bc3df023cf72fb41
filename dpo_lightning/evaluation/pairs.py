"""DPO's implicit-reward metrics of a trained policy on preference pairs, with validation's code.

Per pair, rewards = beta * (policy logp - reference logp) of chosen and rejected; the DPO loss, accuracy
(chosen reward strictly greater), margins, rewards and log-probs, averaged by the same `PreferenceMetrics`
that validation uses. With a judge, also how often it agrees with the labels (chosen scored strictly higher).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from dpo_lightning.data.batch import PairBatch
from dpo_lightning.dpo.metrics import PreferenceMetrics
from dpo_lightning.dpo.objective import LossSettings, pair_forward
from dpo_lightning.dpo.reference import Reference


class PairEvaluation(NamedTuple):
    metrics: dict[str, float]
    margins: list[float]  # per pair: chosen reward - rejected reward


@torch.no_grad()
def evaluate_pairs(
    policy: torch.nn.Module,
    reference: Reference,
    batches: Iterable[PairBatch],
    *,
    settings: LossSettings,
    chunk_size: int = 0,
) -> PairEvaluation:
    """DPO metrics of collated pair batches under the objective `settings`, with validation's code."""
    device = next(policy.parameters()).device
    metrics = PreferenceMetrics(settings.metric_names).to(device)
    margins: list[float] = []
    for batch in batches:
        batch = batch.to(device)
        result = pair_forward(policy, reference, batch, settings, chunk_size=chunk_size)
        metrics.update(result.loss, result.policy, batch)
        margins += (result.loss.chosen_rewards - result.loss.rejected_rewards).tolist()
    values = metrics.report()
    for throughput in ("samples_per_second", "tokens_per_second", "padding_share"):
        values.pop(throughput)  # of this machine and batching, not of the model
    return PairEvaluation(values, margins)


def reward_agreement(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """How often the reward model agrees with the dataset: chosen scored strictly higher than rejected."""
    return float((chosen_scores > rejected_scores).float().mean()) if len(chosen_scores) else math.nan
