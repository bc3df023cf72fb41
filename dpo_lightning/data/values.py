"""The values a preference row holds (text, or lists of {role, content} messages), checked one field at a
time; `BadRow` is one row's problem, which the caller places by source and row number."""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]


class BadRow(ValueError):
    """One row's problem; the caller adds the source and row number."""


class Row(dict):
    """A normalised row that remembers where it was read, `origin` = (source label, row number), so that a
    later stage (truncation) names it as a bad row is named; it equals the plain dict of its values."""

    __slots__ = ("origin",)

    def __init__(self, values: dict, origin: tuple[str, int] | None = None) -> None:
        super().__init__(values)
        self.origin = origin


def row_places(dropped: list[tuple[int, dict]], limit: int) -> str:
    """Where the rows of `dropped` ((1-based position, row) pairs) were read, grouped by source ("data.jsonl
    rows 3, 9; extra.jsonl row 2"), at most `limit` named; rows without an origin by position ("pairs 2, 5 in
    order")."""
    places: dict[str | None, list[str]] = {}
    for position, row in dropped[:limit]:
        label, number = getattr(row, "origin", None) or (None, position)
        places.setdefault(label, []).append(str(number))
    named = "; ".join(
        f"pairs {', '.join(n)} in order"
        if label is None
        else f"{label} {'row' if len(n) == 1 else 'rows'} {', '.join(n)}"
        for label, n in places.items()
    )
    return named + ("; ..." if len(dropped) > limit else "")


# ----------------------------------------------------------------------------- values


def common_prefix_len(a, b) -> int:
    """Length of the longest common prefix of two strings or lists.

    A binary search on slice equality, which runs in C: HH transcripts are long and there are 160k of them.
    """
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def type_name(value: Any) -> str:
    return "a list" if isinstance(value, list) else type(value).__name__


def present(row: dict, role: str) -> Any:
    value = row.get(role)
    if value is None:
        raise BadRow(f"'{role}' is missing")
    return value


def message_list(value: Any, role: str) -> Messages:
    """A list of {role, content} dicts with string values, reduced to those two keys."""
    if not isinstance(value, list):
        raise BadRow(f"'{role}' is {type_name(value)}, expected a list of {{role, content}} messages")
    out = []
    for k, message in enumerate(value, 1):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise BadRow(f"'{role}' message {k} is not a {{role, content}} message with string values")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def text_or_messages(value: Any, role: str) -> str | Messages:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return message_list(value, role)
    raise BadRow(f"'{role}' is {type_name(value)}, expected a string or a list of {{role, content}} messages")


def as_assistant(value: str | Messages) -> Messages:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else value


def is_blank(value: str | Messages) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)
