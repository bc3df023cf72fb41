"""`--show_data N`: what a run would train on, decoded, before anything is trained: the data prepared as the run
prepares it (with the tokenizer alone, no model weights), N pairs (or online prompts) with the prompt and
completion boundary marked and their token counts, then the split sizes and what truncation did.
"""

from __future__ import annotations

from dpo_lightning.config import DPOConfig
from dpo_lightning.config.sources import dataset_label
from dpo_lightning.data import check_source
from dpo_lightning.data.datamodule import DPODataModule
from dpo_lightning.models import load_tokenizer, resolve_model

RULE = "─" * 8


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)  # EOS and template tokens are part of what trains


def describe_pair(tokenizer, row: dict, title: str) -> list[str]:
    """A pair as the policy reads it: its prompt, then each completion after a marked boundary."""
    prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
    return [
        f"{RULE} {title}: prompt {len(prompt)} tokens, chosen {len(chosen)}, rejected {len(rejected)} {RULE}",
        _decode(tokenizer, prompt),
        f"{RULE} chosen ({len(chosen)} tokens) follows the prompt here {RULE}",
        _decode(tokenizer, chosen),
        f"{RULE} rejected ({len(rejected)} tokens) follows the prompt here {RULE}",
        _decode(tokenizer, rejected),
    ]


def describe_prompt(tokenizer, row: dict, title: str) -> list[str]:
    """An online prompt as the policy reads it before it samples."""
    prompt = row["prompt_ids"]
    return [
        f"{RULE} {title}: prompt {len(prompt)} tokens; completions are sampled after it {RULE}",
        _decode(tokenizer, prompt),
    ]


def show_data(cfg: DPOConfig, count: int) -> str:
    """The text `--show_data` prints for `cfg`'s data."""
    check_source(cfg)
    tokenizer = load_tokenizer(resolve_model(cfg.model_name, "model_name"), cfg.trust_remote_code)
    data = DPODataModule(cfg, tokenizer).prepare()
    describe = describe_prompt if data.mode == "online" else describe_pair
    kind = "prompts" if data.mode == "online" else "pairs"
    lines = [f"{dataset_label(cfg.dataset_name)}: mode {data.mode}, as a run of this configuration prepares it"]
    for index in range(min(count, len(data.train))):
        lines += describe(tokenizer, data.train[index], f"training {kind[:-1]} {index + 1} of {len(data.train)}")
    lines.append(RULE * 4)
    held_out = len(data.val) if data.val is not None else 0
    lines.append(f"training {kind}: {len(data.train)}; validation {kind}: {held_out}")
    if data.truncation is not None:
        lines.append(
            f"truncation (max_length {cfg.max_length}, max_prompt_length {cfg.max_prompt_length}, "
            f"max_completion_length {cfg.max_completion_length}): {data.truncation.describe()}"
        )
    return "\n".join(lines)
