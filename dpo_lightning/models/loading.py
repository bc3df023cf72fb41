"""Loading causal LMs and tokenizers: the policy, the reference model, and names resolved before anything loads.

Model names resolve before anything heavy happens: the built-in tiny model, a local folder, or a Hub name.
A Hub name that is neither cached nor reachable fails at once with one line, rather than after the Hub
client's retry loop (about 25 s per file here), and a cached one loads without touching the network.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch

from dpo_lightning.builtin import BUILTIN_MODEL, builtin_model_dir
from dpo_lightning.errors import UserError, first_line, nearest_path
from dpo_lightning.hub import hub_reachable, offline_env
from dpo_lightning.models.lora import (
    adapter_base_name,
    add_adapters,
    is_adapter_folder,
    load_adapters,
    quantization_config,
)


class ModelSource(NamedTuple):
    name_or_path: str
    local_files_only: bool


def _cached_on_hub(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id is "not cached"; the caller reports the name
        return False


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else the user meant as a folder, and so is `dir/name` when
    `dir` is a folder here (`outputs/run` is a typo of a local path, not a Hub organisation)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def not_found(name: str, key: str) -> UserError:
    """A missing local folder, with the nearest existing sibling when one is close (a typo)."""
    return UserError(f"{key}: model folder not found: {name}{nearest_path(name, files=False)}")


def resolve_model(name: str, key: str = "model_name") -> ModelSource:
    """Where to load `name` from, or a UserError naming `key` and how to fix it."""
    if name == BUILTIN_MODEL:
        return ModelSource(str(builtin_model_dir()), True)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: {path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(str(path), True)
    if _looks_like_path(name):
        raise not_found(name, key)
    usable = not offline_env() and hub_reachable()
    if not usable and _cached_on_hub(name):
        return ModelSource(name, True)
    if not usable:
        why = "HF_HUB_OFFLINE is set" if offline_env() else "the Hub is unreachable"
        offline_start = (
            f"; to try the project without it: --{key} {BUILTIN_MODEL} or --config experiments/local-tiny.yaml"
            if key == "model_name"
            else ""
        )
        raise UserError(
            f"{key}: could not fetch model '{name}' from the Hugging Face Hub ({why}) and it is not cached; "
            f"download it where there is network or point {key} at a local folder, e.g. --{key} ./my-model"
            + offline_start
        )
    return ModelSource(name, False)


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """The tokenizer, with pad = EOS when the model defines no pad token (masks never rely on the pad id)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.name_or_path, local_files_only=source.local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the tokenizer of '{source.name_or_path}': {first_line(exc)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of '{source.name_or_path}' defines no EOS token; completions need one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of two forward passes; dropout noise would bias the log-ratio."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def load_causal_lm(
    source: ModelSource, *, dtype: torch.dtype, attn_implementation: str, trust_remote_code: bool, **options
):
    """A causal LM from `source`, dropout off; `options` go to `from_pretrained` (a quantization config). A LoRA
    adapter folder loads as its base (named in its adapter_config.json) with the adapters merged in."""
    from transformers import AutoModelForCausalLM

    if is_adapter_folder(source.name_or_path):
        return _merged_adapter_model(source, dtype, attn_implementation, trust_remote_code)

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            local_files_only=source.local_files_only,
            **options,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"could not load model '{source.name_or_path}': {first_line(exc)}") from None
    disable_dropout(model)
    return model


def _merged_adapter_model(source: ModelSource, dtype, attn_implementation: str, trust_remote_code: bool):
    from peft import PeftModel

    base_name = adapter_base_name(source.name_or_path)
    if not base_name:
        raise UserError(f"{source.name_or_path}: adapter_config.json names no base model (base_model_name_or_path)")
    base = load_causal_lm(
        resolve_model(base_name, f"the base model of the adapters in {source.name_or_path}"),
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return PeftModel.from_pretrained(base, source.name_or_path).merge_and_unload()


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A reference model: eval mode, no gradients, never in an optimizer."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_policy(cfg, source: ModelSource, adapters: str | None = None):
    """The trained policy, always in fp32 master weights (`precision` decides the compute dtype), with
    gradient checkpointing when the configuration asks for it. With `lora_r` > 0: the model at `source` as a
    frozen base (4-bit with `load_in_4bit`) under LoRA adapters, fresh or read from the folder `adapters`."""
    options = {}
    if cfg.lora_r > 0 and cfg.load_in_4bit:
        options["quantization_config"] = quantization_config()
    policy = load_causal_lm(
        source,
        dtype=torch.bfloat16 if options else torch.float32,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        **options,
    )
    if cfg.lora_r > 0:
        policy = load_adapters(policy, adapters, cfg) if adapters else add_adapters(policy, cfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(policy)
    return policy


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant: it works with inputs that need no
    gradient and with frozen layers). transformers 5.x renamed the method, 4.x has only the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_reference(cfg, source: ModelSource, initial_policy: torch.nn.Module | None = None):
    """The frozen reference: a copy of `initial_policy` when it is the freshly loaded policy (no second
    read from disk), else the model at `source` (`ref_model_name`, or the initial policy when resuming)."""
    if initial_policy is not None:
        reference = copy.deepcopy(initial_policy).to(cfg.frozen_dtype)
    else:
        reference = load_causal_lm(
            source,
            dtype=cfg.frozen_dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    return freeze(reference)
