"""How the policy is spread over devices: one device, DDP or FSDP, under a torchrun-style launcher.

Determined's launcher (`determined.launch.torch_distributed`) wraps torchrun, so on a cluster and under
plain `torchrun` alike every worker sees RANK, LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE and TORCHELASTIC_RUN_ID;
Lightning adopts that environment through `TorchElasticEnvironment` instead of launching processes itself.
"""

from __future__ import annotations

import os

import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.errors import UserError


def launcher_layout() -> tuple[int | str, int]:
    """(devices, num_nodes) from a torchrun-style launcher's environment, else Lightning's defaults."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", int(os.environ["WORLD_SIZE"]) // local))
        return local, nodes
    return "auto", 1


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_strategy(cfg: DPOConfig) -> None:
    """Fail before anything loads when the strategy cannot run on this machine."""
    if cfg.strategy == "fsdp" and cfg.export_merged:
        raise UserError(
            "export_merged is not supported with strategy: fsdp; merge final/'s adapters afterwards "
            "(peft's AutoPeftModelForCausalLM(...).merge_and_unload())"
        )
    if cfg.strategy == "fsdp" and not torch.cuda.is_available():
        raise UserError(
            "strategy: fsdp needs CUDA GPUs (Lightning's FSDP strategy does not run on CPU); "
            "use --strategy ddp on this machine"
        )


def decoder_layer_classes(policy: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The transformer block classes FSDP wraps one by one, named by the model's own `_no_split_modules`."""
    names = set(getattr(policy, "_no_split_modules", None) or [])
    found = {type(m) for m in policy.modules() if type(m).__name__ in names}
    if not found:
        raise ValueError(f"{type(policy).__name__} names no decoder layer class (_no_split_modules) to wrap with FSDP")
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
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(
        cluster_environment=environment,
        auto_wrap_policy=decoder_layer_classes(policy),
        sharding_strategy=cfg.fsdp_sharding_strategy,
        # the root unit holds what the layers leave (embeddings, final norms) of both a frozen reference network
        # and the trained policy; FSDP mixes frozen and trainable parameters in one unit only this way
        use_orig_params=True,
        # checkpoints: every rank writes its own shard of weights and optimizer state
        state_dict_type="sharded",
        limit_all_gathers=True,
    )


def is_fsdp(trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def full_trained_state(trainer, module) -> dict[str, torch.Tensor] | None:
    """The trained model's complete weights on global rank 0 (None elsewhere); under FSDP every rank must
    call it."""
    if not is_fsdp(trainer):
        return module.trained.state_dict() if trainer.is_global_zero else None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.strategy.model
    gather = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, gather):
        full = root.state_dict()
    if not trainer.is_global_zero:
        return None
    prefix = f"{trained_name(module)}."
    return {key[len(prefix) :]: value for key, value in full.items() if key.startswith(prefix)}


def trained_name(module) -> str:
    """The attribute under which `module` holds its trained submodule (the prefix of its weights' names)."""
    for name, child in module.named_children():
        if child is module.trained:
            return name
    raise ValueError(f"{type(module).__name__}.trained is not one of its submodules")


def clip_gradients(trainer, module, max_norm: float) -> torch.Tensor:
    """Clip the trained model's global gradient norm; returns the norm before clipping.

    Under FSDP each rank holds a shard of every gradient, so the norm must come from FSDP's own collective.
    """
    if trainer is not None and is_fsdp(trainer):
        return trainer.strategy.model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(module.trained.parameters(), max_norm)
