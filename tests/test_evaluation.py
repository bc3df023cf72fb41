"""evaluate.py and what it measures (CPU, offline): the Wilson interval and the win rate, DPO's preference metrics
against an independent computation, a policy equal to its reference, the win rate of a policy trained toward a
scripted reward, the CLI end to end, path resolution and one-line errors that come before any model loads."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from contract import PREFERENCE_METRICS, write_jsonl

from dpo_lightning.builtin import preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.data.collate import PairCollator
from dpo_lightning.data.tokenize import tokenize_pair
from dpo_lightning.dpo.objective import LossSettings
from dpo_lightning.dpo.reference import FrozenReference
from dpo_lightning.errors import UserError
from dpo_lightning.evaluation.pairs import evaluate_pairs
from dpo_lightning.evaluation.report import summary_table
from dpo_lightning.evaluation.run import EvalOptions, evaluate, evaluation_rows, resolve_model_path, run_settings
from dpo_lightning.online.comparison import wilson_interval, win_rate

ROOT = Path(__file__).resolve().parents[1]
REWARD = "dpo_lightning.builtin:sentiment_reward"
LN2 = math.log(2.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BAD_REWARD_MODULE = "eval_test_wrong_count_reward"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli_module():
    """evaluate.py loaded under its own name (a top-level `evaluate` could be Hugging Face's package)."""
    spec = importlib.util.spec_from_file_location("evaluate_cli_under_test", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(online_demo) -> Path:
    """The tiny policy trained online toward `sentiment_reward` (the session's shortened online demo)."""
    assert (online_demo / "final" / "config.json").is_file() and (online_demo / "run_config.json").is_file()
    return online_demo


# ----------------------------------------------------------------------------- Wilson interval and win rate


def _wilson_by_hand(k: int, n: int, z: float) -> tuple[float, float]:
    """(k + z^2/2 -/+ z sqrt(k (n - k) / n + z^2 / 4)) / (n + z^2): the textbook form multiplied through by n."""
    root = z * math.sqrt(k * (n - k) / n + z * z / 4)
    return (k + z * z / 2 - root) / (n + z * z), (k + z * z / 2 + root) / (n + z * z)


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10, z=1.96)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=5e-5)  # the published 8/10 interval
    assert (low, high) == pytest.approx(_wilson_by_hand(8, 10, 1.96), rel=1e-12)

    z = statistics.NormalDist().inv_cdf(0.975)  # the default is the 95% interval
    for k, n in [(8, 10), (3, 7), (1, 40), (25, 26)]:
        assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n, z), rel=1e-12), (k, n)

    low, high = wilson_interval(0, 10, z=1.96)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(1.96**2 / (10 + 1.96**2), rel=1e-12)
    low, high = wilson_interval(10, 10, z=1.96)
    assert high == pytest.approx(1.0, abs=1e-12) and low == pytest.approx(10 / (10 + 1.96**2), rel=1e-12)
    assert all(0.0 <= v <= 1.0 for k in range(11) for v in wilson_interval(k, 10))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_win_rate_counts_and_leaves_ties_out_of_the_rate():
    policy = torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, -1.0, 0.5])
    reference = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, -1.0, 0.25])
    result = win_rate(policy, reference)
    assert (result.wins, result.losses, result.ties) == (3, 1, 3)
    assert result.rate == pytest.approx(3 / 4)
    z = statistics.NormalDist().inv_cdf(0.975)
    assert (result.low, result.high) == pytest.approx(_wilson_by_hand(3, 4, z), rel=1e-12)

    tied = win_rate(torch.ones(4), torch.ones(4))
    assert (tied.wins, tied.losses, tied.ties) == (0, 0, 4)
    assert math.isnan(tied.rate) and math.isnan(tied.low) and math.isnan(tied.high)


# ----------------------------------------------------------------------------- preference metrics


