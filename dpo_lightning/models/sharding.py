"""What every layer may ask of a model that FSDP2 (`fully_shard`) may have sharded across ranks."""

from __future__ import annotations

import torch


def is_sharded(model: torch.nn.Module) -> bool:
    """Some part of `model` is an FSDP2 unit: its forward passes are collectives every rank must join."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank of its mesh must ask, in the same order), or the
    tensor itself."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered parameter of a sharded model: an FSDP2 root keeps its own whole after a forward,
    for the backward that follows; after a forward without one (a frozen reference, validation, sampling)
    nothing else frees them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
