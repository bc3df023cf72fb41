"""The reference seam: where the reference log-probs of a batch come from.

A training step asks its `Reference` for the log-probs of the rows it scores and never touches a reference
network itself, so another source plugs in as one new class without changing the step. `FrozenReference` is
a frozen copy of the initial policy, or the model named by `ref_model_name`, in eval mode under no_grad;
`SyncedReference` is one that TR-DPO moves toward the policy as it trains; `AdapterDisabledReference` is a LoRA
policy with its adapters switched off; `precomputed.PrecomputedReference` reads log-probs computed before
training; `NoReference` stands in where a reference-free loss needs none. Generation metrics also sample the
reference's own completions, through `sampling_model`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from dpo_lightning.data.batch import SequenceBatch
from dpo_lightning.dpo.logprobs import SequenceLogps, forward_logps
from dpo_lightning.errors import UserError
from dpo_lightning.models.sharding import is_sharded, reshard


class Reference(Protocol):
    def logps(self, batch: SequenceBatch) -> SequenceLogps:
        """Per-row summed completion log-probs (N,) of `batch` under the reference, without gradients."""
        ...

    def sampling_model(self) -> AbstractContextManager[torch.nn.Module]:
        """A causal LM that samples as the reference would, for as long as the context is open."""
        ...


class FrozenReference(torch.nn.Module):
    """A reference network of its own: eval mode always, no gradients, never in an optimizer.

    An `nn.Module`, so that it moves with the LightningModule that holds it and a strategy shards it (FSDP)
    beside the policy; its weights are never saved, since the configuration rebuilds it.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 0) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size  # `logps_chunk_size`: how its log-probs are computed
        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenReference:
        # Lightning switches every submodule to train mode at fit start; dropout in the reference would bias
        # the log-ratio, so this one stays in eval mode whatever it is asked.
        return super().train(False)

    @torch.no_grad()
    def logps(self, batch: SequenceBatch) -> SequenceLogps:
        try:
            return forward_logps(self.model, batch, self.chunk_size)
        finally:
            if is_sharded(self.model):
                reshard(self.model)  # no backward follows to free what its root gathered

    @contextmanager
    def sampling_model(self) -> Iterator[torch.nn.Module]:
        yield self.model


class SyncedReference(FrozenReference):
    """TR-DPO (Gorbatovski et al., 2024, arXiv 2404.09656): a frozen reference that moves toward the policy every
    `every` optimizer steps, reference <- alpha * policy + (1 - alpha) * reference, weight by weight. Between
    syncs it is as frozen as any; its weights are part of a run's state, so checkpoints keep them."""

    def __init__(self, model: torch.nn.Module, policy: torch.nn.Module, *, alpha: float, every: int, chunk_size=0):
        super().__init__(model, chunk_size)
        self.alpha, self.every = alpha, every
        problem = architecture_mismatch(policy, model)
        if problem:
            raise UserError(f"sync_ref_model mixes the policy's weights into the reference's, but {problem}")

    def after_step(self, policy: torch.nn.Module, step: int) -> bool:
        """Sync from `policy` when optimizer step `step` (1-based) is a multiple of `every`; whether it did."""
        if step % self.every:
            return False
        mix_into(self.model, policy, self.alpha)
        return True


def architecture_mismatch(policy: torch.nn.Module, reference: torch.nn.Module) -> str | None:
    """Why `reference`'s weights cannot be mixed with `policy`'s (another name or shape), or None."""
    ours = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    theirs = {name: tuple(p.shape) for name, p in policy.named_parameters()}
    if ours == theirs:
        return None
    differing = sorted(set(ours) ^ set(theirs)) or sorted(n for n in ours if ours[n] != theirs[n])
    return f"the reference's parameters differ from the policy's (first: {differing[0]})"


@torch.no_grad()
def mix_into(target: torch.nn.Module, source: torch.nn.Module, alpha: float) -> None:
    """target <- alpha * source + (1 - alpha) * target, parameter by parameter, in the target's dtype; sharded
    (FSDP2) parameters mix shard by shard, both networks being sharded alike."""
    for mine, theirs in zip(target.parameters(), source.parameters(), strict=True):
        mine.mul_(1.0 - alpha).add_(theirs.detach().to(mine.dtype), alpha=alpha)


class AdapterDisabledReference:
    """The policy itself with its LoRA adapters switched off (peft's `disable_adapter`): the base model it
    started from, without a second copy in memory. Not an `nn.Module`: the policy is already the
    LightningModule's, and its weights are saved once, as the policy's."""

    def __init__(self, policy: torch.nn.Module, chunk_size: int = 0) -> None:
        self.policy = policy
        self.chunk_size = chunk_size

    @torch.no_grad()
    def logps(self, batch: SequenceBatch) -> SequenceLogps:
        with self.policy.disable_adapter():
            return forward_logps(self.policy, batch, self.chunk_size)

    @contextmanager
    def sampling_model(self) -> Iterator[torch.nn.Module]:
        with self.policy.disable_adapter():
            yield self.policy


class NoReference:
    """The reference of a reference-free objective (SimPO, CPO, ORPO): no network is loaded, and the log-probs it
    answers are zeros, which those losses never read."""

    def logps(self, batch: SequenceBatch) -> SequenceLogps:
        zeros = torch.zeros(batch.num_rows, dtype=torch.float32, device=batch.input_ids.device)
        return SequenceLogps(zeros, zeros, zeros)

    @contextmanager
    def sampling_model(self) -> Iterator[torch.nn.Module]:
        raise UserError("a reference-free loss_type loads no reference to sample; set generation_eval_every: 0")
        yield  # pragma: no cover  (a generator, for contextmanager)