def _completion_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> tuple[float, float]:
    """(summed log-prob of the completion, summed vocabulary-mean logit at the positions that predict it), from
    one unpadded forward pass: the logits at position t score the token at t + 1."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    n = len(completion_ids)
    predicting = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + n]  # (n, V)
    logps = F.log_softmax(predicting, dim=-1).gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1)
    return float(logps.sum()), float(predicting.mean(dim=-1).sum())


def test_preference_metrics_equal_an_independent_computation(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    rows = preference_rows(seed=0)["test"][::12][:6]  # six pairs, six different things
    items = [
        tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], max_prompt_length=None, max_length=None)
        for r in rows
    ]
    assert all(item is not None for item in items)
    beta = 0.5

    pc, pr, rc, rr, logits_c, logits_r, tokens_c, tokens_r = ([] for _ in range(8))
    for item in items:
        prompt, chosen, rejected = item["prompt_ids"], item["chosen_ids"], item["rejected_ids"]
        assert prompt and chosen[-1] == rejected[-1] == tokenizer.eos_token_id  # EOS appended and scored
        for out, logit_sums, tokens, completion in (
            (pc, logits_c, tokens_c, chosen),
            (pr, logits_r, tokens_r, rejected),
        ):
            logp, logit_sum = _completion_logps(policy, prompt, completion)
            out.append(logp)
            logit_sums.append(logit_sum)
            tokens.append(len(completion))
        rc.append(_completion_logps(reference, prompt, chosen)[0])
        rr.append(_completion_logps(reference, prompt, rejected)[0])
    pc, pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr))
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    margins = chosen_rewards - rejected_rewards
    expected = {
        "loss": float((-F.logsigmoid(margins)).mean()),
        "rewards/accuracies": float((margins > 0).double().mean()),
        "rewards/margins": float(margins.mean()),
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "logps/chosen": float(pc.mean()),
        "logps/rejected": float(pr.mean()),
        "logits/chosen": sum(logits_c) / sum(tokens_c),  # token-weighted, as TRL defines them
        "logits/rejected": sum(logits_r) / sum(tokens_r),
    }
    assert 0 < expected["rewards/accuracies"] < 1, "the perturbation should leave a mixed accuracy"

    collate = PairCollator(tokenizer.pad_token_id)
    batches = [collate(items[:4]), collate(items[4:])]  # two batches of different widths, padded
    result = evaluate_pairs(policy, FrozenReference(reference), batches, settings=LossSettings(beta=beta))
    assert set(result.metrics) == {"loss", *PREFERENCE_METRICS}
    # the code sums log-probs in fp32: a reward or margin, a difference of sums near -100, is good to about
    # beta * 1e-6 * |logp| absolute (a masking or shift mistake is off by whole units)
    near_zero = beta * 1e-6 * float(torch.cat([pc, pr, rc, rr]).abs().max())
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, rel=1e-5, abs=near_zero), name
    assert result.margins == pytest.approx(margins.tolist(), rel=1e-5, abs=near_zero)


def _pair_options(model: Path, **changes) -> EvalOptions:
    return EvalOptions(model_path=str(model), dataset_name="builtin:sentiment-pairs", num_pairs=16, **changes)


@pytest.mark.parametrize("reference", ["same-folder", "none"])
def test_a_policy_equal_to_its_reference_has_loss_ln2_and_accuracy_0(tiny_model, reference):
    changes = {"ref_model_path": str(tiny_model)} if reference == "same-folder" else {}
    report = evaluate(_pair_options(tiny_model, **changes))
    preference = report["preference"]
    assert preference["num_pairs"] == 16 and report["generation"] is None
    metrics = preference["metrics"]
    assert metrics["rewards/accuracies"] == 0.0
    assert metrics["loss"] == pytest.approx(LN2, abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert preference["margins"] == pytest.approx([0.0] * 16, abs=1e-6)
    if reference == "none":
        assert report["models"]["reference"].endswith("(the policy itself)")
    else:
        assert report["models"]["reference"] == str(tiny_model)


# ----------------------------------------------------------------------------- win rate


def test_describe_prompts_train_split_has_enough_distinct_prompts(tiny_model):
    """Why the win-rate test evaluates split `train`: the held-out test split has only 8 distinct prompts."""
    base = {"model_name": str(tiny_model), "dataset_name": "builtin:describe-prompts", "seed": 42}
    options = EvalOptions(model_path=str(tiny_model), split="train")
    pairs, prompts, _ = evaluation_rows(make_config({**base, "train_split": "train", "eval_split": None}), options)
    assert pairs is None and len({p["prompt"] for p in prompts}) >= 30 and len(prompts) >= 40
    _, held_out, _ = evaluation_rows(make_config(base), EvalOptions(model_path=str(tiny_model)))
    assert len({p["prompt"] for p in held_out}) == 8


def _win_rate_options(model: Path, **changes) -> EvalOptions:
    values = dict(reward_model=REWARD, dataset_name="builtin:describe-prompts", split="train", num_prompts=40)
    values.update(max_new_tokens=16, temperature=1.0)
    return EvalOptions(model_path=str(model), **{**values, **changes})


def _check_counts(generation: dict) -> dict:
    metrics = generation["metrics"]
    assert generation["num_prompts"] == 40
    assert metrics["wins"] + metrics["losses"] + metrics["ties"] == 40
    assert len(generation["policy_scores"]) == len(generation["reference_scores"]) == 40
    wins = sum(p > r for p, r in zip(generation["policy_scores"], generation["reference_scores"], strict=True))
    ties = sum(p == r for p, r in zip(generation["policy_scores"], generation["reference_scores"], strict=True))
    assert (metrics["wins"], metrics["ties"]) == (wins, ties)
    return metrics


def test_a_policy_trained_toward_the_reward_wins_against_its_reference(trained, tiny_model):
    report = evaluate(_win_rate_options(trained))
    assert report["models"]["policy"] == str(trained / "final")
    assert report["models"]["reference"] == str(tiny_model)  # the run's model_name
    metrics = _check_counts(report["generation"])
    assert metrics["win_rate/low"] > 0.5, metrics
    assert metrics["policy/score"] > metrics["reference/score"]
    assert metrics["kl"] > 0


def test_a_policy_identical_to_its_reference_has_an_interval_around_one_half(tiny_model):
    report = evaluate(_win_rate_options(tiny_model, ref_model_path=str(tiny_model), seed=0))
    metrics = _check_counts(report["generation"])
    decided = metrics["wins"] + metrics["losses"]
    assert metrics["ties"] > 0 and decided > 0
    assert metrics["win_rate"] == pytest.approx(metrics["wins"] / decided)  # ties left out
    z = statistics.NormalDist().inv_cdf(0.975)
    interval = _wilson_by_hand(metrics["wins"], decided, z)
    assert (metrics["win_rate/low"], metrics["win_rate/high"]) == pytest.approx(interval, rel=1e-9)
    assert metrics["win_rate/low"] < 0.5 < metrics["win_rate/high"], metrics
    assert abs(metrics["kl"]) < 1e-4


# ----------------------------------------------------------------------------- evaluate.py end to end


def _table_rows(stdout: str) -> list[tuple[str, str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"metric\s+value", line))
    assert re.fullmatch(r"-+  -+", lines[start + 1])
    rows = []
    for line in lines[start + 2 :]:
        match = re.fullmatch(r"(\S.*?)\s{2,}(\S.*)", line)
        if match is None:
            break
        rows.append((match.group(1), match.group(2)))
    return rows


def _same_number(printed: str, value) -> bool:
    if printed == "n/a":
        return value is None
    if value is None:
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        return printed == str(value)
    return float(printed) == pytest.approx(value, rel=5e-4, abs=1e-12)


def test_evaluate_cli_end_to_end(trained, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "evaluate.py", "--model_path", str(trained), "--reward_model", REWARD]
    command += ["--dataset_name", "builtin:sentiment-pairs", "--output_dir", str(out)]
    command += ["--num_prompts", "8", "--max_new_tokens", "8"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "\r" not in done.stdout + done.stderr  # no progress-bar redraws where the output is not a terminal
    for name in ("report.json", "report.md", "margins.png", "win_rate.png", "scores.png"):
        assert (out / name).is_file(), name
    for name in ("margins.png", "win_rate.png", "scores.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
        assert re.search(rf"!\[[^\]]*\]\({re.escape(name)}\)", (out / "report.md").read_text()), name

    report = json.loads((out / "report.json").read_text())
    preference, generation = report["preference"], report["generation"]
    assert generation["num_prompts"] == 8 and preference["num_pairs"] > 0
    assert report["config"]["max_new_tokens"] == 8 and report["config"]["beta"] == 0.1

    rows = _table_rows(done.stdout)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names))
    assert names[:4] == ["split", "split rows", "pairs", "beta"] and "prompts" in names
    # what was measured: the source's test split, held out from training
    assert dict(rows)["split"] == "builtin:sentiment-pairs[test]" and report["data"]["training_rows"] is False
    assert dict(rows)["split rows"] == str(report["data"]["rows"]) and report["data"]["rows"] >= preference["num_pairs"]
    section = preference
    for name, printed in rows[2:]:
        if name == "prompts":
            section = generation
        if name in ("pairs", "prompts"):
            assert printed == str(section["num_pairs" if name == "pairs" else "num_prompts"])
        elif name == "beta":
            assert _same_number(printed, preference["beta"])
        elif name == "win_rate 95% CI":
            low, high = re.fullmatch(r"\[(\S+), (\S+)\]", printed).groups()
            assert _same_number(low, section["metrics"]["win_rate/low"]), printed
            assert _same_number(high, section["metrics"]["win_rate/high"]), printed
        elif name == "wins/losses/ties":
            assert printed == "/".join(str(section["metrics"][k]) for k in ("wins", "losses", "ties"))
        else:
            assert _same_number(printed, section["metrics"][name]), (name, printed, section["metrics"][name])
    # every number in report.json's metrics was printed
    combined = {"win_rate/low", "win_rate/high", "wins", "losses", "ties"}
    assert set(preference["metrics"]) <= set(names)
    assert set(generation["metrics"]) - combined <= set(names)
    # split, split rows, pairs, beta, the preference metrics, prompts, the generation metrics with five in two rows
    assert len(rows) == 4 + len(preference["metrics"]) + 1 + len(generation["metrics"]) - len(combined) + 2


# ----------------------------------------------------------------------------- path resolution and settings


def test_a_training_output_folder_resolves_to_final_and_its_record(trained):
    resolved = resolve_model_path(str(trained))
    assert resolved.folder == trained / "final"
    assert resolved.record == json.loads((trained / "run_config.json").read_text())
    assert resolved.record["config"]["beta"] == 0.1


def test_a_checkpoint_folder_resolves_to_itself(trained, tmp_path):
    (checkpoint,) = [p for p in (trained / "checkpoints").iterdir() if p.is_dir()]
    assert (checkpoint / "config.json").is_file() and (checkpoint / "run_config.json").is_file()
    resolved = resolve_model_path(str(checkpoint))
    assert resolved.folder == checkpoint
    assert resolved.record == json.loads((checkpoint / "run_config.json").read_text())
    # a training output folder with checkpoints and no final/: its newest complete checkpoint
    partial = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", partial / "checkpoints")
    shutil.copy(trained / "run_config.json", partial / "run_config.json")
    resolved = resolve_model_path(str(partial))
    assert resolved.folder == partial / "checkpoints" / checkpoint.name
    assert resolved.record is not None and resolved.record["config"]["max_steps"] == 60


def test_a_plain_model_folder_has_no_record(tiny_model):
    resolved = resolve_model_path(str(tiny_model))
    assert resolved.folder == tiny_model and resolved.record is None


def test_run_settings_take_the_record_and_options_override_it(trained, tiny_model):
    record = {"config": {"beta": 0.3, "model_name": "base-model", "ref_model_name": None, "max_new_tokens": 7}}
    record["config"].update(dataset_name="data.jsonl", temperature=0.5, top_p=0.8, loss_type="ipo")
    settings = run_settings(EvalOptions(model_path="x"), record)
    assert settings["beta"] == 0.3 and settings["reference"] == "base-model"
    assert (settings["max_new_tokens"], settings["temperature"], settings["top_p"]) == (7, 0.5, 0.8)
    assert settings["dataset_name"] == "data.jsonl" and settings["loss_type"] == "ipo"
    with_sft = {"config": {**record["config"], "ref_model_name": "sft"}}
    assert run_settings(EvalOptions(model_path="x"), with_sft)["reference"] == "sft"  # ref_model_name first

    options = EvalOptions(model_path="x", beta=0.7, ref_model_path="other", max_new_tokens=3, temperature=1.5)
    settings = run_settings(options, record)
    assert settings["beta"] == 0.7 and settings["reference"] == "other"
    assert (settings["max_new_tokens"], settings["temperature"], settings["top_p"]) == (3, 1.5, 0.8)

    defaults = run_settings(EvalOptions(model_path="x"), None)
    assert defaults["beta"] == 0.1 and defaults["reference"] is None and defaults["dataset_name"] is None
    assert (defaults["max_new_tokens"], defaults["temperature"], defaults["top_p"]) == (128, 0.9, 1.0)
    assert defaults["num_prompts"] == 0
    assert run_settings(EvalOptions(model_path="x", reward_model=REWARD), None)["num_prompts"] == 64

    # the trained run's own record
    settings = run_settings(EvalOptions(model_path=str(trained)), resolve_model_path(str(trained)).record)
    assert settings["reference"] == str(tiny_model) and settings["max_new_tokens"] == 16
    assert settings["dataset_name"] == "builtin:describe-prompts"


# ----------------------------------------------------------------------------- one-line errors, before any model


ERROR_CASES = {
    "missing-path": "model folder not found",
    "empty-folder": "is not a model folder",
    "dataset-columns": "no preference pairs or prompts in columns note",
    "reward-wrong-count": "returned 2 scores for 1 completions",
    "reward-causal-lm": "not a sequence-classification reward model",
    "prompts-without-reward": "need a judge; pass --reward_model",
    "nothing-to-evaluate": "nothing to evaluate",
}


@pytest.fixture(scope="module")
def error_material(tiny_model, tmp_path_factory) -> dict:
    """For each error case: (argv without --output_dir, folder for the bad reward module)."""
    folder = tmp_path_factory.mktemp("error-cases")
    (folder / "empty").mkdir()
    write_jsonl(folder / "unrelated.jsonl", [{"note": f"row {i}"} for i in range(6)])
    (folder / f"{BAD_REWARD_MODULE}.py").write_text(
        "def score(prompts, completions):\n    return [0.0] * (len(completions) + 1)\n"
    )
    model, pairs = ["--model_path", str(tiny_model)], ["--dataset_name", "builtin:sentiment-pairs"]
    argv = {
        "missing-path": ["--model_path", str(folder / "no-such-model"), *pairs],
        "empty-folder": ["--model_path", str(folder / "empty"), *pairs],
        "dataset-columns": [*model, "--dataset_name", str(folder / "unrelated.jsonl")],
        "reward-wrong-count": [*model, *pairs, "--reward_model", f"{BAD_REWARD_MODULE}:score"],
        "reward-causal-lm": [*model, *pairs, "--reward_model", str(tiny_model)],
        "prompts-without-reward": [*model, *pairs, "--num_prompts", "4"],
        "nothing-to-evaluate": [*model, "--dataset_name", "builtin:describe-prompts"],
    }
    assert set(argv) == set(ERROR_CASES)
    return {"argv": argv, "folder": folder}


@pytest.fixture(scope="module")
def cli_errors(error_material) -> dict:
    """Every error case through `python evaluate.py`, all processes started at once."""
    folder = error_material["folder"]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)])}
    running = {}
    for case, argv in error_material["argv"].items():
        out = folder / f"out-{case}"
        command = [sys.executable, "evaluate.py", *argv, "--output_dir", str(out)]
        running[case] = (
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            out,
        )
    results = {}
    for case, (process, out) in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[case] = {"rc": process.returncode, "stdout": stdout, "stderr": stderr, "out": out}
    return results


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line_before_any_model_loads(case, error_material, monkeypatch, tmp_path):
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained ran before the error")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.syspath_prepend(str(error_material["folder"]))
    cli = _cli_module()
    with pytest.raises(UserError) as caught:
        evaluate(cli.parse_args([*error_material["argv"][case], "--output_dir", str(tmp_path / "out")]))
    message = str(caught.value)
    assert ERROR_CASES[case] in message and "\n" not in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors_are_one_stderr_line_and_exit_2(case, cli_errors):
    result = cli_errors[case]
    assert result["rc"] == 2, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"] and "Loading weights" not in result["stderr"]
    lines = [line for line in result["stderr"].splitlines() if line.strip() and not line[:2].isdigit()]  # no logs
    assert len(lines) == 1 and lines[0].startswith("error: "), result["stderr"]
    assert ERROR_CASES[case] in lines[0]
    assert result["stdout"] == "" and not result["out"].exists()


def test_a_run_trained_with_generation_metrics_is_evaluated_with_the_given_reward_model(tmp_path):
    from dpo_lightning.evaluation.run import _data_config

    record = {"config": {"reward_model": REWARD, "generation_eval_every": 2, "sampler": "vllm", "mode": "online"}}
    record["config"].update(dataset_name="builtin:sentiment-pairs", max_prompt_length=16, max_length=48)
    options = EvalOptions(model_path=str(tmp_path), reward_model=REWARD)
    cfg = _data_config(options, run_settings(options, record), record)
    assert cfg.dataset_name == "builtin:sentiment-pairs" and cfg.max_prompt_length == 16


def test_too_few_pairs_or_prompts_are_said_in_the_table():
    from dpo_lightning.evaluation.report import summary_table

    report = {"preference": {"num_pairs": 1, "beta": 0.1, "metrics": {"loss": 0.5}}}
    table = summary_table(report)
    assert "note: only 1 pairs measured" in table and "32 or more" in table
    report["preference"]["num_pairs"] = 32
    report["generation"] = {"num_prompts": 8, "metrics": {}}
    table = summary_table(report)
    assert "pairs measured" not in table and "note: only 8 prompts measured" in table


# ----------------------------------------------------------------------------- what is measured, and on what


def _run_folder(trained, tmp_path, **config) -> Path:
    """A copy of the trained run whose record says it trained with `config` (columns, data, val_fraction)."""
    folder = tmp_path / "run"
    shutil.copytree(trained / "final", folder / "final")
    record = json.loads((trained / "run_config.json").read_text())
    record["config"].update(config)
    (folder / "run_config.json").write_text(json.dumps(record))
    return folder


def test_columns_of_the_training_file_give_way_to_columns_for_the_evaluated_file(trained, tmp_path):
    """A run trained on a CSV with `columns` evaluated on a plain prompt/chosen/rejected file: the run's columns
    do not fit it (one line naming --columns); `--columns '{}'` reads it by its own names."""
    rows = [
        {"prompt": f"Describe item {i}.", "chosen": " A lovely item.", "rejected": " A grim item."} for i in range(6)
    ]
    data = write_jsonl(tmp_path / "plain.jsonl", rows)
    run = _run_folder(trained, tmp_path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    base = dict(model_path=str(run), dataset_name=str(data), output_dir=str(tmp_path / "out"), split="train")
    with pytest.raises(UserError, match="--columns"):
        evaluate(EvalOptions(**base))
    report = evaluate(EvalOptions(**base, columns="{}"))
    assert report["preference"]["num_pairs"] == 6 and report["data"]["split"] == "train"
    with pytest.raises(UserError, match=r"^--columns has unknown role 'answer'"):
        evaluate(EvalOptions(**base, columns='{"answer": "x"}'))


def test_a_run_that_held_nothing_out_is_evaluated_on_its_training_pairs_with_a_warning(trained, tmp_path, caplog):
    rows = [
        {"prompt": f"Describe item {i}.", "chosen": " A lovely item.", "rejected": " A grim item."} for i in range(6)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    run = _run_folder(trained, tmp_path, dataset_name=str(data), val_fraction=0.0, columns={})
    with caplog.at_level(logging.WARNING):
        report = evaluate(EvalOptions(model_path=str(run), output_dir=str(tmp_path / "out")))
    assert report["data"] == {
        "dataset": str(data), "split": "train", "rows": 6, "pairs_scored": 6, "prompts_sampled": 0,
        "training_rows": True,
    }  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert len(warnings) == 1 and "pass --split or --dataset_name" in warnings[0]
    assert "split  " in summary_table(report) and "(trained on)" in summary_table(report)


def test_a_missing_split_names_evaluate_s_own_option(trained, tmp_path):
    with pytest.raises(UserError, match=r"split 'validation' not found; available splits: test, train; set --split"):
        evaluate(EvalOptions(model_path=str(trained), dataset_name="builtin:sentiment-pairs", split="validation"))
