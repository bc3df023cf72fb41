"""Reading a configuration: the experiment file's `hyperparameters:`, `--name value` overrides on top, every
value coerced to its field's type. One parser serves local runs, Determined trials and evaluation.

A bad key or value raises `ConfigError` with one line naming the key and the valid choices.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from dpo_lightning.config.schema import FIELD_TYPES, FIELDS, LIST_KEYS, RESUMABLE_CHANGES, DPOConfig
from dpo_lightning.errors import ConfigError, nearest_path

# ----------------------------------------------------------------------------- coercion


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Coerce a YAML or command-line value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        listed = next((a for a in inner if typing.get_origin(a) is list), None)
        if listed is not None and _is_list_value(key, value):
            return _listed(key, value)
        return _coerce(key, value, inner[0])
    if origin is Literal:
        text = str(value)
        if text not in args:
            raise ConfigError(f"{key}: '{value}' is not a valid choice; valid choices: {', '.join(args)}")
        return text
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)  # YAML 1.1 reads `1e-6` as a string; float() reads it right
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if key in LIST_KEYS and isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return ",".join(str(v) for v in value)  # a YAML list of a comma-separated key, as TRL's lists
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f'{key}: expected a JSON object such as \'{{"prompt": "question"}}\'') from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)  # value types are checked by _check_columns
    raise ConfigError(f"{key}: unsupported type {annotation}")  # a programming error, kept loud


def _is_list_value(key: str, value: Any) -> bool:
    """Whether a value of a key that is a name or a list (dataset_name) is given as the list: a YAML list or
    mapping, or on the command line a JSON list or object."""
    return isinstance(value, (list, dict)) or (isinstance(value, str) and value.lstrip()[:1] in ("[", "{"))


def _listed(key: str, value: Any) -> list:
    """A list of mappings from a YAML list, one mapping, or their JSON text (each entry is checked by the
    configuration's checks)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{key}: {value!r} is not a JSON list ({exc.msg} at character {exc.pos + 1}); write it as "
                '\'[{"name": "a.jsonl"}, {"name": "b.jsonl", "rows": 100}]\''
            ) from None
    return [dict(value)] if isinstance(value, dict) else list(value)


# TRL's DPOConfig and transformers' TrainingArguments names of settings this project has under another name:
# the key to use, and how to set it where the value does not carry over as it is.
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    "per_device_train_batch_size": ("batch_size", ""),
    "per_device_eval_batch_size": ("eval_batch_size", ""),
    "num_train_epochs": ("num_epochs", ""),
    "logging_steps": ("report_every_n_steps", ""),
    "eval_steps": ("val_check_interval", ""),
    "save_steps": ("checkpoint_every_n_steps", ""),
    "save_total_limit": ("keep_last_n_checkpoints", ""),
    "lr_scheduler_type": ("lr_scheduler", "constant, linear or cosine"),
    "bf16": ("precision", "precision: bf16-mixed for bf16: true"),
    "fp16": ("precision", "32 or bf16-mixed; fp16 training is not offered"),
    "precompute_ref_log_probs": ("precompute_ref_logps", ""),
    "dataloader_num_workers": ("num_workers", ""),
    "torch_dtype": ("dtype", "the frozen models' dtype; the trained policy keeps fp32 master weights"),
    "generate_during_eval": ("generation_eval_every", "a number of validations, 1 for every one"),
    "hub_model_id": ("push_to_hub", "OWNER/NAME"),
    "eval_strategy": ("val_check_interval", "validation is counted in optimizer steps"),
    "save_strategy": ("checkpoint_every_n_steps", "checkpoints are counted in optimizer steps"),
    "logging_strategy": ("report_every_n_steps", "reports are counted in optimizer steps"),
    "model_name_or_path": ("model_name", ""),
    "dataset_name_or_path": ("dataset_name", ""),
    "ref_model": ("ref_model_name", ""),
    "lora_target": ("lora_target_modules", ""),
    "lora_rank": ("lora_r", ""),
}


def unknown_key_message(key: str) -> str:
    """One line for a key the configuration does not have: TRL's or transformers' name mapped to this project's,
    else up to three near names, and where to see them all."""
    if key in FOREIGN_KEYS:
        ours, how = FOREIGN_KEYS[key]
        return f"unknown hyperparameter '{key}' (TRL's and transformers' name): use {ours}" + (
            f" ({how})" if how else ""
        )
    close = difflib.get_close_matches(key, FIELDS, n=3, cutoff=0.6)
    words = set(key.split("_")) - {"", "max", "min", "num", "use"}
    close += [f for f in FIELDS if f not in close and words & set(f.split("_")) and len(close) < 3][: 3 - len(close)]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown hyperparameter '{key}'{hint} (python entrypoint.py --help lists every key)"


