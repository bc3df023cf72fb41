"""A fingerprint of what a run trains on, kept in its run record so that a resume whose data changed in place
is refused, as a changed setting is.

The fingerprint is a content hash of the prepared rows (token ids, so any change that reaches training shows:
rows added, removed, edited, chosen and rejected swapped), beside a description of the source that is only
said, never compared: a file's size and modification time, a Hub dataset's name, config and `datasets`
fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dpo_lightning.config.sources import data_sources, dataset_label, is_mixture
from dpo_lightning.data.sources import resolve_source


def rows_sha256(*splits) -> str:
    """sha256 of the prepared splits' columns (each a datasets.Dataset, or None), column by column in name
    order: values and row boundaries, independent of how arrow chunked them."""
    import pyarrow as pa

    digest = hashlib.sha256()
    for split in splits:
        digest.update(b"split" if split is not None else b"none")
        if split is None:
            continue
        if getattr(split, "_indices", None) is not None:
            split = split.flatten_indices()  # a selection's rows, not the table beneath it
        table = split.data.table if hasattr(split.data, "table") else split.data
        for name in sorted(table.column_names):
            digest.update(name.encode())
            column = table.column(name).combine_chunks() if table.num_rows else pa.array([])
            _update(digest, column)
    return digest.hexdigest()


def _update(digest, array) -> None:
    """Feed an arrow array's values and, for lists, its row lengths into `digest`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        digest.update(pc.list_value_length(array).fill_null(-1).to_numpy(zero_copy_only=False).tobytes())
        _update(digest, array.flatten())
    elif pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        for value in array.to_pylist():
            digest.update(b"\0" if value is None else value.encode() + b"\1")
    else:
        digest.update(array.to_numpy(zero_copy_only=False).tobytes())


def source_description(dataset_name: str, dataset_config: str | None, origin: str | None) -> dict[str, Any]:
    """Where the data came from, for the record and the refusal's line (never compared)."""
    source = resolve_source(dataset_name)
    described: dict[str, Any] = {"dataset_name": dataset_name, "kind": source.kind}
    if source.kind in ("file", "disk", "text") and Path(source.location).exists():
        path = Path(source.location)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        described["bytes"] = sum(p.stat().st_size for p in files)
        described["mtime"] = max((p.stat().st_mtime for p in files), default=None)
    if source.kind == "hub":
        described["dataset_config"] = dataset_config
        described["datasets_fingerprint"] = origin
    return described


def data_fingerprint(cfg, data) -> dict[str, Any]:
    """The run record's `data`: the prepared rows' (`pipeline.PreparedData`) hash and counts, and the source's
    description (of several sources: each one's, with their bytes summed and the latest time)."""
    sources = data_sources(cfg)
    fingerprints = data.source_fingerprints or (None,) * len(sources)
    described = [
        source_description(source.name, source.values["dataset_config"], origin)
        for source, origin in zip(sources, fingerprints, strict=True)
    ]
    source = described[0]
    if is_mixture(cfg.dataset_name):
        sizes = [d["bytes"] for d in described if "bytes" in d]
        times = [d["mtime"] for d in described if d.get("mtime") is not None]
        source = {"dataset_name": dataset_label(cfg.dataset_name), "kind": "mixture", "sources": described}
        source.update({"bytes": sum(sizes)} if sizes else {}, mtime=max(times, default=None))
    return {
        "rows_sha256": rows_sha256(data.train, data.val),
        "train_rows": len(data.train),
        "val_rows": len(data.val) if data.val is not None else 0,
        "source": source,
    }


def data_change(saved: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why a resume's data is not the checkpoint's (None when it is, or when the record predates fingerprints):
    the counts and the source's size and time, as far as they say."""
    if not saved or "rows_sha256" not in saved or saved["rows_sha256"] == current["rows_sha256"]:
        return None
    parts = [f"{saved.get('train_rows')} -> {current['train_rows']} training rows"]
    before, after = saved.get("source", {}), current["source"]
    if before.get("bytes") != after.get("bytes") and "bytes" in after:
        parts.append(f"{before.get('bytes')} -> {after['bytes']} bytes")
    if before.get("mtime") != after.get("mtime") and after.get("mtime") is not None:
        parts.append("modified since")
    name = current["source"].get("dataset_name")
    return f"the training data {name} changed since the checkpoint was written ({', '.join(parts)})"
