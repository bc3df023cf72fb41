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

from dpo_lightning.integrity import FILES, file_checksums, replace_folder, safe_torch_load
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
from dpo_lightning.training.fsdp import safe_reader
from dpo_lightning.training.strategies import all_gather_objects, full_trained_state, full_weights, is_fsdp

# a model's weights in Hugging Face format: one file, a sharded index, or a LoRA run's adapters
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
HF_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json")


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, which a `weights_only` load reads back (numpy's
    key array travels as a tensor)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
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

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


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
        metadata = read_metadata(folder)
        if metadata is not None and FILES in metadata:  # the gathered files join the checksums it records
            metadata[FILES] = {**metadata[FILES], **file_checksums(folder, only=HF_WEIGHT_FILES)}
            write_json(folder / METADATA, metadata)


def has_full_weights(folder: Path) -> bool:
    """Whether a checkpoint holds its trained model in Hugging Face format at the root."""
    return any((Path(folder) / name).is_file() for name in HF_WEIGHTS)


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / FSDP_STATE).is_dir()


def lightning_state_path(folder: Path) -> Path:
    """What `Trainer.fit(ckpt_path=...)` restores from: a file, or FSDP's sharded directory."""
    return folder / FSDP_STATE if is_sharded_checkpoint(folder) else folder / LIGHTNING_STATE


def check_loadable(folder: Path) -> None:
    """Read every torch file of a checkpoint's trainer/ state the way resume will, tensors and plain values only
    (memory-mapped: the optimizer state is not read in), and a sharded checkpoint's metadata through the
    restricted unpickler, before any model loads: a planted object, or a file torn or altered with its checksum
    to match, is refused here in one line and never run."""
    folder = Path(folder)
    for path in sorted((folder / "trainer").rglob("*.pt")):
        safe_torch_load(path, mmap=True)
    if is_sharded_checkpoint(folder):
        safe_reader(folder / FSDP_STATE).read_metadata()


def restore_rank_state(folder: Path, rank: int, module) -> bool:
    """Put back this rank's RNG state and the module's per-rank state; False when the checkpoint has none for
    this rank."""
    path = folder / RANK_STATE.format(rank=rank)
    if not path.is_file():
        return False
    state = safe_torch_load(path)
    set_rng_state(state["rng"])
    module.load_rank_state_dict(state.get("module", {}))
    return True


def record_checksums(folder: Path, metadata: dict[str, Any], trainer) -> None:
    """Put the checksum of every file of the checkpoint in `folder` into its `metadata` (metadata.json), once
    every rank has written its part. Each folder is hashed by the lowest rank that sees it (ranks that share one
    folder hash it once; nodes with folders of their own each hash theirs), and Determined merges what the
    ranks add, as it merges their metadata."""
    trainer.strategy.barrier()
    info = os.stat(folder)
    folders = all_gather_objects((info.st_dev, info.st_ino))
    if folders.index((info.st_dev, info.st_ino)) == trainer.global_rank:
        metadata[FILES] = file_checksums(folder)


def prune_checkpoints(root: Path, keep: int, skipped: list[Path] = ()) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, every torn one (no metadata.json: its writing was
    interrupted; the run's lock rules out a writer in progress) and the damaged ones a resume `skipped`;
    returns what was deleted."""
    old = [folder for _, folder in complete_checkpoints(root)[:-keep]]
    if root.is_dir():
        old += [f for f in root.iterdir() if f.is_dir() and read_metadata(f) is None]
    old += [Path(f) for f in skipped if Path(f).is_dir() and Path(f) not in old]
    for folder in old:
        shutil.rmtree(folder, ignore_errors=True)
    return old


def export_final(output_dir: Path, checkpoint: Path, complete=None) -> Path:
    """`output_dir/final/`: the policy, tokenizer and run_config.json of `checkpoint`, and whatever `complete`
    writes into the new folder before it replaces the old one atomically (never absent, never half written)."""
    final = output_dir / FINAL
    staging = output_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted export left
    try:
        shutil.copytree(checkpoint, staging, ignore=shutil.ignore_patterns("trainer", METADATA))
        if complete is not None:
            complete(staging)
        metadata = read_metadata(checkpoint) or {}
        write_json(staging / COMPLETED, {"steps_completed": metadata.get("steps_completed")})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the space it took, on a full disk
        raise
    replace_folder(staging, final)
    return final


def export_merged(final: Path, model: torch.nn.Module, tokenizer) -> Path:
    """`final/merged/`: a LoRA policy with its adapters merged into the base, a folder that transformers and
    vLLM load without peft, written beside the adapters."""
    folder = final / MERGED
    save_merged(model, folder)
    tokenizer.save_pretrained(folder)
    return folder
