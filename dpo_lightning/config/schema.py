"""The typed, frozen run configuration: every key, its default, its documentation and its checks.

Every hyperparameter lives under `hyperparameters:` in an experiment file, so a Determined searcher can
vary any of them (`parse.py` reads files and overrides). Values are checked here, before any model or
dataset loads, and a bad one raises `ConfigError` with one line that names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from dpo_lightning.errors import ConfigError

COLUMN_ROLES = ("prompt", "chosen", "rejected", "messages")
MODES = ("auto", "offline", "online", "reward")
PAIR_MODES = ("offline", "reward")  # modes that train on preference pairs
STRATEGIES = ("ddp", "fsdp")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")
# Keys a resumed run may change: how long it trains, where it writes and how a step is computed, never what
# it trains.
RESUMABLE_CHANGES = (
    "max_steps",
    "num_epochs",
    "output_dir",
    "logps_chunk_size",
    "gradient_checkpointing",
    "precompute_ref_logps",
    "padding_free",
    "vllm_gpu_memory_utilization",
    "vllm_kv_cache_gib",
    "report_to",
    "push_to_hub",
)
LR_SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("32", "bf16-mixed")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# The loss variants users may choose, in the order shown to them; `dpo.losses` registers one function for each.
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
USES_LABEL_SMOOTHING = frozenset({"sigmoid", "robust"})


@dataclass(frozen=True)
class DPOConfig:
    """The resolved configuration of one run (one Determined trial)."""

    # --- models ---
    model_name: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """Policy to fine-tune: a Hugging Face Hub name, a local model folder, or `builtin:tiny-qwen2`."""
    ref_model_name: str | None = None
    """Reference model; None means a frozen copy of the initial policy (with LoRA: the policy with its adapter
    disabled, so no second model is loaded)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen models (reference). The trained policy always keeps fp32 master weights."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = "sdpa"
    """Attention kernel passed to `from_pretrained`."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the Hub; off because it runs arbitrary code."""
    lora_r: int = 0
    """LoRA rank (peft): train low-rank adapters on a frozen base instead of every weight; 0 trains all."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: an adapter's update is scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' inputs (the base model's dropout stays off)."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: all-linear (every linear layer but the output head), or comma-separated
    module names such as q_proj,v_proj."""
    load_in_4bit: bool = False
    """QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only) under the LoRA adapters."""
    export_merged: bool = False
    """With LoRA: also write final/merged/, the base with the adapters merged in, which loads without peft."""

    # --- data ---
    dataset_name: str = "builtin:sentiment-pairs"
    """Hub dataset name, local .json/.jsonl/.parquet/.csv file, `save_to_disk` folder, or `builtin:sentiment-pairs`."""
    dataset_config: str | None = None
    """Hub dataset configuration (subset) name."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str | None = None
    """Split used for validation; None uses a `test` split when the source has one, else `val_fraction`."""
    val_fraction: float = 0.05
    """Share of prompts held out for validation when there is no eval split; 0 disables validation."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map of role -> dataset column name, roles: prompt, chosen, rejected, messages."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """`error` stops at the first bad row naming it; `skip` drops bad rows and counts them."""
    max_length: int = 1024
    """Maximum tokens of prompt + completion; longer sequences keep their start."""
    max_prompt_length: int | None = 512
    """Keep the last this many prompt tokens; None keeps the whole prompt."""
    max_completion_length: int | None = None
    """Keep the first this many tokens of each completion (before max_length applies); null keeps them whole."""
    num_workers: int = 0
    """DataLoader worker processes."""

    # --- objective ---
    mode: Literal["auto", "offline", "online", "reward"] = "auto"
    """`auto` picks by the data: preference pairs train offline, prompts or plain text train online; `offline`
    and `online` force one; `reward` trains a RewardModel on preference pairs with the Bradley-Terry loss."""
    loss_type: str = "sigmoid"
    """DPO loss variant: sigmoid, ipo, hinge, robust."""
    beta: float = 0.1
    """KL penalty strength: rewards are beta * (policy logp - reference logp)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels, in [0, 0.5); used by the sigmoid (conservative DPO) and robust losses."""
    rpo_alpha: float = 0.0
    """RPO: adds rpo_alpha times the chosen completions' mean token negative log-likelihood to the loss (TRL's
    `sft` loss term), reported as nll_loss; 0 leaves it out."""

    # --- online DPO: sampling and scoring ---
    reward_model: str | None = None
    """Judge of online samples: a Hub name or folder of a sequence-classification reward model, a RewardModel
    folder written by `mode: reward`, or a Python function `package.module:function`."""
    max_new_tokens: int = 64
    """Tokens sampled per completion at most; a completion ends at its first EOS."""
    temperature: float = 0.9
    """Sampling temperature of the policy's completions."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest token set whose probability reaches top_p; 1.0 disables it."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a completion that reached max_new_tokens without an EOS."""
    reward_batch_size: int = 16
    """Completions scored per reward-model forward pass."""
    reward_max_length: int = 1024
    """Tokens of prompt + completion the reward model sees at most (as it tokenizes them); a longer text loses
    the start of its prompt, never its completion."""
    prompt_lines: int = 4
    """Plain-text prompt sources (tiny_shakespeare, .txt files): lines of a block (speech) per prompt."""
    sampler: Literal["hf", "vllm"] = "hf"
    """Engine that samples online completions: hf (transformers generate on the policy itself) or vllm (a vLLM
    engine in the training process, one per rank, its weights synced from the policy)."""
    vllm_sync_every: int = 1
    """Optimizer steps between weight syncs to the vLLM engine; above 1, samples are up to K-1 steps off-policy."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory the vLLM engine takes for its weights and KV cache (training keeps the rest)."""
    vllm_kv_cache_gib: int = 1
    """On CPU: GiB of memory for the vLLM engine's KV cache."""
    vllm_max_model_len: int = 0
    """Tokens of prompt + completion the vLLM engine handles; 0 means max_prompt_length + max_new_tokens."""

    # --- optimisation ---
    batch_size: int = 4
    """Preference pairs per device per micro-batch."""
    eval_batch_size: int | None = None
    """Pairs (or prompts) per device per validation batch; null uses batch_size."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    num_epochs: int = 1
    """Passes over the training set when max_steps is not set."""
    max_steps: int = -1
    """Optimizer steps to train; -1 derives it from num_epochs."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Schedule after warmup: constant, linear decay to 0, or cosine decay to 0."""
    warmup_ratio: float = 0.1
    """Share of the optimizer steps spent in linear warmup (ignored when warmup_steps > 0)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup; overrides warmup_ratio when > 0."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still reported)."""
    precision: Literal["32", "bf16-mixed"] = "32"
    """Compute precision; bf16-mixed autocasts forward passes while master weights stay fp32."""
    seed: int = 42
    """Seed for weights init (built-in model), data order, splits and dropout-free sampling."""

    # --- speed and memory (how a step is computed, never what it computes) ---
    logps_chunk_size: int = 128
    """Completion log-probs go through the output head this many tokens at a time, from the final hidden states
    at completion positions only, and the backward recomputes each chunk's logits instead of keeping them; 0
    computes the full (rows x length x vocabulary) logits instead (the plain path, for comparison)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them: less memory
    for about a third more compute."""
    padding_free: bool = False
    """Pack each micro-batch's sequences into one row (position ids restarting per sequence, attention kept
    within each) instead of padding them to a common length, so that no compute is spent on padding.
    DPO only (offline and online); the report's `padding_share` says what padding costs either way."""
    precompute_ref_logps: bool = False
    """Offline DPO: compute the reference's log-probs of every pair once before training (cached on disk under
    ~/.cache/dpo_lightning/ref_logps, keyed by the reference's weights, the data and the settings, and reused by
    later runs and resumes) and train without the reference model in memory."""

    # --- distribution ---
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Multi-process strategy: `ddp` replicates the model; `fsdp` shards it (FSDP2: each decoder layer a unit, on
    CPU or CUDA)."""
    fsdp_sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"] = "FULL_SHARD"
    """FULL_SHARD frees each layer's gathered weights after its forward; SHARD_GRAD_OP keeps them until its
    backward (more memory, fewer gathers); HYBRID_SHARD shards within a node and replicates across nodes."""

    # --- cadence (all counted in optimizer steps) ---
    report_every_n_steps: int = 10
    """Report training metrics every this many optimizer steps."""
    val_check_interval: int = 100
    """Validate every this many optimizer steps (and at the end of training)."""
    generation_eval_every: int = 0
    """Every this many validations (the first included, and the last), also sample completions of held-out
    prompts from the policy and the reference and report reward_model's verdict (generation/win_rate, ...)."""
    generation_eval_prompts: int = 64
    """Held-out prompts those generation metrics sample for (each rank samples all of them)."""
    validate_at_start: bool = False
    """Also validate before the first step (reported at step 0, where the policy still equals the reference)."""
    checkpoint_every_n_steps: int = 0
    """Save a resumable checkpoint every this many optimizer steps; 0 saves only at the end and on interrupt."""
    keep_last_n_checkpoints: int = 2
    """Local runs keep only the newest this many checkpoints (on a cluster, checkpoint_storage decides)."""
    preempt_check_every_n_steps: int = 10
    """Ask Determined whether to stop (preemption, pause, early stop) every this many optimizer steps."""
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, run_config.json, checkpoints/ and final/ go."""
    report_to: str = "tensorboard"
    """Experiment trackers the reports also go to, comma-separated: tensorboard, wandb, mlflow, csv, or none
    (under output_dir/logs/; on a Determined cluster its own TensorBoard, plus wandb if listed)."""
    push_to_hub: str | None = None
    """Upload final/ to this Hub model repository (OWNER/NAME, created private when missing) at the end of a
    local run; the token is huggingface_hub's (HF_TOKEN or `hf auth login`)."""

    def __post_init__(self) -> None:
        for check in _CHECKS:
            problem = check(self)
            if problem:
                raise ConfigError(problem)

    @property
    def frozen_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(*names: str):
    def check(cfg: DPOConfig) -> str | None:
        for name in names:
            if getattr(cfg, name) <= 0:
                return f"{name} must be > 0, got {getattr(cfg, name)}"
        return None

    return check


