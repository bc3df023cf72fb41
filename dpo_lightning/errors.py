"""Errors a user causes: shown as one line, no traceback, non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad row, bad key or value, unreachable model)."""


class ConfigError(UserError):
    """An invalid configuration key or value."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), cut to `limit` characters: how a
    library's error is quoted inside one of ours."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
