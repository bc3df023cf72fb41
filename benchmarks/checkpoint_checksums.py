"""What checkpoint checksums cost at the default model's real shape: a checkpoint of a Qwen2.5-0.5B-shaped policy
(random weights, fp32, its exact configuration) laid out as this project writes one (the policy in Hugging Face
format at the root, AdamW's two moments in trainer/lightning.pt), then the sha256 of every file as a save
records them (`integrity.file_checksums`) and as a resume verifies them (`integrity.checksum_problem`), from the
page cache and, as root, from disk after dropping the caches.

    python benchmarks/checkpoint_checksums.py [--folder /tmp/ckpt-0.5b]   # ~6 GB of disk, ~7 GB of memory
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dpo_lightning.integrity import checksum_problem, file_checksums

# Qwen/Qwen2.5-0.5B-Instruct's config.json
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def write_checkpoint(folder: Path) -> int:
    """The policy and an optimizer state of its size; returns the parameter count."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).float()
    model.save_pretrained(folder, safe_serialization=True)
    state = {
        "optimizer_states": [
            {
                "state": {
                    i: {"exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p), "step": torch.tensor(1.0)}
                    for i, p in enumerate(model.parameters())
                }
            }
        ]
    }
    (folder / "trainer").mkdir()
    torch.save(state, folder / "trainer" / "lightning.pt")
    return sum(p.numel() for p in model.parameters())


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="ckpt-0.5b-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        params = write_checkpoint(folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"checkpoint of a {params / 1e6:.0f}M-parameter policy: {size / 1e9:.2f} GB")
        started = time.perf_counter()
        recorded = file_checksums(folder)
        record_s = time.perf_counter() - started
        print(f"record at save (page cache): {record_s:.2f} s ({size / record_s / 1e9:.2f} GB/s)")
        started = time.perf_counter()
        assert checksum_problem(folder, recorded) is None
        warm_s = time.perf_counter() - started
        print(f"verify at resume (page cache): {warm_s:.2f} s ({size / warm_s / 1e9:.2f} GB/s)")
        if drop_caches():
            started = time.perf_counter()
            assert checksum_problem(folder, recorded) is None
            cold_s = time.perf_counter() - started
            print(f"verify at resume (from disk, caches dropped): {cold_s:.2f} s ({size / cold_s / 1e9:.2f} GB/s)")
        else:
            print("verify from disk: skipped (dropping the page cache needs root)")
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
