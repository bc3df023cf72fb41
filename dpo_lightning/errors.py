"""Errors a user causes: shown as one line, no traceback, non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad row, bad key or value, unreachable model)."""


class ConfigError(UserError):
    """An invalid configuration key or value."""
