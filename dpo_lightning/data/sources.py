"""Where preference rows come from: the built-in set, a local file, a `save_to_disk` folder or the Hub.

Everything is loaded through the `datasets` library. Local JSON/JSONL files are pre-scanned first, so that a
broken line, a missing column, a wrong type or an empty file is reported by line and column instead of as an
Arrow error from deep inside the library.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from dpo_lightning.builtin import BUILTIN_DATASETS, BUILTIN_PROMPTS
from dpo_lightning.config import PAIR_MODES
from dpo_lightning.data.formats import present_roles, role_columns
from dpo_lightning.data.mode import decide_mode
from dpo_lightning.data.text_prompts import TINY_SHAKESPEARE, text_prompt_rows, text_source_path
from dpo_lightning.errors import UserError, first_line
from dpo_lightning.hub import hub_reachable

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
PAIR_ROLES = ("chosen", "rejected")
PROMPT_ROLES = ("prompt", "messages")
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
        raise UserError(f"dataset file not found: {name}")
    return Source("hub", name)


# ----------------------------------------------------------------------------- JSON pre-scan


class _Scan(NamedTuple):
    kept: list[dict] | None  # the good rows, only when some were skipped (Arrow cannot load the mix)
    skipped: int
    mode: str  # what the file trains, decided from its first record


def _broken(label: str, exc: json.JSONDecodeError) -> UserError:
    return UserError(f"{label} line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})")


def _json_lines(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line, streamed so that a large file stays cheap."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{label} line {lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None


def _json_array(text: str, label: str) -> Iterator[tuple[int, Any]]:
    """(line where the item starts, item) for a top-level JSON list; errors carry absolute line/column."""
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip_ws(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    pos = skip_ws(pos)
    if text.startswith("]", pos):
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise _broken(label, exc) from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, item
        pos = skip_ws(end)
        if text.startswith(",", pos):
            pos = skip_ws(pos + 1)
        elif text.startswith("]", pos):
            break
        else:
            raise _broken(label, json.JSONDecodeError("Expecting ',' delimiter", text, pos))
    if skip_ws(pos + 1) < len(text):
        raise _broken(label, json.JSONDecodeError("Extra data", text, skip_ws(pos + 1)))


def json_records(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    """Records of a .jsonl file, or of a .json file holding either a list of objects or JSON lines."""
    if path.suffix.lower() == ".jsonl":
        yield from _json_lines(path, label)
        return
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from _json_array(text, label)
        return
    try:
        yield from _json_lines(path, label)
    except UserError as line_error:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one document either: the line-level error is the useful one
        if isinstance(whole, dict):
            raise UserError(
                f"{label}: a single JSON object at the top level is not supported; "
                "write a list of row objects or one object per line (JSON lines)"
            ) from None
        raise line_error from None


def _kind(value: Any) -> str | None:
    """'string' or 'messages' for a usable value, None for anything else."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return "messages"
    return None


def _expected(role: str) -> str:
    if role == "messages":
        return "a list of {role, content} messages"
    return "a string or a list of {role, content} messages"


def _check_value(role: str, column: str, value: Any, kinds: dict[str, tuple[str, int]], lineno: int) -> str | None:
    """A problem with one field of one line, or None; `kinds` remembers each column's first kind and line."""
    if value is None:
        return f"column '{column}' is null"
    kind = _kind(value)
    if kind is None or (role == "messages" and kind != "messages"):
        what = type(value).__name__ if not isinstance(value, list) else "a list with a malformed message"
        return f"column '{column}' is {what}, expected {_expected(role)}"
    first = kinds.setdefault(column, (kind, lineno))
    if first[0] != kind:
        return f"column '{column}' is a {kind} but line {first[1]} has a {first[0]}; use one kind per column"
    return None


