"""Judges: what scores each (prompt, completion) of online DPO and of generation metrics, from the run's
`reward_model` string. A judge is one of three kinds:

A `reward_model` string is read, in this order, as:

1. ``package.module:function`` -- dotted identifiers, a colon, an identifier, and not an existing path: a Python
   function ``fn(prompts: list[str], completions: list[str]) -> list[float] | tensor | ndarray`` returning one
   finite score per completion. Chat prompts reach it as text, see `prompt_text`. The module must be importable
   (installed, or on ``PYTHONPATH``).
2. a local folder containing `REWARD_MARKER` (``reward_model.json``) -- a `RewardModel` (dpo_lightning.models) trained
   here (``mode: reward``): a scalar head on a causal-LM backbone, pooled at the last real token.
3. anything else, a local folder or a Hub name -- any Hugging Face sequence-classification reward model with one
   output (``num_labels=1``), scored with its own tokenizer and chat template, e.g.
   ``Skywork/Skywork-Reward-V2-Qwen3-0.6B``.

Models (kinds 2 and 3) see the conversation rendered and cut by `data.reward_text.encode_for_reward` to
`max_length` tokens: a long prompt loses its start, the completion is kept; which inputs were cut is in
`last_cut` after each `score` (online DPO reports their share as `objective/judge_cut_rate`). A folder of
kind 2 is also a valid kind-3 folder; both score the same whenever a text does not end in the pad token
(Hugging Face pools the rightmost non-pad token, RewardModel the last token of the attention mask).
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from dpo_lightning.data.batch import SequenceBatch
from dpo_lightning.data.reward_text import Prompt, encode_for_reward_cut, prompt_text
from dpo_lightning.errors import UserError, first_line
from dpo_lightning.models import (
    REWARD_FORMAT,
    REWARD_MARKER,
    ModelSource,
    RewardModel,
    freeze,
    load_tokenizer,
    resolve_model,
    set_pad_token_id,
)

FUNCTION_SPEC = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
SUGGESTED_REWARD_MODEL = "Skywork/Skywork-Reward-V2-Qwen3-0.6B"


# --- Scorers ------------------------------------------------------------------------------------------------------


class Judge(Protocol):
    description: str

    def score(self, prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        """(N,) float32 scores on CPU, one per completion."""
        ...

    def to(self, device) -> Judge: ...


class FunctionJudge:
    """A Python function `fn(prompts, completions)`; its output is checked (count, numeric, finite)."""

    def __init__(self, fn: Callable, spec: str, key: str = "reward_model") -> None:
        self.fn = fn
        self.spec = spec
        self.key = key
        self.description = f"function {spec}"

    def to(self, device) -> FunctionJudge:
        return self

    def score(self, prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        out = self.fn([prompt_text(p) for p in prompts], list(completions))
        return self._check(out, len(completions))

    def _fail(self, what: str) -> UserError:
        return UserError(f"{self.key} {self.spec} {what}")

    def _check(self, out, expected: int) -> torch.Tensor:
        if isinstance(out, torch.Tensor) or _is_ndarray(out):
            array = out.detach().cpu() if isinstance(out, torch.Tensor) else out
            if array.ndim != 1:
                raise self._fail(
                    f"returned an array of shape {tuple(array.shape)}; expected one score per completion, "
                    f"shape ({expected},)"
                )
            numeric = not array.dtype.is_complex if isinstance(out, torch.Tensor) else array.dtype.kind in "biuf"
            if not numeric:
                raise self._fail(f"returned non-numeric scores (dtype {array.dtype})")
            values = array.tolist()
        elif isinstance(out, Sequence) and not isinstance(out, str | bytes):
            values = list(out)
        else:
            raise self._fail(f"returned a {type(out).__name__}; expected a list of {expected} floats")
        if len(values) != expected:
            raise self._fail(f"returned {len(values)} scores for {expected} completions")
        scores = []
        for index, value in enumerate(values):
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
                value = value.item()
            if not isinstance(value, numbers.Real):
                shown = repr(value)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise self._fail(f"returned a non-numeric score {shown} ({type(value).__name__}) at index {index}")
            value = float(value)
            if not math.isfinite(value):
                raise self._fail(f"returned a non-finite score {value} at index {index}")
            scores.append(value)
        return torch.tensor(scores, dtype=torch.float32)


def _is_ndarray(obj) -> bool:
    return type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray"


class _ModelJudge:
    """Shared batching for the model kinds: encode, right-pad, no_grad forward in batches, scores to CPU fp32."""

    def __init__(self, module: torch.nn.Module, tokenizer, *, description: str, batch_size: int, max_length: int):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}")
        self.module = freeze(module)
        self.tokenizer = tokenizer
        self.description = description
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device):
        self.module.to(device)
        return self

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, prompts: list[Prompt], completions: list[str]) -> torch.Tensor:
        ids, cut = encode_for_reward_cut(self.tokenizer, prompts, completions, max_length=self.max_length)
        self.last_cut = torch.tensor(cut, dtype=torch.bool)
        scores = []
        for start in range(0, len(ids), self.batch_size):
            rows = ids[start : start + self.batch_size]
            # right padding, masks from lengths: the whole text is the "completion" of an empty prompt
            batch = SequenceBatch.from_rows([[] for _ in rows], rows, self.tokenizer.pad_token_id).to(self.device)
            input_ids, mask = batch.input_ids, batch.attention_mask
            scores.append(self._forward(input_ids, mask).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float32)


class ClassifierJudge(_ModelJudge):
    """A Hugging Face `AutoModelForSequenceClassification` with one label: `logits[:, 0]` of its own pooling (the
    rightmost token that is not the pad id; with right padding, padding never changes a score)."""

    def __init__(self, model, tokenizer, *, description: str, batch_size: int = 8, max_length: int = 1024):
        super().__init__(model, tokenizer, description=description, batch_size=batch_size, max_length=max_length)

    @property
    def model(self):
        return self.module

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]


class RewardModelJudge(_ModelJudge):
    """A `RewardModel` (scalar head on a causal-LM backbone), pooled at the last token of the attention mask."""

    def __init__(
        self, reward_model: RewardModel, tokenizer, *, description: str, batch_size: int = 8, max_length: int = 1024
    ):
        super().__init__(reward_model, tokenizer, description=description, batch_size=batch_size, max_length=max_length)

    @property
    def model(self) -> RewardModel:
        return self.module

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.module(input_ids, attention_mask)


# --- Reading a reward_model string ----------------------------------------------------------------------------------


def _is_function_spec(spec: str) -> bool:
    return FUNCTION_SPEC.fullmatch(spec) is not None and not Path(spec).expanduser().exists()


def _marker_path(spec: str) -> Path | None:
    try:
        marker = Path(spec).expanduser() / REWARD_MARKER
        return marker if marker.is_file() else None
    except OSError:
        return None


def judge_kind(spec: str) -> str:
    """The kind `spec` names: "function", "project" or "sequence_classification" (nothing is imported or loaded)."""
    if _is_function_spec(spec):
        return "function"
    if _marker_path(spec) is not None:
        return "project"
    return "sequence_classification"


def _load_function(spec: str, key: str) -> Callable:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"{key}: cannot import module '{module_name}' ({first_line(exc)}); expected package.module:function"
        ) from None
    except Exception as exc:  # the module itself failed while importing: show its error, in one line
        raise UserError(
            f"{key}: importing module '{module_name}' failed: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if not hasattr(module, attr):
        raise UserError(f"{key}: module '{module_name}' has no function '{attr}' (from {spec})")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UserError(f"{key}: {spec} is a {type(fn).__name__}, not a function")
    return fn


def _check_classifier_config(spec: str, source: ModelSource, key: str, trust_remote_code: bool):
    """The folder's or Hub model's config, refused unless it describes a one-output sequence classifier."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            source.name_or_path, trust_remote_code=trust_remote_code, local_files_only=source.local_files_only
        )
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"{key}: could not read the config of '{spec}': {first_line(exc)}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        what = architectures[0] if architectures else f"'{config.model_type}' model that lists no architecture"
        raise UserError(
            f"{key}: '{spec}' is a {what}, not a sequence-classification reward model (no scalar head); "
            f"use a reward model such as {SUGGESTED_REWARD_MODEL}, or train one with mode: reward"
        )
    if config.num_labels != 1:
        raise UserError(
            f"{key}: '{spec}' has {config.num_labels} output labels; "
            "a reward model needs one scalar output (num_labels=1)"
        )
    return config


