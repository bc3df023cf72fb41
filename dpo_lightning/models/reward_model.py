"""RewardModel: a scalar head on a causal-LM backbone, the network `mode: reward` trains and a judge may load.

On disk it is a standard Hugging Face sequence-classification folder plus `REWARD_MARKER`, so that
`AutoModelForSequenceClassification` loads it too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dpo_lightning.errors import UserError, first_line
from dpo_lightning.models.loading import ModelSource, disable_dropout

REWARD_MARKER = "reward_model.json"
REWARD_FORMAT = 1


def set_pad_token_id(config, pad_token_id: int) -> None:
    """Hugging Face's sequence-classification heads read the pad id from the text config (batches need one)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_config.pad_token_id = pad_token_id
    if text_config is not config:
        config.pad_token_id = pad_token_id


class _HeadReportFilter(logging.Filter):
    """Holds back transformers' load report while a causal LM loads as a sequence-classification model: its
    "newly initialized" entry for the score head is expected there. The caller re-emits the held report when the
    loading info shows anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


def _only_the_new_head(info: dict, backbone_prefix: str) -> bool:
    """True when the load report says only what loading a causal LM for sequence classification always says:
    the score head is new and the LM's own output head (outside the backbone) is dropped."""
    missing = info.get("missing_keys", set())
    unexpected = info.get("unexpected_keys", set())
    return (
        all(k.startswith("score.") for k in missing)
        and not any(k.startswith(backbone_prefix + ".") for k in unexpected)
        and not info.get("mismatched_keys")
        and not info.get("error_msgs")
    )


