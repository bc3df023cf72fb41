"""FSDP2 on two CPU ranks (gloo), run for real: every FSDP run is compared with a DDP run of the same global
batch, step by step (losses, gradient norms, rewards, online scores and KL, generation metrics) and in its
final weights, at fp32 and relative 1e-5. A run killed with SIGKILL after a checkpoint resumes to the
straight run's numbers; checkpoints hold each rank's shard of the policy and optimizer, never the reference;
`final/` loads with transformers (or peft, for LoRA) and gives the trained model's logits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contract import checkpoints_by_step, online_demo_values, stepwise_run_values, write_jsonl
from safetensors.torch import load_file

from dpo_lightning.builtin import preference_rows

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENTRY = [str(ROOT / "entrypoint.py")]
CRASH = [str(ROOT / "tests" / "crash.py")]
REL = 1e-5


def _env() -> dict[str, str]:
    tests = str(ROOT / "tests")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tests}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run_ranks(arguments: list, *, expect_ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun with two CPU processes of `arguments` (a script and its arguments)."""
    done = subprocess.run(
        [*TORCHRUN, *map(str, arguments)],
        cwd=ROOT,
        env={**_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _launch(script: list[str], values: dict, *extra: str, **options) -> subprocess.CompletedProcess:
    return _run_ranks([*script, *extra, *[f"--{k}={v}" for k, v in values.items()]], **options)


def _reports(output_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    """Each (group, step)'s report; a step reported again after a resume counts as its last report."""
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {(r["group"], r["step"]): r["metrics"] for r in map(json.loads, lines)}


def _assert_same_reports(got: dict, want: dict, names: tuple[str, ...]) -> None:
    assert set(got) == set(want)
    for key, metrics in want.items():
        for name in names:
            if name not in metrics:
                continue
            a, b = got[key][name], metrics[name]
            if math.isnan(b):
                assert math.isnan(a), (key, name)
            else:
                assert a == pytest.approx(b, rel=REL, abs=1e-6), (key, name, a, b)


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=REL, atol=1e-7, msg=name)


def _final_weights(output_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / name)


TRAIN_NAMES = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")
GENERATION_NAMES = ("generation/kl", "generation/policy/score", "generation/reference/score", "generation/win_rate")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("fsdp") / "pairs.jsonl", preference_rows(seed=5)["train"][:80])


def _offline(tiny_model, data, output_dir: Path, strategy: str) -> dict:
    """Six steps, checkpoints every two, validation with generation metrics every three."""
    values = stepwise_run_values(
        tiny_model,
        data,
        output_dir,
        max_steps=6,
        checkpoint_every_n_steps=2,
        strategy=strategy,
        reward_model="dpo_lightning.builtin:sentiment_reward",
        generation_eval_every=1,
        max_new_tokens=8,
    )
    return {"config": "experiments/local-tiny.yaml", **values}


@pytest.fixture(scope="module")
def offline_runs(tiny_model, data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offline")
    for strategy in ("ddp", "fsdp"):
        _launch(ENTRY, _offline(tiny_model, data, root / strategy, strategy))
    return {strategy: root / strategy for strategy in ("ddp", "fsdp")}


def test_fsdp_equals_ddp_step_by_step_and_in_its_final_weights(offline_runs):
    fsdp, ddp = _reports(offline_runs["fsdp"]), _reports(offline_runs["ddp"])
    assert sorted(k for k in fsdp if k[0] == "training") == [("training", s) for s in range(1, 7)]
    assert fsdp[("training", 6)]["loss"] < fsdp[("training", 1)]["loss"]  # it trained
    _assert_same_reports(fsdp, ddp, TRAIN_NAMES + GENERATION_NAMES)
    assert "generation/kl" in fsdp[("validation", 6)]  # sampling sharded policy and reference ran
    _assert_same_weights(_final_weights(offline_runs["fsdp"]), _final_weights(offline_runs["ddp"]))


def test_fsdp_checkpoints_hold_shards_of_the_policy_and_optimizer_only(offline_runs, tiny_model):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    checkpoints = checkpoints_by_step(offline_runs["fsdp"])
    assert sorted(checkpoints) == [4, 6]  # keep_last_n_checkpoints: 2
    middle, last = checkpoints[4], checkpoints[6]
    for folder in (middle, last):
        shards = folder / "trainer" / "fsdp"
        assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        keys = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata.keys()
        weights = {k.removeprefix("state_dict.") for k in keys if k.startswith("state_dict.")}
        policy = AutoModelForCausalLM.from_pretrained(tiny_model)
        assert weights == {name for name, _ in policy.named_parameters()}  # the policy's, once; no reference
        assert any(k.startswith("optimizer_0.state.") and k.endswith("exp_avg_sq") for k in keys)
    assert not (middle / "model.safetensors").exists()  # never gathered at an ordinary checkpoint
    assert (last / "model.safetensors").is_file()  # the run's last checkpoint: gathered once


def test_fsdp_final_loads_with_transformers_and_gives_the_trained_logits(offline_runs):
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 8, 120, 64, 2, 11]])
    fsdp = AutoModelForCausalLM.from_pretrained(offline_runs["fsdp"] / "final").eval()
    ddp = AutoModelForCausalLM.from_pretrained(offline_runs["ddp"] / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(fsdp(ids).logits, ddp(ids).logits, rtol=REL, atol=1e-5)


def test_fsdp_killed_after_a_checkpoint_resumes_to_the_straight_run(offline_runs, tiny_model, data, tmp_path):
    values = _offline(tiny_model, data, tmp_path / "run", "fsdp")
    killed = _launch(CRASH, values, "checkpoint:4", expect_ok=False)
    assert killed.returncode != 0
    assert sorted(checkpoints_by_step(tmp_path / "run")) == [2, 4] and not (tmp_path / "run" / "final").exists()
    _launch(ENTRY, values)  # resumes from step 4 on both ranks
    straight = _reports(offline_runs["fsdp"])
    _assert_same_reports(_reports(tmp_path / "run"), straight, TRAIN_NAMES + GENERATION_NAMES)
    _assert_same_weights(_final_weights(tmp_path / "run"), _final_weights(offline_runs["fsdp"]))


def test_lora_with_precomputed_reference_and_checkpointing_under_fsdp_equals_ddp(tiny_model, data, tmp_path):
    """LoRA adapters sharded with their layers, the reference log-probs precomputed from the adapter-disabled
    policy, gradient checkpointing on: the same steps and adapters as DDP; final/ loads with peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = {"lora_r": 4, "lora_target_modules": "q_proj,v_proj", "gradient_checkpointing": True}
    for strategy in ("ddp", "fsdp"):
        values = stepwise_run_values(
            tiny_model, data, tmp_path / strategy, max_steps=4, strategy=strategy, precompute_ref_logps=True, **lora
        )
        cache = tmp_path / f"cache-{strategy}"  # each run computes its own (the key does not name the strategy)
        done = _launch(
            ENTRY, {"config": "experiments/local-tiny.yaml", **values}, env={"DPO_LIGHTNING_CACHE": str(cache)}
        )
        assert "computed on 2 process(es)" in done.stdout + done.stderr  # each rank its share of the pairs
        assert len(list((cache / "ref_logps").iterdir())) == 1  # one cache file, written once
    _assert_same_reports(_reports(tmp_path / "fsdp"), _reports(tmp_path / "ddp"), TRAIN_NAMES)
    adapters = "adapter_model.safetensors"
    _assert_same_weights(_final_weights(tmp_path / "fsdp", adapters), _final_weights(tmp_path / "ddp", adapters))
    assert not (tmp_path / "fsdp" / "final" / "model.safetensors").exists()  # adapters only
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    logits = {}
    for strategy in ("ddp", "fsdp"):
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        model = PeftModel.from_pretrained(base, str(tmp_path / strategy / "final")).eval()
        with torch.no_grad():
            logits[strategy] = model(ids).logits
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], rtol=REL, atol=1e-5)


def test_online_dpo_with_hf_generate_under_fsdp_equals_ddp(tiny_model, tmp_path):
    """Sampling with the sharded policy (ranks generating in step), judging, KL against the sharded reference."""
    for strategy in ("ddp", "fsdp"):
        values = online_demo_values(
            tiny_model,
            tmp_path / strategy,
            max_steps=4,
            batch_size=4,
            max_new_tokens=8,
            val_check_interval=2,
            report_every_n_steps=2,
            strategy=strategy,
        )
        _launch(ENTRY, {"config": "experiments/online-tiny.yaml", **values})
    names = ("loss", "grad_norm", "objective/scores_chosen", "objective/scores_rejected", "objective/kl")
    fsdp, ddp = _reports(tmp_path / "fsdp"), _reports(tmp_path / "ddp")
    assert ("validation", 4) in fsdp and "objective/kl" in fsdp[("training", 4)]
    _assert_same_reports(fsdp, ddp, names + ("objective/scores", "objective/eos_rate"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_vllm_sync_stream_under_fsdp_equals_the_unsharded_weights(tiny_model, tmp_path, lora):
    """What a colocated engine receives under FSDP: every parameter gathered whole, one at a time, named and
    valued as the unsharded policy's stream (LoRA: adapters merged). The engines themselves run under FSDP in
    tests/test_vllm.py, in vLLM's own environment."""
    out = tmp_path / "stream.pt"
    _run_ranks([ROOT / "tests" / "fsdp_weights_stream.py", tiny_model, out, *(["lora"] if lora else [])])
    got = torch.load(out, weights_only=False)
    assert list(got["streamed"]) == list(got["whole"])  # same names, same order
    for name, value in got["whole"].items():
        torch.testing.assert_close(got["streamed"][name], value, rtol=0, atol=1e-6, msg=name)
    if not lora:
        assert set(got["state"]) == set(got["whole"]) - {"lm_head.weight"}  # the tied head saved once


def test_a_trial_warm_started_from_a_sharded_checkpoint_takes_its_weights(offline_runs, tiny_model, data, tmp_path):
    """Another trial's FSDP checkpoint gives a new trial (FSDP or DDP) its policy weights, read from the
    shards, and nothing else: a fresh schedule from step 1, whose first report (taken before any update)
    already shows the donor's training."""
    donor = checkpoints_by_step(offline_runs["fsdp"])[4]  # an ordinary checkpoint: shards only
    first = {}
    for strategy in ("ddp", "fsdp"):
        values = stepwise_run_values(tiny_model, data, tmp_path / strategy, max_steps=2, strategy=strategy)
        logs = tmp_path / f"logs-{strategy}"
        logs.mkdir()
        config = json.dumps({k: str(v) for k, v in values.items()})
        _run_ranks([ROOT / "tests" / "fake_trial.py", config, tmp_path / f"storage-{strategy}", logs, "0", donor])
        reports = json.loads((logs / "rank-0.json").read_text())["reports"]
        first[strategy] = next(metrics for group, step, metrics in reports if group == "training" and step == 1)
    assert first["fsdp"]["rewards/margins"] > 0.01  # the donor's weights against the initial reference
    for name in ("loss", "logps/chosen", "rewards/margins"):
        assert first["fsdp"][name] == pytest.approx(first["ddp"][name], rel=REL, abs=1e-6), name


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_hybrid_shard_over_two_nodes_equals_ddp(tiny_model, data, tmp_path):
    """HYBRID_SHARD on two simulated nodes of two processes each (two torchrun agents meeting through a c10d
    rendezvous on this machine): sharded within a node, replicated across the two, the same steps and
    weights as DDP over the same four processes."""
    values = {"config": "experiments/local-tiny.yaml", **stepwise_run_values(tiny_model, data, tmp_path / "ddp")}
    values.update(batch_size=2, max_steps=4, checkpoint_every_n_steps=2)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", *ENTRY]
    done = subprocess.run(
        [*ddp, *[f"--{k}={v}" for k, v in values.items()]], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    values.update(output_dir=tmp_path / "hybrid", strategy="fsdp", fsdp_sharding_strategy="HYBRID_SHARD")
    rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{_free_port()}", "--rdzv_id", "hybrid"]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2", *rendezvous]
    command = [*node, *ENTRY, *[f"--{k}={v}" for k, v in values.items()]]
    agents = [
        subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in "ab"
    ]
    outputs = [agent.communicate(timeout=300)[0].decode(errors="replace") for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    _assert_same_reports(_reports(tmp_path / "hybrid"), _reports(tmp_path / "ddp"), TRAIN_NAMES)
    # A key bias shifts every attention logit of a query alike, which softmax ignores: its true gradient is 0,
    # and AdamW turns the rounding noise left in its place (which another reduction order changes) into full
    # steps. Every other weight must agree.
    hybrid, ddp = (_final_weights(tmp_path / run) for run in ("hybrid", "ddp"))
    zero_gradient = {name for name in ddp if name.endswith("k_proj.bias")}
    _assert_same_weights(
        {n: v for n, v in hybrid.items() if n not in zero_gradient},
        {n: v for n, v in ddp.items() if n not in zero_gradient},
    )
    shards = checkpoints_by_step(tmp_path / "hybrid")[2] / "trainer" / "fsdp"
    assert len(list(shards.glob("*.distcp"))) == 4


def test_reward_model_training_under_fsdp_equals_ddp(tiny_model, data, tmp_path):
    """`mode: reward` shards the reward model's backbone the same way; final/ is the same classifier."""
    for strategy in ("ddp", "fsdp"):
        values = stepwise_run_values(tiny_model, data, tmp_path / strategy, max_steps=4, strategy=strategy)
        _launch(ENTRY, {"config": "experiments/local-tiny.yaml", "mode": "reward", **values})
    _assert_same_reports(_reports(tmp_path / "fsdp"), _reports(tmp_path / "ddp"), ("loss", "grad_norm", "accuracy"))
    _assert_same_weights(_final_weights(tmp_path / "fsdp"), _final_weights(tmp_path / "ddp"))


def test_kills_and_signals_while_fsdp_checkpoints_are_written_resume_to_the_straight_run(
    offline_runs, tiny_model, data, tmp_path
):
    """Two faults drawn with a fixed seed among SIGKILL of rank 0 halfway through writing a checkpoint (its trainer
    state saved, its rank files not; or every file written, metadata.json not), and SIGTERM while one is being
    written, at the step-4 and step-6 checkpoints; each launch resumes from the newest intact checkpoint (a torn
    one is never taken), and the run ends on the straight run's reports and weights."""
    import random

    from dpo_lightning.layout import checkpoint_problem

    rng = random.Random(26)
    out = tmp_path / "run"
    values = _offline(tiny_model, data, out, "fsdp")
    faults = [rng.choice([f"writing:{s}:state", f"writing:{s}:files", f"signal-writing:{s}:SIGTERM"]) for s in (4, 6)]
    for moment in faults:
        done = _launch(CRASH, values, moment, expect_ok=False)
        assert (done.returncode == 0) == moment.startswith("signal"), (moment, done.stderr[-2000:])
        assert not (out / "final").exists()
        assert all(checkpoint_problem(folder) is None for folder in checkpoints_by_step(out).values())
    _launch(ENTRY, values)
    _assert_same_reports(_reports(out), _reports(offline_runs["fsdp"]), TRAIN_NAMES + GENERATION_NAMES)
    _assert_same_weights(_final_weights(out), _final_weights(offline_runs["fsdp"]))
    torn = [f for f in (out / "checkpoints").iterdir() if not (f / "metadata.json").is_file()]
    assert not torn  # the torn folders went once a later checkpoint was complete


def test_an_fsdp_reward_model_run_killed_after_a_checkpoint_resumes_from_its_shards(tiny_model, data, tmp_path):
    """A sharded reward-model checkpoint holds no Hugging Face weights: the resumed run builds the model afresh
    and reads the shards (it used to look for model.safetensors and fail)."""
    runs = {}
    for name in ("straight", "killed"):
        values = stepwise_run_values(tiny_model, data, tmp_path / name, max_steps=4, checkpoint_every_n_steps=2)
        runs[name] = {"config": "experiments/local-tiny.yaml", "mode": "reward", "strategy": "fsdp", **values}
    _launch(ENTRY, runs["straight"])
    assert _launch(CRASH, runs["killed"], "checkpoint:2", expect_ok=False).returncode != 0
    assert not (checkpoints_by_step(tmp_path / "killed")[2] / "model.safetensors").exists()  # shards only
    _launch(ENTRY, runs["killed"])
    names = ("loss", "grad_norm", "accuracy")
    _assert_same_reports(_reports(tmp_path / "killed"), _reports(tmp_path / "straight"), names)
    _assert_same_weights(_final_weights(tmp_path / "killed"), _final_weights(tmp_path / "straight"))