def _read_marker(spec: str, key: str) -> dict:
    marker = _marker_path(spec)
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot read {marker}: {first_line(exc)}") from None
    if not isinstance(data, dict) or data.get("kind") != "dpo_lightning.RewardModel":
        raise UserError(f"{key}: {marker} is not a dpo_lightning reward model marker")
    if data.get("format") != REWARD_FORMAT:
        raise UserError(
            f"{key}: {marker} has format {data.get('format')!r}; this dpo_lightning reads format {REWARD_FORMAT}"
        )
    return data


def check_judge(spec: str, key: str = "reward_model", trust_remote_code: bool = False) -> None:
    """Pre-flight before any model loads: a function path imports its module and finds a callable; a folder or Hub
    name must resolve (`models.resolve_model`) and its config must describe a one-output sequence classifier."""
    kind = judge_kind(spec)
    if kind == "function":
        _load_function(spec, key)
        return
    source = resolve_model(spec, key)
    if kind == "project":
        _read_marker(spec, key)
    _check_classifier_config(spec, source, key, trust_remote_code)


def load_judge(
    spec: str,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    max_length: int = 1024,
    trust_remote_code: bool = False,
    key: str = "reward_model",
) -> Judge:
    """The judge `spec` names (see the module docstring), frozen, in eval mode, on `device`."""
    kind = judge_kind(spec)
    if kind == "function":
        return FunctionJudge(_load_function(spec, key), spec, key)

    source = resolve_model(spec, key)
    _check_classifier_config(spec, source, key, trust_remote_code)
    if kind == "project":
        model, tokenizer = _load_reward_model(spec, source, key, dtype, trust_remote_code)
        judge_type, description = RewardModelJudge, f"RewardModel {spec}"
    else:
        model, tokenizer = _load_classifier(spec, source, key, dtype, trust_remote_code)
        judge_type, description = ClassifierJudge, f"sequence-classification model {spec}"
    judge = judge_type(model, tokenizer, description=description, batch_size=batch_size, max_length=max_length)
    return judge.to(device)


def _load_reward_model(spec: str, source: ModelSource, key: str, dtype, trust_remote_code: bool):
    """A RewardModel folder and its tokenizer (the base model's, when the folder has none)."""
    marker = _read_marker(spec, key)
    folder = Path(source.name_or_path)
    tokenizer_source = source
    base_model = marker.get("base_model")
    if not (folder / "tokenizer_config.json").is_file() and base_model:
        tokenizer_source = resolve_model(base_model, f"{key} (base_model in {REWARD_MARKER})")
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code)
    return RewardModel.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code), tokenizer


def _load_classifier(spec: str, source: ModelSource, key: str, dtype, trust_remote_code: bool):
    """A Hugging Face sequence-classification model and its own tokenizer, with a pad id for batching."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source.name_or_path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            local_files_only=source.local_files_only,
        )
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise UserError(f"{key}: could not load reward model '{spec}': {first_line(exc)}") from None
    if model.config.get_text_config().pad_token_id is None:
        set_pad_token_id(model.config, tokenizer.pad_token_id)
    return model, tokenizer
