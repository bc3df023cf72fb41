"""Every check of a configuration's values and of the combinations that cannot work, one function per concern;
`DPOConfig.__post_init__` runs them in order and raises the first problem as one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpo_lightning.config.schema import COLUMN_ROLES, LABEL_SIDES, REPORT_TARGETS
from dpo_lightning.config.sources import sources_problem

if TYPE_CHECKING:
    from dpo_lightning.config.schema import DPOConfig


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
    """The objective and its options, as the loss registry declares them (`dpo_lightning.losses.LOSSES`)."""
    from dpo_lightning.losses import objective_problem

    if cfg.ld_alpha is not None and not 0.0 <= cfg.ld_alpha <= 1.0:
        return f"ld_alpha must be in [0, 1] or null, got {cfg.ld_alpha}"
    return objective_problem(cfg)


def _check_reference_sync(cfg: DPOConfig) -> str | None:
    """TR-DPO's options, and what it cannot work with."""
    if not 0.0 < cfg.ref_model_mixup_alpha <= 1.0:
        return f"ref_model_mixup_alpha must be in (0, 1], got {cfg.ref_model_mixup_alpha}"
    if cfg.ref_model_sync_steps <= 0:
        return f"ref_model_sync_steps must be > 0, got {cfg.ref_model_sync_steps}"
    if not cfg.sync_ref_model:
        return None
    if cfg.precompute_ref_logps:
        return (
            "sync_ref_model changes the reference every ref_model_sync_steps steps, so its log-probs cannot be "
            "precomputed (set precompute_ref_logps: false)"
        )
    if cfg.lora_r > 0:
        return (
            "sync_ref_model mixes the policy's weights into the reference's; with LoRA the policy is adapters on a "
            "frozen base (set lora_r: 0, or sync_ref_model: false)"
        )
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


def _check_report_to(cfg: DPOConfig) -> str | None:
    targets = [t for t in cfg.report_to.replace(" ", "").split(",") if t]
    unknown = [t for t in targets if t not in REPORT_TARGETS]
    if unknown or not targets:
        return f"report_to: unknown '{','.join(unknown)}'; valid choices, comma-separated: {', '.join(REPORT_TARGETS)}"
    if "none" in targets and len(targets) > 1:
        return "report_to: none cannot be combined with other trackers"
    return None


def columns_problem(columns: dict, label_values: dict, prefix: str = "") -> str | None:
    """What is wrong with a `columns` map and a `label_values` map (`prefix` names where they are, e.g. a
    source of several), or None."""
    for role, column in columns.items():
        if role not in COLUMN_ROLES:
            return f"{prefix}columns has unknown role '{role}'; valid roles: {', '.join(COLUMN_ROLES)}"
        if not isinstance(column, str) or not column:
            return f"{prefix}columns.{role} must be a non-empty column name, got {column!r}"
    for raw, side in label_values.items():
        if side not in LABEL_SIDES:
            return f"{prefix}label_values.{raw} is {side!r}; each label maps to one of {', '.join(LABEL_SIDES)}"
    return None


def _check_columns(cfg: DPOConfig) -> str | None:
    return columns_problem(cfg.columns, cfg.label_values)


def _check_sampling(cfg: DPOConfig) -> str | None:
    if not 0.0 < cfg.top_p <= 1.0:
        return f"top_p must be in (0, 1], got {cfg.top_p}"
    if cfg.reward_model is not None and not cfg.reward_model.strip():
        return "reward_model must not be empty; leave it null for offline runs"
    if cfg.generation_eval_every > 0 and cfg.reward_model is None:
        return "generation_eval_every needs a reward_model to judge the policy's completions against the reference's"
    if cfg.precompute_ref_logps and cfg.generation_eval_every > 0:
        return (
            "precompute_ref_logps works only without generation metrics: generation_eval_every samples the "
            "reference model, which precomputing leaves out of memory"
        )
    if not 0.0 < cfg.vllm_gpu_memory_utilization <= 1.0:
        return f"vllm_gpu_memory_utilization must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}"
    if cfg.lora_r == 0 and (cfg.load_in_4bit or cfg.export_merged):
        return f"{'load_in_4bit' if cfg.load_in_4bit else 'export_merged'} needs LoRA adapters: set lora_r > 0"
    if cfg.load_in_4bit and cfg.sampler == "vllm":
        return (
            "load_in_4bit with sampler: vllm: the engine takes the policy with its adapters merged, and adapter deltas "
            "cannot be added to 4-bit packed weights; use sampler: hf, or LoRA on a bf16 base (load_in_4bit: false)"
        )
    if not 0.0 <= cfg.lora_dropout < 1.0:
        return f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}"
    if not cfg.lora_target_modules.strip():
        return "lora_target_modules must name modules, or be all-linear"
    return None


