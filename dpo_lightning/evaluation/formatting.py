"""How the evaluation report writes a value: ints as ints, floats to 4 significant digits, missing values as
"n/a", and the combined entries (the interval, wins/losses/ties) as one cell. The table, report.md and the
plots' titles all format through here, so they agree.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

NOT_AVAILABLE = "n/a"
COMBINED = {
    "win_rate 95% CI": ("win_rate/low", "win_rate/high"),
    "wins/losses/ties": ("wins", "losses", "ties"),
}


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral) and math.isnan(x))


def format_value(x: Any) -> str:
    """Ints as ints, floats with 4 significant digits, None and NaN as "n/a", anything else as `str`."""
    if _is_missing(x):
        return NOT_AVAILABLE
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, numbers.Integral):
        return str(int(x))
    if isinstance(x, numbers.Real):
        return f"{float(x):.4g}"
    return str(x)


def format_combined(name: str, metrics: Mapping[str, Any]) -> str:
    values = [metrics.get(key) for key in COMBINED[name]]
    if name == "win_rate 95% CI":
        if any(_is_missing(v) for v in values):
            return NOT_AVAILABLE
        return f"[{format_value(values[0])}, {format_value(values[1])}]"
    return "/".join(format_value(v) for v in values)
