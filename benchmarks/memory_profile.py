"""What is alive at the peak of a training step on CPU: parameters, gradients, AdamW state, the reference,
activations saved for backward, and what the allocator holds beyond the tensors.

    python benchmarks/memory_profile.py --preset cpu-qwen0.5b --run ours-equal [--ours '{"prefix_sharing": true}']
    python benchmarks/memory_profile.py --preset cpu-qwen0.5b --run trl-equal
    DPO_LIGHTNING_MALLOC=off python benchmarks/memory_profile.py --preset cpu-qwen0.5b --run ours-equal

One run in this process, on `dpo_throughput.py`'s assets and settings. A thread samples the resident set size
every 5 ms and tags each sample with the phase the run is in (setup, forward, backward, optimizer); glibc's
`mallinfo2` gives, at the end of each step's forward (the activations' high point) and at the peak sample,
the heap bytes in use and the free bytes it keeps. Activations are the tensors autograd saved for backward
during the step (unique storages, parameters left out), counted by a saved-tensor hook. It prints one JSON
line (`PROFILE {...}`) and a table in GB.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dpo_throughput import PRESETS, build_assets, run_ours, run_trl  # noqa: E402

GB = 1e9
PAGE = os.sysconf("SC_PAGE_SIZE")


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc():
    """glibc with `mallinfo2` (2.33 and later), found where the allocator settings find it; else None."""
    from dpo_lightning.memory import _glibc

    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    return libc


LIBC = _libc()


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def heap() -> dict:
    """glibc's heap: bytes in use by allocations (heap and mmapped blocks) and free bytes kept in its arenas."""
    if LIBC is None:
        return {}
    info = LIBC.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free_kept": info.fordblks, "mmapped": info.hblkhd}


class Sampler(threading.Thread):
    """The resident set size every few ms, with the phase it fell in; the peak keeps a heap snapshot."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.phase, self.step = "setup", 0
        self.peak = {"rss": 0}
        self.by_phase: dict[str, int] = {}
        self.per_step: dict[int, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            now = rss()
            self.by_phase[self.phase] = max(self.by_phase.get(self.phase, 0), now)
            self.per_step[self.step] = max(self.per_step.get(self.step, 0), now)
            if now > self.peak["rss"]:
                self.peak = {"rss": now, "phase": self.phase, "step": self.step, **heap()}
            time.sleep(0.005)

    def stop(self) -> None:
        self._done.set()
        self.join()


class SavedTensors:
    """Bytes autograd saves for backward while entered (unique storages, the given parameters left out)."""

    def __init__(self, parameters) -> None:
        import torch

        self.skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def enter(self) -> None:
        self.storages = {}
        self._hooks.__enter__()

    def exit(self) -> int:
        self._hooks.__exit__(None, None, None)
        return sum(self.storages.values())


def tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class Profile:
    """Shared by both systems' hooks: phases for the sampler, and the counts taken at the end of a forward."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.saved, self.at_backward = sampler, None, []
        self.models: dict[str, int] = {}
        self.grads = self.optimizer_state = 0

    def step_begins(self, parameters) -> None:
        self.sampler.step += 1
        self.sampler.phase = "forward"
        if self.saved is None:
            self.saved = SavedTensors(parameters)
        self.saved.enter()

    def forward_ends(self) -> None:
        activations = self.saved.exit()
        self.at_backward.append({"step": self.sampler.step, "rss": rss(), "activations": activations, **heap()})
        self.sampler.phase = "backward"

    def optimizer_begins(self, parameters) -> None:
        self.grads = tensor_bytes(p.grad for p in parameters)
        self.sampler.phase = "optimizer"

    def step_ends(self, optimizer) -> None:
        self.optimizer_state = tensor_bytes(
            value for state in optimizer.state.values() for value in state.values() if hasattr(value, "untyped_storage")
        )
        self.sampler.phase = "between steps"


def lightning_hooks(profile: Profile):
    import lightning as L
    import torch

    class Hooks(L.Callback):
        def on_train_start(self, trainer, module):
            profile.models["policy"] = tensor_bytes(module.policy.parameters())
            reference = getattr(module.reference, "model", None)
            if isinstance(reference, torch.nn.Module):
                profile.models["reference"] = tensor_bytes(reference.parameters())

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            profile.step_begins(module.parameters())

        def on_before_backward(self, trainer, module, loss):
            profile.forward_ends()

        def on_before_optimizer_step(self, trainer, module, optimizer):
            profile.optimizer_begins(module.policy.parameters())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            profile.step_ends(trainer.optimizers[0])

    return Hooks()