def mode_problem(cfg: DPOConfig, mode: str) -> str | None:
    """What keeps `cfg` from training `mode` (offline, online or reward), or None: checked with the rest of the
    configuration when `mode` is set, and by the data pipeline once `mode: auto` has chosen from the data."""
    if cfg.precompute_ref_logps and mode != "offline":
        return f"precompute_ref_logps works only for offline DPO: mode {mode} has no fixed pairs"
    if cfg.sampler != "hf" and mode != "online":
        return f"sampler: {cfg.sampler} samples online DPO's completions; mode {mode} samples none (sampler: hf)"
    if cfg.lora_r > 0 and mode == "reward":
        return "lora_r applies to DPO's policy; mode reward trains a reward model in full (set lora_r: 0)"
    if cfg.padding_free and mode == "reward":
        return "padding_free packs DPO's sequences; mode reward scores padded rows (set padding_free: false)"
    if cfg.prefix_sharing and mode == "reward":
        return "prefix_sharing lays out DPO's pairs; mode reward scores whole sequences (set prefix_sharing: false)"
    if cfg.sync_ref_model and mode == "reward":
        return "sync_ref_model moves DPO's reference; mode reward has none (set sync_ref_model: false)"
    if mode == "online":
        return _reference_free_online(cfg) or _online_problem(cfg)
    return None


def _reference_free_online(cfg: DPOConfig) -> str | None:
    from dpo_lightning.losses import reference_free_loss

    free = reference_free_loss(cfg.loss_type)
    if free is None:
        return None
    return f"loss_type {free} is offline only here: online DPO's metrics measure the policy against a reference"


def _check_mode(cfg: DPOConfig) -> str | None:
    return None if cfg.mode == "auto" else mode_problem(cfg, cfg.mode)


def _online_problem(cfg: DPOConfig) -> str | None:
    """What keeps `cfg` from sampling and judging online, or None."""
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


PREFIX_SHARING_ATTENTION = ("sdpa", "eager")  # the kernels that take the 4D mask prefix sharing builds


def _check_prefix_sharing(cfg: DPOConfig) -> str | None:
    if cfg.prefix_sharing and cfg.attn_implementation not in PREFIX_SHARING_ATTENTION:
        return (
            f"prefix_sharing needs attn_implementation {' or '.join(PREFIX_SHARING_ATTENTION)} (it passes a 4D "
            f"attention mask, which {cfg.attn_implementation} does not take); set attn_implementation: sdpa or "
            "prefix_sharing: false"
        )
    return None


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
    for name in ("model_name", "output_dir", "train_split"):
        if not getattr(cfg, name).strip():
            return f"{name} must not be empty"
    return sources_problem(cfg, columns_problem)


_CHECKS = (
    _check_text,
    _positive("beta", "batch_size", "gradient_accumulation_steps", "num_epochs", "max_length", "learning_rate"),
    _positive("report_every_n_steps", "val_check_interval", "keep_last_n_checkpoints", "adam_epsilon"),
    _positive("preempt_check_every_n_steps", "max_new_tokens", "reward_batch_size", "reward_max_length"),
    _positive("temperature", "prompt_lines", "vllm_sync_every", "vllm_kv_cache_gib"),
    _non_negative("vllm_max_model_len", "lora_r", "rpo_alpha"),
    _positive("lora_alpha", "discopop_tau"),
    _non_negative("missing_eos_penalty", "generation_eval_every"),
    _positive("generation_eval_prompts"),
    _check_sampling,
    _check_mode,
    _non_negative("weight_decay", "max_grad_norm", "warmup_steps", "checkpoint_every_n_steps", "num_workers"),
    _non_negative("logps_chunk_size"),
    _check_loss,
    _check_reference_sync,
    _check_lengths,
    _check_fractions,
    _check_steps,
    _check_columns,
    _check_report_to,
    _check_strategy,
    _check_prefix_sharing,
)


def first_problem(cfg: DPOConfig) -> str | None:
    """The first problem `_CHECKS` finds in `cfg`, or None."""
    for check in _CHECKS:
        problem = check(cfg)
        if problem:
            return problem
    return None