def _non_negative(*names: str):
    def check(cfg: DPOConfig) -> str | None:
        for name in names:
            if getattr(cfg, name) < 0:
                return f"{name} must be >= 0, got {getattr(cfg, name)}"
        return None

    return check


def _check_loss(cfg: DPOConfig) -> str | None:
    if cfg.loss_type not in LOSS_TYPES:
        return f"unknown loss_type '{cfg.loss_type}'; valid choices: {', '.join(LOSS_TYPES)}"
    if not 0.0 <= cfg.label_smoothing < 0.5:
        return f"label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}"
    if cfg.label_smoothing > 0 and cfg.loss_type not in USES_LABEL_SMOOTHING:
        users = ", ".join(sorted(USES_LABEL_SMOOTHING))
        return f"label_smoothing is only used by loss_type {users}; loss_type '{cfg.loss_type}' would ignore it"
    return None


def _check_lengths(cfg: DPOConfig) -> str | None:
    for name in ("max_completion_length", "eval_batch_size"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            return f"{name} must be > 0 or null, got {value}"
    if cfg.max_prompt_length is not None:
        if cfg.max_prompt_length <= 0:
            return f"max_prompt_length must be > 0 or null, got {cfg.max_prompt_length}"
        if cfg.max_prompt_length >= cfg.max_length:
            return (
                f"max_prompt_length ({cfg.max_prompt_length}) must be < max_length ({cfg.max_length}) "
                "so that every pair keeps a completion token"
            )
    return None


def _check_fractions(cfg: DPOConfig) -> str | None:
    if not 0.0 <= cfg.val_fraction < 1.0:
        return f"val_fraction must be in [0, 1), got {cfg.val_fraction}"
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        return f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}"
    return None


