"""The evaluation report: summary rows and table, report.json, report.md and the PNG plots (CPU, no model)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

from dpo_lightning.evaluation.formatting import NOT_AVAILABLE, format_value
from dpo_lightning.evaluation.report import (
    PLOT_NAMES,
    summary_rows,
    summary_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NASTY = 'print("hi")\n```\nnot code any more\n````python\nx = 1\n```````\nend `inline` ``x``'


def _full_report() -> dict:
    policy_scores = [0.1 * i - 1.0 for i in range(64)]
    reference_scores = [0.05 * i - 1.5 for i in range(64)]
    samples = [
        {
            "prompt": f"Question {i}: what is {i} + {i}?",
            "policy": f"The answer is {2 * i}.",
            "reference": f"I think it is {2 * i + 1}.",
            "policy_score": 1.0 + i / 8,
            "reference_score": 0.2 - i / 16,
        }
        for i in range(7)
    ]
    return {
        "created": "2026-11-24T01:00:00Z",
        "config": {"model_path": "/runs/policy", "max_new_tokens": 64, "temperature": 0.7, "seed": None},
        "models": {"policy": "/runs/policy", "reference": "Qwen/Qwen2.5-0.5B", "reward_model": "rm.score:fn"},
        "versions": {"dpo_lightning": "0.3", "torch": "2.13.0", "transformers": "5.1.0"},
        "preference": {
            "num_pairs": 96,
            "beta": 0.1,
            "metrics": {
                "loss": 0.6931471805599453,
                "rewards/accuracies": 0.5625,
                "rewards/margins": 0.012345678,
                "rewards/chosen": -0.0123456,
                "rewards/rejected": -0.0246913,
                "logps/chosen": -20.123456,
                "logps/rejected": -21.3,
                "reward_model/agreement": float("nan"),
            },
            "margins": [0.37 * math.sin(i) for i in range(96)] + [float("nan")],
        },
        "generation": {
            "num_prompts": 64,
            "metrics": {
                "win_rate": 0.703125,
                "win_rate/low": 0.5812345,
                "win_rate/high": 0.8012345,
                "wins": 40,
                "losses": 17,
                "ties": 7,
                "policy/score": 1.2345678,
                "reference/score": 0.3,
                "kl": 3.14159265,
                "policy/length": 31.0,
                "reference/length": 40.2,
                "policy/eos_rate": 0.9,
                "reference/eos_rate": float("nan"),
            },
            "policy_scores": policy_scores,
            "reference_scores": reference_scores,
            "samples": samples,
        },
    }


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


def _fenced_blocks(md: str) -> list[tuple[str, str]]:
    """(info, content) of each fenced code block, CommonMark style: a fence closes only with the same character,
    at least as long as the opening and nothing after it. Fails if a fence is left open."""
    blocks, open_fence, info, content = [], None, "", []
    for line in md.split("\n"):
        if open_fence is None:
            m = re.match(r"^(`{3,}|~{3,})(.*)$", line)
            if m:
                open_fence, info, content = m.group(1), m.group(2).strip(), []
        elif re.fullmatch(re.escape(open_fence[0]) + "{" + str(len(open_fence)) + r",}\s*", line):
            blocks.append((info, "\n".join(content)))
            open_fence = None
        else:
            content.append(line)
    assert open_fence is None, "a fenced block is never closed"
    return blocks


def _lookup(report: dict) -> dict:
    """Each summary row name -> the raw value(s) it shows, straight from report.json."""
    out = {}
    pref, gen = report.get("preference"), report.get("generation")
    if pref is not None:
        out["pairs"], out["beta"] = pref["num_pairs"], pref["beta"]
        out.update(pref["metrics"])
    if gen is not None:
        out["prompts"] = gen["num_prompts"]
        m = gen["metrics"]
        out.update({k: v for k, v in m.items() if k not in ("win_rate/low", "win_rate/high", "wins", "losses", "ties")})
        out["win_rate 95% CI"] = [m["win_rate/low"], m["win_rate/high"]]
        out["wins/losses/ties"] = [m["wins"], m["losses"], m["ties"]]
    return out


def _check_shown(text: str, expected) -> None:
    if expected is None:
        assert text == NOT_AVAILABLE
    elif isinstance(expected, bool) or not isinstance(expected, int | float):
        assert text == str(expected)
    elif isinstance(expected, int):
        assert text == str(expected)
    else:
        assert float(text) == pytest.approx(expected, rel=5e-4, abs=0.0)


def _check_rows(rows: list[tuple[str, str]], report_json: dict) -> None:
    expected = _lookup(report_json)
    assert [name for name, _ in rows] == list(dict.fromkeys(name for name, _ in rows)), "duplicate row names"
    assert {name for name, _ in rows} == set(expected)
    for name, text in rows:
        want = expected[name]
        if name == "win_rate 95% CI":
            low, high = re.fullmatch(r"\[(.+), (.+)\]", text).groups()
            _check_shown(low, want[0])
            _check_shown(high, want[1])
        elif name == "wins/losses/ties":
            parts = text.split("/")
            assert len(parts) == 3
            for part, value in zip(parts, want, strict=True):
                _check_shown(part, value)
        else:
            _check_shown(text, want)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


def test_format_value():
    assert format_value(40) == "40"
    assert format_value(0.6931471805599453) == "0.6931"
    assert format_value(31.0) == "31"
    assert format_value(12345.678) == "1.235e+04"
    assert format_value(float("nan")) == NOT_AVAILABLE
    assert format_value(None) == NOT_AVAILABLE
    assert format_value("x") == "x"


def test_write_full_report(tmp_path):
    report = _full_report()
    original = copy.deepcopy(report)
    paths = write_report(tmp_path / "eval", report)

    assert json.dumps(report, sort_keys=True) == json.dumps(original, sort_keys=True), "the input is not modified"
    assert set(paths) == {"json", "markdown", "margins", "win_rate", "scores"}
    for key, path in paths.items():
        assert path.is_file(), key
        assert path.parent == tmp_path / "eval"
    assert paths["json"].name == "report.json" and paths["markdown"].name == "report.md"
    for key in PLOT_NAMES:
        assert paths[key].name == PLOT_NAMES[key]
        _assert_png(paths[key])
    assert not list((tmp_path / "eval").glob(".*")), "temporary files left behind"

    text = paths["json"].read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded == _nan_to_none(report)
    assert text == json.dumps(loaded, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    md = paths["markdown"].read_text()
    assert "# DPO evaluation report" in md
    assert "/runs/policy" in md and "Qwen/Qwen2.5-0.5B" in md and "rm.score:fn" in md
    assert "2026-11-24T01:00:00Z" in md
    assert "| metric | value |" in md
    for name, value in summary_rows(report):
        assert f"| {name} | {value} |" in md
    for key in PLOT_NAMES:
        assert f"]({PLOT_NAMES[key]})" in md
    # up to 5 samples, each with prompt, completions and scores
    for sample in report["generation"]["samples"][:5]:
        for field in ("prompt", "policy", "reference"):
            assert sample[field] in md
        assert f"**Policy** (score {format_value(sample['policy_score'])})" in md
        assert f"**Reference** (score {format_value(sample['reference_score'])})" in md
    assert report["generation"]["samples"][5]["prompt"] not in md
    assert "The first 5 of 7 samples." in md
    # the configuration round-trips from its JSON block; versions are listed
    blocks = _fenced_blocks(md)
    config_blocks = [content for info, content in blocks if info == "json"]
    assert len(config_blocks) == 1 and json.loads(config_blocks[0]) == report["config"]
    for package, version in report["versions"].items():
        assert f"| {package} | {version} |" in md


def test_write_is_deterministic_and_overwrites(tmp_path):
    report = _full_report()
    first = {k: p.read_bytes() for k, p in write_report(tmp_path / "a", report).items()}
    second = {k: p.read_bytes() for k, p in write_report(tmp_path / "b", report).items()}
    assert first == second
    again = {k: p.read_bytes() for k, p in write_report(tmp_path / "a", report).items()}
    assert again == first


def test_preference_only(tmp_path):
    report = _full_report()
    report["generation"] = None
    report["models"]["reward_model"] = None
    paths = write_report(tmp_path, report)
    assert set(paths) == {"json", "markdown", "margins"}
    assert not (tmp_path / "win_rate.png").exists() and not (tmp_path / "scores.png").exists()
    md = paths["markdown"].read_text()
    assert "](margins.png)" in md
    assert "win_rate.png" not in md and "scores.png" not in md
    assert "## Samples" not in md
    assert "**Reward model:** none" in md
    _fenced_blocks(md)
    assert json.loads(paths["json"].read_text())["generation"] is None
    names = [name for name, _ in summary_rows(report)]
    assert "pairs" in names and "prompts" not in names and "win_rate" not in names


def test_generation_only(tmp_path):
    report = _full_report()
    report["preference"] = None
    paths = write_report(tmp_path, report)
    assert set(paths) == {"json", "markdown", "win_rate", "scores"}
    assert not (tmp_path / "margins.png").exists()
    md = paths["markdown"].read_text()
    assert "](win_rate.png)" in md and "](scores.png)" in md
    assert "margins.png" not in md
    names = [name for name, _ in summary_rows(report)]
    assert "prompts" in names and "pairs" not in names and "loss" not in names


def test_stale_plots_are_removed(tmp_path):
    write_report(tmp_path, _full_report())
    report = _full_report()
    report["preference"]["margins"] = []
    report["generation"] = None
    paths = write_report(tmp_path, report)
    assert set(paths) == {"json", "markdown"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    md = paths["markdown"].read_text()
    assert ".png" not in md and "## Plots" not in md


def test_edge_cases_nan_and_empty(tmp_path):
    report = _full_report()
    report["preference"]["margins"] = [float("nan")]
    report["preference"]["metrics"] = {k: float("nan") for k in report["preference"]["metrics"]}
    gen = report["generation"]
    gen["metrics"] = {k: float("nan") for k in gen["metrics"]}
    gen["policy_scores"], gen["reference_scores"], gen["samples"] = [], [], []
    paths = write_report(tmp_path, report)
    assert set(paths) == {"json", "markdown"}
    md = paths["markdown"].read_text()
    assert "No samples were recorded." in md
    assert ".png" not in md
    rows = dict(summary_rows(report))
    assert rows["win_rate 95% CI"] == NOT_AVAILABLE
    assert rows["wins/losses/ties"] == "n/a/n/a/n/a"
    assert rows["pairs"] == "96" and rows["prompts"] == "64"
    assert all(v == NOT_AVAILABLE for k, v in rows.items() if k not in ("pairs", "beta", "prompts", "wins/losses/ties"))
    loaded = json.loads(paths["json"].read_text())
    assert loaded == _nan_to_none(report)


def test_neither_section(tmp_path):
    report = _full_report()
    report["preference"] = report["generation"] = None
    assert summary_rows(report) == []
    assert "no evaluation metrics" in summary_table(report)
    paths = write_report(tmp_path, report)
    assert set(paths) == {"json", "markdown"}
    _fenced_blocks(paths["markdown"].read_text())


def test_summary_rows_match_json(tmp_path):
    report = _full_report()
    loaded = json.loads(write_report(tmp_path, report)["json"].read_text())
    rows = summary_rows(report)
    _check_rows(rows, loaded)
    names = [name for name, _ in rows]
    # fixed order: preference first, then generation
    assert names[:3] == ["pairs", "beta", "loss"]
    assert names.index("reward_model/agreement") < names.index("prompts") < names.index("win_rate")
    assert names[names.index("win_rate") + 1 : names.index("win_rate") + 3] == ["win_rate 95% CI", "wins/losses/ties"]
    assert dict(rows)["reward_model/agreement"] == NOT_AVAILABLE
    assert dict(rows)["reference/eos_rate"] == NOT_AVAILABLE
    assert dict(rows)["win_rate 95% CI"] == "[0.5812, 0.8012]"
    assert dict(rows)["wins/losses/ties"] == "40/17/7"
    assert dict(rows)["loss"] == "0.6931"


def test_unknown_metrics_follow_in_sorted_order():
    report = _full_report()
    report["generation"] = None
    report["preference"]["metrics"]["zeta"] = 2
    report["preference"]["metrics"]["alpha"] = 1.5
    names = [name for name, _ in summary_rows(report)]
    assert names[-2:] == ["alpha", "zeta"]


def test_summary_table_values_match_json(tmp_path):
    report = _full_report()
    loaded = json.loads(write_report(tmp_path, report)["json"].read_text())
    table = summary_table(report)
    lines = table.split("\n")
    assert lines[0].split() == ["metric", "value"]
    assert set(lines[1]) <= {"-", " "}
    assert len({len(line) for line in lines}) == 1, "columns are aligned"
    names = [name for name, _ in summary_rows(report)]
    parsed = []
    for name, line in zip(names, lines[2:], strict=True):
        assert line.startswith(name + " ")
        parsed.append((name, line[len(name) :].strip()))
    _check_rows(parsed, loaded)
    assert "nan" not in table.lower().replace(NOT_AVAILABLE, "")


def test_backticks_cannot_break_fences(tmp_path):
    report = _full_report()
    sample = report["generation"]["samples"][0]
    sample["policy"] = NASTY
    sample["prompt"] = "```\nopen fence in the prompt"
    sample["reference"] = "ends with backticks ``"
    report["config"]["stop"] = "```"
    report["models"]["policy"] = "/odd`path``"
    md = write_report(tmp_path, report)["markdown"].read_text()

    blocks = [content for _, content in _fenced_blocks(md)]
    assert NASTY in blocks
    assert sample["prompt"] in blocks
    assert sample["reference"] in blocks
    # outside the texts themselves, fence lines come in pairs
    outside = md
    for text in (NASTY, sample["prompt"], sample["reference"]):
        outside = outside.replace(text, "")
    fence_lines = [line for line in outside.split("\n") if re.match(r"^`{3,}", line)]
    assert fence_lines and len(fence_lines) % 2 == 0
    # the samples' headings are outside the blocks, so the structure survived
    assert md.count("### Sample ") == 5
    assert not any("### Sample" in block for block in blocks)
    assert "**Policy:** ``` /odd`path`` ```" in md


def test_backticks_with_commonmark_parser(tmp_path):
    markdown_it = pytest.importorskip("markdown_it")
    report = _full_report()
    report["generation"]["samples"][2]["policy"] = NASTY
    md = write_report(tmp_path, report)["markdown"].read_text()
    tokens = markdown_it.MarkdownIt("commonmark").parse(md)
    fences = [t.content for t in tokens if t.type == "fence"]
    assert NASTY + "\n" in fences
    headings = [t for t in tokens if t.type == "heading_open" and t.tag == "h3"]
    assert len(headings) == 3 + 5  # three plots, five samples


def test_the_scores_legend_sits_outside_the_bars():
    """The legend of scores.png is drawn outside the axes, so that it covers no bar, even when the histograms
    fill the plot (inside, loc="best" covered the tallest bars)."""
    from dpo_lightning.evaluation.plots import scores_figure

    generation = {"policy_scores": [1.0] * 30 + [2.0] * 30, "reference_scores": [1.5] * 30 + [2.5] * 30}
    fig = scores_figure(generation)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    (legend,) = fig.legends
    box, axes_box = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.y0 >= axes_box.y1 - 1  # above the axes: no bar lies under it
    assert "policy (mean 1.5, n=60)" in [text.get_text() for text in legend.get_texts()]
