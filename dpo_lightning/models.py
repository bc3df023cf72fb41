"""Policy, reference and tokenizer loading.

Model names resolve before anything heavy happens: the built-in tiny model, a local folder, or a Hub name.
A Hub name that is neither cached nor reachable fails at once with one line, rather than after the Hub
client's retry loop (about 25 s per file here), and a cached one loads without touching the network.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import NamedTuple

import torch

from dpo_lightning.builtin import BUILTIN_MODEL, builtin_model_dir
from dpo_lightning.errors import UserError
from dpo_lightning.hub import hub_reachable, offline_env

log = logging.getLogger(__name__)


class ModelSource(NamedTuple):
    name_or_path: str
    local_files_only: bool


def _cached_on_hub(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id is "not cached"; the caller reports the name
        return False


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else the user meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_model(name: str, key: str = "model_name") -> ModelSource:
    """Where to load `name` from, or a UserError naming `key` and how to fix it."""
    if name == BUILTIN_MODEL:
        return ModelSource(str(builtin_model_dir()), True)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: {path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(str(path), True)
    if _looks_like_path(name):
        raise UserError(f"{key}: model folder not found: {name}")
    usable = not offline_env() and hub_reachable()
    if not usable and _cached_on_hub(name):
        return ModelSource(name, True)
    if not usable:
        why = "HF_HUB_OFFLINE is set" if offline_env() else "the Hub is unreachable"
        raise UserError(
            f"{key}: could not fetch model '{name}' from the Hugging Face Hub ({why}) and it is not cached; "
            f"download it where there is network or point {key} at a local folder, e.g. --{key} ./my-model"
        )
    return ModelSource(name, False)


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """The tokenizer, with pad = EOS when the model defines no pad token (masks never rely on the pad id)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.name_or_path, local_files_only=source.local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the tokenizer of '{source.name_or_path}': {_first_line(exc)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer of '{source.name_or_path}' defines no EOS token; completions need one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of two forward passes; dropout noise would bias the log-ratio."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def load_causal_lm(source: ModelSource, *, dtype: torch.dtype, attn_implementation: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            local_files_only=source.local_files_only,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"could not load model '{source.name_or_path}': {_first_line(exc)}") from None
    disable_dropout(model)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A reference model: eval mode, no gradients, never in an optimizer."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_policy(cfg, source: ModelSource):
    """The trained policy, always in fp32 master weights; `precision` decides the compute dtype."""
    return load_causal_lm(
        source,
        dtype=torch.float32,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )


def load_reference(cfg, source: ModelSource, initial_policy: torch.nn.Module | None = None):
    """The frozen reference: a copy of `initial_policy` when it is the freshly loaded policy (no second
    read from disk), else the model at `source` (`ref_model_name`, or the initial policy when resuming)."""
    if initial_policy is not None:
        reference = copy.deepcopy(initial_policy).to(cfg.frozen_dtype)
    else:
        reference = load_causal_lm(
            source,
            dtype=cfg.frozen_dtype,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )
    return freeze(reference)


# --- Reward models ------------------------------------------------------------------------------------------------

REWARD_MARKER = "reward_model.json"
REWARD_FORMAT = 1


def _set_pad_token_id(config, pad_token_id: int) -> None:
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
            raise UserError(f"could not load the config of '{source.name_or_path}': {_first_line(exc)}") from None
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
                f"could not load '{source.name_or_path}' as a reward model backbone: {_first_line(exc)}"
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
            _set_pad_token_id(model.config, pad_token_id)
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
            raise UserError(f"could not load reward model '{folder}': {_first_line(exc)}") from None
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
        import json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None and self.config.get_text_config().pad_token_id is None:
            _set_pad_token_id(self.config, tokenizer.pad_token_id)
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
