"""The evaluation report's plots, as PNG bytes: the implicit reward margins, the win rate with its interval, and
both models' judged scores.

Plots use matplotlib's Agg canvas directly (`matplotlib.figure.Figure` + `FigureCanvasAgg`), never pyplot, so no
global backend or figure state is touched; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from io import BytesIO
from typing import Any

from dpo_lightning.evaluation.formatting import format_combined

_FIGSIZE = (6.4, 4.0)
_DPI = 100


def _finite(values: Any) -> list[float]:
    out = []
    for v in values or ():
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)):
            out.append(float(v))
    return out


def _num_bins(n: int) -> int:
    return max(5, min(50, math.ceil(math.sqrt(max(n, 1)))))


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_FIGSIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _finite_metric(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plot_margins(preference: Mapping[str, Any]) -> bytes | None:
    """Histogram of the per-pair implicit reward margins (chosen - rejected); None when there are none."""
    margins = _finite(preference.get("margins"))
    if not margins:
        return None
    metrics = preference.get("metrics") or {}
    mean = sum(margins) / len(margins)
    accuracy = _finite_metric(metrics, "rewards/accuracies")
    if accuracy is None:
        accuracy = sum(m > 0 for m in margins) / len(margins)
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.hist(margins, bins=_num_bins(len(margins)), color="tab:blue", alpha=0.8, edgecolor="white")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.axvline(mean, color="tab:red", linewidth=1.5, label=f"mean {mean:.4g}")
    ax.set_xlabel("implicit reward margin (chosen \u2212 rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(f"Reward margins: n={len(margins)}, mean {mean:.4g}, accuracy {accuracy:.1%}")
    _legend_above(fig, ax)
    return _png_bytes(fig)


def plot_win_rate(generation: Mapping[str, Any]) -> bytes | None:
    """The win rate against the reference with its 95% (Wilson) interval; None when there is no finite win rate."""
    metrics = generation.get("metrics") or {}
    win_rate = _finite_metric(metrics, "win_rate")
    if win_rate is None:
        return None
    low, high = _finite_metric(metrics, "win_rate/low"), _finite_metric(metrics, "win_rate/high")
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.bar([0], [win_rate], width=0.5, color="tab:blue", alpha=0.8)
    if low is not None and high is not None:
        yerr = [[max(win_rate - low, 0.0)], [max(high - win_rate, 0.0)]]
        ax.errorbar([0], [win_rate], yerr=yerr, fmt="o", color="black", capsize=8, label="95% Wilson interval")
        ax.legend(loc="upper right")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xticks([0], ["policy vs reference"])
    ax.set_ylabel("win rate")
    wlt = format_combined("wins/losses/ties", metrics)
    ax.set_title(f"Win rate {win_rate:.4g} (wins/losses/ties {wlt})")
    return _png_bytes(fig)


def _legend_above(fig, ax) -> None:
    """The legend above the axes, outside them, where it cannot cover a bar (inside, "best" still covered the
    tallest ones when both histograms filled the plot)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=len(labels), frameon=False)


def plot_scores(generation: Mapping[str, Any]) -> bytes | None:
    """Overlaid histograms (shared bins) of the policy's and the reference's reward scores; None without scores."""
    fig = scores_figure(generation)
    return None if fig is None else _png_bytes(fig)


def scores_figure(generation: Mapping[str, Any]):
    """The figure of `plot_scores`, or None without scores."""
    series = [
        ("policy", _finite(generation.get("policy_scores")), "tab:blue"),
        ("reference", _finite(generation.get("reference_scores")), "tab:orange"),
    ]
    series = [s for s in series if s[1]]
    if not series:
        return None
    import numpy as np

    combined = [v for _, values, _ in series for v in values]
    edges = np.histogram_bin_edges(combined, bins=_num_bins(max(len(values) for _, values, _ in series)))
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, values, color in series:
        mean = sum(values) / len(values)
        ax.hist(values, bins=edges, color=color, alpha=0.5, label=f"{name} (mean {mean:.4g}, n={len(values)})")
        ax.axvline(mean, color=color, linewidth=1.5)
    ax.set_xlabel("reward score")
    ax.set_ylabel("prompts")
    ax.set_title("Reward scores: policy vs reference")
    _legend_above(fig, ax)
    return fig
