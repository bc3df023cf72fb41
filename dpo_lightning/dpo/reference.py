"""The reference seam: where the reference log-probs of a batch come from.

A training step asks its `Reference` for the log-probs of the rows it scores and never touches a reference
network itself, so another source plugs in as one new class without changing the step. `FrozenReference` is
a frozen copy of the initial policy, or the model named by `ref_model_name`, in eval mode under no_grad;
`AdapterDisabledReference` is a LoRA policy with its adapters switched off; `precomputed.PrecomputedReference`
reads log-probs computed before training. Generation metrics also sample the reference's own completions, through
`sampling_model`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from dpo_lightning.data.batch import SequenceBatch
from dpo_lightning.dpo.logprobs import SequenceLogps, forward_logps
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
