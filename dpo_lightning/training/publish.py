"""The trained model as a Hugging Face user expects it: a model card in final/README.md, and `push_to_hub`
uploading final/ at the end of a run (token from the environment, as huggingface_hub reads it)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from dpo_lightning.config import DPOConfig
from dpo_lightning.config.sources import dataset_label, source_names
from dpo_lightning.errors import UserError, first_line
from dpo_lightning.hub import hub_reachable, offline_env

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CARD_HYPERPARAMETERS = (
    "loss_type",
    "beta",
    "label_smoothing",
    "rpo_alpha",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_epochs",
    "max_length",
    "max_prompt_length",
    "precision",
    "seed",
)
ONLINE_HYPERPARAMETERS = ("reward_model", "max_new_tokens", "temperature", "top_p", "sampler")
LORA_HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit")


def training_command() -> str:
    """The command line of this process, as a user would type it again."""
    return shlex.join(["python", *sys.argv])


def model_card(cfg: DPOConfig, *, mode: str, step: int, metrics: dict[str, float] | None, command: str) -> str:
    """final/README.md: base model, data, method and loss, key hyperparameters, the final validation metrics
    and the command that trained it, with the Hub's metadata block on top."""
    lora = cfg.lora_r > 0
    hub_datasets = [name for name in source_names(cfg.dataset_name) if "/" in name and not Path(name).exists()]
    header = ["---", f"base_model: {cfg.model_name}", f"library_name: {'peft' if lora else 'transformers'}"]
    header += ["tags:", "- dpo", "- dpo-lightning", *(["- lora"] if lora else [])]
    if hub_datasets:
        header += ["datasets:", *(f"- {name}" for name in dict.fromkeys(hub_datasets))]
    header.append("---")
    method = {
        "offline": "offline DPO on preference pairs",
        "online": "online DPO: two completions sampled per prompt from the policy, ordered by the reward model",
        "reward": "reward-model training (Bradley-Terry) on preference pairs",
    }.get(mode, mode)
    keys = list(CARD_HYPERPARAMETERS) + (list(ONLINE_HYPERPARAMETERS) if mode == "online" else [])
    keys += list(LORA_HYPERPARAMETERS) if lora else []
    values = cfg.to_dict()
    adapters = f", as rank-{cfg.lora_r} LoRA adapters (peft) against the base with them disabled" if lora else ""
    loader = "AutoPeftModelForCausalLM" if lora else "AutoModelForCausalLM"
    body = [
        f"# {Path(cfg.output_dir).name}",
        "",
        f"`{cfg.model_name}` fine-tuned with Direct Preference Optimization (Rafailov et al. 2023,"
        f" arXiv 2305.18290) by dpo-lightning: {method}, on `{dataset_label(cfg.dataset_name)}`, for {step} "
        "optimizer steps"
        f"{adapters}.",
        "",
        "## Hyperparameters",
        "",
        "| key | value |",
        "| --- | --- |",
        *(f"| {key} | `{values[key]}` |" for key in keys),
        "",
        "## Final validation metrics" + (f" (step {step})" if metrics else ""),
        "",
    ]
    if metrics:
        body += ["| metric | value |", "| --- | ---: |", *(f"| {k} | {_number(v)} |" for k, v in metrics.items())]
    else:
        body.append("No validation set was held out.")
    body += ["", "## How it was trained", "", "```bash", command, "```", "", "## Use", "", "```python"]
    package = "peft" if lora else "transformers"
    body += [f"from {package} import {loader}", "", f'model = {loader}.from_pretrained("PATH")', "```", ""]
    return "\n".join(header + [""] + body)


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def check_push(cfg: DPOConfig) -> None:
    """Before training: `push_to_hub` names a repository and the Hub can be reached."""
    if cfg.push_to_hub is None:
        return
    if not REPO_ID.match(cfg.push_to_hub):
        raise UserError(f"push_to_hub: '{cfg.push_to_hub}' is not a Hub repository id (OWNER/NAME)")
    if offline_env() or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline_env() else "the Hub is unreachable"
        raise UserError(f"push_to_hub: cannot upload to {cfg.push_to_hub} ({why}); leave push_to_hub unset")


def push_final(folder: Path, repo_id: str) -> str:
    """Upload final/ to the model repository `repo_id` (created when missing, private by default); returns its
    address. The token is huggingface_hub's: HF_TOKEN, or the one `hf auth login` stored."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="dpo-lightning")
    except Exception as exc:  # authentication, permissions, network: the run's files stay where they are
        raise UserError(f"push_to_hub: upload of {folder} to {repo_id} failed: {first_line(exc)}") from None
    return f"https://huggingface.co/{repo_id}"
