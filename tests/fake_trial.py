"""One rank of a trial driven by the strict fake Core API context, for tests/test_distributed.py.

usage (under torchrun): fake_trial.py CONFIG_JSON STORAGE LOG_DIR PREEMPT_ON_CALL [WARM_START_CHECKPOINT]
Each rank writes what its fake context saw to LOG_DIR/rank-<r>.json. With a checkpoint of another trial, the
trial warm-starts from it (its policy weights only), as Determined's continued trials do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fake_core import FakeCore

from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import run_trial, start_point


def main(config_json: str, storage: str, log_dir: str, preempt_on_call: str, warm_from: str = "") -> int:
    cfg = make_config(json.loads(config_json))
    core = FakeCore(Path(storage), preempt_on_call=int(preempt_on_call))
    start = start_point(Path(warm_from), trial_id=3) if warm_from else None
    outcome = run_trial(core, cfg, start=start, trial_id=3, on_cluster=True)
    rank = outcome.trainer.global_rank
    seen = {
        "rank": rank,
        "interrupted": outcome.interrupted,
        "step": outcome.trainer.global_step,
        "reports": core.train.reports,
        "progress": core.train.progress,
        "stored": core.checkpoint.stored,
        "preempt_calls": core.preempt.calls,
    }
    (Path(log_dir) / f"rank-{rank}.json").write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
