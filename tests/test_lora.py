"""LoRA (`lora_r` > 0): the reference is the policy with its adapters disabled, only the adapters train, the
checkpoints and final/ hold the adapters, resume is exact, and the exports load with peft and without it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from contract import online_demo_values, stepwise_run_values, write_jsonl
from fake_core import straight_and_resumed
from safetensors.torch import load_file
from tiny_models import random_pairs, random_qwen2

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.data.batch import PairBatch
from dpo_lightning.determined import bridge
from dpo_lightning.dpo.objective import LossSettings, pair_forward
from dpo_lightning.dpo.reference import AdapterDisabledReference, FrozenReference
from dpo_lightning.errors import ConfigError, UserError
from dpo_lightning.evaluation.run import EvalOptions, evaluate
from dpo_lightning.models.lora import add_adapters

LN2 = math.log(2.0)


def _lora_cfg(**overrides):
    return make_config({"lora_r": 4, "lora_alpha": 8.0, **overrides})


def test_at_step_zero_the_adapter_disabled_reference_is_the_base():
    base = random_qwen2()
    frozen = FrozenReference(copy.deepcopy(base))
    policy = add_adapters(base, _lora_cfg())
    batch = PairBatch.from_pairs(*random_pairs(3, (3, 5), (4, 2), (2, 6)), pad_token_id=0)
    reference = AdapterDisabledReference(policy, chunk_size=4)
    torch.testing.assert_close(reference.logps(batch).logps, frozen.logps(batch).logps, rtol=1e-6, atol=1e-6)

    result = pair_forward(policy, reference, batch, LossSettings(beta=0.1), chunk_size=4)
    torch.testing.assert_close(result.loss.losses, torch.full((2,), LN2), rtol=1e-6, atol=1e-6)
    assert result.loss.chosen_rewards.abs().max() == 0 and result.loss.rejected_rewards.abs().max() == 0

    # with the adapters moved off zero, the policy differs from the reference, which stays the base
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    moved = pair_forward(policy, reference, batch, LossSettings(beta=0.1), chunk_size=4)
    torch.testing.assert_close(moved.reference.chosen.logps, result.reference.chosen.logps, rtol=1e-6, atol=1e-6)
    assert (moved.policy.chosen.logps - result.policy.chosen.logps).abs().max() > 1e-3


def test_only_adapters_are_trainable_and_the_reference_shares_the_policy():
    policy = add_adapters(random_qwen2(), _lora_cfg(lora_target_modules="q_proj,v_proj"))
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "v_proj"}  # ...q_proj.lora_A.default.weight
    assert not isinstance(AdapterDisabledReference(policy), torch.nn.Module)  # never saved or sharded twice


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("lora") / "pairs.jsonl", preference_rows(seed=2)["train"][:48])


def _offline(tiny_model: Path, data: Path, out: Path, **overrides) -> dict:
    values = dict(lora_r=4, lora_alpha=8.0, learning_rate=2e-2, max_steps=6, preempt_check_every_n_steps=1)
    return stepwise_run_values(tiny_model, data, out, **{**values, **overrides})


@pytest.fixture(scope="module")
def lora_run(tiny_model, pairs, tmp_path_factory):
    """A short LoRA run with gradient checkpointing and the merged export, trained once for these tests."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    values = _offline(tiny_model, pairs, out, gradient_checkpointing=True, export_merged=True, validate_at_start=True)
    outcome = bridge.run_local(make_config(values))
    return out, outcome


def test_training_moves_only_the_adapters(lora_run, tiny_model):
    out, outcome = lora_run
    policy = outcome.module.policy
    original = load_file(tiny_model / "model.safetensors")
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in policy.named_parameters()}
    for name, tensor in original.items():
        if name in base:
            assert torch.equal(base[name].detach().cpu(), tensor), name  # bit for bit
    moved = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert moved and all(p.abs().max() > 0 for p in moved)  # B starts at zero: every adapter trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["group"] == "validation" and r["step"] == 0)["metrics"]
    last = [r for r in rows if r["group"] == "validation"][-1]["metrics"]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6) and first["rewards/margins"] == 0
    assert last["loss"] < LN2 - 1e-3


