"""Where preference rows come from: the built-in set, a local file, a `save_to_disk` folder or the Hub; which
splits train and validate; and what the run trains on them (the mode, decided here once).

Everything is loaded through the `datasets` library. Local JSON/JSONL files are pre-scanned first
(`json_scan.py`), so that a bad line is reported by line and column.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from dpo_lightning.builtin import BUILTIN_DATASETS, BUILTIN_PROMPTS
from dpo_lightning.data.formats import role_columns
from dpo_lightning.data.json_scan import non_utf8_place, prescan_json
from dpo_lightning.data.mode import decide_mode
from dpo_lightning.data.text_prompts import TINY_SHAKESPEARE, text_prompt_rows, text_source_path
from dpo_lightning.errors import UserError, first_line, nearest_path
from dpo_lightning.hub import hub_reachable

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
EVAL_SPLIT_DEFAULTS = ("test", "validation")


class RawSplits(NamedTuple):
    """Rows as the source holds them, before any format detection."""

    train: datasets.Dataset
    eval: datasets.Dataset | None  # None when the source has no eval split
    label: str  # names the source in error messages: the path or the Hub name as the user gave it
    skipped: int = 0  # lines the JSON pre-scan skipped as bad (on_bad_rows="skip"); normalize counts the rest
    mode: str = "offline"  # what the run trains on this data ("offline" | "online" | "reward"), decided once


class Source(NamedTuple):
    kind: str  # "builtin" | "file" | "text" | "disk" | "hub"
    location: str  # an expanded path for file/disk, else the name


# ----------------------------------------------------------------------------- resolving the name


def _looks_like_path(name: str) -> bool:
    return name.startswith(("./", "../", "/", "~")) or Path(name).suffix.lower() in DATA_EXTENSIONS


def resolve_source(name: str) -> Source:
    """Classify `dataset_name` without loading anything; raise UserError for a missing or unusable path."""
    if name in BUILTIN_DATASETS:
        return Source("builtin", name)
    if name.startswith("builtin:"):
        raise UserError(f"unknown built-in dataset '{name}'; built-in datasets: {', '.join(BUILTIN_DATASETS)}")
    if name == TINY_SHAKESPEARE:
        return Source("text", name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".txt":
        return Source("text", str(text_source_path(name)))
    if path.is_file():
        if path.suffix.lower() not in DATA_EXTENSIONS:
            raise UserError(
                f"{name}: unsupported file type '{path.suffix}'; use a {', '.join(DATA_EXTENSIONS)} file, "
                "a .txt file of prompts, or a folder written by datasets.save_to_disk"
            )
        return Source("file", str(path))
    if path.is_dir():
        if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            raise UserError(
                f"{name} is a folder but not one written by datasets.save_to_disk "
                "(no dataset_dict.json or state.json); point dataset_name at a data file or such a folder"
            )
        return Source("disk", str(path))
    if _looks_like_path(name):
        raise UserError(f"dataset file not found: {name}{nearest_path(name)}")
    return Source("hub", name)


# ----------------------------------------------------------------------------- loaders


def _load_file(source: Source, label: str, cfg) -> tuple[dict[str, Any], int, str | None]:
    """({"train": Dataset}, lines skipped by the pre-scan, the mode a JSON file's first record decided)."""
    import datasets

    path = Path(source.location)
    builder = DATA_EXTENSIONS[path.suffix.lower()]
    mode = None
    if builder == "json":
        scan = prescan_json(path, label, dict(cfg.columns), cfg.on_bad_rows, cfg.mode)
        if scan.kept is not None:
            return {"train": datasets.Dataset.from_list(scan.kept, split="train")}, scan.skipped, scan.mode
        mode = scan.mode
    try:
        return {"train": datasets.load_dataset(builder, data_files=str(path), split="train")}, 0, mode
    except Exception as exc:  # the library's many error types all mean "this file cannot be read"
        place = non_utf8_place(path) if builder == "csv" else None
        if place:
            raise UserError(f"{label} {place}is not UTF-8 text; save it as UTF-8") from None
        # datasets wraps the parser's own reason ("Expected 3 fields in line 4, saw 5") in a generic one
        raise UserError(f"{label}: the datasets library could not read it ({first_line(root_cause(exc))})") from None


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception `exc` was raised from."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def _load_disk(source: Source, label: str) -> dict[str, Any]:
    import datasets

    try:
        loaded = datasets.load_from_disk(source.location)
    except Exception as exc:
        raise UserError(f"{label}: could not load the save_to_disk folder ({first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {"train": loaded}


@contextmanager
def _offline_if_unreachable():
    """Force offline mode (cache only) while loading when the Hub cannot be reached; yields whether it did.

    Both libraries read HF_HUB_OFFLINE once at import, so the flags are flipped on their modules for the
    duration of the call and restored after.
    """
    import datasets
    from huggingface_hub import constants

    if datasets.config.HF_HUB_OFFLINE or hub_reachable():
        yield False
        return
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hub(source: Source, cfg) -> dict[str, Any]:
    import datasets

    forced = False
    try:
        with _offline_if_unreachable() as forced:
            loaded = datasets.load_dataset(source.location, cfg.dataset_config)
    except Exception as exc:
        why = first_line(exc)
        if forced:
            why = f"the Hub is unreachable from this machine, so only the local cache was tried: {why}"
        raise UserError(
            f"could not load dataset '{source.location}' from the Hugging Face Hub ({why}); "
            "check the name or point dataset_name at a local .jsonl/.parquet/.csv file "
            "or a save_to_disk folder"
        ) from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _load_builtin(cfg) -> dict[str, Any]:
    import datasets

    from dpo_lightning.builtin import describe_prompt_rows, preference_rows

    rows = describe_prompt_rows(cfg.seed) if cfg.dataset_name == BUILTIN_PROMPTS else preference_rows(cfg.seed)
    return {name: datasets.Dataset.from_list(split_rows, split=name) for name, split_rows in rows.items()}


def _load_text(source: Source, cfg) -> dict[str, Any]:
    """Prompts cut from plain text (tiny_shakespeare is downloaded and verified once, then cached)."""
    import datasets

    path = text_source_path(source.location)
    rows = text_prompt_rows(path, label=cfg.dataset_name, max_lines=cfg.prompt_lines)
    return {"train": datasets.Dataset.from_list(rows, split="train")}


# ----------------------------------------------------------------------------- choosing splits


def _split_error(label: str, key: str, split: str, available: list[str]) -> UserError:
    return UserError(
        f"{label}: split '{split}' not found; available splits: {', '.join(available)}; set {key} to one of them"
    )


def pick_splits(splits: dict[str, Any], cfg, label: str, split_key: str = "train_split") -> RawSplits:
    """Train from `train_split`; eval from `eval_split`, else a `test`/`validation` split, else None. `split_key`:
    the option that set train_split, as the error names it (evaluate.py's --split)."""
    available = sorted(splits)
    if cfg.train_split not in splits:
        raise _split_error(label, split_key, cfg.train_split, available)
    if cfg.eval_split is not None:
        if cfg.eval_split not in splits:
            raise _split_error(label, "eval_split", cfg.eval_split, available)
        return RawSplits(splits[cfg.train_split], splits[cfg.eval_split], label)
    for name in EVAL_SPLIT_DEFAULTS:
        if name in splits and name != cfg.train_split:
            return RawSplits(splits[cfg.train_split], splits[name], label)
    return RawSplits(splits[cfg.train_split], None, label)


def split_labels(raw: RawSplits) -> tuple[str, str]:
    """Labels for error messages: 'NAME[split]' when the source has several splits, else the name alone."""
    if raw.eval is None:
        return raw.label, raw.label
    train_split = str(raw.train.split or "train")
    eval_split = str(raw.eval.split or "eval")
    return f"{raw.label}[{train_split}]", f"{raw.label}[{eval_split}]"


def load_splits(cfg, split_key: str = "train_split") -> RawSplits:
    """Load `cfg.dataset_name`, pick its train and eval splits and decide what the run trains on them (the
    mode); a user mistake is one UserError line (`split_key`: see `pick_splits`)."""
    source = resolve_source(cfg.dataset_name)
    label, skipped, mode = cfg.dataset_name, 0, None
    if source.kind == "builtin":
        splits = _load_builtin(cfg)
    elif source.kind == "text":
        splits = _load_text(source, cfg)
    elif source.kind == "file":
        splits, skipped, mode = _load_file(source, label, cfg)
    elif source.kind == "disk":
        splits = _load_disk(source, label)
    else:
        splits = _load_hub(source, cfg)
    raw = pick_splits(splits, cfg, label, split_key)._replace(skipped=skipped)
    if mode is None:
        train_label, _ = split_labels(raw)
        found = role_columns(list(raw.train.column_names), dict(cfg.columns), train_label)
        mode = decide_mode(cfg.mode, found, label=train_label, columns=list(raw.train.column_names))
    return raw._replace(mode=mode)
