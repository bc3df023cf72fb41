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

# The roles a dataset's columns fill (`columns` maps role -> column): a prompt, as text or as a conversation
# (in this order of precedence), and a pair's two completions. `data.formats` builds its layouts from these.
PROMPT_ROLES = ("prompt", "messages")
PAIR_ROLES = ("chosen", "rejected")
CONTEXT_ROLES = ("system",)  # a column beside the prompt: the chat template's system message
LABEL_ROLES = ("response_a", "response_b", "label")  # two responses and which one is preferred (SHP, PKU, Arena)
COLUMN_ROLES = (*PROMPT_ROLES, *PAIR_ROLES, *CONTEXT_ROLES, *LABEL_ROLES)
LABEL_SIDES = ("a", "b", "tie")  # what `label_values` maps a raw label to
MODES = ("auto", "offline", "online", "reward")
PAIR_MODES = ("offline", "reward")  # modes that train on preference pairs
STRATEGIES = ("ddp", "fsdp")
FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")
# Keys a resumed run may change: how long it trains, where it writes and how a step is computed, never what
# it trains; and the learning rate, the way on after a divergence (the schedule goes on at the new peak rate).
RESUMABLE_CHANGES = (
    "max_steps",
    "num_epochs",
    "learning_rate",
    "output_dir",
    "logps_chunk_size",
    "gradient_checkpointing",
    "precompute_ref_logps",
    "padding_free",
    "prefix_sharing",
    "vllm_gpu_memory_utilization",
    "vllm_kv_cache_gib",
    "report_to",
    "push_to_hub",
)
# Keys whose value is a comma-separated list, which an experiment file may also write as a YAML list.
LIST_KEYS = ("loss_type", "loss_weights", "lora_target_modules", "report_to")
LR_SCHEDULERS = ("constant", "linear", "cosine")
REPORT_TARGETS = ("tensorboard", "wandb", "mlflow", "csv", "none")
PRECISIONS = ("32", "bf16-mixed")
DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


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
    dataset_name: str | list[dict[str, Any]] = "builtin:sentiment-pairs"
    """Hub dataset name, local .json/.jsonl/.parquet/.csv file, `save_to_disk` folder, or `builtin:sentiment-pairs`;
    or a list of sources mixed in one run, each a mapping with a `name`, optionally its own dataset_config,
    train_split, eval_split, columns and label_values, and the part of it taken: `fraction` (a share of its
    training rows) or `rows` (a number of them), and `eval_fraction` or `eval_rows` of its validation rows, drawn
    with the seed (README: Several datasets in one run)."""
    dataset_config: str | None = None
    """Hub dataset configuration (subset) name."""
    train_split: str = "train"
    """Split used for training."""
    eval_split: str | None = None
    """Split used for validation; None uses a `test` split when the source has one, else `val_fraction`."""
    val_fraction: float = 0.05
    """Share of prompts held out for validation when there is no eval split; 0 disables validation there (a
    source with a test or validation split, or eval_split, validates on that split whatever this says)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map of role -> dataset column name, roles: prompt, chosen, rejected, messages, system, and response_a,
    response_b, label for data of two responses and a preference label."""
    label_values: dict[str, str] = field(default_factory=dict)
    """With `label`: each raw label value (as text) -> a, b or tie, e.g. SHP {"1": "a", "0": "b"}. Without it the
    labels a/b, model_a/model_b, tie and tie (bothbad) are understood and numbers are refused (never guessed)."""
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
    """Preference loss, or several comma-separated (summed with loss_weights), of `dpo_lightning.losses.LOSSES`:
    sigmoid, ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
    discopop, sft, sigmoid_norm (TRL's names and semantics), and without a reference simpo, cpo, orpo (README:
    Losses)."""
    loss_weights: str = ""
    """Comma-separated weights of loss_type's losses, one each (e.g. 0.8,0.2); empty weighs each 1."""
    beta: float = 0.1
    """KL penalty strength: rewards are beta * (policy logp - reference logp)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped labels, in [0, 0.5): conservative DPO with sigmoid, rDPO's with robust, EXO's
    epsilon with exo_pair (required there), the soft labels of aot and aot_unpaired."""
    rpo_alpha: float = 0.0
    """RPO: adds rpo_alpha times the chosen completions' mean token negative log-likelihood to the loss (an sft
    term of that weight), reported as nll_loss; 0 leaves it out."""
    discopop_tau: float = 0.05
    """DiscoPOP (`loss_type: discopop`): the temperature of the sigmoid that blends its logistic and exponential
    terms; the paper's value is 0.05."""
    cpo_alpha: float = 1.0
    """CPO and SimPO (`loss_type: cpo, simpo`): the weight of the chosen completions' NLL added to the loss
    (TRL's CPOTrainer's default, 1; the SimPO paper's objective is cpo_alpha 0)."""
    simpo_gamma: float = 0.5
    """SimPO (`loss_type: simpo`): the target reward margin gamma (the margin is taken per token, gamma / beta)."""
    f_divergence_type: str = "reverse_kl"
    """f-DPO: the divergence from the reference the policy is held to: reverse_kl (DPO's), forward_kl,
    js_divergence or alpha_divergence; other than reverse_kl only for the losses README's table marks."""
    f_alpha_divergence_coef: float = 0.5
    """The alpha of f_divergence_type alpha_divergence."""
    use_weighting: bool = False
    """WPO: weight each pair by the policy's length-normalised, probability-aligned likelihood of both of its
    completions (detached), so that off-policy pairs count less."""
    ld_alpha: float | None = None
    """LD-DPO, in [0, 1]: the completion tokens past the pair's shorter completion count ld_alpha times in every
    log-prob sum the loss sees (policy and reference); null (or 1) counts them fully."""
    sync_ref_model: bool = False
    """TR-DPO: every ref_model_sync_steps optimizer steps the reference becomes ref_model_mixup_alpha * policy +
    (1 - ref_model_mixup_alpha) * reference, weight by weight (saved in each checkpoint). Not with LoRA or
    precompute_ref_logps."""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO: the policy's share of the reference after each sync, in (0, 1]."""
    ref_model_sync_steps: int = 512
    """TR-DPO: optimizer steps between reference syncs."""

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
    prefix_sharing: bool = False
    """Lay each pair out once as prompt, chosen, rejected (the rejected tokens' positions restart at the prompt's
    end and they never attend to the chosen ones), so that the policy, the reference and the precompute pass
    compute each prompt once instead of twice; log-probs equal the separate sequences'. DPO only, with
    attn_implementation sdpa or eager (a 4D mask of T x T per row; README: Prefix sharing)."""
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
        from dpo_lightning.config.checks import first_problem

        problem = first_problem(self)
        if problem:
            raise ConfigError(problem)

    @property
    def frozen_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(DPOConfig)}
FIELD_TYPES = typing.get_type_hints(DPOConfig)
