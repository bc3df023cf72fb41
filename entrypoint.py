"""Train with DPO: `python entrypoint.py [--config FILE] [--fast-dev-run] [--print_config] [--show_data N]
[--resume PATH] [--name value ...]`.

The configuration is the `hyperparameters:` block of the experiment file (default experiment.yaml); any
key can be overridden on the command line. A run resumes from the newest complete checkpoint in its
output_dir, or from `--resume PATH` (a checkpoint folder or an output folder). Under `torchrun` or
Determined's launcher every process runs this same script; on a Determined cluster the trial's
hyperparameters are the configuration.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

from dpo_lightning.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "experiment.yaml"
USAGE = __doc__.strip().splitlines()[0]
HELP_USAGE = (
    "usage: python entrypoint.py [--config FILE] [--fast-dev-run] [--print_config] [--show_data N] [--resume PATH] "
    "[--KEY VALUE ...]"
)


class Args(NamedTuple):
    config: Path
    fast_dev_run: bool
    print_config: bool
    resume: str | None
    overrides: list[str]
    show_data: int | None = None


def _value(argv: list[str], i: int, flag: str) -> tuple[str, int]:
    """The value of `--flag=value` or `--flag value` at argv[i], and the index of its last token."""
    arg = argv[i]
    if "=" in arg:
        return arg.split("=", 1)[1], i
    if i + 1 < len(argv):
        return argv[i + 1], i + 1
    raise UserError(f"{flag} needs a value")


def _print_help(argv: list[str]) -> None:
    """The help, with the values a run of the given (or default) --config takes; then exit 0."""
    from dpo_lightning.config import read_experiment_hparams
    from dpo_lightning.config.help import help_text

    config = DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            config = Path(_value(argv, i, "--config")[0])
    try:
        values = read_experiment_hparams(config)
    except UserError:
        values = None
    try:
        print(help_text(HELP_USAGE, config.name if config == DEFAULT_CONFIG else config, values))
        print("\nA run's resolved configuration, every key with its value: python entrypoint.py --print_config")
        sys.stdout.flush()
    except BrokenPipeError:  # `--help | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


def parse_args(argv: list[str]) -> Args:
    """Split the script's own flags from hyperparameter overrides."""
    config, fast_dev_run, print_config, resume, rest, show = DEFAULT_CONFIG, False, False, None, [], None
    if "-h" in argv or "--help" in argv:
        _print_help(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--fast-dev-run", "--fast_dev_run"):
            fast_dev_run = True
        elif arg in ("--print_config", "--print-config"):
            print_config = True
        elif arg == "--config" or arg.startswith("--config="):
            value, i = _value(argv, i, "--config")
            config = Path(value)
        elif arg == "--resume" or arg.startswith("--resume="):
            resume, i = _value(argv, i, "--resume")
        elif arg in ("--show_data", "--show-data") or arg.startswith(("--show_data=", "--show-data=")):
            value, i = _value(argv, i, "--show_data")
            if not value.isdigit():
                raise UserError(f"--show_data takes a number of pairs to show, got {value!r}")
            show = int(value)
        else:
            rest.append(arg)
        i += 1
    return Args(config, fast_dev_run, print_config, resume, rest, show)


def main(argv: list[str] | None = None) -> int:
    from dpo_lightning.console import Interrupted, install_interrupt_handlers

    install_interrupt_handlers()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        from dpo_lightning.config import load_config, parse_overrides

        overrides = parse_overrides(args.overrides)
        if args.print_config:
            print(json.dumps(load_config(args.config, overrides).to_dict(), indent=2))
            return 0
        if args.show_data is not None:  # the data as the run prepares it; no model weights, nothing written
            from dpo_lightning.console import configure_logging
            from dpo_lightning.training.show import show_data

            configure_logging()
            print(show_data(load_config(args.config, overrides), args.show_data))
            return 0
        from dpo_lightning.console import configure_logging
        from dpo_lightning.determined.bridge import run

        configure_logging()
        return run(args.config, overrides, fast_dev_run=args.fast_dev_run, resume=args.resume)
    except UserError as exc:  # one line per problem (a run missing several things says all of them)
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # 2 for bad input; a diverged run says 3
    except (Interrupted, KeyboardInterrupt) as exc:  # outside training's own stop (its handler finishes the step
        # and checkpoints), or a second Ctrl-C during it
        name, detail = getattr(exc, "signal_name", "SIGINT"), getattr(exc, "detail", "")
        print(
            f"interrupted by {name}{' ' + detail if detail else ''}; a re-run resumes from the newest complete "
            "checkpoint, if any",
            file=sys.stderr,
        )
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    from dpo_lightning.console import quiet_shutdown

    code = main()
    quiet_shutdown()  # a second Ctrl-C while the interpreter winds down: one line, no atexit traceback
    sys.exit(code)
