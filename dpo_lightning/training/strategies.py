"""How the policy is spread over devices: one device, DDP or FSDP2, under a torchrun-style launcher.

Determined's launcher (`determined.launch.torch_distributed`) wraps torchrun, so on a cluster and under
plain `torchrun` alike every worker sees RANK, LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE and TORCHELASTIC_RUN_ID;
Lightning adopts that environment through `TorchElasticEnvironment` instead of launching processes itself.

`strategy: fsdp` is FSDP2 (torch's per-parameter `fully_shard`) driven by Lightning's `ModelParallelStrategy`
on CPU (gloo) and CUDA (nccl) alike. The sharding itself is `fsdp.py`'s; this module picks the strategy,
checks what cannot run, and holds the few operations that differ between a whole and a sharded model
(clipping, the full weights at export).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.errors import UserError
from dpo_lightning.training.fsdp import FSDP2Strategy, full_state_dict, grad_norm_value


def launcher_layout() -> tuple[int, int]:
    """(devices, num_nodes) from a torchrun-style launcher's environment, else one device: more than one process
    runs only under a launcher (Lightning's "auto" would start a process per GPU itself)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", int(os.environ["WORLD_SIZE"]) // local))
        return local, nodes
    return 1, 1


def all_gather_objects(value: Any) -> list[Any]:
    """`value` from every rank, in rank order ([value] without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_strategy(cfg: DPOConfig) -> None:
    """Fail before anything loads when the strategy cannot run with this launch (what FSDP cannot do whatever
    the launch is the configuration's own check, `config.checks._check_strategy`)."""
    if cfg.strategy != "fsdp":
        return
    world = launched_world_size()
    local, nodes = launcher_layout()
    if local * nodes != world:
        raise UserError(
            f"strategy: fsdp: the launcher started {world} processes but {nodes} node(s) of {local}; "
            "FSDP's device mesh needs LOCAL_WORLD_SIZE x GROUP_WORLD_SIZE = WORLD_SIZE (launch every node alike)"
        )
    if cfg.fsdp_sharding_strategy == "HYBRID_SHARD" and nodes < 2:
        raise UserError(
            "fsdp_sharding_strategy: HYBRID_SHARD shards within a node and replicates across nodes; this run has "
            "one node, so use FULL_SHARD (the same thing here)"
        )


def decoder_layer_classes(policy: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The transformer block classes FSDP shards one by one, named by the model's own `_no_split_modules`
    (found on any submodule: a peft wrapper or a reward model holds the transformers model inside)."""
    names = set()
    for module in policy.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    found = {type(m) for m in policy.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(f"{type(policy).__name__} names no decoder layer class (_no_split_modules) to shard with FSDP")
    return found


def build_strategy(cfg: DPOConfig, policy: torch.nn.Module):
    """A Lightning strategy (or "auto" for one process) that adopts the launcher's processes."""
    world_size = launched_world_size()
    if cfg.strategy == "ddp" and world_size == 1:
        return "auto"
    from lightning.pytorch.plugins.environments import TorchElasticEnvironment

    environment = TorchElasticEnvironment() if TorchElasticEnvironment.detect() else None
    if cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(cluster_environment=environment)
    decoder_layer_classes(policy)  # a model FSDP cannot split fails here, before the processes meet
    _, nodes = launcher_layout()
    return FSDP2Strategy(
        sharding=cfg.fsdp_sharding_strategy,
        world_size=world_size,
        num_nodes=nodes,
        bf16=cfg.precision == "bf16-mixed",
        cluster_environment=environment,
    )


def trainer_precision(cfg: DPOConfig) -> str:
    """Lightning's precision setting: under FSDP2 the sharding's MixedPrecisionPolicy casts (bf16 compute,
    fp32 master weights and gradient reduction), so Lightning must not autocast on top of it."""
    return "32-true" if cfg.strategy == "fsdp" else cfg.precision


def is_fsdp(trainer) -> bool:
    return trainer is not None and isinstance(trainer.strategy, FSDP2Strategy)


def full_trained_state(trainer, module) -> dict[str, torch.Tensor] | None:
    """The trained model's complete weights on global rank 0 (None elsewhere); under FSDP every rank must
    call it, and the full tensors are gathered one parameter at a time into rank 0's CPU memory."""
    return full_weights(trainer, module.trained)


def full_weights(trainer, model: torch.nn.Module, *, trainable_only: bool = True) -> dict[str, torch.Tensor] | None:
    """`model`'s complete weights on global rank 0 (None elsewhere), sharded or not; under FSDP every rank must
    call it. `trainable_only`: leave frozen parameters out (a LoRA base) where the model is sharded."""
    if not is_fsdp(trainer):
        return model.state_dict() if trainer.is_global_zero else None
    state = full_state_dict(model, trainable_only=trainable_only)
    return state if trainer.is_global_zero else None


def clip_gradients(trainer, module, max_norm: float) -> torch.Tensor:
    """Clip the trained model's global gradient norm; returns the norm before clipping.

    Under FSDP each rank holds a shard of every gradient (a DTensor); torch's clipping reduces the shards'
    norms over the mesh, and the number is read from the resulting DTensor."""
    params = [p for p in module.trained.parameters() if p.grad is not None]
    return grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
