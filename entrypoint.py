"""Train with DPO: `python entrypoint.py [--config FILE] [--fast-dev-run] [--print_config] [--name value ...]`.

The configuration is the `hyperparameters:` block of the experiment file (default experiment.yaml); any
key can be overridden on the command line. Under `torchrun` every process runs this same script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dpo_lightning.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "experiment.yaml"
USAGE = __doc__.strip().splitlines()[0]


def parse_args(argv: list[str]) -> tuple[Path, bool, bool, list[str]]:
    """Split the script's own flags from hyperparameter overrides."""
    config, fast_dev_run, print_config, rest = DEFAULT_CONFIG, False, False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(USAGE)
            print("Hyperparameters and their defaults: python entrypoint.py --print_config")
            raise SystemExit(0)
        if arg in ("--fast-dev-run", "--fast_dev_run"):
            fast_dev_run = True
        elif arg in ("--print_config", "--print-config"):
            print_config = True
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise UserError("--config needs a path to an experiment file")
            config = Path(value)
        else:
            rest.append(arg)
        i += 1
    return config, fast_dev_run, print_config, rest


def main(argv: list[str] | None = None) -> int:
    try:
        config_path, fast_dev_run, print_config, rest = parse_args(sys.argv[1:] if argv is None else argv)
        from dpo_lightning.config import load_config, parse_overrides

        cfg = load_config(config_path, parse_overrides(rest))
        if print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        from dpo_lightning.training import configure_logging, run_local

        configure_logging()
        return run_local(cfg, fast_dev_run=fast_dev_run)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to save", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
