"""Per loss and option, the largest relative difference from TRL 1.16 on the same batch: of the loss, and of
every preference metric the two define alike (logits/* are means of ~1e-3, so theirs is the largest), through
`tests/test_trl_parity.py`'s own cases (the tests assert these stay within 1e-4; this prints how far within).

    PYTHONPATH=.:tests python benchmarks/trl_loss_parity.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_trl_parity as parity  # noqa: E402

from dpo_lightning.builtin import build_tiny_model  # noqa: E402


class Recorder:
    """Stands in for torch.testing.assert_close and pytest.approx in the parity tests, keeping each
    relative difference instead of asserting it."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.worst = 0.0

    def close(self, actual, expected, **_):
        self.loss = max(self.loss, _relative(float(actual), float(expected)))

    def approx(self, expected, **_):
        recorder = self

        class Approx:
            def __eq__(self, actual):
                recorder.note(float(actual), float(expected))
                return True

        return Approx()

    def note(self, actual: float, expected: float) -> None:
        self.worst = max(self.worst, _relative(actual, expected))


def _relative(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-12)


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        model = build_tiny_model(Path(root) / "model", seed=3)
        cases = [(f"{name} (eps {eps})" if eps else name, name, eps, {}) for name, eps in parity.PAIRWISE]
        cases += [(case_id, *case) for case_id, case in parity.OPTIONS.items()]
        print(f"{'case':<24} {'loss':>8} {'metrics':>8}  (largest relative difference)")
        for case_id, loss_type, eps, options in cases:
            recorder = Recorder()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(parity.torch.testing, "assert_close", recorder.close)
                patch.setattr(parity.pytest, "approx", recorder.approx)
                parity.test_loss_and_metrics_match_trl(model, Path(tempfile.mkdtemp(dir=root)), loss_type, eps, options)
            print(f"{case_id:<24} {recorder.loss:8.1e} {recorder.worst:8.1e}")
        for case in sorted(parity.FREE):
            recorder = Recorder()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(parity.torch.testing, "assert_close", recorder.close)
                patch.setattr(parity.pytest, "approx", recorder.approx)
                parity.test_reference_free_losses_match_trl_cpo_and_orpo_trainers(
                    model, Path(tempfile.mkdtemp(dir=root)), case
                )
            print(f"{case + ' (CPO/ORPO)':<24} {recorder.loss:8.1e} {recorder.worst:8.1e}")


if __name__ == "__main__":
    main()
