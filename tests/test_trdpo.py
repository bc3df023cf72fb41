"""TR-DPO (`sync_ref_model`): the reference after each sync is the mixup by hand of the policy and the reference
before it, it stays put between syncs, a checkpoint keeps it, and a run resumed between syncs ends where the
straight run does. What it cannot work with is refused in one line."""

from __future__ import annotations

import pytest
import torch
from contract import stepwise_run_values, write_jsonl
from matrix_driver import leave_as_a_crash_would
from safetensors.torch import load_file
from tiny_models import random_qwen2

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import run_local
from dpo_lightning.dpo.reference import SyncedReference
from dpo_lightning.errors import ConfigError, UserError
from dpo_lightning.layout import CHECKPOINTS, FINAL, REFERENCE, complete_checkpoints

ALPHA = 0.4


def _weights(folder) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's weights by name (the tied head saved once, under the embedding's name)."""
    return load_file(str(folder / "model.safetensors"))


def _by_step(out) -> dict[int, object]:
    return dict(complete_checkpoints(out / CHECKPOINTS))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """A 4-step TR-DPO run syncing every 2 steps, checkpointed every step; and a copy crashed after step 3's
    checkpoint (between syncs), resumed."""
    root = tmp_path_factory.mktemp("trdpo")
    pairs = write_jsonl(root / "pairs.jsonl", preference_rows(seed=5)["train"][:32])
    values = stepwise_run_values(
        tiny_model, pairs, root / "straight", max_steps=4, checkpoint_every_n_steps=1, keep_last_n_checkpoints=10,
        learning_rate=5e-3, lr_scheduler="constant", warmup_ratio=0.0, val_fraction=0.0,
        sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=ALPHA,
    )  # fmt: skip
    run_local(make_config(values))
    leave_as_a_crash_would(root / "straight", root / "resumed", 3)
    run_local(make_config({**values, "output_dir": str(root / "resumed")}))
    return root


def test_the_reference_after_each_sync_is_the_mixup_by_hand(runs, tiny_model):
    checkpoints = _by_step(runs / "straight")
    assert sorted(checkpoints) == [1, 2, 3, 4]
    initial = _weights(tiny_model)
    policy = {step: _weights(folder) for step, folder in checkpoints.items()}
    reference = {step: _weights(folder / REFERENCE) for step, folder in checkpoints.items()}
    expected_2 = {name: ALPHA * policy[2][name] + (1 - ALPHA) * initial[name] for name in initial}
    expected_4 = {name: ALPHA * policy[4][name] + (1 - ALPHA) * expected_2[name] for name in initial}
    for name in initial:
        torch.testing.assert_close(reference[1][name], initial[name], rtol=0, atol=0)  # before the first sync
        torch.testing.assert_close(reference[2][name], expected_2[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(reference[3][name], reference[2][name], rtol=0, atol=0)  # between syncs
        torch.testing.assert_close(reference[4][name], expected_4[name], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(policy[2][n], initial[n]) for n in initial)  # the policy did move
    assert not (runs / "straight" / FINAL / REFERENCE).exists()  # final/ is the policy alone


def test_a_run_resumed_between_syncs_ends_where_the_straight_run_does(runs):
    straight, resumed = _by_step(runs / "straight"), _by_step(runs / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for what in (lambda folder: folder, lambda folder: folder / REFERENCE):
        ours, theirs = _weights(what(resumed[4])), _weights(what(straight[4]))
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"precompute_ref_logps": True, "mode": "offline"}, "its log-probs cannot be precomputed"),
        ({"lora_r": 4}, "with LoRA the policy is adapters on a frozen base"),
        ({"mode": "reward"}, "mode reward has none"),
        ({"ref_model_mixup_alpha": 0.0}, "ref_model_mixup_alpha must be in (0, 1]"),
        ({"ref_model_sync_steps": 0}, "ref_model_sync_steps must be > 0"),
    ],
)
def test_what_tr_dpo_cannot_work_with_is_refused_in_one_line(values, words):
    with pytest.raises(ConfigError) as info:
        make_config({"sync_ref_model": True, **values})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_reference_of_another_architecture_cannot_be_synced():
    with pytest.raises(UserError, match="the reference's parameters differ from the policy's"):
        SyncedReference(random_qwen2(hidden_size=64), random_qwen2(), alpha=0.5, every=1)
