"""The data sources of a run: `dataset_name` is one name, or a list of sources (mappings), each with its own
splits, columns and labels and the share of its rows the run takes, so that several datasets mix in one run.

Every key a source leaves out takes the top-level value of the same name (`dataset_config`, `train_split`,
`eval_split`, `columns`, `label_values`); the portion keys say how much of the source the mixture takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from dpo_lightning.config.schema import DPOConfig

# What a source's mapping may say besides its `name`: the top-level keys it may override, and its portions.
INHERITED_KEYS = ("dataset_config", "train_split", "eval_split", "columns", "label_values")
PORTION_KEYS = ("fraction", "rows", "eval_fraction", "eval_rows")
SOURCE_KEYS = ("name", *INHERITED_KEYS, *PORTION_KEYS)


class Portion(NamedTuple):
    """How much of a split the mixture takes: a share of its rows or a number of them (None: all)."""

    fraction: float | None = None
    rows: int | None = None

    @property
    def whole(self) -> bool:
        return self.fraction is None and self.rows is None


class DataSource(NamedTuple):
    """One source of a run's data, with every top-level default filled in."""

    where: str  # names it in messages: the name, or `dataset_name[i] (name)` in a list of several
    key: str  # the key that configures it: dataset_name, or dataset_name[i]
    name: str
    values: dict[str, Any]  # the INHERITED_KEYS' values for this source
    train: Portion
    eval: Portion


def is_mixture(dataset_name) -> bool:
    return isinstance(dataset_name, list)


def source_names(dataset_name) -> list[str]:
    """The names of `dataset_name`'s sources, in order (one for a plain name)."""
    if not is_mixture(dataset_name):
        return [dataset_name]
    return [str(entry.get("name", "")) for entry in dataset_name]


def dataset_label(dataset_name) -> str:
    """`dataset_name` as messages and the model card say it: the name, or the names joined by " + "."""
    return " + ".join(source_names(dataset_name))


def data_sources(cfg: DPOConfig) -> list[DataSource]:
    """The run's sources (checked by `sources_problem`), top-level defaults filled in."""
    defaults = {key: getattr(cfg, key) for key in INHERITED_KEYS}
    if not is_mixture(cfg.dataset_name):
        return [DataSource(cfg.dataset_name, "dataset_name", cfg.dataset_name, defaults, Portion(), Portion())]
    sources = []
    for index, entry in enumerate(cfg.dataset_name, 1):
        values = {key: entry.get(key, default) for key, default in defaults.items()}
        train = Portion(entry.get("fraction"), entry.get("rows"))
        evaluation = Portion(entry.get("eval_fraction"), entry.get("eval_rows"))
        key = f"dataset_name[{index}]"
        sources.append(DataSource(f"{key} ({entry['name']})", key, entry["name"], values, train, evaluation))
    return sources


# ----------------------------------------------------------------------------- checks


def _portion_problem(entry: dict, where: str, share: str, count: str) -> str | None:
    fraction, rows = entry.get(share), entry.get(count)
    if fraction is not None and rows is not None:
        return f"{where}: give {share} or {count}, not both"
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))):
        return f"{where}.{share} must be a number in (0, 1], got {fraction!r}"
    if fraction is not None and not 0 < fraction <= 1:
        return f"{where}.{share} must be in (0, 1] (the share of the split's rows taken), got {fraction}"
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0):
        return f"{where}.{count} must be a positive whole number of rows, got {rows!r}"
    return None


def _entry_problem(entry: Any, where: str, columns_problem) -> str | None:
    if not isinstance(entry, dict):
        return f"{where} must be a mapping with a name (and optionally {', '.join(SOURCE_KEYS[1:])}), got {entry!r}"
    unknown = [key for key in entry if key not in SOURCE_KEYS]
    if unknown:
        return f"{where} has unknown key '{unknown[0]}'; valid keys: {', '.join(SOURCE_KEYS)}"
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        return f"{where}.name must name a dataset (Hub name, file or folder), got {name!r}"
    for key in ("dataset_config", "train_split", "eval_split"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            return f"{where}.{key} must be a non-empty name, got {value!r}"
    for key in ("columns", "label_values"):
        if key in entry and not isinstance(entry[key], dict):
            return f"{where}.{key} must be a mapping, got {entry[key]!r}"
    problem = columns_problem(entry.get("columns", {}), entry.get("label_values", {}), f"{where}.")
    return (
        problem
        or _portion_problem(entry, where, "fraction", "rows")
        or _portion_problem(entry, where, "eval_fraction", "eval_rows")
    )


def sources_problem(cfg: DPOConfig, columns_problem) -> str | None:
    """What is wrong with a list of sources (`columns_problem(columns, label_values, prefix)` checks a
    source's maps as the top-level ones are checked), or None."""
    if not is_mixture(cfg.dataset_name):
        return None if cfg.dataset_name.strip() else "dataset_name must not be empty"
    if not cfg.dataset_name:
        return "dataset_name is an empty list; name a dataset, or list sources as mappings with a name"
    for index, entry in enumerate(cfg.dataset_name, 1):
        problem = _entry_problem(entry, f"dataset_name[{index}]", columns_problem)
        if problem:
            return problem
    return None
