"""Writing and restoring checkpoints in the layout of `dpo_lightning.layout`, and the final export.

Checkpoints are written through Determined's sharded `store_path` protocol (`determined.session`): every rank
writes its part into the directory, then Determined writes metadata.json; on a cluster the directory is
named by the checkpoint's uuid, off-cluster too (under `<output_dir>/checkpoints/`).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.layout import (
    COMPLETED,
    FINAL,
    FORMAT,
    FSDP_STATE,
    LIGHTNING_STATE,
    MERGED,
    METADATA,
    RANK_STATE,
    REFERENCE,
    RUN_CONFIG,
    complete_checkpoints,
    read_metadata,
    write_json,
)
from dpo_lightning.models.lora import save_merged
from dpo_lightning.training.strategies import full_trained_state, full_weights, is_fsdp

# a model's weights in Hugging Face format: one file, a sharded index, or a LoRA run's adapters
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def checkpoint_metadata(step: int, trial_id: int | None) -> dict[str, Any]:
    """What every rank passes to `store_path`; Determined writes it to metadata.json once all ranks are done."""
    return {"steps_completed": int(step), "trial_id": trial_id, "format": FORMAT}


def write_checkpoint(
    folder: Path, *, trainer, module, tokenizer, record: dict[str, Any], with_full_weights: bool
) -> None:
    """This rank's part of a checkpoint into `folder`; every rank calls it, in step.

    Rank 0 writes the tokenizer and run_config.json at the root and every rank its own RNG state and the
    module's per-rank state (its sampling stream). Without FSDP, rank 0 also writes the trained model (the
    policy, or a RewardModel) in Hugging Face format at the root and the Lightning state (optimizer, scheduler,
    loops, data position) without weights. Under FSDP every rank writes its shard of the trained weights and
    optimizer state instead, and the whole model is gathered into Hugging Face format only with
    `with_full_weights` (the last checkpoint of a run). A TR-DPO reference, which moves as the policy trains, is
    written whole at trainer/reference/ in Hugging Face format.
    """
    folder = Path(folder)
    sharded = is_fsdp(trainer)
    if sharded:
        module.reshard()  # a root left whole by validation would be saved whole, not as this rank's shard
    trained_state = full_trained_state(trainer, module) if with_full_weights or not sharded else None
    synced = module.synced_reference()
    reference_state = None if synced is None else full_weights(trainer, synced, trainable_only=False)
    (folder / "trainer").mkdir(parents=True, exist_ok=True)
    # Without FSDP the module leaves the weights out of this state (`on_save_checkpoint`): they are at the root.
    trainer.save_checkpoint(folder / (FSDP_STATE if sharded else LIGHTNING_STATE), weights_only=False)
    if trainer.is_global_zero:
        if trained_state is not None:
            module.save_pretrained(folder, trained_state)
        if reference_state is not None:
            synced.save_pretrained(folder / REFERENCE, state_dict=reference_state, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_json(folder / RUN_CONFIG, record)
    rank_state = {"rng": rng_state(), "module": module.rank_state_dict()}
    torch.save(rank_state, folder / RANK_STATE.format(rank=trainer.global_rank))


def add_full_weights(folder: Path, *, trainer, module) -> None:
    """Gather a sharded checkpoint's trained model into Hugging Face format at its root (every rank calls it;
    rank 0 writes), for a run whose last checkpoint was written before it knew it was the last."""
    state = full_trained_state(trainer, module)
    if trainer.is_global_zero:
        module.save_pretrained(folder, state)


def has_full_weights(folder: Path) -> bool:
    """Whether a checkpoint holds its trained model in Hugging Face format at the root."""
    return any((Path(folder) / name).is_file() for name in HF_WEIGHTS)


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / FSDP_STATE).is_dir()


def lightning_state_path(folder: Path) -> Path:
    """What `Trainer.fit(ckpt_path=...)` restores from: a file, or FSDP's sharded directory."""
    return folder / FSDP_STATE if is_sharded_checkpoint(folder) else folder / LIGHTNING_STATE


def restore_rank_state(folder: Path, rank: int, module) -> bool:
    """Put back this rank's RNG state and the module's per-rank state; False when the checkpoint has none for
    this rank."""
    path = folder / RANK_STATE.format(rank=rank)
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=False)
    set_rng_state(state["rng"])
    module.load_rank_state_dict(state.get("module", {}))
    return True


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns what was deleted."""
    old = [folder for _, folder in complete_checkpoints(root)[:-keep]]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def export_final(output_dir: Path, checkpoint: Path) -> Path:
    """`output_dir/final/`: the policy, tokenizer and run_config.json of `checkpoint`, replaced atomically."""
    final = output_dir / FINAL
    staging = output_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging, ignore=shutil.ignore_patterns("trainer", METADATA))
    metadata = read_metadata(checkpoint) or {}
    write_json(staging / COMPLETED, {"steps_completed": metadata.get("steps_completed")})
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def export_merged(final: Path, model: torch.nn.Module, tokenizer) -> Path:
    """`final/merged/`: a LoRA policy with its adapters merged into the base, a folder that transformers and
    vLLM load without peft, written beside the adapters."""
    folder = final / MERGED
    save_merged(model, folder)
    tokenizer.save_pretrained(folder)
    return folder
