"""Features that work alone and broke together: each test here failed before its fix (issue: features that
combine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.config import make_config
from dpo_lightning.data.batch import SequenceBatch
from dpo_lightning.data.collate import PromptCollator
from dpo_lightning.dpo.logprobs import forward_logps
from dpo_lightning.dpo.reference import AdapterDisabledReference
from dpo_lightning.models.lora import add_adapters
from dpo_lightning.online.comparison import compare_generations, sample_one
from dpo_lightning.online.sampling import HFSampler, SamplingRNG, SamplingSettings

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Describe the river.", "Tell me about a lovely garden in the morning.", "Why is the castle old?"]


class LengthJudge:
    """Scores a completion by its length in characters (a judge needs only `score`)."""

    description = "length"

    def score(self, prompts, completions) -> torch.Tensor:
        return torch.tensor([float(len(c)) for c in completions])


@pytest.fixture
def lora_policy(tiny_model):
    """The tiny model under LoRA adapters whose weights moved (B != 0): the adapted policy differs from its base."""
    policy = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_model), make_config({"lora_r": 4}))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return policy.eval()


def test_lora_generation_metrics_sample_and_score_the_policy_with_its_adapters_on(tiny_model, lora_policy):
    """The reference of a LoRA run is the policy with its adapters off; that must hold for the reference's own
    samples and log-probs only, never for the policy's (which made `generation/kl` 0 all run)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    items = [{"prompt_ids": tokenizer(t)["input_ids"], "prompt_json": json.dumps(t)} for t in PROMPTS]
    batch = PromptCollator(tokenizer.pad_token_id)(items)
    settings = SamplingSettings(8, 1.0, 1.0, (tokenizer.eos_token_id,), tokenizer.pad_token_id)
    reference = AdapterDisabledReference(lora_policy)
    result = compare_generations(lora_policy, reference, tokenizer, [batch], LengthJudge(), settings, seed=7)

    # by hand: the adapted policy's own draws from the same stream, scored with the adapters on and then off
    mine = sample_one(HFSampler(lora_policy), tokenizer, batch, settings, SamplingRNG(7))
    rows = SequenceBatch.from_rows(batch.prompt_ids(), mine.ids, tokenizer.pad_token_id)
    with torch.no_grad():
        adapted = forward_logps(lora_policy, rows).logps
        with lora_policy.disable_adapter():
            base = forward_logps(lora_policy, rows).logps
    expected = (adapted - base).mean().item()
    assert abs(expected) > 1e-2  # the adapters matter here
    assert result.metrics["kl"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert result.metrics["policy/length"] == pytest.approx(sum(map(len, mine.ids)) / len(mine.ids))


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_an_empty_prompt_scores_the_same_tokens_packed_and_padded(chunk_size):
    """With no prompt (`prompt: ""`, an implicit pair with no shared start, a tokenizer without BOS) nothing
    predicts a sequence's first token: the padded layout never scores it, and in a packed row the previous
    sequence's last position must not either (it did: -9.06 packed against -4.59 padded)."""
    from tiny_models import random_pairs, random_qwen2

    from dpo_lightning.data.batch import PairBatch

    prompts, chosen, rejected = random_pairs(3, (0, 4, 0), (5, 3, 2), (4, 6, 3))
    padded = PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0)
    packed = PairBatch.from_pairs(prompts, chosen, rejected, pad_token_id=0, packed=True)
    model = random_qwen2()
    expected, got = forward_logps(model, padded, chunk_size), forward_logps(model, packed, chunk_size)
    assert expected.num_tokens.tolist() == [4, 3, 1, 3, 6, 2]  # an empty prompt's first completion token unscored
    for name in ("logps", "num_tokens", "logits_sum"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-5, msg=name)


def _crash_and_resume_values(tiny_model, pairs, out) -> dict:
    from contract import stepwise_run_values

    values = stepwise_run_values(tiny_model, pairs, out, max_steps=6, checkpoint_every_n_steps=2)
    return {"config": "experiments/local-tiny.yaml", **values, "val_check_interval": 2, "report_to": "tensorboard,csv"}


