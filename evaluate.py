"""Evaluate a trained policy: `python evaluate.py --model_path PATH --dataset_name NAME`.

Evaluation (preference metrics, win rate against the reference, reports) is not implemented yet; it is
planned as its own piece of work. This script says so plainly instead of pretending to measure anything.
"""

import sys

if __name__ == "__main__":
    print(
        "error: evaluate.py is not implemented yet; validation metrics of a training run are in "
        "<output_dir>/metrics.jsonl (group 'validation')",
        file=sys.stderr,
    )
    sys.exit(2)
