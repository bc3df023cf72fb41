"""Errors a user causes: shown as one line, no traceback, non-zero exit."""

from __future__ import annotations

import difflib
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad path, bad row, bad key or value, unreachable model)."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters: how a
    library's error is quoted inside one of ours."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def nearest_path(name: str, *, folders: bool = True, files: bool = True) -> str:
    """ "; did you mean PATH?" naming the existing sibling of a missing path `name` that is closest to it (a
    typo), or "" when none is close."""
    path = Path(name).expanduser()
    parent = path.parent
    if not parent.is_dir():
        return ""
    siblings = [c.name for c in parent.iterdir() if (folders and c.is_dir()) or (files and c.is_file())]
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.75)
    return f"; did you mean {parent / close[0]}?" if close else ""