def trl_hooks(profile: Profile):
    """TRL's Trainer has no hook between forward and backward: the accelerator's `backward` is wrapped."""
    from transformers import TrainerCallback

    class Hooks(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            profile.models["policy"] = tensor_bytes(model.parameters())
            trainer = profile.trainer
            profile.models["reference"] = tensor_bytes(trainer.ref_model.parameters())
            original = trainer.accelerator.backward

            def backward(loss, **kw):
                profile.forward_ends()
                return original(loss, **kw)

            trainer.accelerator.backward = backward

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            profile.step_begins(model.parameters())

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            profile.optimizer_begins(model.parameters())

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            profile.step_ends(optimizer or profile.trainer.optimizer)

    return Hooks()


def summary(profile: Profile, sampler: Sampler) -> dict:
    last = profile.at_backward[-1] if profile.at_backward else {}
    return {
        "peak_rss": sampler.peak,
        "peak_rss_by_phase": sampler.by_phase,
        "peak_rss_by_step": sampler.per_step,
        "models": profile.models,
        "gradients": profile.grads,
        "optimizer_state": profile.optimizer_state,
        "at_end_of_forward": profile.at_backward,
        "activations_last_step": last.get("activations"),
    }


def table(result: dict) -> str:
    peak, last = result["peak_rss"], result["at_end_of_forward"][-1]
    rows = [
        ("peak RSS", peak["rss"], f"in {peak.get('phase')} of step {peak.get('step')}"),
        ("  heap in use at the peak", peak.get("in_use"), ""),
        ("  free heap kept at the peak", peak.get("free_kept"), "allocator retention"),
        ("policy parameters", result["models"].get("policy"), ""),
        ("reference parameters", result["models"].get("reference"), ""),
        ("gradients", result["gradients"], "before the optimizer step"),
        ("AdamW state", result["optimizer_state"], ""),
        ("activations saved for backward", last["activations"], f"step {last['step']}"),
        ("RSS at the end of the forward", last["rss"], ""),
        ("  heap in use there", last.get("in_use"), ""),
        ("  free heap kept there", last.get("free_kept"), ""),
    ]
    lines = [f"{name:34s} {'' if value is None else f'{value / GB:7.2f}'}  {note}" for name, value, note in rows]
    phases = ", ".join(f"{phase} {value / GB:.2f}" for phase, value in result["peak_rss_by_phase"].items())
    return "\n".join([*lines, f"peak RSS by phase: {phases}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-qwen0.5b")
    parser.add_argument(
        "--run", default="ours-equal", help="ours-equal, ours-shared, ours-fast(-shared), trl, trl-equal"
    )
    parser.add_argument("--ours", default="{}", help="settings for this project's run, JSON")
    parser.add_argument("--steps", type=int, default=0, help="override the preset's step count")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "dpo_lightning" / "benchmarks"))
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.steps:
        from dataclasses import replace

        preset = replace(preset, steps=args.steps, warmup=0)
    workdir = Path(args.workdir) / args.preset
    model_dir, pairs = build_assets(preset, workdir)
    sampler = Sampler()
    profile = Profile(sampler)
    sampler.start()
    if args.run.startswith("ours"):
        from dpo_lightning.memory import tune_cpu_allocator

        tuned = tune_cpu_allocator()  # as the entrypoint does
        run_ours(preset, model_dir, pairs, workdir, args.run, json.loads(args.ours), [lightning_hooks(profile)])
    else:
        tuned = False
        run_trl(
            preset,
            model_dir,
            pairs,
            workdir,
            args.run == "trl",
            [trl_hooks(profile)],
            lambda t: setattr(profile, "trainer", t),
        )
    sampler.stop()
    result = {"preset": args.preset, "run": args.run, "ours": json.loads(args.ours), "allocator_tuned": tuned}
    result.update(summary(profile, sampler))
    print("PROFILE " + json.dumps(result), flush=True)
    print(table(result), flush=True)


if __name__ == "__main__":
    main()
