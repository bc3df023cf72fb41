"""Online DPO's pairs: each prompt's two samples scored by the judge and ordered (higher score chosen).

The pair a prompt yields is (higher-scored sample, lower-scored sample); equal scores carry no preference, so
such a pair is kept in the batch with weight 0 (every rank still runs the same forward and backward passes,
so DDP's collectives stay in step) and counted. Training uses the sampled token ids as they are: decoding
and re-tokenizing could change them, and the log-probs must be those of what the policy actually sampled.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dpo_lightning.data.batch import PairBatch, PromptBatch
from dpo_lightning.dpo.objective import PairResult
from dpo_lightning.online.judges import Judge
from dpo_lightning.online.metrics import StepTimer
from dpo_lightning.online.sampling import SAMPLES_PER_PROMPT, Completions, Sampler, SamplingRNG, SamplingSettings


def order_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen index, rejected index, tie) per prompt from scores (P, 2): the higher score is chosen;
    equal scores are a tie (chosen 0, rejected 1, to be weighted 0)."""
    first_wins = scores[:, 0] >= scores[:, 1]
    chosen = torch.where(first_wins, 0, 1)
    return chosen, 1 - chosen, scores[:, 0] == scores[:, 1]


def pair_items(prompts: list[list[int]], completions: Completions, chosen: torch.Tensor, rejected: torch.Tensor):
    """PairCollator items: prompt i's chosen and rejected completions."""
    items = []
    for i, prompt in enumerate(prompts):
        base = i * SAMPLES_PER_PROMPT
        items.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": completions.ids[base + int(chosen[i])],
                "rejected_ids": completions.ids[base + int(rejected[i])],
            }
        )
    return items


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores (N,) with `penalty` subtracted where a completion ran out of tokens before its EOS."""
    return scores - penalty * (~has_eos).to(scores.dtype) if penalty else scores


class SampledPairs(NamedTuple):
    """What one batch of prompts yields: the pair batch to train on and what the objective metrics need."""

    pairs: PairBatch  # 2P rows, chosen then rejected; pair weight = prompt weight, 0 for ties
    scores: torch.Tensor  # (N,) each sample's score (missing-EOS penalty applied), prompt-major, N = 2P
    pair_scores: tuple[torch.Tensor, torch.Tensor]  # (P,) the chosen and the rejected sample's score
    has_eos: torch.Tensor  # (N,) bool
    lengths: torch.Tensor  # (N,) completion tokens
    tie: torch.Tensor  # (P,) bool
    chosen: torch.Tensor  # (P,) which of the prompt's two samples is chosen
    prompt_weight: torch.Tensor  # (P,) 0 for rows that only even out evaluation shards
    # (K,) the sampler's log-prob of each completion token in the pair batch's scored order (chosen rows, then
    # rejected, each in token order); None where the sampler is the policy itself
    sampler_logps: torch.Tensor | None
    judge_cut: torch.Tensor  # (N,) bool: the judge saw the sample with its prompt cut short (never the completion)


def sample_pairs(
    sampler: Sampler,
    judge: Judge,
    tokenizer,
    prompts: PromptBatch,
    settings: SamplingSettings,
    rng: SamplingRNG,
    *,
    missing_eos_penalty: float,
    timer: StepTimer,
    device: torch.device,
    packed: bool = False,
    shared: bool = False,
) -> SampledPairs:
    """Sample two completions per prompt, have the judge score them and order them into pairs."""
    with timer.measure("generation", device):
        completions = sampler.sample(prompts, SAMPLES_PER_PROMPT, settings, rng)
    texts = tokenizer.batch_decode(completions.ids, skip_special_tokens=True)
    judged = [prompt for prompt in prompts.prompts for _ in range(SAMPLES_PER_PROMPT)]
    with timer.measure("scoring", device):
        scores = judge.score(judged, texts).float()
    judge_cut = getattr(judge, "last_cut", None)  # a function judge reads whole texts
    judge_cut = torch.zeros(len(texts), dtype=torch.bool) if judge_cut is None else judge_cut
    scores = apply_missing_eos_penalty(scores, completions.has_eos, missing_eos_penalty)
    per_prompt = scores.view(-1, SAMPLES_PER_PROMPT)
    chosen, rejected, tie = order_pairs(per_prompt)
    weight = prompts.weights()
    items = pair_items(prompts.prompt_ids(), completions, chosen, rejected)
    pairs = PairBatch.from_pairs(
        [item["prompt_ids"] for item in items],
        [item["chosen_ids"] for item in items],
        [item["rejected_ids"] for item in items],
        settings.pad_id,
        weight=weight * (~tie).float(),
        packed=packed,
        shared=shared,
    )
    index = torch.arange(len(chosen))
    sampler_logps = None
    if completions.logps is not None:
        rows = [i * SAMPLES_PER_PROMPT + int(side[i]) for side in (chosen, rejected) for i in range(len(side))]
        sampler_logps = torch.tensor([lp for row in rows for lp in completions.logps[row]], dtype=torch.float32)
    return SampledPairs(
        pairs=pairs.to(device),
        scores=scores,
        pair_scores=(per_prompt[index, chosen], per_prompt[index, rejected]),
        has_eos=completions.has_eos,
        lengths=torch.tensor([len(ids) for ids in completions.ids], dtype=torch.float32),
        tie=tie,
        chosen=chosen,
        prompt_weight=weight,
        sampler_logps=sampler_logps,
        judge_cut=judge_cut,
    )


def sampler_logp_diff(sampled: SampledPairs, policy_tokens: torch.Tensor) -> torch.Tensor:
    """(K,) |sampler log-prob - policy log-prob| per sampled token; a single 0 where the sampler is the policy."""
    if sampled.sampler_logps is None:
        return torch.zeros(1)
    policy = policy_tokens.detach().float().cpu()
    if policy.shape != sampled.sampler_logps.shape:
        raise RuntimeError(
            f"the sampler reported {sampled.sampler_logps.numel()} token log-probs for {policy.numel()} sampled tokens"
        )
    return (sampled.sampler_logps - policy).abs()


def sample_log_ratios(result: PairResult, chosen: torch.Tensor) -> torch.Tensor:
    """(N,) each sample's log pi(y|x) - log pi_ref(y|x), summed over its tokens, back in prompt-major sample
    order (the pairs hold each prompt's chosen sample first); their mean estimates KL(pi || pi_ref)."""
    by_role = torch.stack(
        [
            result.policy.chosen.logps.detach() - result.reference.chosen.logps.float(),
            result.policy.rejected.logps.detach() - result.reference.rejected.logps.float(),
        ],
        dim=1,
    ).cpu()  # (P, 2): chosen, rejected
    first_chosen = (chosen.cpu() == 0).unsqueeze(1)
    return torch.where(first_chosen, by_role, by_role.flip(1)).flatten()
