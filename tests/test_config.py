"""Tests for dpo_lightning.config and entrypoint.py's command line: validation, coercion, files, overrides."""

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpo_lightning.config import FIELDS, DPOConfig, load_config, make_config, parse_overrides, read_experiment_hparams
from dpo_lightning.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]


def config_error(values: dict) -> str:
    """The one-line ConfigError message that make_config raises for `values`."""
    with pytest.raises(ConfigError) as info:
        make_config(values)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def write_yaml(tmp_path: Path, body: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("beta", [0, -0.5, "-1"])
def test_beta_must_be_positive(beta):
    assert "beta" in config_error({"beta": beta})


@pytest.mark.parametrize("value", [-0.1, 0.5, 0.7])
def test_label_smoothing_range(value):
    message = config_error({"label_smoothing": value})
    assert "label_smoothing" in message and "[0, 0.5)" in message


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_label_smoothing_rejected_for_losses_that_ignore_it(loss_type):
    message = config_error({"label_smoothing": 0.1, "loss_type": loss_type})
    assert "label_smoothing" in message and loss_type in message
    assert make_config({"label_smoothing": 0.1, "loss_type": "sigmoid"}).label_smoothing == 0.1
    assert make_config({"label_smoothing": 0.1, "loss_type": "robust"}).loss_type == "robust"


def test_unknown_loss_type_lists_choices():
    message = config_error({"loss_type": "kto_pair"})
    assert "kto_pair" in message
    for choice in ("sigmoid", "ipo", "hinge", "robust"):
        assert choice in message


@pytest.mark.parametrize("prompt_len", [64, 100])
def test_max_prompt_length_below_max_length(prompt_len):
    message = config_error({"max_length": 64, "max_prompt_length": prompt_len})
    assert "max_prompt_length" in message and "max_length" in message
    assert make_config({"max_length": 64, "max_prompt_length": 63}).max_prompt_length == 63


@pytest.mark.parametrize("prompt_len", [0, -3])
def test_max_prompt_length_positive(prompt_len):
    assert "max_prompt_length" in config_error({"max_prompt_length": prompt_len})


@pytest.mark.parametrize("key", ["val_fraction", "warmup_ratio"])
@pytest.mark.parametrize("value", [-0.01, 1.0, 1.5])
def test_fractions_in_unit_interval(key, value):
    assert key in config_error({key: value})
    assert getattr(make_config({key: 0.0}), key) == 0.0
    assert getattr(make_config({key: 0.99}), key) == 0.99


@pytest.mark.parametrize("steps", [0, -2, -100])
def test_max_steps_positive_or_minus_one(steps):
    assert "max_steps" in config_error({"max_steps": steps})
    assert make_config({"max_steps": -1}).max_steps == -1
    assert make_config({"max_steps": 1}).max_steps == 1


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [("lr_scheduler", "step", ("constant", "linear", "cosine")), ("precision", 16, ("32", "bf16-mixed"))],
)
def test_bad_literal_choice_lists_valid_ones(key, value, choices):
    message = config_error({key: value})
    assert key in message and str(value) in message
    for choice in choices:
        assert choice in message


def test_precision_32_as_yaml_int_is_accepted():
    assert make_config({"precision": 32}).precision == "32"


def test_unknown_key_names_it_and_suggests():
    message = config_error({"learning_rat": 1e-5})
    assert "learning_rat" in message
    assert "did you mean learning_rate" in message
    assert "--help lists every key" in message and "max_steps" not in message  # a few near names, not ~80 keys


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ("per_device_train_batch_size", "batch_size"),
        ("per_device_eval_batch_size", "eval_batch_size"),
        ("num_train_epochs", "num_epochs"),
        ("logging_steps", "report_every_n_steps"),
        ("eval_steps", "val_check_interval"),
        ("save_steps", "checkpoint_every_n_steps"),
        ("save_total_limit", "keep_last_n_checkpoints"),
        ("lr_scheduler_type", "lr_scheduler"),
        ("bf16", "precision (precision: bf16-mixed"),
        ("precompute_ref_log_probs", "precompute_ref_logps"),
    ],
)
def test_trl_and_transformers_names_are_refused_naming_the_key_to_use(theirs, ours):
    message = config_error({theirs: 1})
    assert message.startswith(f"unknown hyperparameter '{theirs}' (TRL's and transformers' name): use {ours}")
    assert len(message) < 160


def test_a_bad_key_in_a_file_is_blamed_on_that_file_alone_whatever_the_overrides(tmp_path):
    path = tmp_path / "bad.yaml"
    document = yaml.safe_load((REPO / "experiments" / "local-tiny.yaml").read_text())
    document["hyperparameters"]["learnin_rate"] = 1e-5
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as info:
        load_config(path, {"output_dir": "elsewhere"})
    message = str(info.value)
    assert message == (
        f"{path}: unknown hyperparameter 'learnin_rate'; did you mean learning_rate? "
        "(python entrypoint.py --help lists every key)"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch_size", "four"), ("batch_size", 2.5), ("batch_size", True), ("trust_remote_code", "maybe")],
)
def test_ill_typed_values(key, value):
    message = config_error({key: value})
    assert key in message and str(value) in message


