"""Evaluate a trained policy: `python evaluate.py --model_path PATH --dataset_name NAME [options]`.

PATH is a Hugging Face model folder, a training output folder (its final/ policy) or a checkpoint folder
(as `det checkpoint download` gives it). Preference pairs give DPO's implicit-reward metrics against the
reference; with `--reward_model`, prompts give the policy's win rate against the reference. The report goes
to `<output_dir>/report.json`, `report.md` and PNG plots; a summary table is printed at the end.
"""

from __future__ import annotations

import argparse
import sys

from dpo_lightning.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user error
        raise UserError(f"{message} (see python evaluate.py --help)")


def parse_args(argv: list[str]):
    from dpo_lightning.evaluation.run import EvalOptions

    parser = _Parser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    add = parser.add_argument
    add("--model_path", required=True, help="model folder, training output folder or checkpoint folder")
    add("--dataset_name", help="dataset (as in training); default: the run's dataset_name")
    add("--ref_model_path", help="reference model; default: the run's reference, else the policy itself")
    add("--beta", type=float, help="DPO beta; default: the run's beta, else 0.1")
    add("--reward_model", help="judge: sequence-classification model, RewardModel folder or package.module:function")
    add("--split", help="split to evaluate whole; default: the part training held out")
    add(
        "--columns",
        help='JSON role -> column map for this dataset, e.g. \'{"prompt": "question"}\'; default: the run\'s',
    )
    add("--num_pairs", type=int, default=256, help="preference pairs to score (default 256)")
    add("--num_prompts", type=int, help="prompts to generate for (default 64 with --reward_model, else 0)")
    add("--max_new_tokens", type=int, help="tokens sampled per completion at most; default: the run's, else 128")
    add("--temperature", type=float, help="sampling temperature; default: the run's, else 0.9")
    add("--top_p", type=float, help="nucleus sampling threshold; default: the run's, else 1.0")
    add("--batch_size", type=int, default=8, help="pairs or prompts per forward pass (default 8)")
    add("--output_dir", default="outputs/eval", help="report.json, report.md, plots (default outputs/eval)")
    add("--seed", type=int, default=0, help="seed of the sampling streams (default 0)")
    dtypes = ["float32", "bfloat16", "float16"]
    add("--dtype", default="float32", choices=dtypes, help="model weights (default float32)")
    return EvalOptions(**vars(parser.parse_args(argv)))


def main(argv: list[str]) -> int:
    from pathlib import Path

    from dpo_lightning.console import configure_logging
    from dpo_lightning.evaluation.report import summary_table, write_report
    from dpo_lightning.evaluation.run import evaluate
    from dpo_lightning.memory import tune_cpu_allocator

    configure_logging()
    tune_cpu_allocator()
    options = parse_args(argv)
    report = evaluate(options)
    files = write_report(Path(options.output_dir), report)
    print(summary_table(report))
    print(f"report: {files['markdown']} (numbers: {files['json']})")
    return 0


if __name__ == "__main__":
    from dpo_lightning.console import Interrupted, install_interrupt_handlers, quiet_shutdown

    install_interrupt_handlers()
    try:
        code = main(sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"interrupted by {getattr(exc, 'signal_name', 'SIGINT')}; no report written", file=sys.stderr)
        code = getattr(exc, "exit_code", 130)
    quiet_shutdown()  # a second Ctrl-C while the interpreter winds down: one line, no atexit traceback
    sys.exit(code)