def _entry(script: list[str], values: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}
    args = [f"--{k}={v}" for k, v in values.items()]
    return subprocess.run([sys.executable, *script, *args], cwd=ROOT, env=env, capture_output=True, text=True)


def _every_sink(out: Path) -> dict[str, list[tuple[str, int, float]]]:
    """(group, step, loss) of every report, as each sink holds them: metrics.jsonl, the CSV file, TensorBoard."""
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    jsonl = [(r["group"], r["step"], r["metrics"]["loss"]) for r in rows]
    with (out / "logs" / "metrics.csv").open(newline="") as handle:
        table = [
            ("validation", int(r["step"]), float(r["val/loss"]))
            if r.get("val/loss")
            else ("training", int(r["step"]), float(r["train/loss"]))
            for r in csv.DictReader(handle)
        ]
    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    board = [
        (group, event.step, event.value)
        for group, tag in (("training", "train/loss"), ("validation", "val/loss"))
        for event in events.Scalars(tag)
    ]
    return {"jsonl": jsonl, "csv": table, "tensorboard": board}


def test_a_crash_past_a_checkpoint_leaves_each_report_once_in_every_sink(tiny_model, tmp_path):
    """Killed after step 5's report (checkpoints at 2 and 4), resumed from step 4: metrics.jsonl, the CSV file
    and TensorBoard each hold every (group, step) once, with the straight run's values (they held steps 5
    and validation 4 twice)."""
    from contract import write_jsonl

    from dpo_lightning.builtin import preference_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(seed=5)["train"][:60])
    straight = _crash_and_resume_values(tiny_model, pairs, tmp_path / "straight")
    assert _entry([str(ROOT / "entrypoint.py")], straight).returncode == 0
    crashed = _crash_and_resume_values(tiny_model, pairs, tmp_path / "crashed")
    assert _entry([str(ROOT / "tests" / "crash.py"), "report:5"], crashed).returncode == -9
    before = _every_sink(tmp_path / "crashed")["jsonl"]
    assert ("training", 5) in {(g, s) for g, s, _ in before} and ("validation", 4) in {(g, s) for g, s, _ in before}
    assert _entry([str(ROOT / "entrypoint.py")], crashed).returncode == 0  # resumes from step 4

    expected = _every_sink(tmp_path / "straight")
    got = _every_sink(tmp_path / "crashed")
    for sink, reports in got.items():
        keys = [(group, step) for group, step, _ in reports]
        assert len(keys) == len(set(keys)), (sink, keys)
        assert sorted(keys) == sorted((g, s) for g, s, _ in expected[sink]), sink
        want = {(g, s): v for g, s, v in expected[sink]}
        for group, step, value in reports:
            assert value == pytest.approx(want[(group, step)], rel=1e-5), (sink, group, step)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_graceful_stop_between_reports_leaves_the_straight_runs_reports_in_every_sink(
    tiny_model, tmp_path, signal_name
):
    """Reports every 4 steps, stopped by a signal after step 6 (a preemption, or Ctrl-C) and resumed: every sink
    holds exactly the straight run's reports, with all their values (timings and memory aside). The stop used
    to report steps 5-6 as a report of its own at step 6, so step 8's then covered 7-8 alone."""
    from contract import write_jsonl

    from dpo_lightning.builtin import preference_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(seed=5)["train"][:60])
    common = dict(max_steps=10, report_every_n_steps=4, checkpoint_every_n_steps=0)
    straight = {**_crash_and_resume_values(tiny_model, pairs, tmp_path / "straight"), **common}
    stopped = {**_crash_and_resume_values(tiny_model, pairs, tmp_path / "stopped"), **common}
    assert _entry([str(ROOT / "entrypoint.py")], straight).returncode == 0
    assert _entry([str(ROOT / "tests" / "crash.py"), f"signal:6:{signal_name}"], stopped).returncode == 0
    assert not (tmp_path / "stopped" / "final").exists()  # it stopped, with a checkpoint
    assert _entry([str(ROOT / "entrypoint.py")], stopped).returncode == 0

    assert _every_sink(tmp_path / "stopped") == _every_sink(tmp_path / "straight")
    timings = {"samples_per_second", "tokens_per_second", "peak_memory_gb"}

    def reports(out: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["group"], r["step"], {k: v for k, v in r["metrics"].items() if k not in timings}) for r in rows]

    assert reports(tmp_path / "stopped") == reports(tmp_path / "straight")


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_the_report_window_open_at_a_checkpoint_survives_a_crash(tiny_model, tmp_path, mode):
    """Reports every 4 steps, checkpoints every 3, killed right after the step-6 checkpoint: the resumed run's
    step-8 report averages steps 5-8 as the straight run's does, not 7-8 alone (it did: the window's sums
    were not in the checkpoint)."""
    from contract import online_demo_values, stepwise_run_values, write_jsonl

    from dpo_lightning.builtin import preference_rows

    def values(out: Path) -> dict:
        common = dict(max_steps=8, checkpoint_every_n_steps=3, report_every_n_steps=4, val_check_interval=100)
        if mode == "online":
            run = online_demo_values(tiny_model, out, batch_size=4, max_new_tokens=8, **common)
            return {"config": "experiments/online-tiny.yaml", **run}
        pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(seed=5)["train"][:60])
        return {"config": "experiments/local-tiny.yaml", **stepwise_run_values(tiny_model, pairs, out, **common)}

    assert _entry([str(ROOT / "entrypoint.py")], values(tmp_path / "straight")).returncode == 0
    crashed = values(tmp_path / "crashed")
    assert _entry([str(ROOT / "tests" / "crash.py"), "checkpoint:6"], crashed).returncode == -9
    assert _entry([str(ROOT / "entrypoint.py")], crashed).returncode == 0

    def training(out: Path) -> dict[int, dict]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["metrics"] for r in rows if r["group"] == "training"}

    expected, got = training(tmp_path / "straight"), training(tmp_path / "crashed")
    assert sorted(got) == sorted(expected) == [4, 8]
    names = ["loss", "grad_norm", "rewards/margins", "logps/chosen", "logits/chosen"]
    names += ["objective/scores", "objective/kl"] if mode == "online" else []
    for name in names:
        assert got[8][name] == pytest.approx(expected[8][name], rel=1e-5, abs=1e-7), name


