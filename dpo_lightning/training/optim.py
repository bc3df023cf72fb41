"""The optimizer's pieces: AdamW parameter groups and the learning-rate schedule (warmup, then decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup, then decay."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor


def warmup_steps_for(cfg, total_steps: int) -> int:
    """Warmup steps: `warmup_steps` when set, else `warmup_ratio` of the run, rounded up."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def decays(module: torch.nn.Module, param_name: str) -> bool:
    """Whether a parameter gets weight decay: everything but biases and normalisation gains.

    Decided by name and owning module, never by shape: a sharded parameter's local shape is not the model's
    (FSDP1 flattened every shard to 1-D, where a shape test would exempt every parameter)."""
    return not (param_name.endswith("bias") or "norm" in type(module).__name__.lower() or "norm" in param_name.lower())


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: decayed parameters, and biases and norm gains without decay."""
    decayed, plain, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:  # a tied weight (embedding = head) once
                seen.add(id(param))
                (decayed if decays(module, f"{module_name}.{name}") else plain).append(param)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def adamw(groups: list[dict], **settings) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per device where every parameter sits on CPU or CUDA.

    The fused step reads and writes each parameter once instead of through foreach's temporary lists: about
    4x faster on CPU for a Qwen-sized embedding and no transient copies of the gradients at the step."""
    params = [p for group in groups for p in group["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **settings)
