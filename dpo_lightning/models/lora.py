"""LoRA and QLoRA through peft: the policy as a frozen base with trained low-rank adapters.

The reference of a LoRA run without `ref_model_name` is the same model with its adapters disabled (peft's
`disable_adapter`), so no second model is loaded. Checkpoints and `final/` hold the adapters only
(`adapter_config.json`, `adapter_model.safetensors`); `merged_weights` gives the base with the adapters
merged in, for an export that loads without peft and for a sampling engine's weight sync.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import torch

from dpo_lightning.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"


def check_lora(cfg) -> None:
    """What keeps the LoRA settings from working on this machine, as one line, before any model loads."""
    if cfg.lora_r == 0:
        return
    if importlib.util.find_spec("peft") is None:
        raise UserError("lora_r > 0 needs the peft package: pip install peft")
    if cfg.load_in_4bit:
        if not torch.cuda.is_available():
            raise UserError("load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit layers do not run on CPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("load_in_4bit (QLoRA) needs the bitsandbytes package: pip install bitsandbytes")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def target_modules(spec: str) -> str | list[str]:
    """`lora_target_modules` as peft takes it: "all-linear", or a list of module names."""
    spec = spec.strip()
    return spec if spec == "all-linear" else [name.strip() for name in spec.split(",") if name.strip()]


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def quantization_config():
    """QLoRA's base: 4-bit NF4 weights with double quantization, computing in bf16."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def prepare_base(base: torch.nn.Module, cfg) -> None:
    """What the frozen base needs before adapters go on: frozen weights, and with gradient checkpointing,
    embeddings whose output requires grad (a checkpointed layer whose inputs need no gradient would give its
    adapters none)."""
    base.requires_grad_(False)
    if cfg.gradient_checkpointing:
        base.enable_input_require_grads()


def unmatched_targets(base: torch.nn.Module, spec: str) -> str | None:
    """One line naming the `lora_target_modules` names that match no module of `base` (peft matches a name
    against the end of each module's dotted path), with the names it could use; None when all match. peft
    itself fails only when no name matches, so a typo beside a good name would be dropped silently."""
    targets = target_modules(spec)
    if targets == "all-linear":
        return None
    paths = [path for path, _ in base.named_modules()]
    missing = [t for t in targets if not any(p == t or p.endswith(f".{t}") for p in paths)]
    if not missing:
        return None
    leaves = sorted(
        {path.rsplit(".", 1)[-1] for path, module in base.named_modules() if isinstance(module, torch.nn.Linear)}
    )
    close = difflib.get_close_matches(missing[0], leaves, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (
        f"lora_target_modules: no module is named {', '.join(missing)}{hint}; "
        f"the model's linear layers are named {', '.join(leaves)} (or use all-linear)"
    )


def add_adapters(base: torch.nn.Module, cfg):
    """`base` with fresh LoRA adapters (B = 0: the adapted model starts equal to its base)."""
    from peft import get_peft_model

    problem = unmatched_targets(base, cfg.lora_target_modules)
    if problem:
        raise UserError(problem)
    prepare_base(base, cfg)
    try:
        return get_peft_model(base, lora_config(cfg))
    except ValueError as exc:  # e.g. target modules the model does not have
        raise UserError(f"lora_target_modules: {exc}") from None


def load_adapters(base: torch.nn.Module, folder: str | Path, cfg, *, trainable: bool = True):
    """`base` with the adapters saved in `folder` (a checkpoint or final/)."""
    from peft import PeftModel

    prepare_base(base, cfg)
    return PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)


def adapter_base_name(folder: str | Path) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path` in its adapter_config.json)."""
    import json

    try:
        return json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under peft's wrappers (the model itself when it has none)."""
    return model.get_base_model() if is_peft_model(model) else model


@torch.no_grad()
def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the adapted model with its adapters merged in, named as the base
    model's `save_pretrained` names them. Computed out of place: the model's own weights are left as they are
    (merging in place and back would round the base weights). Sharded (FSDP2) weights are gathered whole, in
    the same order on every rank."""
    from peft.tuners.lora import LoraLayer

    from dpo_lightning.models.sharding import full_tensor

    base = base_model(model)
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    delta = full_tensor(module.get_delta_weight(adapter))
                    deltas[f"{name}.base_layer.weight"] = deltas.get(f"{name}.base_layer.weight", 0) + delta
    for name, param in base.named_parameters():
        if "lora_" in name:
            continue
        value = full_tensor(param.detach())
        if name in deltas:
            value = value + deltas[name].to(value.dtype)
        yield name.replace(".base_layer.", "."), value


def save_merged(model: torch.nn.Module, folder: str | Path) -> None:
    """The base with the adapters merged in, as a plain transformers model folder (no peft needed to load).
    Merged in a copy, so the trained model keeps its adapters and its base weights unrounded."""
    import copy

    copy.deepcopy(model).merge_and_unload().save_pretrained(str(folder))
