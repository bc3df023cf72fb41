"""Per-rank peak memory and step time of a 2-rank FSDP2 run against a 2-rank DDP run of the same model, pairs
and global batch.

    python benchmarks/fsdp_memory.py --preset cpu-small [--repeats 2] [--nproc 2]

It builds the preset's assets as `dpo_throughput.py` does (a Qwen2-shaped random model with Qwen2.5's
vocabulary, synthetic pairs), then launches `torchrun --nproc_per_node N entrypoint.py` once per strategy and
repeat, alternating DDP and FSDP (this machine's speed drifts). Each rank records its own peak memory when it
exits (resident set size on CPU, max allocated on GPU); the step time is the median over the run's steps of
the global pairs per step divided by the reported samples per second, warm-up steps left out. On CPU the peak
includes each rank's load of the whole model before sharding; what FSDP saves is the gradients and AdamW state
of the other ranks' shards. The last line gives FSDP's ratios to DDP's.

Outside FSDP the entrypoint keeps freed memory in the process for speed (dpo_lightning/memory.py), so a DDP
run's peak resident size on CPU also holds what its allocator kept; FSDP runs keep glibc's defaults (memory is
their point). `--malloc-off` gives DDP glibc's defaults too, to compare like with like.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dpo_throughput import PRESETS, build_assets  # noqa: E402


def _peak_gb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def worker(peaks_dir: str, entry_args: list[str]) -> None:
    """One rank: the entrypoint, then this rank's peak memory into `peaks_dir`."""
    rank = os.environ.get("RANK", "0")
    atexit.register(lambda: Path(peaks_dir, f"rank-{rank}.json").write_text(json.dumps({"peak_gb": _peak_gb()})))
    sys.argv = [str(ROOT / "entrypoint.py"), *entry_args]
    runpy.run_path(str(ROOT / "entrypoint.py"), run_name="__main__")


def run(args, strategy: str, model_dir: Path, pairs: Path, workdir: Path, index: int) -> dict:
    preset = PRESETS[args.preset]
    out = workdir / f"{strategy}-{index}"
    shutil.rmtree(out, ignore_errors=True)  # a finished run in the folder would only say so and exit
    peaks = Path(tempfile.mkdtemp(prefix="peaks-", dir=workdir))
    values = {
        "config": "experiments/local-tiny.yaml",
        "model_name": model_dir,
        "dataset_name": pairs,
        "output_dir": out,
        "strategy": strategy,
        "batch_size": preset.batch_size,
        "max_length": preset.max_length,
        "max_prompt_length": preset.max_length // 2,
        "precision": preset.precision,
        "max_steps": preset.steps,
        "report_every_n_steps": 1,
        "val_fraction": 0,
        "checkpoint_every_n_steps": 0,
        "validate_at_start": False,
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
        __file__, "--worker", str(peaks), *[f"--{k}={v}" for k, v in values.items()],
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    if args.malloc_off:
        env["DPO_LIGHTNING_MALLOC"] = "off"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{strategy} run failed:\n{done.stderr[-3000:]}")
    reports = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    training = [r["metrics"] for r in reports if r["group"] == "training"][preset.warmup :]
    pairs_per_step = preset.batch_size * args.nproc
    result = {
        "strategy": strategy,
        "ranks": args.nproc,
        "peak_gb_per_rank": [
            round(json.loads((peaks / f"rank-{r}.json").read_text())["peak_gb"], 3) for r in range(args.nproc)
        ],
        "median_s_per_step": round(statistics.median(pairs_per_step / m["samples_per_second"] for m in training), 3),
        "first_loss": reports[0]["metrics"]["loss"],
        "malloc": "default" if args.malloc_off or strategy == "fsdp" else "tuned",
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--malloc-off", action="store_true", help="glibc's allocator defaults (DPO_LIGHTNING_MALLOC=off) in both runs"
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dpo-lightning-bench")
    args = parser.parse_args()
    workdir = args.workdir / args.preset
    model_dir, pairs = build_assets(PRESETS[args.preset], workdir)
    results: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    for index in range(args.repeats):
        for strategy in ("ddp", "fsdp") if index % 2 == 0 else ("fsdp", "ddp"):
            results[strategy].append(run(args, strategy, model_dir, pairs, workdir, index))

    def median(strategy: str, pick) -> float:
        return statistics.median(pick(r) for r in results[strategy])

    ratios = {
        "fsdp_over_ddp_peak_memory_per_rank": round(
            median("fsdp", lambda r: max(r["peak_gb_per_rank"])) / median("ddp", lambda r: max(r["peak_gb_per_rank"])),
            3,
        ),
        "fsdp_over_ddp_step_time": round(
            median("fsdp", lambda r: r["median_s_per_step"]) / median("ddp", lambda r: r["median_s_per_step"]), 3
        ),
    }
    print(json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