def _check_steps(cfg: DPOConfig) -> str | None:
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        return f"max_steps must be a positive number of optimizer steps or -1 (use num_epochs), got {cfg.max_steps}"
    return None


REPORT_TARGETS = ("tensorboard", "wandb", "mlflow", "csv", "none")


def _check_report_to(cfg: DPOConfig) -> str | None:
    targets = [t for t in cfg.report_to.replace(" ", "").split(",") if t]
    unknown = [t for t in targets if t not in REPORT_TARGETS]
    if unknown or not targets:
        return f"report_to: unknown '{','.join(unknown)}'; valid choices, comma-separated: {', '.join(REPORT_TARGETS)}"
    if "none" in targets and len(targets) > 1:
        return "report_to: none cannot be combined with other trackers"
    return None


def _check_columns(cfg: DPOConfig) -> str | None:
    for role, column in cfg.columns.items():
        if role not in COLUMN_ROLES:
            return f"columns has unknown role '{role}'; valid roles: {', '.join(COLUMN_ROLES)}"
        if not isinstance(column, str) or not column:
            return f"columns.{role} must be a non-empty column name, got {column!r}"
    return None


def _check_sampling(cfg: DPOConfig) -> str | None:
    if not 0.0 < cfg.top_p <= 1.0:
        return f"top_p must be in (0, 1], got {cfg.top_p}"
    if cfg.reward_model is not None and not cfg.reward_model.strip():
        return "reward_model must not be empty; leave it null for offline runs"
    if cfg.generation_eval_every > 0 and cfg.reward_model is None:
        return "generation_eval_every needs a reward_model to judge the policy's completions against the reference's"
    if cfg.precompute_ref_logps and (cfg.mode in ("online", "reward") or cfg.generation_eval_every > 0):
        why = (
            f"mode {cfg.mode} has no fixed pairs"
            if cfg.mode in ("online", "reward")
            else ("generation_eval_every samples the reference model, which precomputing leaves out of memory")
        )
        return f"precompute_ref_logps works only for offline DPO without generation metrics: {why}"
    if cfg.sampler != "hf" and cfg.mode in ("offline", "reward"):
        return f"sampler: {cfg.sampler} samples online DPO's completions; mode {cfg.mode} samples none (sampler: hf)"
    if not 0.0 < cfg.vllm_gpu_memory_utilization <= 1.0:
        return f"vllm_gpu_memory_utilization must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}"
    if cfg.lora_r == 0 and (cfg.load_in_4bit or cfg.export_merged):
        return f"{'load_in_4bit' if cfg.load_in_4bit else 'export_merged'} needs LoRA adapters: set lora_r > 0"
    if cfg.load_in_4bit and cfg.sampler == "vllm":
        return (
            "load_in_4bit with sampler: vllm: the engine takes the policy with its adapters merged, and adapter deltas "
            "cannot be added to 4-bit packed weights; use sampler: hf, or LoRA on a bf16 base (load_in_4bit: false)"
        )
    if cfg.lora_r > 0 and cfg.mode == "reward":
        return "lora_r applies to DPO's policy; mode reward trains a reward model in full (set lora_r: 0)"
    if not 0.0 <= cfg.lora_dropout < 1.0:
        return f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}"
    if not cfg.lora_target_modules.strip():
        return "lora_target_modules must name modules, or be all-linear"
    if cfg.padding_free and cfg.mode == "reward":
        return "padding_free packs DPO's sequences; mode reward scores padded rows (set padding_free: false)"
    if cfg.mode == "online":
        return online_problem(cfg)
    return None