class RewardModel(torch.nn.Module):
    """A scalar head on a causal-LM backbone: a Hugging Face `*ForSequenceClassification` with one label, scored
    at the last real token of each sequence.

    The wrapped model is kept as is, so `save_pretrained` writes a standard Hugging Face sequence-classification
    folder (loadable by `AutoModelForSequenceClassification`) plus `REWARD_MARKER`. Hugging Face pools the rightmost
    token that is not the pad id; `forward` pools the last position whose attention mask is 1 instead, so a text
    that ends in the pad token (pad may equal EOS) still scores at its true end. On right-padded texts that do not
    end in the pad token the two agree.
    """

    def __init__(self, model) -> None:
        super().__init__()
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1:
            raise ValueError(f"RewardModel needs a sequence-classification model with num_labels=1, got {num_labels}")
        if not isinstance(getattr(model, "score", None), torch.nn.Module):
            raise UserError(
                f"{type(model).__name__} has no `score` head; RewardModel supports decoder models whose "
                "sequence-classification head is `score` (Llama, Qwen, Mistral, Gemma, ...)"
            )
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def _no_split_modules(self) -> list[str]:
        # the decoder layer classes FSDP wraps one by one, as for the policy
        return list(getattr(self.model, "_no_split_modules", None) or [])

    @property
    def backbone(self) -> torch.nn.Module:
        return getattr(self.model, self.model.base_model_prefix)

    @property
    def head(self) -> torch.nn.Module:
        return self.model.score

    @classmethod
    def from_causal_lm(
        cls,
        source: ModelSource,
        *,
        dtype: torch.dtype,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
        pad_token_id: int | None = None,
        head_seed: int = 0,
    ) -> RewardModel:
        """The causal LM at `source` with a new scalar head: backbone weights from the LM, head `score` drawn from
        N(0, 1/(hidden+1)) with a generator seeded by `head_seed` (so every rank and every run starts from the same
        head, near 0). A folder that already holds a one-label `score` head keeps it."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        try:
            config = AutoConfig.from_pretrained(
                source.name_or_path, trust_remote_code=trust_remote_code, local_files_only=source.local_files_only
            )
        except (OSError, ValueError, ImportError) as exc:
            raise UserError(f"could not load the config of '{source.name_or_path}': {first_line(exc)}") from None
        remote = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
        if type(config) not in AutoModelForSequenceClassification._model_mapping and not remote:
            raise UserError(
                f"model type '{config.model_type}' of '{source.name_or_path}' has no sequence-classification class "
                "in transformers, so it cannot carry a reward head; pick a decoder model such as Qwen2 or Llama"
            )
        quiet = _HeadReportFilter()
        hf_log = logging.getLogger("transformers.modeling_utils")
        hf_log.addFilter(quiet)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source.name_or_path,
                num_labels=1,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                local_files_only=source.local_files_only,
                output_loading_info=True,
            )
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise UserError(
                f"could not load '{source.name_or_path}' as a reward model backbone: {first_line(exc)}"
            ) from None
        finally:
            hf_log.removeFilter(quiet)
        if not _only_the_new_head(info, model.base_model_prefix):
            for record in quiet.held:
                hf_log.handle(record)
        reward = cls(model)
        if any(k.startswith("score.") for k in info.get("missing_keys", ())):
            reward.init_head(head_seed)
        if pad_token_id is not None:
            set_pad_token_id(model.config, pad_token_id)
        disable_dropout(model)
        return reward

    def init_head(self, seed: int = 0) -> None:
        """Redraw the head from N(0, 1/(hidden+1)), independent of the global torch RNG."""
        weight = self.head.weight
        generator = torch.Generator().manual_seed(seed)
        std = 1.0 / (weight.shape[-1] + 1) ** 0.5
        fresh = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std
        with torch.no_grad():
            weight.copy_(fresh.to(device=weight.device, dtype=weight.dtype))
            if getattr(self.head, "bias", None) is not None:
                self.head.bias.zero_()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str | None = "sdpa",
        trust_remote_code: bool = False,
    ) -> RewardModel:
        """A RewardModel written by `save_pretrained` (any one-label sequence-classification folder loads)."""
        from transformers import AutoModelForSequenceClassification

        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder),
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                local_files_only=True,
            )
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise UserError(f"could not load reward model '{folder}': {first_line(exc)}") from None
        if model.config.num_labels != 1:
            raise UserError(
                f"reward model '{folder}' has {model.config.num_labels} output labels; "
                "a reward model needs one scalar output (num_labels=1)"
            )
        disable_dropout(model)
        return cls(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) ids and mask -> (N,) fp32 scores: the head at the last position whose mask is 1 (pooled by
        lengths, never by comparing ids with the pad id)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=attention_mask.device)
        last = (positions * attention_mask.ne(0)).argmax(-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
        return self.head(pooled)[:, 0].float()

    def save_pretrained(
        self,
        folder: str | Path,
        *,
        tokenizer=None,
        state_dict: dict[str, torch.Tensor] | None = None,
        base_model: str | None = None,
    ) -> Path:
        """Write a standard Hugging Face sequence-classification folder (num_labels=1, safetensors), the tokenizer
        if given, and `REWARD_MARKER`. `state_dict` (e.g. gathered from FSDP) may be keyed like the wrapped model or
        like this wrapper (`model.` prefix); by default the model's own weights are written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None and self.config.get_text_config().pad_token_id is None:
            set_pad_token_id(self.config, tokenizer.pad_token_id)
        if state_dict is not None:
            state_dict = self._unwrap_state_dict(state_dict)
        self.model.save_pretrained(folder, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        marker = {
            "format": REWARD_FORMAT,
            "kind": "dpo_lightning.RewardModel",
            "base_model": base_model,
            "pooling": "last_token",
        }
        (folder / REWARD_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return folder

    def _unwrap_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = set(self.model.state_dict())
        if set(state_dict) <= own:
            return state_dict
        stripped = {k.removeprefix("model."): v for k, v in state_dict.items()}
        if all(k.startswith("model.") for k in state_dict) and set(stripped) <= own:
            return stripped
        return state_dict  # let Hugging Face report keys it does not know