def test_columns_unknown_role():
    message = config_error({"columns": {"question": "q"}})
    assert "question" in message
    for role in ("prompt", "chosen", "rejected", "messages"):
        assert role in message


NON_FINITE = [("beta", "nan"), ("learning_rate", "inf"), ("max_grad_norm", "nan")]


@pytest.mark.parametrize(("key", "value"), NON_FINITE)
def test_non_finite_numbers_rejected(key, value):
    assert key in config_error({key: value})


def test_columns_null_column_name_rejected():
    assert "columns.prompt" in config_error({"columns": {"prompt": None}})


# ----------------------------------------------------------------------------- experiment files


def test_yaml_scientific_notation_is_coerced(tmp_path):
    body = "hyperparameters:\n  learning_rate: 1e-6\n  adam_epsilon: 5.0e-7\n  max_steps: 1e3\n"
    path = write_yaml(tmp_path, body)
    cfg = load_config(path)
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate == 1e-06
    assert isinstance(cfg.adam_epsilon, float) and cfg.adam_epsilon == 5e-07
    assert isinstance(cfg.max_steps, int) and cfg.max_steps == 1000


def test_const_hyperparameter_resolves(tmp_path):
    path = write_yaml(tmp_path, "hyperparameters:\n  beta: {type: const, val: 0.25}\n  seed: 7\n")
    cfg = load_config(path)
    assert cfg.beta == 0.25 and cfg.seed == 7