def online_problem(cfg: DPOConfig) -> str | None:
    """What keeps `cfg` from training online, or None (checked again once `mode: auto` has seen the data)."""
    if cfg.reward_model is None:
        return (
            "online DPO needs a reward_model: a sequence-classification model (Hub name or folder), "
            "a RewardModel folder from mode: reward, or a function package.module:function"
        )
    if cfg.max_prompt_length is None:
        return "online DPO needs max_prompt_length (prompt tokens kept) so that prompt + max_new_tokens fits max_length"
    if cfg.max_prompt_length + cfg.max_new_tokens > cfg.max_length:
        return (
            f"max_prompt_length ({cfg.max_prompt_length}) + max_new_tokens ({cfg.max_new_tokens}) must be <= "
            f"max_length ({cfg.max_length}): sampled completions are trained on as they are, never cut"
        )
    needed = cfg.max_prompt_length + cfg.max_new_tokens
    if cfg.sampler == "vllm" and 0 < cfg.vllm_max_model_len < needed:
        return (
            f"vllm_max_model_len ({cfg.vllm_max_model_len}) must be >= max_prompt_length ({cfg.max_prompt_length}) + "
            f"max_new_tokens ({cfg.max_new_tokens}), or 0 to fit them"
        )
    return None


def vllm_max_model_len(cfg: DPOConfig) -> int:
    """Tokens of prompt + completion the vLLM engine is built for."""
    return cfg.vllm_max_model_len or cfg.max_prompt_length + cfg.max_new_tokens


