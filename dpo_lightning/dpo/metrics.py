"""Preference metrics with TRL's names, accumulated between reports and synchronised across ranks.

A report is the pair-weighted mean over every micro-batch and rank since the previous report (logits/* are
token-weighted, as TRL defines them). torchmetrics does the cross-rank reduction when `compute` is called,
which every rank does at the same optimizer step.
"""

from __future__ import annotations

import time

import torch
from torchmetrics import MeanMetric, SumMetric

from dpo_lightning.data.batch import PairBatch
from dpo_lightning.dpo.logprobs import PairLogps
from dpo_lightning.losses import LossOutput

PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
TOKEN_METRICS = ("logits/chosen", "logits/rejected")


def _key(name: str) -> str:
    return name.replace("/", "__")  # ModuleDict keys cannot hold "/"


def pair_values(out: LossOutput, policy: PairLogps) -> dict[str, torch.Tensor]:
    """Per-pair values (B,) of the pair-weighted metrics for one micro-batch."""
    chosen_logps, rejected_logps = policy.chosen.logps.detach(), policy.rejected.logps.detach()
    return {
        "loss": out.losses.detach(),
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
    }


class PairMeans(torch.nn.Module):
    """Pair-weighted means of named per-pair values, plus pairs and tokens per second, until `report`."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.means = torch.nn.ModuleDict({_key(n): MeanMetric(sync_on_compute=True) for n in names})
        self.pairs = SumMetric()
        self.tokens = SumMetric()
        self.padding = MeanMetric()  # share of the padded layout that is padding, per micro-batch
        self.updates = 0
        self._started = time.perf_counter()

    def update_pairs(self, values: dict[str, torch.Tensor], batch: PairBatch) -> torch.Tensor:
        """One micro-batch of per-pair values (B,) over its pair batch; returns the weight (B,) it used, the
        batch's pair weight (0 for pairs that count in no metric: evaluation padding, ties)."""
        some = next(iter(values.values()))
        weight = batch.weights().to(some.device)
        for name, value in values.items():
            self.means[_key(name)].update(value.float(), weight=weight)
        self.pairs.update(weight.sum())
        row_tokens = batch.row_lengths().float().to(some.device)
        self.tokens.update((row_tokens * batch.row_weight(weight)).sum())
        self.padding.update(torch.tensor(batch.padding_share(), device=some.device))
        self.updates += 1
        return weight

    def report(self) -> dict[str, float]:
        """Means since the last report, as plain floats (all ranks must call this together); then reset."""
        values = {name: self.means[_key(name)].compute().item() for name in self.names}
        values.update(self._extra_values())
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        values["samples_per_second"] = self.pairs.compute().item() / elapsed
        values["tokens_per_second"] = self.tokens.compute().item() / elapsed
        values["padding_share"] = self.padding.compute().item()
        self.reset()
        return values

    def _extra_values(self) -> dict[str, float]:
        return {}

    def reset(self) -> None:
        for metric in self.children():
            if isinstance(metric, torch.nn.ModuleDict):
                for inner in metric.values():
                    inner.reset()
            else:
                metric.reset()
        self.updates = 0
        self._started = time.perf_counter()


class PreferenceMetrics(PairMeans):
    """Accumulates one group's (training or validation) DPO metrics until `report` is called."""

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        """`extra`: the per-pair metrics the objective's losses add (`LossOutput.extras`), e.g. ORPO's."""
        super().__init__(PAIR_METRICS + tuple(extra))
        self.token_means = torch.nn.ModuleDict({_key(n): MeanMetric() for n in TOKEN_METRICS})
        self.nll = MeanMetric()  # with an NLL term (sft, rpo_alpha, cpo, simpo, orpo): the chosen tokens' mean NLL
        self._nll_updates = 0

    def update(self, out: LossOutput, policy: PairLogps, batch: PairBatch) -> None:
        """One micro-batch: its loss, the policy's log-probs and the batch, whose pair weight is 0 for pairs
        that only even out the ranks' shares, or ties."""
        weight = self.update_pairs({**pair_values(out, policy), **(out.extras or {})}, batch)
        for name, half in zip(TOKEN_METRICS, policy, strict=True):
            logits_sum, num_tokens = half.logits_sum, half.num_tokens
            total = (num_tokens * weight).sum()
            # the token-weighted mean: each micro-batch weighs in by its completion tokens
            self.token_means[_key(name)].update((logits_sum * weight).sum() / total.clamp(min=1), weight=total)

    def update_nll(self, nll: torch.Tensor, tokens: torch.Tensor) -> None:
        """One micro-batch's chosen-token NLL (a mean over its `tokens` chosen completion tokens)."""
        self.nll.update(nll.detach().float(), weight=tokens.float())
        self._nll_updates += 1

    def _extra_values(self) -> dict[str, float]:
        values = {name: self.token_means[_key(name)].compute().item() for name in TOKEN_METRICS}
        if self._nll_updates:
            values["nll_loss"] = self.nll.compute().item()
            self._nll_updates = 0
        return values


REWARD_METRICS = ("loss", "accuracy", "margin", "scores/chosen", "scores/rejected")


class RewardMetrics(PairMeans):
    """Reward-model training: Bradley-Terry loss, accuracy (chosen scored strictly higher), mean margin."""

    def __init__(self) -> None:
        super().__init__(REWARD_METRICS)

    def update(
        self,
        losses: torch.Tensor,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        batch: PairBatch,
    ) -> None:
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        values = {
            "loss": losses.detach(),
            "accuracy": (chosen > rejected).float(),
            "margin": chosen - rejected,
            "scores/chosen": chosen,
            "scores/rejected": rejected,
        }
        self.update_pairs(values, batch)
