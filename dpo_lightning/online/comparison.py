"""Policy against reference on prompts: one completion each, judged, with a win rate and its interval.

Per prompt one completion from the policy and one from the reference, each from its own random stream; the
judge scores both. Win rate = wins / (wins + losses), ties counted apart, with a Wilson 95% interval; mean
scores; the mean over the policy's completions of log pi(y|x) - log pi_ref(y|x) (an unbiased estimate of
KL(policy || reference) when sampled at temperature 1 and top_p 1; on tempered samples the same log-ratio, not
the KL); mean completion length and EOS rate of each model. Validation (`generation/*` metrics) and
evaluate.py both measure through `compare_generations`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from dpo_lightning.data.batch import PromptBatch, SequenceBatch
from dpo_lightning.data.reward_text import prompt_text
from dpo_lightning.dpo.logprobs import forward_logps
from dpo_lightning.dpo.reference import Reference
from dpo_lightning.online.judges import Judge
from dpo_lightning.online.sampling import HFSampler, Sampler, SamplingRNG, SamplingSettings

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927): unlike the normal approximation it stays
    inside [0, 1] and keeps its coverage near 0 and 1 and for small samples. (nan, nan) without trials."""
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


class WinRate(NamedTuple):
    wins: int
    losses: int
    ties: int
    rate: float  # wins / (wins + losses); nan when every comparison tied
    low: float
    high: float


def win_rate(policy_scores: torch.Tensor, reference_scores: torch.Tensor) -> WinRate:
    """Policy against reference, prompt by prompt: a win is a strictly higher score; equal scores are ties,
    counted but left out of the rate (they say nothing about which model is better)."""
    wins = int((policy_scores > reference_scores).sum())
    losses = int((policy_scores < reference_scores).sum())
    ties = len(policy_scores) - wins - losses
    decided = wins + losses
    rate = wins / decided if decided else math.nan
    return WinRate(wins, losses, ties, rate, *wilson_interval(wins, decided))


# ----------------------------------------------------------------------------- completions on prompts


class Sampled(NamedTuple):
    ids: list[list[int]]
    texts: list[str]
    has_eos: torch.Tensor  # (P,) bool


class GenerationEvaluation(NamedTuple):
    metrics: dict[str, float]
    policy_scores: list[float]
    reference_scores: list[float]
    samples: list[dict]  # the first few prompts with both completions and their scores


def sample_one(sampler: Sampler, tokenizer, batch: PromptBatch, settings: SamplingSettings, rng) -> Sampled:
    """One completion per prompt, from `rng`'s stream."""
    out = sampler.sample(batch, 1, settings, rng)
    return Sampled(out.ids, tokenizer.batch_decode(out.ids, skip_special_tokens=True), out.has_eos)


@torch.no_grad()
def sequence_log_ratio(
    policy, reference: Reference, prompts: list[list[int]], completions: list[list[int]], pad_id: int, chunk_size=0
) -> torch.Tensor:
    """(N,) log pi(y|x) - log pi_ref(y|x) of each completion, summed over its tokens."""
    device = next(policy.parameters()).device
    batch = SequenceBatch.from_rows(prompts, completions, pad_id).to(device)
    policy_logps = forward_logps(policy, batch, chunk_size).logps.float()
    return (policy_logps - reference.logps(batch).logps.float()).cpu()


def compare_generations(
    policy: torch.nn.Module,
    reference: Reference,
    tokenizer,
    batches: Iterable[PromptBatch],
    judge: Judge,
    settings: SamplingSettings,
    *,
    seed: int,
    sampler_for: Callable[[torch.nn.Module], Sampler] = HFSampler,
    logps_chunk_size: int = 0,
    num_samples_shown: int = 5,
) -> GenerationEvaluation:
    """Policy vs reference on prompt batches: one completion each (from `sampler_for(model)`), judged."""
    # independent streams: the two models' draws must not be the same random numbers
    streams = {"policy": SamplingRNG(seed), "reference": SamplingRNG(seed + 1_000_003)}
    collected: dict[str, list] = {k: [] for k in ("policy", "reference", "kl", "p_eos", "r_eos", "p_len", "r_len")}
    samples: list[dict] = []
    policy_sampler = sampler_for(policy)
    for batch in batches:
        mine = sample_one(policy_sampler, tokenizer, batch, settings, streams["policy"])
        # only while the reference samples: for a LoRA policy it is the same model with its adapters off
        with reference.sampling_model() as reference_model:
            theirs = sample_one(sampler_for(reference_model), tokenizer, batch, settings, streams["reference"])
        prompts = batch.prompts
        policy_scores = judge.score(prompts, mine.texts).float()
        reference_scores = judge.score(prompts, theirs.texts).float()
        kl = sequence_log_ratio(
            policy, reference, batch.prompt_ids(), mine.ids, tokenizer.pad_token_id, logps_chunk_size
        )
        collected["policy"] += policy_scores.tolist()
        collected["reference"] += reference_scores.tolist()
        collected["kl"] += kl.tolist()
        collected["p_eos"] += mine.has_eos.float().tolist()
        collected["r_eos"] += theirs.has_eos.float().tolist()
        collected["p_len"] += [float(len(ids)) for ids in mine.ids]
        collected["r_len"] += [float(len(ids)) for ids in theirs.ids]
        for i in range(min(len(prompts), num_samples_shown - len(samples))):
            samples.append(
                {
                    "prompt": prompt_text(prompts[i]),
                    "policy": mine.texts[i],
                    "reference": theirs.texts[i],
                    "policy_score": float(policy_scores[i]),
                    "reference_score": float(reference_scores[i]),
                }
            )
    result = win_rate(torch.tensor(collected["policy"]), torch.tensor(collected["reference"]))
    metrics = {
        "win_rate": result.rate,
        "win_rate/low": result.low,
        "win_rate/high": result.high,
        "wins": result.wins,
        "losses": result.losses,
        "ties": result.ties,
        "policy/score": _mean(collected["policy"]),
        "reference/score": _mean(collected["reference"]),
        "kl": _mean(collected["kl"]),
        "policy/length": _mean(collected["p_len"]),
        "reference/length": _mean(collected["r_len"]),
        "policy/eos_rate": _mean(collected["p_eos"]),
        "reference/eos_rate": _mean(collected["r_eos"]),
    }
    return GenerationEvaluation(metrics, collected["policy"], collected["reference"], samples)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
