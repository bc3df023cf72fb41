"""Which reference a run trains against: a frozen network (`dpo.reference.FrozenReference`), or its log-probs
precomputed once and read from disk (`dpo.precomputed`, `precompute_ref_logps: true`)."""

from __future__ import annotations

import logging
import os

import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.data.collate import PairCollator, collate_in_batches
from dpo_lightning.data.datamodule import DPODataModule
from dpo_lightning.dpo.precomputed import (
    PrecomputedReference,
    cache_key,
    pairs_fingerprint,
    read_cached,
    reference_pass,
    weights_fingerprint,
    write_cached,
)
from dpo_lightning.dpo.reference import AdapterDisabledReference, FrozenReference, Reference
from dpo_lightning.errors import UserError
from dpo_lightning.hub import cache_root

log = logging.getLogger(__name__)


def check_precompute(cfg: DPOConfig, mode: str) -> None:
    """Precomputed log-probs need fixed pairs: online runs sample new ones every step."""
    if cfg.precompute_ref_logps and mode != "offline":
        raise UserError(
            f"precompute_ref_logps works on a dataset's preference pairs (offline DPO); this run trains {mode}: "
            "set precompute_ref_logps: false"
        )


def _device() -> torch.device:
    """This process's accelerator, as Lightning will pick it (LOCAL_RANK's GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def make_reference(
    cfg: DPOConfig, model: torch.nn.Module | None, datamodule: DPODataModule, policy: torch.nn.Module
) -> Reference:
    """The run's reference: its frozen network `model` kept as it is, or (`model` None, a LoRA run without
    `ref_model_name`) the policy with its adapters disabled; or either used once for precomputed log-probs (read
    from the cache when an earlier run computed the same ones) and then let go."""
    if not cfg.precompute_ref_logps:
        if model is None:
            return AdapterDisabledReference(policy, chunk_size=cfg.logps_chunk_size)
        return FrozenReference(model, chunk_size=cfg.logps_chunk_size)
    if model is None:
        with policy.disable_adapter():
            return _precomputed(cfg, policy, datamodule, weights=weights_fingerprint(policy, skip="lora_"))
    return _precomputed(cfg, model, datamodule, weights=weights_fingerprint(model))


def _precomputed(cfg: DPOConfig, model: torch.nn.Module, datamodule: DPODataModule, weights: str) -> Reference:
    data = datamodule.prepare()
    splits = {"train": data.train, **({"val": data.val} if data.val is not None else {})}
    device = _device()
    autocast = torch.bfloat16 if cfg.precision == "bf16-mixed" else None
    settings = {
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        "attn_implementation": cfg.attn_implementation,
        "logps_chunk_size": cfg.logps_chunk_size,
        "device": device.type,
    }
    key = cache_key(weights, {n: pairs_fingerprint(d) for n, d in splits.items()}, settings)
    path = cache_root() / "ref_logps" / f"{key}.pt"
    values = read_cached(path, key, {name: len(split) for name, split in splits.items()})
    if values is None:
        model.to(device)  # and back to the CPU after the pass, so that the device holds the policy alone
        collate = PairCollator(datamodule.tokenizer.pad_token_id)
        values = {
            name: reference_pass(
                model,
                collate_in_batches(split, collate, cfg.batch_size),
                chunk_size=cfg.logps_chunk_size,
                autocast_dtype=autocast,
                description=f"reference log-probs ({name})",
            )
            for name, split in splits.items()
        }
        write_cached(path, key, values)
        log.info("reference log-probs of %s pairs computed and saved to %s", _counts(values), path)
    else:
        log.info("reference log-probs of %s pairs read from %s", _counts(values), path)
    datamodule.attach_reference_logps(values)
    model.to("cpu")
    return PrecomputedReference()


def _counts(values: dict[str, torch.Tensor]) -> str:
    return " + ".join(f"{len(v)} {name}" for name, v in values.items())
