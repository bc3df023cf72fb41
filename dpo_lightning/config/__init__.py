"""The configuration: one typed, frozen `DPOConfig` per run, read from an experiment file's `hyperparameters:`
with command-line overrides on top (one parser for local runs, Determined trials and evaluation).

`schema.py` holds every key with its default and documentation, `checks.py` every check of values and
combinations; `parse.py` reads files, overrides and Determined's hyperparameter values; `sources.py` reads
the data sources `dataset_name` names (one, or a list mixed in one run). This package is the bottom layer: it
imports nothing from dpo_lightning beyond the foundation modules.

Imports: foundation
"""

from dpo_lightning.config.checks import mode_problem, vllm_max_model_len
from dpo_lightning.config.parse import (
    config_changes,
    load_config,
    make_config,
    parse_overrides,
    read_experiment_hparams,
    record_diff,
    resolve_hparams,
    unknown_key_message,
)
from dpo_lightning.config.schema import (
    CONTEXT_ROLES,
    FIELDS,
    LABEL_ROLES,
    LABEL_SIDES,
    MODES,
    PAIR_MODES,
    PAIR_ROLES,
    PROMPT_ROLES,
    RESUMABLE_CHANGES,
    DPOConfig,
)

__all__ = [
    "FIELDS",
    "MODES",
    "PAIR_MODES",
    "CONTEXT_ROLES",
    "LABEL_ROLES",
    "LABEL_SIDES",
    "PAIR_ROLES",
    "PROMPT_ROLES",
    "RESUMABLE_CHANGES",
    "DPOConfig",
    "config_changes",
    "load_config",
    "make_config",
    "mode_problem",
    "parse_overrides",
    "read_experiment_hparams",
    "record_diff",
    "resolve_hparams",
    "unknown_key_message",
    "vllm_max_model_len",
]
