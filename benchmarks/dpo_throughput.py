"""DPO training throughput and memory, this project against TRL's DPOTrainer on the same model and pairs.

    pip install -r benchmarks/requirements.txt
    python benchmarks/dpo_throughput.py --preset cpu-small [--runs ours-equal,trl,ours-fast] [--repeats 1]
    python benchmarks/dpo_throughput.py --preset cpu-qwen0.5b   # TRL, ours, ours with sharing, both fast paths
    python benchmarks/dpo_throughput.py --preset cpu-qwen0.5b-long

`cpu-qwen0.5b` and `cpu-qwen0.5b-long` are Qwen2.5-0.5B-Instruct's exact shape (hidden 896, 24 layers, 14 heads,
2 key-value heads, intermediate 4864, vocabulary 151,936, tied embeddings; random weights, fp32): 12-21 GB and
tens of seconds a step on a small CPU, so run one at a time.

Offline: it builds its own assets (a Qwen2-shaped random model with Qwen2.5's vocabulary size, a byte-level BPE
tokenizer, synthetic preference pairs) once in `--workdir`, then trains each run in a fresh process of its own
(so that peak memory is the run's), alternating the systems run by run, since this machine's speed drifts. Each
run prints one JSON line: samples/s, non-padding tokens/s, the median step time (warm-up steps excluded),
peak memory (RSS on CPU, max allocated on GPU) and the first step's loss and rewards (the policy equals its
reference there, so every system must report ln 2 and 0). A last line gives each run's ratios to TRL's.

Runs: `trl` (DPOTrainer at the preset's precision, a separate live reference, gradient checkpointing on as TRL 1.16
ships it), `trl-equal` (the same with gradient checkpointing off, this project's default; the ratios are to it when
it ran), `ours-equal` (the same settings in this project: its defaults, a live reference, padded batches),
`ours-shared` (`ours-equal` with `prefix_sharing`, each pair's prompt computed once), `ours-fast` (precomputed
reference log-probs, padding-free batches, chunked log-probs, at the preset's precision), `ours-fast-shared` (the
same with prefix sharing) and `ours-fast-bf16` (the same in bf16-mixed, the reference in bf16). `ours-plain` is
`ours-equal` with the full-logits log-prob path (`logps_chunk_size: 0`). `ours-lora` is `ours-equal` training
rank-16 LoRA adapters on every linear layer against the adapter-disabled reference (no second model); `ours-qlora`
the same on a 4-bit base (CUDA). `ours-simpo` is `ours-equal` with the reference-free SimPO loss (no reference
loaded; its first loss is not ln 2).
`DPO_LIGHTNING_MALLOC=off` in the environment leaves glibc's allocator defaults in this project's runs (the
entrypoint tunes them otherwise, see dpo_lightning/memory.py). `setup_seconds` is the time before the first
step: model loading and, for the fast runs, the reference pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the a river garden morning window teacher letter bridge forest kitchen village song market harbor castle "
    "meadow library candle bakery orchard lantern painting valley mountain island school festival station "
    "warm bright kind gentle lovely calm cheerful friendly sunny sweet golden peaceful cold dark cruel harsh "
    "is was and but with under over near far quickly slowly because although every some many few old new "
    "describe explain tell write show why how what when where which people time year day way thing man world"
).split()


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    pairs: int
    prompt_words: tuple[int, int]
    completion_words: tuple[int, int]
    batch_size: int
    max_length: int
    precision: str  # "32" or "bf16-mixed"
    steps: int
    warmup: int  # steps left out of the median


PRESETS = {
    "cpu-small": Preset(256, 4, 8, 2, 1024, 151_936, 2000, (20, 60), (10, 60), 4, 512, "32", 8, 2),
    "cpu-long": Preset(256, 4, 8, 2, 1024, 151_936, 200, (200, 400), (100, 300), 2, 1024, "32", 6, 2),
    # most parameters in the decoder layers (as in 7B models), not the embedding: where FSDP's sharding shows
    "cpu-layers": Preset(512, 16, 8, 2, 2048, 32_000, 400, (20, 60), (10, 60), 2, 256, "32", 6, 2),
    "smoke": Preset(64, 2, 4, 2, 128, 4096, 64, (5, 10), (3, 8), 2, 64, "32", 3, 1),  # does the script run?
    "gpu-qwen0.5b": Preset(896, 24, 14, 2, 4864, 151_936, 4000, (20, 200), (20, 200), 8, 1024, "bf16-mixed", 30, 5),
    # Qwen2.5-0.5B-Instruct's exact shape (random weights, fp32): HH-like pairs, and long (TL;DR-like) prompts
    "cpu-qwen0.5b": Preset(896, 24, 14, 2, 4864, 151_936, 12, (40, 120), (20, 80), 2, 1024, "32", 5, 2),
    "cpu-qwen0.5b-long": Preset(896, 24, 14, 2, 4864, 151_936, 12, (200, 400), (20, 60), 2, 1024, "32", 5, 2),
}
RUNS = (
    "ours-equal",
    "ours-shared",
    "trl",
    "trl-equal",
    "ours-fast",
    "ours-fast-shared",
    "ours-fast-bf16",
    "ours-plain",
    "ours-lora",
    "ours-qlora",
    "ours-simpo",
)
# what `--runs` means when not given: at the default model's shape, TRL beside ours with and without sharing
DEFAULT_RUNS = "ours-equal,trl,ours-fast"
QWEN_RUNS = "trl-equal,ours-equal,ours-shared,ours-fast,ours-fast-shared"
PRESET_RUNS = {"cpu-qwen0.5b": QWEN_RUNS, "cpu-qwen0.5b-long": QWEN_RUNS, "gpu-qwen0.5b": "trl," + QWEN_RUNS}
GPU_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU, for MFU


# ----------------------------------------------------------------------------- assets


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def build_assets(preset: Preset, workdir: Path) -> tuple[Path, Path]:
    """(model folder, pairs.jsonl), built once per preset and reused."""
    model_dir, pairs = workdir / "model", workdir / "pairs.jsonl"
    if (model_dir / "config.json").is_file() and pairs.is_file():
        return model_dir, pairs
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpo_lightning.builtin import train_tokenizer

    rng = random.Random(0)
    rows = [
        {
            "prompt": _sentence(rng, *preset.prompt_words) + "\n",
            "chosen": " " + _sentence(rng, *preset.completion_words),
            "rejected": " " + _sentence(rng, *preset.completion_words),
        }
        for _ in range(preset.pairs)
    ]
    tokenizer = train_tokenizer([r[k] for r in rows[:500] for k in ("prompt", "chosen", "rejected")], 4096)
    config = Qwen2Config(
        vocab_size=preset.vocab,
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=max(2048, preset.max_length),
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    workdir.mkdir(parents=True, exist_ok=True)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, pairs


def mean_tokens_per_pair(model_dir: Path, pairs: Path, max_length: int) -> float:
    """Non-padding tokens per pair (prompt + chosen, prompt + rejected) as both systems tokenize them."""
    from transformers import AutoTokenizer

    from dpo_lightning.data.tokenize import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    total = 0
    for row in rows:
        item = tokenize_pair(
            tokenizer, row["prompt"], row["chosen"], row["rejected"], max_prompt_length=None, max_length=max_length
        )
        total += 2 * len(item["prompt_ids"]) + len(item["chosen_ids"]) + len(item["rejected_ids"])
    return total / len(rows)


# ----------------------------------------------------------------------------- measuring one run


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class BenchSession:
    """A training session that writes nothing: reports go to `sinks`, the clock rides in `callbacks`."""

    write_files = False
    on_cluster = False

    def __init__(self, sinks: list, callbacks: list) -> None:
        self.sinks, self.callbacks = sinks, callbacks
        self.record: dict = {}  # the run record a real session writes into each checkpoint

    def finish(self, trainer, module):
        return None


class StepClock:
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def start(self) -> None:
        _sync()
        self._start = time.perf_counter()

    def stop(self) -> None:
        _sync()
        self.seconds.append(time.perf_counter() - self._start)


def run_ours(
    preset: Preset, model_dir: Path, pairs: Path, workdir: Path, variant: str, overrides: dict, callbacks=()
) -> dict:
    import lightning as L

    from dpo_lightning.config import make_config
    from dpo_lightning.training.run import train

    fast, bf16 = variant.startswith("ours-fast"), variant == "ours-fast-bf16" or preset.precision == "bf16-mixed"
    values = dict(
        model_name=str(model_dir),
        dataset_name=str(pairs),
        batch_size=preset.batch_size,
        max_length=preset.max_length,
        max_prompt_length=preset.max_length // 2,
        learning_rate=1e-6,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_steps=preset.steps,
        val_fraction=0.0,
        report_every_n_steps=1,
        precision="bf16-mixed" if bf16 else "32",
        dtype="bfloat16" if bf16 else "float32",
        seed=0,
        output_dir=str(workdir / "ours-out"),
    )
    if variant == "ours-plain":
        values["logps_chunk_size"] = 0
    if variant in ("ours-lora", "ours-qlora"):  # rank-16 adapters on every linear layer, the adapter-disabled reference
        values.update(lora_r=16, lora_alpha=32.0, load_in_4bit=variant == "ours-qlora")
    if variant == "ours-simpo":  # reference-free: no reference network loaded, no reference forward
        values.update(loss_type="simpo", cpo_alpha=0.0)
    if fast:
        values.update(precompute_ref_logps=True, padding_free=True)
    if variant.endswith("-shared"):  # each pair's prompt computed once (prefix_sharing)
        values["prefix_sharing"] = True
    values.update(overrides)
    clock, first, began = StepClock(), {}, time.perf_counter()

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            first.setdefault("setup_seconds", time.perf_counter() - began)
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.stop()

    def keep_first(report) -> None:
        if report.group == "training":
            first.setdefault("metrics", report.metrics)

    train(make_config(values), session=BenchSession([keep_first], [Clock(), *callbacks]))
    metrics = first.get("metrics", {})
    return {
        "step_seconds": clock.seconds,
        "first": {k: metrics.get(k) for k in FIRST_STEP_METRICS},
        "setup_seconds": first.get("setup_seconds"),
    }


FIRST_STEP_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins")


def run_trl(
    preset: Preset, model_dir: Path, pairs: Path, workdir: Path, checkpointing: bool = True, callbacks=(), seen=None
) -> dict:
    """TRL's DPOTrainer: as shipped (gradient checkpointing on, TRL 1.16's default), or with it off (`trl-equal`,
    this project's default). `seen(trainer)` is called before it trains (a profiler's hooks)."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    clock, began, setup = StepClock(), time.perf_counter(), {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            setup.setdefault("seconds", time.perf_counter() - began)
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

    bf16 = preset.precision == "bf16-mixed"
    args = trl.DPOConfig(
        output_dir=str(workdir / "trl-out"),
        per_device_train_batch_size=preset.batch_size,
        max_length=preset.max_length,
        beta=0.1,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_steps=preset.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        bf16=bf16,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=checkpointing,
    )
    dtype = torch.float32
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else dtype),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[Clock(), *callbacks],
    )
    if seen is not None:
        seen(trainer)
    trainer.train()
    logged = next((entry for entry in trainer.state.log_history if entry.get("step") == 1 and "loss" in entry), {})
    first = {k: logged.get(k) for k in FIRST_STEP_METRICS}
    return {"step_seconds": clock.seconds, "first": first, "setup_seconds": setup.get("seconds")}


