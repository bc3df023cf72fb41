"""The open report window: what the metrics have accumulated since the last report, kept per rank in each
checkpoint so that a resumed run's first report averages the same steps as the uninterrupted run's.

A metric container is a module tree of torchmetrics metrics (their states are tensors or lists of tensors)
beside a few plain tallies (`COUNTERS`) and, in online DPO, a timer of sampling and scoring seconds.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

# plain-int tallies the metric containers keep beside torchmetrics' own state
COUNTERS = ("updates", "_nll_updates")


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list):
        return [_cpu(item) for item in value]
    return value


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(item, device) for item in value]
    return value


def window_state(root: torch.nn.Module) -> dict:
    """Everything `root`'s metrics hold since their last report, on the CPU."""
    state = {}
    for name, module in root.named_modules():
        entry = {key: getattr(module, key) for key in COUNTERS if isinstance(getattr(module, key, None), int)}
        if isinstance(module, Metric):
            entry["metric"] = {key: _cpu(getattr(module, key)) for key in module._defaults}
            entry["count"] = module._update_count
        timer = getattr(module, "timer", None)
        if isinstance(getattr(timer, "seconds", None), dict):
            entry["timer"] = dict(timer.seconds)
        if entry:
            state[name] = entry
    return state


def load_window_state(root: torch.nn.Module, state: dict, device: torch.device) -> None:
    """Put back what `window_state` took, on `device`."""
    modules = dict(root.named_modules())
    for name, entry in state.items():
        module = modules[name]
        for key in COUNTERS:
            if key in entry:
                setattr(module, key, entry[key])
        if "metric" in entry:
            for key, value in entry["metric"].items():
                setattr(module, key, _to(value, device))
            module._update_count = entry["count"]
            module._computed = None
        if "timer" in entry:
            module.timer.seconds = dict(entry["timer"])
