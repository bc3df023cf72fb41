"""The sampler seam: `Sampler.sample(prompts, n, settings, rng)` -> `Completions`.

Online DPO samples its pairs and generation metrics sample the policy's and the reference's completions
through it, the same way. `HFSampler` (Hugging Face `generate` on the policy itself) is the default;
`vllm_sampler.VLLMSampler` is a vLLM engine holding a synced copy of the policy's weights. Whatever the
engine, a completion is plain ancestral sampling from softmax(logits / temperature) with nucleus `top_p`, cut
after its first stop token, and its draws come from a `SamplingRNG` kept apart from every other random
stream and saved in each rank's checkpoint, so that a resumed run samples exactly what the uninterrupted run
would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from dpo_lightning.data.batch import PromptBatch
from dpo_lightning.models.sharding import is_sharded

SAMPLES_PER_PROMPT = 2  # online DPO's pair per prompt


class SamplingRNG:
    """A random stream of its own for sampling, saved and restored with each rank's checkpoint.

    Hugging Face `generate` draws from torch's global generator (it takes no generator of its own); running it
    inside `active`, a `fork_rng` with this stream's state, keeps it apart from everything else that draws
    (data loading, initialisation), so that a resumed run samples exactly what the uninterrupted run would
    have. An engine that seeds each request itself (vLLM) takes `request_seeds`: derived from `seed` and a
    counter of requests so far, which is saved with the rest.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cpu_state: torch.Tensor | None = None
        self.cuda_state: torch.Tensor | None = None
        self.requests = 0

    def request_seeds(self, count: int) -> list[int]:
        """One seed per request for the next `count` requests, each a hash of (seed, request number)."""
        first, self.requests = self.requests, self.requests + count
        return [request_seed(self.seed, number) for number in range(first, first + count)]

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
        return {"seed": self.seed, "cpu": self.cpu_state, "cuda": self.cuda_state, "requests": self.requests}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.cpu_state, self.cuda_state = state["seed"], state["cpu"], state["cuda"]
        self.requests = state.get("requests", 0)  # checkpoints written before engines seeded requests


def request_seed(seed: int, number: int) -> int:
    """A 63-bit seed for request `number` of stream `seed`: hashed, so that neighbouring streams and requests
    share no structure."""
    digest = hashlib.blake2b(f"{seed}:{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Completions(NamedTuple):
    ids: list[list[int]]  # N = P * SAMPLES_PER_PROMPT completions (prompt-major), each cut after its first EOS
    has_eos: torch.Tensor  # (N,) bool: the completion ended with an EOS rather than at max_new_tokens
    # the engine's log-prob of each sampled token (raw logits, temperature 1), where the engine is not the
    # training policy itself; None where it is (Hugging Face generate on the policy)
    logps: list[list[float]] | None = None


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


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn, whatever the engine."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]  # a completion ends after the first of these (EOS, a chat model's end of turn)
    pad_id: int

    @classmethod
    def of(cls, cfg, model, tokenizer, *, max_new_tokens: int | None = None) -> SamplingSettings:
        """The run's settings (`max_new_tokens`, `temperature`, `top_p`), stopping at every stop token of
        `model` and `tokenizer`."""
        return cls(
            max_new_tokens=cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop_ids=tuple(stop_token_ids(model, tokenizer)),
            pad_id=tokenizer.pad_token_id,
        )


class Sampler(Protocol):
    def start(self, device: torch.device) -> None:
        """Get ready to sample on `device` (an engine of its own starts here, once the rank's device is known)."""
        ...

    def sync(self, policy: torch.nn.Module) -> None:
        """Take the policy's current weights (an engine that holds a copy of its own loads them here)."""
        ...

    def close(self) -> None:
        """Let go of what `start` took (an engine's memory and processes)."""
        ...

    def sample(self, prompts: PromptBatch, n: int, settings: SamplingSettings, rng: SamplingRNG) -> Completions:
        """`n` completions per prompt, prompt-major (prompt 0's n samples, then prompt 1's, ...), drawn from
        `rng`'s stream (which the call advances)."""
        ...


def _sharded(model: torch.nn.Module) -> bool:
    """Part of `model` is sharded across ranks (FSDP): every forward pass is then a collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size() > 1 and is_sharded(model)


class HFSampler:
    """Hugging Face `generate` on `model`, in eval mode with its KV cache.

    Under FSDP it passes `synced_gpus`, which keeps the ranks generating in step until every rank is done.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def start(self, device: torch.device) -> None:
        pass  # generate runs on the policy where it is

    def sync(self, policy: torch.nn.Module) -> None:
        pass  # it samples from the live policy: always its current weights

    def close(self) -> None:
        pass

    def sample(self, prompts: PromptBatch, n: int, settings: SamplingSettings, rng: SamplingRNG) -> Completions:
        config = sampling_config(
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            eos_ids=list(settings.stop_ids),
            pad_id=settings.pad_id,
            num_samples=n,
        )
        device = self.device
        with rng.active(device):
            return sample_completions(
                self.model,
                prompts.input_ids.to(device),
                prompts.attention_mask.to(device),
                config,
                synced_gpus=_sharded(self.model),
            )
