"""Measure a trained policy: DPO's implicit-reward metrics on preference pairs, and the policy's completions
against its reference's, judged by a reward model.

- Pairs: per pair, rewards = beta * (policy logp - reference logp) of chosen and rejected; the DPO loss,
  accuracy (chosen reward strictly greater), margins, rewards and log-probs, averaged by the same
  `PreferenceMetrics` that validation uses. With a reward model, also how often it agrees with the labels
  (chosen scored strictly higher).
- Prompts: one completion from the policy and one from the reference per prompt, each from its own random
  stream; the reward model scores both. Win rate = wins / (wins + losses), ties counted apart, with a Wilson
  95% interval; mean scores; the mean over the policy's completions of log pi(y|x) - log pi_ref(y|x) (an
  unbiased estimate of KL(policy || reference) when sampled at temperature 1 and top_p 1; on tempered samples
  the same log-ratio, not the KL); mean completion length and EOS rate of each model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from dpo_lightning.data.collate import completion_batch
from dpo_lightning.logprobs import forward_logps
from dpo_lightning.losses import compute_loss
from dpo_lightning.metrics import PreferenceMetrics
from dpo_lightning.online import SamplingRNG, prompt_rows, sample_completions, sampling_config, stop_token_ids
from dpo_lightning.rewards import prompt_text

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


# ----------------------------------------------------------------------------- preference pairs


class PairEvaluation(NamedTuple):
    metrics: dict[str, float]
    margins: list[float]  # per pair: chosen reward - rejected reward


@torch.no_grad()
def evaluate_pairs(
    policy,
    reference,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    device: torch.device | str = "cpu",
) -> PairEvaluation:
    """DPO metrics of collated pair batches (2B rows: B chosen, then B rejected), with validation's code."""
    metrics = PreferenceMetrics().to(device)
    margins: list[float] = []
    for batch in batches:
        batch = {name: value.to(device) for name, value in batch.items()}
        policy_logps = forward_logps(policy, batch)
        reference_logps = forward_logps(reference, batch)
        out = compute_loss(
            loss_type,
            *policy_logps.logps.float().chunk(2),
            *reference_logps.logps.float().chunk(2),
            beta=beta,
            label_smoothing=label_smoothing,
            chosen_lengths=policy_logps.num_tokens.chunk(2)[0],
            rejected_lengths=policy_logps.num_tokens.chunk(2)[1],
        )
        metrics.update(out, policy_logps, batch["attention_mask"])
        margins += (out.chosen_rewards - out.rejected_rewards).tolist()
    values = metrics.report()
    for throughput in ("samples_per_second", "tokens_per_second"):
        values.pop(throughput)  # of this machine, not of the model
    return PairEvaluation(values, margins)


def reward_agreement(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """How often the reward model agrees with the dataset: chosen scored strictly higher than rejected."""
    return float((chosen_scores > rejected_scores).float().mean()) if len(chosen_scores) else math.nan


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


def sample_one(model, tokenizer, batch: dict, generation, rng: SamplingRNG, device) -> Sampled:
    """One completion per left-padded prompt, from `rng`'s stream."""
    with rng.active(torch.device(device)):
        out = sample_completions(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), generation)
    return Sampled(out.ids, tokenizer.batch_decode(out.ids, skip_special_tokens=True), out.has_eos)


@torch.no_grad()
def sequence_log_ratio(policy, reference, prompts: list[list[int]], completions: list[list[int]], pad_id, device):
    """(N,) log pi(y|x) - log pi_ref(y|x) of each completion, summed over its tokens."""
    batch = {k: v.to(device) for k, v in completion_batch(prompts, completions, pad_id).items()}
    return (forward_logps(policy, batch).logps.float() - forward_logps(reference, batch).logps.float()).cpu()


def compare_generations(
    policy,
    reference,
    tokenizer,
    batches: Iterable[dict],
    score: Callable[[list, list[str]], torch.Tensor],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    device: torch.device | str = "cpu",
    num_samples_shown: int = 5,
) -> GenerationEvaluation:
    """Policy vs reference on prompt batches (PromptCollator's): one completion each, scored by `score`."""
    generation = sampling_config(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_ids=stop_token_ids(policy, tokenizer),
        pad_id=tokenizer.pad_token_id,
        num_samples=1,
    )
    # independent streams: the two models' draws must not be the same random numbers
    streams = {"policy": SamplingRNG(seed), "reference": SamplingRNG(seed + 1_000_003)}
    collected: dict[str, list] = {k: [] for k in ("policy", "reference", "kl", "p_eos", "r_eos", "p_len", "r_len")}
    samples: list[dict] = []
    for batch in batches:
        mine = sample_one(policy, tokenizer, batch, generation, streams["policy"], device)
        theirs = sample_one(reference, tokenizer, batch, generation, streams["reference"], device)
        prompts = batch["prompts"]
        policy_scores, reference_scores = score(prompts, mine.texts).float(), score(prompts, theirs.texts).float()
        prompt_ids = prompt_rows(batch["input_ids"], batch["attention_mask"])
        kl = sequence_log_ratio(policy, reference, prompt_ids, mine.ids, tokenizer.pad_token_id, device)
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