def _check_record(record: Any, lineno: int, wanted: dict[str, str], kinds: dict) -> str | None:
    """A problem with one record (missing column or ill-typed value), or None when it is usable."""
    for role, column in wanted.items():
        if column not in record:
            mapped = "" if column == role else f" (columns.{role})"
            return (
                f"missing column '{column}'{mapped}; this row has columns: {', '.join(record) or 'none'} "
                f'(map yours with columns, e.g. {{"{role}": "<your column>"}})'
            )
        problem = _check_value(role, column, record[column], kinds, lineno)
        if problem:
            return problem
    return None


def _wanted_columns(first: dict, columns: dict[str, str], mode: str) -> dict[str, str]:
    """Role -> column that every line must have: the prompt role the first line uses, plus chosen/rejected
    when the first line has a chosen column or the decided mode trains on pairs."""
    pairs = {role: columns.get(role, role) for role in PAIR_ROLES}
    prompt = {}
    for role in PROMPT_ROLES:
        if columns.get(role, role) in first:
            prompt = {role: columns.get(role, role)}
            break
    if prompt and mode not in PAIR_MODES and pairs["chosen"] not in first:
        return prompt
    return {**prompt, **pairs}


def _utf8_records(path: Path, label: str) -> Iterator[tuple[int, Any]]:
    try:
        yield from json_records(path, label)
    except UnicodeDecodeError as exc:
        raise UserError(f"{label} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None


def prescan_json(path: Path, label: str, columns: dict[str, str], on_bad_rows: str, mode: str = "auto") -> _Scan:
    """Check every record of a JSON/JSONL file; raise UserError on the first problem, or skip and count.

    The first record's columns decide the mode (`mode.decide_mode`, once for the whole file, so that a file
    with no usable columns is said once, not as a missing column on every line) and so what every line needs.
    """
    wanted: dict[str, str] | None = None
    kinds: dict[str, tuple[str, int]] = {}
    kept: list[dict] = []
    skipped, first_problem, rows = 0, "", 0
    for lineno, record in _utf8_records(path, label):
        rows += 1
        if not isinstance(record, dict):
            raise UserError(f"{label} line {lineno}: expected a JSON object, got {type(record).__name__}")
        if wanted is None:
            decided = decide_mode(mode, present_roles(list(record), columns), label=label, columns=list(record))
            wanted = _wanted_columns(record, columns, decided)
        problem = _check_record(record, lineno, wanted, kinds)
        if problem and on_bad_rows != "skip":
            raise UserError(f"{label} line {lineno}: {problem}")
        if problem:
            skipped += 1
            first_problem = first_problem or f"line {lineno}: {problem}"
        elif on_bad_rows == "skip":
            kept.append({column: record[column] for column in wanted.values()})
    if rows == 0:
        raise UserError(f"{label} has no rows")
    if skipped == rows:
        raise UserError(f"{label}: every row is bad ({skipped} skipped; first: {first_problem})")
    if skipped:
        logger.warning("%s: skipped %d bad lines (first: %s)", label, skipped, first_problem)
    return _Scan(kept if skipped else None, skipped, decided)


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
        raise UserError(f"{label}: the datasets library could not read it ({first_line(exc)})") from None


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


def pick_splits(splits: dict[str, Any], cfg, label: str) -> RawSplits:
    """Train from `train_split`; eval from `eval_split`, else a `test`/`validation` split, else None."""
    available = sorted(splits)
    if cfg.train_split not in splits:
        raise _split_error(label, "train_split", cfg.train_split, available)
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


def load_splits(cfg) -> RawSplits:
    """Load `cfg.dataset_name`, pick its train and eval splits and decide what the run trains on them (the
    mode); a user mistake is one UserError line."""
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
    raw = pick_splits(splits, cfg, label)._replace(skipped=skipped)
    if mode is None:
        train_label, _ = split_labels(raw)
        found = role_columns(list(raw.train.column_names), dict(cfg.columns), train_label)
        mode = decide_mode(cfg.mode, found, label=train_label, columns=list(raw.train.column_names))
    return raw._replace(mode=mode)