def _check_strategy(cfg: DPOConfig) -> str | None:
    """What FSDP cannot do whatever the launch (the launch itself is checked by `training.strategies`)."""
    if cfg.strategy != "fsdp":
        return None
    if cfg.lora_r > 0 and cfg.load_in_4bit:
        return (
            "load_in_4bit (QLoRA) with strategy: fsdp: bitsandbytes' packed 4-bit weights cannot be sharded by "
            "FSDP2; use strategy: ddp for QLoRA, or LoRA on a bf16/fp32 base with fsdp"
        )
    if cfg.export_merged:
        return (
            "export_merged is not supported with strategy: fsdp (merging needs the whole base on one process); "
            "merge final/'s adapters afterwards (peft's AutoPeftModelForCausalLM(...).merge_and_unload())"
        )
    return None


def _check_text(cfg: DPOConfig) -> str | None:
    for name in ("model_name", "dataset_name", "output_dir", "train_split"):
        if not getattr(cfg, name).strip():
            return f"{name} must not be empty"
    return None


_CHECKS = (
    _check_text,
    _positive("beta", "batch_size", "gradient_accumulation_steps", "num_epochs", "max_length", "learning_rate"),
    _positive("report_every_n_steps", "val_check_interval", "keep_last_n_checkpoints", "adam_epsilon"),
    _positive("preempt_check_every_n_steps", "max_new_tokens", "reward_batch_size", "reward_max_length"),
    _positive("temperature", "prompt_lines", "vllm_sync_every", "vllm_kv_cache_gib"),
    _non_negative("vllm_max_model_len", "lora_r", "rpo_alpha"),
    _positive("lora_alpha"),
    _non_negative("missing_eos_penalty", "generation_eval_every"),
    _positive("generation_eval_prompts"),
    _check_sampling,
    _non_negative("weight_decay", "max_grad_norm", "warmup_steps", "checkpoint_every_n_steps", "num_workers"),
    _non_negative("logps_chunk_size"),
    _check_loss,
    _check_lengths,
    _check_fractions,
    _check_steps,
    _check_columns,
    _check_report_to,
    _check_strategy,
)

FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(DPOConfig)}
FIELD_TYPES = typing.get_type_hints(DPOConfig)