def test_a_judge_with_a_short_window_sees_the_completions_of_long_prompts(tiny_model, tmp_path):
    """Online DPO with a sequence-classification judge whose `reward_max_length` is shorter than a rendered
    prompt: the judge keeps each completion and cuts the prompt from the left, so the two samples of a prompt
    get their own scores (they got the same one, every pair a tie of weight 0), and the share of cut judge
    inputs is reported."""
    from contract import online_demo_values
    from transformers import AutoModelForSequenceClassification

    judge = tmp_path / "judge"
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(judge)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(judge)
    values = online_demo_values(
        tiny_model,
        tmp_path / "run",
        reward_model=str(judge),
        reward_max_length=12,  # shorter than any rendered prompt of the built-in set
        max_steps=2,
        batch_size=8,
        max_new_tokens=8,
        report_every_n_steps=1,
        val_check_interval=100,
    )
    done = _entry([str(ROOT / "entrypoint.py")], {"config": "experiments/online-tiny.yaml", **values})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    training = [r["metrics"] for r in rows if r["group"] == "training"]
    assert [m["objective/judge_cut_rate"] for m in training] == [1.0, 1.0]
    assert all(m["objective/tie_rate"] < 0.5 for m in training), [m["objective/tie_rate"] for m in training]


def test_raising_max_steps_on_resume_keeps_the_warmup_and_decays_over_the_new_total(tiny_model, tmp_path):
    """10 steps with warmup_ratio 0.2 (2 warmup steps, linear decay), then the same run to 20 steps: the
    resumed steps follow warmup 2 and decay to step 20, from step 11 on, and say so in one line (warmup was
    recomputed as 4 steps of the new total, restarting the rate at step 11)."""
    from contract import stepwise_run_values, write_jsonl

    from dpo_lightning.builtin import preference_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(seed=5)["train"][:80])
    values = stepwise_run_values(
        tiny_model, pairs, tmp_path / "run", max_steps=10, warmup_ratio=0.2, lr_scheduler="linear"
    )
    values = {"config": "experiments/local-tiny.yaml", **values, "val_check_interval": 100}
    assert _entry([str(ROOT / "entrypoint.py")], values).returncode == 0
    longer = _entry([str(ROOT / "entrypoint.py")], {**values, "max_steps": 20})
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "the run now ends at step 20 instead of 10" in longer.stderr + longer.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["metrics"]["learning_rate"] for r in rows if r["group"] == "training"}
    peak = float(values["learning_rate"])
    for step in range(1, 21):  # reported at step N: the rate after N optimizer steps (the next step's)
        done = step
        if step <= 10:  # the first launch, planned for 10 steps
            factor = done / 2 if done < 2 else 1 - (done - 2) / (10 - 2)
        else:
            factor = 1 - (done - 2) / (20 - 2)
        assert rates[step] == pytest.approx(peak * factor, rel=1e-6, abs=1e-12), step