def make_config(values: dict[str, Any]) -> DPOConfig:
    """Build a validated config from raw (YAML or command-line) values."""
    kwargs = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(unknown_key_message(key))
        kwargs[key] = _coerce(key, value, FIELD_TYPES[key])
    return DPOConfig(**kwargs)


# ----------------------------------------------------------------------------- experiment files


def _resolve_hparam(key: str, value: Any) -> Any:
    """Determined hyperparameters may be `{type: const, val: X}`; a search space needs an explicit value locally."""
    if isinstance(value, dict) and "type" in value and key not in ("columns", "label_values"):
        kind = value["type"]
        if kind == "const":
            return value.get("val")
        raise ConfigError(
            f"hyperparameter '{key}' is a '{kind}' search space, which only a Determined searcher samples; "
            f"pass --{key} VALUE to run it locally"
        )
    return value


def read_experiment_hparams(path: str | Path) -> dict[str, Any]:
    """The raw `hyperparameters:` block of an experiment file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{nearest_path(str(path), folders=False)}")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(document, dict) or not isinstance(document.get("hyperparameters"), dict):
        raise ConfigError(f"{path}: no `hyperparameters:` mapping found")
    return dict(document["hyperparameters"])


def resolve_hparams(raw: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameter values with `{type: const}` resolved; a search space left unresolved is an error."""
    return {key: _resolve_hparam(key, value) for key, value in raw.items()}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DPOConfig:
    """The experiment file's hyperparameters with command-line overrides on top."""
    raw = read_experiment_hparams(path)
    for key in raw:
        if key not in FIELDS:  # a command-line key is checked as it is read (`parse_overrides`)
            raise ConfigError(f"{path}: {unknown_key_message(key)}")
    raw.update(overrides or {})  # an override may stand in for a search space
    try:
        return make_config(resolve_hparams(raw))
    except ConfigError as exc:
        raise ConfigError(f"{blamed_source(str(exc), path, overrides or {})}: {exc}") from None


def blamed_source(message: str, path: str | Path, overrides: dict[str, Any]) -> str:
    """Where the values a configuration error names came from: `--key on the command line`, the file, or both
    (a check of two keys may involve one from each)."""
    named = sorted(
        (match.start(), key) for key in FIELDS for match in [re.search(rf"(?<![\w-]){key}(?!\w)", message)] if match
    )
    keys = [key for _, key in named]
    given = [key for key in keys if key in overrides]
    if not given:
        return str(path)
    source = ", ".join(f"--{key}" for key in given) + " on the command line"
    from_file = [key for key in keys if key not in overrides]
    return source + (f" with {', '.join(from_file)} from {path}" if from_file else "")


class RecordDiff(NamedTuple):
    """How a saved run record's configuration compares with this run's."""

    changed: list[str]  # keys whose value differs (run length excepted): these refuse a resume
    defaulted: list[str]  # keys the record predates, read with the schema's default
    dropped: list[str]  # keys the record has and this schema no longer does


def record_diff(saved: dict[str, Any], cfg: DPOConfig) -> RecordDiff:
    """Compare a checkpoint's configuration with this run's. A record written before a key existed is read
    with that key's default, so that adding a key does not strand every older checkpoint."""
    current = cfg.to_dict()
    defaults = DPOConfig().to_dict()
    defaulted = sorted(k for k in current if k not in saved)
    filled = {**{k: defaults[k] for k in defaulted}, **saved}
    changed = [k for k in sorted(current) if k not in RESUMABLE_CHANGES and filled[k] != current[k]]
    return RecordDiff(changed, defaulted, sorted(k for k in saved if k not in current))


def config_changes(saved: dict[str, Any], cfg: DPOConfig) -> list[str]:
    """Keys whose value differs between a checkpoint's configuration and this run's, run length excepted."""
    return record_diff(saved, cfg).changed


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """`--name value` and `--name=value` pairs; a value is a raw string coerced later by field type."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument '{token}'; hyperparameters are given as --name value")
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(unknown_key_message(name))
        if not eq:
            if i + 1 >= len(tokens):
                raise ConfigError(f"--{name} needs a value")
            value = tokens[i + 1]
            i += 1
        overrides[name] = value
        i += 1
    return overrides
