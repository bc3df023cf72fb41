"""The evaluation report: a summary table for the terminal, and report.json, report.md and PNG plots on disk.

`evaluate.py` computes a plain, JSON-serialisable dict (see `write_report` for the schema, and the module tests for a
full example) and hands it here. Nothing in this module measures anything: it only formats and draws.

Every output is deterministic for a given report: the only date written is ``report["created"]``. Files are
written atomically (a temporary file beside the target, then `os.replace`), so a reader never sees half a report.
Plots are drawn by `plots.py`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpo_lightning.evaluation.formatting import COMBINED, format_combined, format_value
from dpo_lightning.evaluation.plots import plot_margins, plot_scores, plot_win_rate

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
PLOT_NAMES = {"margins": "margins.png", "win_rate": "win_rate.png", "scores": "scores.png"}
MAX_SAMPLES = 5

# Fixed display order; metrics not listed here follow in sorted order.
PREFERENCE_ORDER = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "reward_model/agreement",
)
GENERATION_ORDER = (
    "win_rate",
    "win_rate 95% CI",  # from win_rate/low and win_rate/high
    "wins/losses/ties",  # from wins, losses and ties
    "policy/score",
    "reference/score",
    "kl",
    "policy/length",
    "reference/length",
    "policy/eos_rate",
    "reference/eos_rate",
)


def _metric_rows(metrics: Mapping[str, Any], order: Sequence[str]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    consumed: set[str] = set()
    for name in order:
        if name in COMBINED:
            keys = COMBINED[name]
            consumed.update(keys)
            if any(key in metrics for key in keys):
                rows.append((name, format_combined(name, metrics)))
        elif name in metrics:
            consumed.add(name)
            rows.append((name, format_value(metrics[name])))
    for name in sorted(set(metrics) - consumed, key=str):
        rows.append((str(name), format_value(metrics[name])))
    return rows


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(metric name, formatted value): the preference section, then the generation section, in a fixed order.

    Names are the dict's keys, except three rows that are added or combined: "pairs" (num_pairs) and "beta" lead
    the preference rows, "prompts" (num_prompts) the generation rows; "win_rate 95% CI" is
    ``[win_rate/low, win_rate/high]`` and "wins/losses/ties" is ``wins/losses/ties``.
    """
    rows: list[tuple[str, str]] = []
    data = report.get("data")
    if data is not None:  # what was measured: the split, its size, and whether training saw it
        seen = " (trained on)" if data.get("training_rows") else ""
        rows.append(("split", f"{data.get('dataset')}[{data.get('split')}]{seen}"))
        rows.append(("split rows", format_value(data.get("rows"))))
    preference = report.get("preference")
    if preference is not None:
        rows.append(("pairs", format_value(preference.get("num_pairs"))))
        if "beta" in preference:
            rows.append(("beta", format_value(preference["beta"])))
        rows += _metric_rows(preference.get("metrics") or {}, PREFERENCE_ORDER)
    generation = report.get("generation")
    if generation is not None:
        rows.append(("prompts", format_value(generation.get("num_prompts"))))
        rows += _metric_rows(generation.get("metrics") or {}, GENERATION_ORDER)
    return rows


RELIABLE_SAMPLE = 32  # fewer pairs or prompts than this and the figures say little


def small_sample_notes(report: Mapping[str, Any]) -> list[str]:
    """One sentence per section measured on fewer than RELIABLE_SAMPLE pairs or prompts."""
    notes = []
    for section, noun in (("preference", "pairs"), ("generation", "prompts")):
        count = (report.get(section) or {}).get(f"num_{noun}")
        if count is not None and count < RELIABLE_SAMPLE:
            notes.append(
                f"only {count} {noun} measured: too few for these {section} figures to mean much "
                f"({RELIABLE_SAMPLE} or more advised)"
            )
    return notes


def summary_table(report: Mapping[str, Any]) -> str:
    """A plain-text two-column table (names left-aligned, values right-aligned) for the terminal; no final newline."""
    rows = summary_rows(report)
    if not rows:
        return "no evaluation metrics (neither preference pairs nor generations were evaluated)"
    header = ("metric", "value")
    name_width = max(len(name) for name, _ in [header, *rows])
    value_width = max(len(value) for _, value in [header, *rows])
    lines = [f"{header[0]:<{name_width}}  {header[1]:>{value_width}}", f"{'-' * name_width}  {'-' * value_width}"]
    lines += [f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows]
    notes = small_sample_notes(report)
    if notes:
        lines += ["", *(f"note: {note}" for note in notes)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- JSON


def _json_safe(x: Any) -> Any:
    """A copy of `x` that strict JSON accepts: NaN and infinities become None, tuples lists, numpy/torch values
    Python ones, Paths strings. Anything else unknown is left for `json.dumps` to reject."""
    if x is None or isinstance(x, str | bool):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        value = float(x)
        return value if math.isfinite(value) else None
    if isinstance(x, Mapping):
        return {str(key): _json_safe(value) for key, value in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(value) for value in x]
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "tolist"):  # numpy arrays and scalars, torch tensors
        return _json_safe(x.tolist())
    return x