def test_validation_follows_optimizer_steps_across_epochs_that_end_mid_accumulation(tiny_model, tmp_path):
    """Accumulation 2 over epochs of 3 batches (6 pairs of 2): each epoch's last batch is a step of its own, so
    optimizer steps drift from batch counts. Validation every 2 steps must come at steps 2, 4 and 6 (counted in
    batches it came at 5 and never at 4, while a run resumed from step 4 validated there)."""
    from contract import stepwise_run_values, write_jsonl

    from dpo_lightning.builtin import preference_rows
    from dpo_lightning.determined.bridge import run_local

    by_prompt = {row["prompt"]: row for row in preference_rows(seed=7)["train"]}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", list(by_prompt.values())[:8])
    values = stepwise_run_values(
        tiny_model, pairs, tmp_path / "run", batch_size=2, gradient_accumulation_steps=2, val_fraction=0.25
    )
    values.update(max_steps=6, val_check_interval=2, report_to="none")
    run_local(make_config(values))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["group"] == "validation"] == [2, 4, 6]
    assert [r["step"] for r in rows if r["group"] == "training"] == [1, 2, 3, 4, 5, 6]


def test_mode_auto_is_held_to_the_same_rules_as_the_mode_the_data_chose(tiny_model, tmp_path, monkeypatch):
    """A rule of a mode lives once (`config.mode_problem`): an explicit `mode: online` meets it with the rest of
    the configuration, `mode: auto` once the data has chosen online, before any model loads, in the same words."""
    from contract import tiny_run_values, write_jsonl

    from dpo_lightning.determined.bridge import run_local
    from dpo_lightning.errors import UserError

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("dpo_lightning.training.run.load_policy", no_loading)
    rows = [{"prompt": f"Tell me about the {thing}."} for thing in ("river", "garden", "castle", "market")]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    online = dict(reward_model="dpo_lightning.builtin:sentiment_reward", max_prompt_length=16, max_new_tokens=8)
    values = tiny_run_values(tiny_model, prompts, tmp_path / "out", precompute_ref_logps=True, **online)
    rule = "precompute_ref_logps works only for offline DPO: mode online has no fixed pairs"
    with pytest.raises(UserError) as explicit:
        make_config({**values, "mode": "online"})
    with pytest.raises(UserError) as chosen:
        run_local(make_config(values))
    assert str(explicit.value) == rule
    assert str(chosen.value).endswith(f"holds prompts, not preference pairs, so mode auto trains online: {rule}")
    assert "prompts.jsonl" in str(chosen.value) and "\n" not in str(chosen.value)
    assert not (tmp_path / "out").exists()

    # a reference-free loss trains offline only, whether online was asked for or chosen by the data
    free = {**values, "precompute_ref_logps": False, "loss_type": "simpo"}
    rule = "loss_type simpo is offline only here: online DPO's metrics measure the policy against a reference"
    with pytest.raises(UserError) as explicit:
        make_config({**free, "mode": "online"})
    with pytest.raises(UserError) as chosen:
        run_local(make_config(free))
    assert str(explicit.value) == rule
    assert str(chosen.value).endswith(f"so mode auto trains online: {rule}")
    assert not (tmp_path / "out").exists()
