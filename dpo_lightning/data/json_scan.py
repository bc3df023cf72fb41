"""The pre-scan of local JSON and JSON-lines files, before the `datasets` library reads them: a broken line, a
missing column, a wrong type or an empty file is reported by line and column instead of as an Arrow error
from deep inside the library. With `on_bad_rows: skip` the bad lines are counted and left out.

The file's first record decides the mode (`mode.decide_mode`), and with it the columns every line needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from dpo_lightning.config import PAIR_MODES
from dpo_lightning.data.formats import present_roles, row_roles
from dpo_lightning.data.mode import decide_mode
from dpo_lightning.errors import UserError

logger = logging.getLogger(__name__)


class _Scan(NamedTuple):
    kept: list[dict] | None  # the good rows, only when some were skipped (Arrow cannot load the mix)
    skipped: int
    mode: str  # what the file trains, decided from its first record


# json's messages stop where a position would follow ("Invalid control character at"); these say what is wrong
JSON_PROBLEMS = (
    ("Invalid control character", "a raw tab or line break inside a string (write it as \\t or \\n)"),
    ("Unterminated string", 'a string is not closed (a missing ")'),
    ("Expecting property name", 'a key not in double quotes (JSON needs "key"), or a comma before a closing brace'),
    ("Expecting ',' delimiter", "a missing comma between two items"),
    ("Expecting ':' delimiter", "a missing colon after a key"),
    ("Expecting value", "a missing value (an empty field, a comma before a closing bracket, or text that is not JSON)"),
    ("Extra data", "more than one JSON value on one line"),
    ("Invalid \\escape", "a backslash that starts no valid escape (write \\\\ for a backslash)"),
)


def json_problem(exc: json.JSONDecodeError) -> str:
    """What is wrong with a line, in words, with the column."""
    words = next((text for start, text in JSON_PROBLEMS if exc.msg.startswith(start)), exc.msg)
    return f"column {exc.colno}: invalid JSON: {words}"


class BrokenLine(NamedTuple):
    problem: str


def _broken(label: str, exc: json.JSONDecodeError) -> UserError:
    return UserError(f"{label} line {exc.lineno}, {json_problem(exc)}")


def _json_lines(path: Path, label: str, keep_broken: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line, streamed so that a large file stays cheap. A line that
    is not JSON is an error, or with `keep_broken` a `BrokenLine` for the caller to skip and count."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                if keep_broken:
                    yield lineno, BrokenLine(json_problem(exc))
                else:
                    raise UserError(f"{label} line {lineno}, {json_problem(exc)}") from None


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


def json_records(path: Path, label: str, keep_broken: bool = False) -> Iterator[tuple[int, Any]]:
    """Records of a .jsonl file, or of a .json file holding either a list of objects or JSON lines (with
    `keep_broken`, a JSON-lines file's broken lines come as `BrokenLine`s; a broken list is always an error)."""
    if path.suffix.lower() == ".jsonl":
        yield from _json_lines(path, label, keep_broken)
        return
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        yield from _json_array(text, label)
        return
    try:
        yield from _json_lines(path, label, keep_broken)
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
    if role == "label":  # any scalar: `formats.preferred_side` reads it
        return None if isinstance(value, (str, int, float, bool)) else f"column '{column}' is not a label value"
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
    """Role -> column that every line must have: the roles the first line fills (`formats.row_roles`)."""
    roles = row_roles(present_roles(list(first), columns), trains_pairs=mode in PAIR_MODES)
    return {role: columns.get(role, role) for role in roles}


def _utf8_records(path: Path, label: str, keep_broken: bool) -> Iterator[tuple[int, Any]]:
    try:
        yield from json_records(path, label, keep_broken)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{label} {non_utf8_place(path) or ''}is not UTF-8 text ({exc.reason}); save it as UTF-8"
        ) from None


def non_utf8_place(path: Path) -> str | None:
    """ "line N, byte M " of the first bytes of `path` that are not UTF-8, or None."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {number}, byte {exc.start + 1} "
    return None


def prescan_json(path: Path, label: str, columns: dict[str, str], on_bad_rows: str, mode: str = "auto") -> _Scan:
    """Check every record of a JSON/JSONL file; raise UserError on the first problem, or skip and count.

    The first record's columns decide the mode (`mode.decide_mode`, once for the whole file, so that a file
    with no usable columns is said once, not as a missing column on every line) and so what every line needs.
    """
    wanted: dict[str, str] | None = None
    kinds: dict[str, tuple[str, int]] = {}
    kept: list[dict] = []
    skipped, first_problem, rows, skipped_lines = 0, "", 0, []
    for lineno, record in _utf8_records(path, label, keep_broken=on_bad_rows == "skip"):
        rows += 1
        if isinstance(record, BrokenLine):
            skipped += 1
            skipped_lines.append(lineno)
            first_problem = first_problem or f"line {lineno}, {record.problem}"
            continue
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
            skipped_lines.append(lineno)
            first_problem = first_problem or f"line {lineno}: {problem}"
        elif on_bad_rows == "skip":
            kept.append({column: record[column] for column in wanted.values()})
    if rows == 0:
        raise UserError(f"{label} has no rows")
    if skipped == rows:
        raise UserError(f"{label}: every row is bad ({skipped} skipped; first: {first_problem})")
    if skipped:
        shown = ", ".join(map(str, skipped_lines[:20])) + (", ..." if len(skipped_lines) > 20 else "")
        logger.warning("%s: skipped %d bad lines (lines %s; first: %s)", label, skipped, shown, first_problem)
    return _Scan(kept if skipped else None, skipped, decided)
