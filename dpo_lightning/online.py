"""Online DPO's pieces: sample two completions per prompt from the policy, score them, order them into pairs.

The pair a prompt yields is (higher-scored sample, lower-scored sample); equal scores carry no preference, so
such a pair is kept in the batch with weight 0 (every rank still runs the same forward and backward passes,
so DDP's collectives stay in step) and counted. Training uses the sampled token ids as they are: decoding
and re-tokenizing could change them, and the log-probs must be those of what the policy actually sampled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torchmetrics import MeanMetric, SumMetric

SAMPLES_PER_PROMPT = 2


class SamplingRNG:
    """A random stream of its own for sampling, saved and restored with each rank's checkpoint.

    Generation draws from torch's global generator; running it inside `fork_rng` with this stream's state
    keeps it apart from everything else that draws (data loading, initialisation), so that a resumed run
    samples exactly what the uninterrupted run would have.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cpu_state: torch.Tensor | None = None
        self.cuda_state: torch.Tensor | None = None

    @contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
            if self.cpu_state is None:
                torch.default_generator.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.cpu_state)
            if cuda:
                if self.cuda_state is None:
                    torch.cuda.default_generators[device.index or 0].manual_seed(self.seed)
                else:
                    torch.cuda.set_rng_state(self.cuda_state, device)
            yield
            self.cpu_state = torch.get_rng_state()
            self.cuda_state = torch.cuda.get_rng_state(device) if cuda else None

    def state_dict(self) -> dict:
        return {"seed": self.seed, "cpu": self.cpu_state, "cuda": self.cuda_state}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.cpu_state, self.cuda_state = state["seed"], state["cpu"], state["cuda"]


class Completions(NamedTuple):
    ids: list[list[int]]  # N = P * SAMPLES_PER_PROMPT completions (prompt-major), each cut after its first EOS
    has_eos: torch.Tensor  # (N,) bool: the completion ended with an EOS rather than at max_new_tokens


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation EOS ids
    (chat models such as Qwen2.5-Instruct end turns with <|im_end|>, beside <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def cut_at_eos(generated: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths (N,), has_eos (N,)) of generated rows (N, T): up to and including the first EOS, else all T."""
    is_eos = torch.isin(generated, torch.tensor(eos_ids, device=generated.device))
    has_eos = is_eos.any(dim=1)
    first = is_eos.int().argmax(dim=1)  # the first maximum, i.e. the first EOS, where there is one
    lengths = torch.where(has_eos, first + 1, torch.full_like(first, generated.shape[1]))
    return lengths, has_eos


def sampling_config(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_ids: list[int],
    pad_id: int,
    num_samples: int = SAMPLES_PER_PROMPT,
):
    """A GenerationConfig that samples from the policy's softmax(logits / temperature) with nucleus top_p and
    nothing else. `generate` fills every knob left unset from the model's own generation_config, and the
    neutral value of many is "unset", so `sample_completions` also stands this config in for the model's;
    the knobs with a neutral value (top_k, repetition penalty, ...) are pinned here as well."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        num_return_sequences=num_samples,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )


@torch.no_grad()
def sample_completions(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config, *, synced_gpus: bool = False
) -> Completions:
    """`num_return_sequences` completions per left-padded prompt (P, T), from `model` in eval mode with its KV
    cache.

    Returns the completions prompt-major (prompt 0's samples, then prompt 1's, ...). `synced_gpus` keeps
    sharded (FSDP) ranks generating in step until every rank is done.
    """
    was_training, model_defaults = model.training, model.generation_config
    model.eval()
    # the model's defaults (a chat model's top_k, suppressed tokens, beams, ...) must not fill our unset knobs
    model.generation_config = generation_config
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
        )
    finally:
        model.generation_config = model_defaults
        model.train(was_training)
    generated = out[:, input_ids.shape[1] :]
    lengths, has_eos = cut_at_eos(generated, list(generation_config.eos_token_id))
    rows = generated.tolist()
    return Completions([row[:n] for row, n in zip(rows, lengths.tolist(), strict=True)], has_eos.cpu())


def order_pairs(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen index, rejected index, tie) per prompt from scores (P, 2): the higher score is chosen;
    equal scores are a tie (chosen 0, rejected 1, to be weighted 0)."""
    first_wins = scores[:, 0] >= scores[:, 1]
    chosen = torch.where(first_wins, 0, 1)
    return chosen, 1 - chosen, scores[:, 0] == scores[:, 1]


def prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each left-padded prompt's own tokens."""
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]


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


# ----------------------------------------------------------------------------- metrics

SAMPLE_METRICS = (
    "objective/scores",
    "objective/scores_chosen",
    "objective/scores_rejected",
    "objective/scores_margin",
    "objective/kl",
    "objective/eos_rate",
    "objective/tie_rate",
    "objective/completion_length",
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
    ) -> None:
        """One micro-batch: per-sample (N,) scores, kl, has_eos, lengths; per-prompt (P,) chosen and rejected
        scores, tie flags and weights (0 for the rows that only even out evaluation shards)."""
        sample_weight = prompt_weight.repeat_interleave(SAMPLES_PER_PROMPT)
        pair_weight = prompt_weight * (~tie).float()
        self._update("objective/scores", scores, sample_weight)
        self._update("objective/kl", kl, sample_weight)
        self._update("objective/eos_rate", has_eos, sample_weight)
        self._update("objective/completion_length", lengths, sample_weight)
        self._update("objective/tie_rate", tie, prompt_weight)
        chosen, rejected = pair_scores
        self._update("objective/scores_chosen", chosen, pair_weight)
        self._update("objective/scores_rejected", rejected, pair_weight)
        self._update("objective/scores_margin", chosen - rejected, pair_weight)
        self.ties.update((tie.float() * prompt_weight).sum())

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
