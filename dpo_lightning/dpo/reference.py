"""The reference seam: where the reference log-probs of a batch come from.

A training step asks its `Reference` for the log-probs of the rows it scores and never touches a reference
network itself, so another source plugs in as one new class without changing the step. The one source today
is `FrozenReference`: a frozen copy of the initial policy, or the model named by `ref_model_name`, in eval
mode under no_grad. Generation metrics also sample the reference's own completions, through
`sampling_model`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch

from dpo_lightning.data.batch import SequenceBatch
from dpo_lightning.dpo.logprobs import SequenceLogps, forward_logps


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
        return forward_logps(self.model, batch, self.chunk_size)

    @contextmanager
    def sampling_model(self) -> Iterator[torch.nn.Module]:
        yield self.model
