"""Which reference a run trains against: a frozen network (`dpo.reference.FrozenReference`, or TR-DPO's
`SyncedReference`, which moves toward the policy), the LoRA policy with its adapters disabled, or either's
log-probs precomputed once and read from disk (`dpo.precomputed`, `precompute_ref_logps: true`).

Precomputing runs once the training processes have met and the networks are placed (and, under FSDP,
sharded): each rank computes an equal share of the pairs, the shares are gathered, rank 0 writes the one
cache file, and the reference network is let go before the first step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.data.collate import PairCollator, collate_in_batches
from dpo_lightning.data.datamodule import DPODataModule
from dpo_lightning.dpo.objective import LossSettings
from dpo_lightning.dpo.precomputed import (
    PrecomputedReference,
    cache_key,
    interleave_shares,
    pairs_fingerprint,
    rank_share,
    read_cached,
    reference_pass,
    weights_fingerprint,
    write_cached,
)
from dpo_lightning.dpo.reference import (
    AdapterDisabledReference,
    FrozenReference,
    NoReference,
    Reference,
    SyncedReference,
)
from dpo_lightning.hub import cache_root

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingPrecompute:
    """Reference log-probs not in the cache yet: where they go once the ranks have computed them."""

    path: Path
    key: str


def make_reference(
    cfg: DPOConfig, model: torch.nn.Module | None, datamodule: DPODataModule, policy: torch.nn.Module
) -> tuple[Reference, PendingPrecompute | None]:
    """The run's reference: its frozen network `model`, or (`model` None, a LoRA run without `ref_model_name`)
    the policy with its adapters disabled. With precomputed log-probs: read from the cache when an earlier run
    computed the same ones (no network kept), else the live reference and the pending computation, which
    `compute_pending` finishes once training has set up."""
    if LossSettings.of(cfg).reference_free:
        return NoReference(), None
    if model is None:
        live = AdapterDisabledReference(policy, chunk_size=cfg.logps_chunk_size)
    elif cfg.sync_ref_model:
        every, alpha = cfg.ref_model_sync_steps, cfg.ref_model_mixup_alpha
        live = SyncedReference(model, policy, alpha=alpha, every=every, chunk_size=cfg.logps_chunk_size)
    else:
        live = FrozenReference(model, chunk_size=cfg.logps_chunk_size)
    if not cfg.precompute_ref_logps:
        return live, None
    weights = weights_fingerprint(policy, skip="lora_") if model is None else weights_fingerprint(model)
    splits = _splits(datamodule)
    settings = {
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        "attn_implementation": cfg.attn_implementation,
        "logps_chunk_size": cfg.logps_chunk_size,
        "ld_alpha": cfg.ld_alpha,  # the stored sums are LD-DPO's weighted ones
        "autocast": str(pass_autocast(cfg)),  # which follows the strategy as well as the precision
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    key = cache_key(weights, {n: pairs_fingerprint(d) for n, d in splits.items()}, settings)
    path = cache_root() / "ref_logps" / f"{key}.pt"
    values = read_cached(path, key, {name: len(split) for name, split in splits.items()})
    if values is None:
        return live, PendingPrecompute(path, key)
    log.info("reference log-probs of %s pairs read from %s", _counts(values), path)
    datamodule.attach_reference_logps(values)
    return PrecomputedReference(), None


def pass_autocast(cfg: DPOConfig) -> torch.dtype | None:
    """The reference pass's autocast dtype: bf16 under bf16-mixed, except under FSDP, whose mixed-precision
    policy casts the sharded parameters itself."""
    return torch.bfloat16 if cfg.precision == "bf16-mixed" and cfg.strategy != "fsdp" else None


def _splits(datamodule: DPODataModule) -> dict:
    data = datamodule.prepare()
    return {"train": data.train, **({"val": data.val} if data.val is not None else {})}


def compute_pending(pending: PendingPrecompute, reference: Reference, trainer, cfg: DPOConfig) -> None:
    """Every rank's share of the pairs through `reference`, gathered in pair order on every rank, written to
    the cache by rank 0 and attached to the datamodule's splits. Every rank calls it, in step."""
    datamodule = trainer.datamodule
    collate = PairCollator(datamodule.tokenizer.pad_token_id, shared=cfg.prefix_sharing)
    autocast = pass_autocast(cfg)
    rank, world = trainer.global_rank, trainer.world_size
    values = {}
    for name, split in _splits(datamodule).items():
        indices = rank_share(len(split), rank, world)
        share = reference_pass(
            reference,
            collate_in_batches(split.select(indices) if indices else [], collate, cfg.batch_size),
            device=trainer.strategy.root_device,
            autocast_dtype=autocast,
            description=f"reference log-probs ({name})",
            ld_alpha=cfg.ld_alpha,
        )
        gathered = trainer.strategy.all_gather(share.to(trainer.strategy.root_device))
        # (world, count, 2): strategies differ in whether one process's gather has the world dimension
        values[name] = interleave_shares(gathered.reshape(world, *share.shape), len(split))
    if trainer.is_global_zero:
        write_cached(pending.path, pending.key, values)
        log.info(
            "reference log-probs of %s pairs computed on %d process(es), saved to %s",
            _counts(values),
            world,
            pending.path,
        )
    datamodule.attach_reference_logps(values)


def _counts(values: dict[str, torch.Tensor]) -> str:
    return " + ".join(f"{len(v)} {name}" for name, v in values.items())