def test_search_space_needs_explicit_value(tmp_path):
    path = write_yaml(tmp_path, "hyperparameters:\n  beta: {type: double, minval: 0.01, maxval: 0.5}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "beta" in message and "--beta" in message and "\n" not in message


def test_override_replaces_search_space(tmp_path):
    path = write_yaml(tmp_path, "hyperparameters:\n  beta: {type: double, minval: 0.01, maxval: 0.5}\n")
    assert load_config(path, parse_overrides(["--beta", "0.2"])).beta == 0.2


def test_null_for_optional_fields(tmp_path):
    body = "hyperparameters:\n  ref_model_name: null\n  max_prompt_length: null\n  eval_split: ~\n"
    cfg = load_config(write_yaml(tmp_path, body))
    assert cfg.ref_model_name is None and cfg.max_prompt_length is None and cfg.eval_split is None
    assert "model_name" in config_error({"model_name": None})  # a required string may not be null


def test_file_without_hyperparameters(tmp_path):
    path = write_yaml(tmp_path, "name: x\nsearcher: {name: single}\n")
    with pytest.raises(ConfigError, match="hyperparameters"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_invalid_yaml_reports_line_and_column(tmp_path):
    path = write_yaml(tmp_path, "hyperparameters:\n  beta: 0.1\n  seed: [1, 2\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        read_experiment_hparams(path)
    message = str(info.value)
    assert "line " in message and "column " in message and "\n" not in message
    assert str(path) in message


def test_config_error_is_user_error():
    assert issubclass(ConfigError, UserError)


# ----------------------------------------------------------------------------- overrides


def test_parse_overrides_forms():
    overrides = parse_overrides(["--beta", "0.2", "--max_steps=20", "--columns", '{"prompt": "question"}'])
    assert overrides == {"beta": "0.2", "max_steps": "20", "columns": '{"prompt": "question"}'}


def test_overrides_beat_file_and_are_coerced(tmp_path):
    path = write_yaml(tmp_path, "hyperparameters:\n  beta: 0.1\n  max_steps: 5\n  batch_size: 2\n")
    overrides = parse_overrides(["--beta", "0.2", "--max_steps=20", "--columns", '{"prompt": "question"}'])
    cfg = load_config(path, overrides)
    assert cfg.beta == 0.2 and isinstance(cfg.beta, float)
    assert cfg.max_steps == 20 and isinstance(cfg.max_steps, int)
    assert cfg.columns == {"prompt": "question"}
    assert cfg.batch_size == 2  # untouched keys keep the file's value


def test_override_bad_value_names_the_command_line_not_the_file(tmp_path):
    path = write_yaml(tmp_path, "hyperparameters:\n  beta: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, parse_overrides(["--batch_size", "four"]))
    assert str(info.value).startswith("--batch_size on the command line: ") and str(path) not in str(info.value)
    bad_file = write_yaml(tmp_path, "hyperparameters:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=rf"^{bad_file}: beta must be > 0"):
        load_config(bad_file, parse_overrides(["--batch_size", "4"]))


def test_override_without_value():
    with pytest.raises(ConfigError, match="--beta needs a value"):
        parse_overrides(["--max_steps", "3", "--beta"])


def test_stray_positional_argument():
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        parse_overrides(["--beta", "0.2", "oops"])


def test_override_unknown_key():
    with pytest.raises(ConfigError, match="unknown hyperparameter 'bta'.*did you mean beta"):
        parse_overrides(["--bta", "0.2"])


def test_dashes_map_to_underscores():
    assert parse_overrides(["--batch-size", "4", "--max-prompt-length=8"]) == {
        "batch_size": "4",
        "max_prompt_length": "8",
    }


# ----------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "entrypoint.py", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_print_config(tmp_path):
    path = write_yaml(tmp_path, "hyperparameters:\n  beta: 0.1\n  max_steps: 1e3\n")
    result = run_cli("--print_config", "--beta", "0.3", "--config", str(path))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["beta"] == 0.3 and printed["max_steps"] == 1000
    assert set(printed) == {f.name for f in dataclasses.fields(DPOConfig)}


@pytest.mark.parametrize("args", [("--beta", "-1"), ("--config", "missing.yaml")])
def test_cli_user_error_is_one_line(args):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert args[0].lstrip("-") in lines[0] or args[1] in lines[0]


EXPERIMENT_FILES = ["experiment.yaml", "experiments/offline-hh.yaml", "experiments/local-tiny.yaml"]


@pytest.mark.parametrize("name", EXPERIMENT_FILES)
def test_repo_experiment_files_load(name):
    cfg = load_config(REPO / name)
    assert isinstance(cfg, DPOConfig)
    assert isinstance(cfg.learning_rate, float) and cfg.learning_rate > 0


# ----------------------------------------------------------------------------- the dataclass itself


def test_config_is_frozen():
    cfg = make_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.5


def test_every_field_has_a_docstring():
    tree = ast.parse((REPO / "dpo_lightning" / "config" / "schema.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DPOConfig")
    fields = []
    for node, after in zip(cls.body, [*cls.body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign):
            name = node.target.id
            fields.append(name)
            documented = (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
                and after.value.value.strip()
            )
            assert documented, f"DPOConfig.{name} has no docstring"
    assert fields == [f.name for f in dataclasses.fields(DPOConfig)]


def test_a_bad_value_is_blamed_on_where_it_came_from():
    from dpo_lightning.config import load_config

    with pytest.raises(ConfigError) as cli:
        load_config("experiments/local-tiny.yaml", {"learning_rate": "-0.001"})
    assert str(cli.value) == "--learning_rate on the command line: learning_rate must be > 0, got -0.001"
    with pytest.raises(ConfigError) as both:
        load_config("experiments/local-tiny.yaml", {"max_prompt_length": "100"})
    assert str(both.value).startswith(
        "--max_prompt_length on the command line with max_length from experiments/local-tiny.yaml: "
    )
    with pytest.raises(ConfigError) as from_file:
        load_config("experiments/local-tiny.yaml", {"max_length": "8"})  # the file's max_prompt_length is 32
    assert "--max_length on the command line with max_prompt_length from experiments/local-tiny.yaml" in str(
        from_file.value
    )


def test_help_lists_every_key_by_group_with_default_and_documentation():
    done = subprocess.run([sys.executable, "entrypoint.py", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: python entrypoint.py")
    listed = [line.split()[0][2:] for line in done.stdout.splitlines() if line.startswith("  --")]
    assert listed == list(FIELDS)  # every key, once, in the schema's order
    for group in ("models:", "data:", "objective:", "optimisation:", "distribution:"):
        assert f"\n{group}\n" in done.stdout
    learning_rate = read_experiment_hparams(REPO / "experiment.yaml")["learning_rate"]
    assert f"  --learning_rate ({learning_rate})\n      Peak AdamW learning rate." in done.stdout
    assert "Values shown are those a run with --config experiment.yaml takes" in done.stdout


def test_help_shows_the_values_of_the_config_a_run_would_read():
    command = [sys.executable, "entrypoint.py", "--config", "experiments/local-tiny.yaml", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "  --model_name (builtin:tiny-qwen2)\n" in done.stdout  # the file's, not the schema's Qwen default
    missing = subprocess.run([*command[:2], "--config", "nope.yaml", "--help"], capture_output=True, text=True)
    assert "Values shown are the configuration schema's defaults (nope.yaml could not be read)." in missing.stdout
    assert "  --model_name (Qwen/Qwen2.5-0.5B-Instruct)\n" in missing.stdout


def test_help_piped_into_a_reader_that_stops_early_is_quiet():
    done = subprocess.run(
        f"{sys.executable} entrypoint.py --help | head -1", shell=True, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.startswith("usage: ") and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