def report_json(report: Mapping[str, Any]) -> str:
    """The report as strict JSON text: sorted keys, indent 2, NaN as null, a final newline."""
    return json.dumps(_json_safe(report), sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def _atomic_write(path: Path, data: bytes) -> None:
    # A unique temporary name in the same folder (so os.replace is atomic); `open(.., "xb")` honours the umask.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------- markdown

_BACKTICK_RUN = re.compile(r"`+")


def _fence(text: str, info: str = "") -> str:
    """`text` in a fenced code block whose fence is longer than any backtick run in it, so it cannot be closed early."""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") or not text else text + "\n"
    return f"{fence}{info}\n{body}{fence}"


def _inline_code(text: Any) -> str:
    """`text` as one line of inline code, whatever backticks it contains."""
    text = " ".join(str(text).splitlines())
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _cell(text: str) -> str:
    return " ".join(text.splitlines()).replace("|", "\\|")


def _sample_block(label: str, text: Any, score: Any) -> list[str]:
    return [f"**{label}** (score {format_value(score)}):", "", _fence("" if text is None else str(text), "text"), ""]


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """report.md's text; `plots` maps a plot key to its file name (relative to report.md) for the plots written."""
    models = report.get("models") or {}
    preference, generation = report.get("preference"), report.get("generation")
    lines = ["# DPO evaluation report", ""]
    for label, key in (("Policy", "policy"), ("Reference", "reference"), ("Reward model", "reward_model")):
        value = models.get(key)
        lines.append(f"- **{label}:** {'none' if value is None else _inline_code(value)}")
    lines.append(f"- **Created:** {format_value(report.get('created'))}")
    lines.append("")

    lines += ["## Summary", ""]
    rows = summary_rows(report)
    if rows:
        lines += ["| metric | value |", "| --- | ---: |"]
        lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in rows]
        lines += [f"\n**Note:** {note}." for note in small_sample_notes(report)]
    else:
        lines.append("No metrics.")
    if preference is None:
        lines += ["", "Preference metrics were not computed (the dataset has no preference pairs)."]
    if generation is None:
        lines += ["", "Generation metrics were not computed (no reward model was given)."]
    lines.append("")

    titles = {
        "margins": "Implicit reward margins",
        "win_rate": "Win rate against the reference",
        "scores": "Reward scores, policy vs reference",
    }
    if plots:
        lines += ["## Plots", ""]
        for key, name in plots.items():
            lines += [f"### {titles.get(key, key)}", "", f"![{titles.get(key, key)}]({name})", ""]

    if generation is not None:
        samples = list(generation.get("samples") or [])
        lines += ["## Samples", ""]
        if not samples:
            lines += ["No samples were recorded.", ""]
        elif len(samples) > MAX_SAMPLES:
            lines += [f"The first {MAX_SAMPLES} of {len(samples)} samples.", ""]
        for i, sample in enumerate(samples[:MAX_SAMPLES], start=1):
            lines += [f"### Sample {i}", "", "**Prompt:**", "", _fence(str(sample.get("prompt", "")), "text"), ""]
            lines += _sample_block("Policy", sample.get("policy"), sample.get("policy_score"))
            lines += _sample_block("Reference", sample.get("reference"), sample.get("reference_score"))

    config_text = json.dumps(_json_safe(report.get("config") or {}), sort_keys=True, indent=2, ensure_ascii=False)
    lines += ["## Configuration", "", _fence(config_text, "json"), ""]
    versions = report.get("versions") or {}
    lines += ["## Versions", ""]
    if versions:
        lines += ["| package | version |", "| --- | --- |"]
        lines += [f"| {_cell(str(k))} | {_cell(format_value(versions[k]))} |" for k in sorted(versions, key=str)]
    else:
        lines.append("Not recorded.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- write


def write_report(output_dir: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write report.json, the plots whose data exists and report.md into `output_dir` (created if needed).

    Returns ``{"json": path, "markdown": path}`` plus ``"margins"``, ``"win_rate"`` and ``"scores"`` for the plots
    written. A plot file of an earlier report in the same folder whose data this report lacks is removed, so the
    folder never shows a stale plot. report.json is written last: once it exists, the rest is complete.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    preference, generation = report.get("preference"), report.get("generation")
    drawn = {
        "margins": plot_margins(preference) if preference is not None else None,
        "win_rate": plot_win_rate(generation) if generation is not None else None,
        "scores": plot_scores(generation) if generation is not None else None,
    }
    plots: dict[str, Path] = {}
    for key, png in drawn.items():
        path = output_dir / PLOT_NAMES[key]
        if png is None:
            path.unlink(missing_ok=True)
        else:
            _atomic_write(path, png)
            plots[key] = path

    markdown_path = output_dir / MARKDOWN_NAME
    _atomic_write(markdown_path, render_markdown(report, {k: p.name for k, p in plots.items()}).encode("utf-8"))
    json_path = output_dir / JSON_NAME
    _atomic_write(json_path, report_json(report).encode("utf-8"))
    return {"json": json_path, "markdown": markdown_path, **plots}
