"""The combination matrix: the options that change how a training step runs, covered pairwise (every pair of
two options' values in at least one run, `pairwise.py`), each run a few steps of one tiny model on one
small dataset.

Every run is either refused in one line before any model loads, with its reason, or it passes the same
invariants:
- step 1 (measured before its update, the policy still its reference) has the loss's closed form at zero
  log-ratio, ln 2 (+ rpo_alpha x nll_loss), and zero rewards;
- every metric of every report is finite, and each report is written once;
- the run left as a crash after its step-2 checkpoint leaves it, then resumed, reports what the straight
  run reported and ends with the same weights;
- final/ loads (with peft for LoRA) and is not the initial model;
- with generation metrics, the policy's sampled KL estimate from its reference is not 0 once it has moved.

Adding an option is one line in FACTORS (and a line in REFUSED for values that cannot go with another's).
The one-process runs share one Python process (matrix_driver.py); each run of two processes is a torchrun of
its own.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from contract import write_jsonl
from matrix_driver import OUTCOME, RESUMED, STRAIGHT
from pairwise import covering_rows, pairs_of, refusing_rules

from dpo_lightning.builtin import build_tiny_model, preference_rows
from dpo_lightning.config import make_config
from dpo_lightning.determined.bridge import run_local
from dpo_lightning.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SEPARATE = "<a copy of the model in another folder>"
FACTORS: dict[str, tuple] = {
    "mode": ("offline", "online"),
    "lora_r": (0, 4),
    "precompute_ref_logps": (False, True),
    "padding_free": (False, True),
    "prefix_sharing": (False, True),
    "logps_chunk_size": (0, 4),
    "gradient_checkpointing": (False, True),
    "generation_eval_every": (0, 1),
    "ranks": (1, 2),
    "rpo_alpha": (0.0, 0.5),
    "gradient_accumulation_steps": (1, 2),
    "ref_model_name": (None, SEPARATE),
    "strategy": ("ddp", "fsdp"),
    "sync_ref_model": (False, True),
    "sampler": ("hf", "vllm"),
}
# values that cannot go together, and the words of the one line that refuses them
REFUSED = (
    ({"mode": "online", "precompute_ref_logps": True}, "mode online has no fixed pairs"),
    ({"precompute_ref_logps": True, "generation_eval_every": 1}, "generation_eval_every samples the reference"),
    ({"mode": "offline", "sampler": "vllm"}, "sampler: vllm samples online DPO's completions"),
    ({"sync_ref_model": True, "lora_r": 4}, "with LoRA the policy is adapters on a frozen base"),
    ({"sync_ref_model": True, "precompute_ref_logps": True}, "its log-probs cannot be precomputed"),
)
# values that need a package a machine may lack: the other rows cover every other pair without them, and
# where the package is missing the rows holding them must be refused in one line that names it
RULES = [rule for rule, _ in REFUSED]
OPTIONAL = {("sampler", "vllm"): ("vllm", "sampler: vllm needs the vllm package")}
COMMON = dict(
    max_length=40,
    max_prompt_length=16,
    max_new_tokens=8,
    temperature=1.0,
    batch_size=2,
    learning_rate=5e-2,
    lr_scheduler="constant",
    warmup_ratio=0.0,
    max_steps=4,
    checkpoint_every_n_steps=2,
    val_check_interval=2,
    report_every_n_steps=1,
    val_fraction=0.3,  # of 26 prompts: 8 held out, 18 trained on
    reward_model="reward_scripts:text_hash",  # no ties: every metric is defined
    generation_eval_prompts=8,
    report_to="none",
    ref_model_sync_steps=1,  # with sync_ref_model: the reference moves at every step, a resume must restore it
)
CRASH_AFTER = 2
TIMING = ("samples_per_second", "tokens_per_second", "peak_memory_gb", "time/")
LN2 = math.log(2.0)


def _missing(name: str, value) -> str | None:
    """The words refusing `value` of `name` on this machine (its package missing), or None."""
    module, words = OPTIONAL.get((name, value), (None, None))
    return words if module is not None and importlib.util.find_spec(module) is None else None


def _plan() -> tuple[list[dict], list[dict]]:
    """(rows that run, rows refused by REFUSED): first covering every pair without the optional values, then
    the pairs holding them."""
    without = {name: tuple(v for v in values if (name, v) not in OPTIONAL) for name, values in FACTORS.items()}
    runs, refused = covering_rows(without, RULES)
    more_runs, more_refused = covering_rows(FACTORS, RULES, already=runs + refused)
    return runs + more_runs, refused + more_refused


RUNS, REFUSED_ROWS = _plan()


def label(row: dict) -> str:
    """The row's values that differ from each factor's first, as name=value."""
    changed = [f"{n}={'separate' if v == SEPARATE else v}" for n, v in row.items() if v != FACTORS[n][0]]
    return ",".join(changed) or "defaults"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """One tiny model (head size 32, which vLLM's CPU attention takes), its copy and one small dataset: 26 pairs
    of distinct prompts, so that online runs have as many prompts as offline runs have pairs. Its 18 training
    pairs make an epoch an odd number of batches on one process and on two (9 and 5 of 2): with accumulation,
    an epoch ends mid-step and the next epoch's steps are off by one batch."""
    root = tmp_path_factory.mktemp("matrix-inputs")
    model = build_tiny_model(root / "model", seed=0, num_heads=2)
    copy = shutil.copytree(model, root / "reference")
    by_prompt = {row["prompt"]: row for row in preference_rows(seed=7)["train"]}
    data = write_jsonl(root / "pairs.jsonl", list(by_prompt.values())[:26])
    return {"model": model, "reference": copy, "data": data}


def run_values(row: dict, inputs: dict[str, Path], output_dir: Path) -> dict:
    values = {name: value for name, value in row.items() if name != "ranks"}
    if values["ref_model_name"] == SEPARATE:
        values["ref_model_name"] = str(inputs["reference"])
    paths = dict(model_name=str(inputs["model"]), dataset_name=str(inputs["data"]), output_dir=str(output_dir))
    return {**COMMON, **paths, **values}


def _env() -> dict[str, str]:
    tests = str(ROOT / "tests")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tests}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _drive(launcher: list[str], plan: list[dict], plan_file: Path) -> str:
    """Run `plan` under `launcher`; what it printed last, for the rows it left without an outcome."""
    if not plan:
        return ""
    plan_file.write_text(json.dumps(plan))
    command = [*launcher, str(ROOT / "tests" / "matrix_driver.py"), str(plan_file)]
    try:
        done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as stopped:
        return f"timed out after {stopped.timeout} s"
    return f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def matrix(inputs, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every row that can run on this machine, run: the one-process rows in one process, the two-process rows
    in one torchrun. Returns each row's folder and what its launch printed last."""
    root = tmp_path_factory.mktemp("matrix")
    runnable = [row for row in RUNS if not any(_missing(n, v) for n, v in row.items())]
    folders = {label(row): root / f"row-{k}" for k, row in enumerate(runnable)}
    launchers = {1: [sys.executable], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone"]}
    launchers[2] += ["--nproc_per_node", "2"]
    shared: dict[int, list[dict]] = {1: []}
    printed: dict[str, str] = {}
    for row in runnable:
        entry = {"name": label(row), "values": run_values(row, inputs, folders[label(row)]), "crash_after": CRASH_AFTER}
        if row["ranks"] == 1 and row["sampler"] != "vllm":
            shared[1].append(entry)
            continue
        # Each of the row's two runs in a launch of its own, as a user's runs are: a second run in the same
        # process of a two-process launch finds Determined's fixed broadcast ports still held by the first run's
        # context, and a second vLLM engine in such a process hangs.
        plan = root / f"{folders[label(row)].name}.json"
        for phase in ("straight", "resumed"):
            printed[label(row)] = _drive(launchers[row["ranks"]], [{**entry, "phases": [phase]}], plan)
    for ranks, plan in shared.items():
        done = _drive(launchers[ranks], plan, root / f"{ranks}-processes.json")
        printed.update({entry["name"]: done for entry in plan})
    return {label(row): (folders[label(row)], printed[label(row)]) for row in runnable}


def _outcome(folder: Path, printed: str) -> dict:
    """The driver's outcome of one row; a failure names the error (each rank's, under torchrun)."""
    if (folder / OUTCOME).is_file():
        outcome = json.loads((folder / OUTCOME).read_text())
        assert "error" not in outcome, outcome["error"]
        return outcome
    errors = "\n".join(path.read_text()[-3000:] for path in sorted(folder.glob("error-rank-*.txt")))
    pytest.fail(f"no outcome for {folder.name}: {errors or printed}")


def test_the_matrix_covers_every_pair_of_values_in_few_runs():
    names = list(FACTORS)
    assert all(not refusing_rules(row, RULES) for row in RUNS)
    assert all(refusing_rules(row, RULES) for row in REFUSED_ROWS)
    held = set().union(*(pairs_of(row, names) for row in RUNS + REFUSED_ROWS))
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for x in FACTORS[a]:
                for y in FACTORS[b]:
                    assert ((a, x), (b, y)) in held, (a, x, b, y)
    assert 15 <= len(RUNS) + len(REFUSED_ROWS) <= 25
    assert len({label(row) for row in RUNS + REFUSED_ROWS}) == len(RUNS) + len(REFUSED_ROWS)


def _refusals(row: dict) -> list[str]:
    """The words any refusal of `row` may say: the rules it breaks, and the packages it lacks here."""
    words = [REFUSED[k][1] for k in refusing_rules(row, RULES)]
    return words + [w for w in (_missing(n, v) for n, v in row.items()) if w]


REFUSED_HERE = REFUSED_ROWS + [row for row in RUNS if _refusals(row)]


@pytest.mark.parametrize("row", REFUSED_HERE, ids=label)
def test_a_combination_that_cannot_run_is_refused_in_one_line_before_models_load(row, inputs, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("dpo_lightning.training.run.load_policy", no_loading)
    monkeypatch.setattr("dpo_lightning.training.run.load_reference", no_loading)
    output_dir = tmp_path / "out"
    with pytest.raises(UserError) as refused:
        run_local(make_config(run_values(row, inputs, output_dir)))
    message = str(refused.value)
    assert "\n" not in message
    assert any(words in message for words in _refusals(row)), message
    assert not output_dir.exists()


def _reports(output_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["group"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), f"a report written twice in {output_dir}"
    return {(r["group"], r["step"]): r["metrics"] for r in rows}


def _kept(name: str) -> bool:
    return not name.startswith(TIMING)


def _final_logits(folder: Path, lora: bool) -> torch.Tensor:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    model = (AutoPeftModelForCausalLM if lora else AutoModelForCausalLM).from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[3, 17, 41, 8, 99, 5, 60]])).logits


@pytest.mark.parametrize("row", [row for row in RUNS if not _refusals(row)], ids=label)
def test_a_combination_runs_resumes_exactly_and_exports(row, matrix, inputs):
    folder, printed = matrix[label(row)]
    outcome = _outcome(folder, printed)
    assert outcome["resumed_from"] == CRASH_AFTER  # the second run did resume, from the crash's checkpoint
    straight, resumed = _reports(folder / STRAIGHT), _reports(folder / RESUMED)

    first = straight[("training", 1)]  # before the first update: the policy is its reference
    assert first["loss"] == pytest.approx(LN2 + row["rpo_alpha"] * first.get("nll_loss", 0.0), abs=1e-5)
    assert ("nll_loss" in first) == (row["rpo_alpha"] > 0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[name]) < 1e-5, (name, first[name])

    assert {("training", s) for s in range(1, 5)} | {("validation", 2), ("validation", 4)} == set(straight)
    for key, metrics in straight.items():
        assert all(math.isfinite(v) for v in metrics.values()), (key, metrics)
    assert set(resumed) == set(straight)
    for key, metrics in straight.items():
        assert set(resumed[key]) == set(metrics), key
        for name in filter(_kept, metrics):
            assert resumed[key][name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-6), (key, name)

    lora = row["lora_r"] > 0
    expected = _final_logits(folder / STRAIGHT / "final", lora)
    torch.testing.assert_close(_final_logits(folder / RESUMED / "final", lora), expected, rtol=1e-5, atol=1e-5)
    initial = _final_logits(inputs["model"], lora=False)
    assert (expected - initial).abs().max() > 1e-3  # the policy moved

    if row["generation_eval_every"]:
        # a sampled estimate (the mean log-ratio of the policy's own samples), negative at times on 8 prompts;
        # what must never be is exactly 0, generation metrics measuring the reference against itself
        assert abs(straight[("validation", 4)]["generation/kl"]) > 1e-4