def test_checkpoints_and_final_hold_the_adapters_only(lora_run):
    out, _ = lora_run
    checkpoints = [p for p in (out / "checkpoints").iterdir() if (p / "metadata.json").is_file()]
    for folder in [*checkpoints, out / "final"]:
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, folder
        assert "model.safetensors" not in names and "config.json" not in names, folder
        adapters = load_file(folder / "adapter_model.safetensors")
        assert adapters and all("lora_" in name for name in adapters)


@torch.no_grad()
def test_final_loads_with_peft_and_merged_without(lora_run):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out, outcome = lora_run
    trained = outcome.module.policy.eval()
    ids = torch.tensor([[3, 17, 41, 8, 99, 5]])
    expected = trained(input_ids=ids).logits
    with_peft = AutoPeftModelForCausalLM.from_pretrained(out / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged").eval()
    assert not hasattr(merged, "peft_config")
    for model in (with_peft, merged):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_evaluate_accepts_a_lora_run(lora_run, tmp_path):
    out, _ = lora_run
    report = evaluate(EvalOptions(model_path=str(out), num_pairs=8, output_dir=str(tmp_path / "eval")))
    assert report["preference"]["num_pairs"] == 8
    assert report["preference"]["metrics"]["rewards/margins"] != 0  # reference: the base; policy: adapted


def _resumed_equals_straight(cfg, tmp_path, stop_at: int, names: tuple[str, ...]):
    straight, second = straight_and_resumed(cfg, tmp_path, stop_at)
    expected, got = straight.train.group("training"), second.train.group("training")
    assert sorted(got) == sorted(expected)
    for step in expected:
        for name in [n for n in names if n in expected[step]]:
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-5, abs=1e-8), (step, name)
    files = [tmp_path / name / core.latest_checkpoint() for name, core in (("straight", straight), ("resumed", second))]
    straight_adapters, resumed_adapters = (load_file(f / "adapter_model.safetensors") for f in files)
    assert straight_adapters.keys() == resumed_adapters.keys()
    for name, tensor in straight_adapters.items():
        torch.testing.assert_close(resumed_adapters[name], tensor, rtol=1e-5, atol=1e-7)


def test_an_interrupted_lora_run_resumes_exactly(tiny_model, pairs, tmp_path):
    cfg = make_config(_offline(tiny_model, pairs, tmp_path / "out"))
    _resumed_equals_straight(cfg, tmp_path, 3, ("loss", "rewards/chosen", "rewards/margins", "grad_norm"))


def test_an_interrupted_online_lora_run_resumes_exactly(tiny_model, tmp_path):
    values = online_demo_values(tiny_model, tmp_path / "out", max_steps=6, report_every_n_steps=1)
    values.update(lora_r=4, lora_alpha=8.0, preempt_check_every_n_steps=1, val_check_interval=100)
    cfg = make_config(values)
    _resumed_equals_straight(cfg, tmp_path, 3, ("loss", "objective/scores", "objective/kl", "grad_norm"))


def test_lora_settings_fail_in_one_line(tiny_model, pairs, tmp_path):
    with pytest.raises(ConfigError, match="export_merged needs LoRA adapters"):
        make_config({"export_merged": True})
    with pytest.raises(ConfigError, match="load_in_4bit needs LoRA adapters"):
        make_config({"load_in_4bit": True})
    if not torch.cuda.is_available():
        values = _offline(tiny_model, pairs, tmp_path / "out", load_in_4bit=True)
        with pytest.raises(UserError, match="load_in_4bit .*needs a CUDA GPU"):
            bridge.run_local(make_config(values))
        assert not (tmp_path / "out").exists()
    values = _offline(tiny_model, pairs, tmp_path / "out2", lora_target_modules="no_such_proj")
    with pytest.raises(UserError, match="lora_target_modules"):
        bridge.run_local(make_config(values))


def test_a_target_module_typo_beside_a_good_name_fails_in_one_line(tiny_model, pairs, tmp_path):
    """peft adapts the names that match and drops a typo silently when another name matches; every name must
    match a module."""
    values = _offline(tiny_model, pairs, tmp_path / "out", lora_target_modules="q_prj,v_proj")
    with pytest.raises(UserError) as info:
        bridge.run_local(make_config(values))
    message = str(info.value)
    assert "no module is named q_prj (did you mean q_proj?)" in message and "\n" not in message
    assert "o_proj" in message and "v_proj" in message  # the names it could use
    assert not (tmp_path / "out" / "checkpoints").exists()