def child(args) -> None:
    """One run, in this process; prints its JSON line."""
    preset = PRESETS[args.preset]
    workdir = Path(args.workdir) / args.preset
    model_dir, pairs = build_assets(preset, workdir)
    if args.batch_size:  # a probe of the largest batch: a few steps at this batch size
        preset = replace(preset, batch_size=args.batch_size, steps=3, warmup=1)
    if args.run.startswith("ours"):
        from dpo_lightning.memory import tune_cpu_allocator

        tune_cpu_allocator()  # as the entrypoint does
        result = run_ours(preset, model_dir, pairs, workdir, args.run, json.loads(args.ours))
    else:
        result = run_trl(preset, model_dir, pairs, workdir, checkpointing=args.run == "trl")
    setup_seconds = result.pop("setup_seconds", None)
    steps = result["step_seconds"][preset.warmup :]
    median = statistics.median(steps) if steps else math.nan
    samples_per_second = preset.batch_size / median
    tokens = mean_tokens_per_pair(model_dir, pairs, preset.max_length)
    line = {
        "preset": args.preset,
        "run": args.run,
        "samples_per_second": round(samples_per_second, 4),
        "tokens_per_second": round(samples_per_second * tokens, 1),
        "median_step_seconds": round(median, 4),
        "step_seconds": [round(s, 3) for s in result["step_seconds"]],
        "peak_memory_gb": round(peak_memory_gb(), 3),
        "setup_seconds": None if setup_seconds is None else round(setup_seconds, 1),
        "first_step": result["first"],
        "device": _device_name(),
    }
    mfu = _mfu(preset, samples_per_second * tokens)
    if mfu is not None:
        line["mfu"] = round(mfu, 4)
    print("RESULT " + json.dumps(line), flush=True)


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def _mfu(preset: Preset, tokens_per_second: float) -> float | None:
    """Model FLOPs utilisation: 8N FLOP per token (6N policy forward and backward, 2N reference forward)."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = next((flops for name, flops in GPU_PEAK_BF16_FLOPS.items() if name in torch.cuda.get_device_name()), None)
    if peak is None:
        return None
    per_layer = 4 * preset.hidden * preset.hidden + 3 * preset.hidden * preset.intermediate  # attention ~ as dense
    params = preset.layers * per_layer + preset.vocab * preset.hidden
    return 8 * params * tokens_per_second / peak


# ----------------------------------------------------------------------------- the parent: alternate and compare


def run_child(args, name: str, batch_size: int | None = None) -> tuple[dict | None, str]:
    """(the run's JSON result or None, its stderr tail), from a fresh process."""
    command = [sys.executable, __file__, "--child", "--run", name, "--preset", args.preset]
    command += ["--workdir", args.workdir, "--ours", args.ours]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return None, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :]), ""


