"""The reference's log-probs computed once, before training, and kept on disk (`precompute_ref_logps: true`).

One pass of the reference over every training and validation pair gives each pair's (chosen, rejected)
log-probs; they travel with the pairs as two dataset columns into every `PairBatch` (`ref_logps`), and
`PrecomputedReference` answers the step's question from there, so the reference network is not held in
memory during training.

The file is keyed by everything that decides the numbers: the reference's weights, the tokenized pairs, the
dtype and precision it runs in, the attention kernel, the log-prob path and the device type. A later run
with the same key, a resumed one included, reads it instead of recomputing. The file is written to a
temporary name and renamed, and read back only when it holds its key and the expected shapes, so a torn or
foreign file is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dpo_lightning.data.batch import PairBatch, SequenceBatch
from dpo_lightning.dpo.logprobs import SequenceLogps, ld_weighted
from dpo_lightning.errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class PrecomputedReference:
    """The reference's log-probs read from each batch (`PairBatch.ref_logps`), precomputed before training."""

    def logps(self, batch: SequenceBatch) -> SequenceLogps:
        ref_logps = getattr(batch, "ref_logps", None)
        if ref_logps is None:
            raise RuntimeError("a batch without precomputed reference log-probs reached PrecomputedReference")
        _, _, sequences = batch.scored_positions()
        num_tokens = torch.bincount(sequences, minlength=batch.num_rows).to(torch.float32)
        return SequenceLogps(ref_logps.float(), num_tokens, torch.zeros_like(num_tokens))

    @contextmanager
    def sampling_model(self) -> Iterator[torch.nn.Module]:
        raise UserError(
            "generation metrics sample the reference model, which precompute_ref_logps does not keep in memory; "
            "set generation_eval_every: 0 or precompute_ref_logps: false"
        )
        yield  # pragma: no cover  (a generator, for contextmanager)


# ----------------------------------------------------------------------------- fingerprints


def weights_fingerprint(model: torch.nn.Module, skip: str | None = None) -> str:
    """A digest of every parameter and buffer (those whose name contains `skip` left out: a LoRA policy's
    adapters, which its adapter-disabled reference does not use): names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if skip is not None and skip in name:
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own bytes, no copy
    return digest.hexdigest()


def pairs_fingerprint(data) -> str:
    """A digest of the tokenized pairs (a Dataset or list with PAIR_COLUMNS), in order."""
    digest = hashlib.blake2b(digest_size=16)
    columns = [data[column] for column in PAIR_COLUMNS]
    for row in zip(*columns, strict=True):
        for ids in row:
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(np.asarray(ids, dtype="<i4").tobytes())  # at C speed: datasets hold millions of ids
    return digest.hexdigest()


def cache_key(weights: str, splits: dict[str, str], settings: dict[str, object]) -> str:
    """The file's key: the reference's weights, each split's pairs and the settings that change the numbers."""
    text = repr((FORMAT, weights, sorted(splits.items()), sorted(settings.items())))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------- the cache file


def read_cached(path: Path, key: str, sizes: dict[str, int]) -> dict[str, torch.Tensor] | None:
    """The stored (pairs, 2) log-probs per split, or None when the file is missing, torn or not this key's."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing, truncated or not a torch file: recompute
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    splits = stored.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(sizes):
        return None
    for name, size in sizes.items():
        values = splits[name]
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (size, 2):
            return None
    return splits


def write_cached(path: Path, key: str, splits: dict[str, torch.Tensor]) -> None:
    """Atomically: a temporary file beside the target, then a rename (two ranks may write the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    torch.save({"key": key, "splits": splits}, partial)
    os.replace(partial, path)


# ----------------------------------------------------------------------------- the pass


@torch.no_grad()
def reference_pass(
    reference,
    batches: Iterable[PairBatch],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    description: str = "reference log-probs",
    ld_alpha: float | None = None,
) -> torch.Tensor:
    """(pairs, 2) float32 (chosen, rejected) log-probs of every pair in `batches`, in order, from a `Reference`
    (`.logps(batch)`) on `device`, with a progress bar; with `ld_alpha`, LD-DPO's weighted sums (stored so)."""
    from tqdm.auto import tqdm

    out = []
    for batch in tqdm(batches, desc=description, unit="batch", leave=False, disable=None):  # off without a terminal
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            rows = ld_weighted(reference.logps(batch), ld_alpha).float()
        chosen, rejected = batch.split(rows)
        out.append(torch.stack([chosen, rejected], dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def rank_share(size: int, rank: int, world_size: int) -> list[int]:
    """The pair indices rank `rank` computes (every `world_size`-th from `rank`), padded with repeats of its
    first index (or 0) to the same count on every rank, so that sharded forward passes stay in step."""
    own = list(range(rank, size, world_size))
    count = -(-size // world_size)
    return own + [own[0] if own else 0] * (count - len(own))


def interleave_shares(shares: torch.Tensor, size: int) -> torch.Tensor:
    """(world, count, 2) per-rank results of `rank_share`'s indices back into pair order (size, 2)."""
    world = shares.shape[0]
    out = torch.empty(size, *shares.shape[2:], dtype=shares.dtype)
    for rank in range(world):
        own = len(range(rank, size, world))
        out[rank::world] = shares[rank, :own].cpu()
    return out