def largest_batch(args, name: str, start: int, cap: int) -> dict:
    """The largest batch (pairs per device) that trains a few steps without running out of memory, doubling
    from `start`; the search stops at `cap` or at a failure that is not an out-of-memory error."""
    fits, size = None, start
    while size <= cap:
        result, errors = run_child(args, name, size)
        if result is None:
            if "out of memory" not in errors.lower() and "outofmemory" not in errors.lower():
                print(errors, file=sys.stderr)
                raise SystemExit(f"error: run {name} at batch {size} failed, and not for lack of memory")
            break
        fits, size = size, size * 2
    return {"run": name, "largest_batch_fitting": fits, "searched_up_to": min(size, cap)}


def parent(args) -> None:
    preset = PRESETS[args.preset]
    build_assets(preset, Path(args.workdir) / args.preset)  # once, before any run is timed
    runs = [name.strip() for name in (args.runs or PRESET_RUNS.get(args.preset, DEFAULT_RUNS)).split(",")]
    unknown = [name for name in runs if name not in RUNS]
    if unknown:
        raise SystemExit(f"error: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:  # alternating, so that drift in the machine's speed hits every system alike
            result, errors = run_child(args, name)
            if result is None:
                print(errors, file=sys.stderr)
                raise SystemExit(f"error: run {name} failed")
            results[name].append(result)
            print(json.dumps(result), flush=True)
    if "trl" in results or "trl-equal" in results:
        print(json.dumps(ratios(results)), flush=True)
    if args.max_batch:
        for name in runs:
            print(json.dumps(largest_batch(args, name, preset.batch_size, args.max_batch)), flush=True)


def ratios(results: dict[str, list[dict]]) -> dict:
    """Each run's median samples/s and peak memory over the repeats, as a ratio to TRL's at equal settings
    (`trl-equal`, gradient checkpointing off) when it ran, else to TRL as shipped."""

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    base = "trl-equal" if "trl-equal" in results else "trl"
    base_speed, base_memory = median(base, "samples_per_second"), median(base, "peak_memory_gb")
    return {
        "base": base,
        "ratios_to_trl": {
            name: {
                "samples_per_second": round(median(name, "samples_per_second") / base_speed, 3),
                "peak_memory": round(median(name, "peak_memory_gb") / base_memory, 3),
            }
            for name in results
            if name != base
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument(
        "--runs",
        default=None,
        help=f"comma-separated, from {', '.join(RUNS)}; default {DEFAULT_RUNS} ({QWEN_RUNS} on the Qwen presets)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "dpo_lightning" / "benchmarks"))
    parser.add_argument(
        "--ours", default="{}", help="settings for this project's runs, JSON: '{\"logps_chunk_size\": 256}'"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="also find each run's largest batch that fits, doubling from the preset's up to this (GPU presets)",
    )
    parser.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
