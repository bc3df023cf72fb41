"""One evaluation, top to bottom: resolve the paths -> check the options -> read the data -> load the reward
model and probe it -> load the policy and reference -> measure -> the report dict (report.py writes it).

Every mistake a user can make is caught in the first steps, before any model loads, as one UserError line.
"""

from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch

from dpo_lightning.config import make_config
from dpo_lightning.config.sources import dataset_label, is_mixture
from dpo_lightning.data.collate import PairCollator, PromptCollator, collate_in_batches
from dpo_lightning.data.formats import (
    normalize,
    normalize_prompts,
    row_options,
    unique_prompts,
)
from dpo_lightning.data.mixture import load_rows
from dpo_lightning.data.sources import load_splits
from dpo_lightning.data.tokenize import tokenize_pair, tokenize_prompts
from dpo_lightning.dpo.objective import LossSettings
from dpo_lightning.dpo.reference import FrozenReference, Reference
from dpo_lightning.errors import UserError
from dpo_lightning.evaluation.pairs import evaluate_pairs, reward_agreement
from dpo_lightning.evaluation.report import small_sample_notes
from dpo_lightning.layout import CHECKPOINTS, RUN_CONFIG, find_resume_checkpoint, library_versions, read_run_record
from dpo_lightning.models import ModelSource, freeze, load_causal_lm, load_tokenizer, resolve_model
from dpo_lightning.models.lora import is_adapter_folder
from dpo_lightning.online.comparison import compare_generations
from dpo_lightning.online.judges import check_judge, load_judge
from dpo_lightning.online.sampling import SamplingSettings, stop_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """evaluate.py's options; None means "from the run's run_config.json, else the default"."""

    model_path: str
    dataset_name: str | None = None
    ref_model_path: str | None = None
    beta: float | None = None
    reward_model: str | None = None
    split: str | None = None
    columns: str | None = None  # JSON role -> column map, in place of the run's `columns`
    num_pairs: int = 256
    num_prompts: int | None = None  # default: 64 with a reward model, else 0
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    batch_size: int = 8
    output_dir: str = "outputs/eval"
    seed: int = 0
    dtype: str = "float32"


@dataclass(frozen=True)
class ResolvedModel:
    source: ModelSource  # a Hugging Face model folder, or a Hub name (cached or reachable)
    record: dict[str, Any] | None  # the training run's run_config.json, when there is one

    @property
    def folder(self) -> Path:
        return Path(self.source.name_or_path)


def resolve_model_path(path: str) -> ResolvedModel:
    """A model folder (a checkpoint's is one), a training output folder (its final/ or newest checkpoint), or
    a Hub name; with the run record found beside it."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if _is_model_folder(folder):
            record = read_run_record(folder / RUN_CONFIG) or read_run_record(folder.parent / RUN_CONFIG)
            return ResolvedModel(_local(folder), record)
        if _is_model_folder(folder / "final"):
            return ResolvedModel(_local(folder / "final"), read_run_record(folder / RUN_CONFIG))
        checkpoint = find_resume_checkpoint(folder) if (folder / CHECKPOINTS).is_dir() else None
        if checkpoint is not None:
            return ResolvedModel(_local(checkpoint), read_run_record(checkpoint / RUN_CONFIG))
        raise UserError(
            f"model_path: {path} is not a model folder (no config.json or adapter_config.json), a training output "
            "folder (no final/ "
            "and no complete checkpoint) or a checkpoint"
        )
    return ResolvedModel(resolve_model(path, "model_path"), None)  # a Hub name, or one line for a missing folder


def _is_model_folder(folder: Path) -> bool:
    """A Hugging Face model folder, or a LoRA adapter folder (a LoRA run's checkpoints and final/)."""
    return (folder / "config.json").is_file() or is_adapter_folder(folder)


def _local(folder: Path) -> ModelSource:
    return ModelSource(str(folder), True)


def run_settings(options: EvalOptions, record: dict | None) -> dict[str, Any]:
    """Every setting the evaluation uses: the option when given, else the training run's, else a default."""
    trained = (record or {}).get("config", {})

    def pick(name: str, run_key: str, default):
        value = getattr(options, name)
        return value if value is not None else trained.get(run_key, default)

    reference = options.ref_model_path or trained.get("ref_model_name") or trained.get("model_name")
    return {
        "dataset_name": pick("dataset_name", "dataset_name", None),
        "reference": reference,  # None: the policy is its own reference
        "beta": pick("beta", "beta", 0.1),
        # the trained run's objective (loss_type, its weights and options), with beta as given
        **{k: v for k, v in asdict(LossSettings.of(trained)).items() if k != "beta"},
        "max_new_tokens": pick("max_new_tokens", "max_new_tokens", 128),
        "temperature": pick("temperature", "temperature", 0.9),
        "top_p": pick("top_p", "top_p", 1.0),
        "num_prompts": options.num_prompts if options.num_prompts is not None else (64 if options.reward_model else 0),
    }


def check_options(options: EvalOptions, settings: dict[str, Any]) -> None:
    """The option combinations that cannot work, before anything loads."""
    if settings["dataset_name"] is None:
        raise UserError(
            "dataset_name: no dataset given and the model has no run_config.json naming one; pass --dataset_name"
        )
    for name in ("num_pairs", "batch_size"):
        if getattr(options, name) < (0 if name == "num_pairs" else 1):
            raise UserError(
                f"--{name} must be {'>= 0' if name == 'num_pairs' else '> 0'}, got {getattr(options, name)}"
            )
    if settings["num_prompts"] < 0:
        raise UserError(f"--num_prompts must be >= 0, got {settings['num_prompts']}")
    if settings["num_prompts"] > 0 and options.reward_model is None:
        raise UserError(
            "--num_prompts: generation metrics (win rate against the reference) need a judge; pass --reward_model "
            "(a sequence-classification model, a RewardModel folder or package.module:function)"
        )
    if not settings["beta"] > 0:
        raise UserError(f"--beta must be > 0, got {settings['beta']}")
    if not 0 < settings["top_p"] <= 1 or not settings["temperature"] > 0:
        raise UserError("--temperature must be > 0 and --top_p in (0, 1]")
    if options.reward_model is not None:
        check_judge(options.reward_model, "--reward_model")


# ----------------------------------------------------------------------------- data


def _data_config(options: EvalOptions, settings: dict, record: dict | None):
    """A training configuration for the data layer: the run's (columns, lengths, splits), on this dataset."""
    values = dict((record or {}).get("config", {}))
    values = {k: v for k, v in values.items() if k not in ("mode", "reward_model", "output_dir")}
    # what only training does (its generation metrics, its sampling engine) must not make the data's
    # configuration invalid here, where the reward model is evaluate.py's own option
    values.update(generation_eval_every=0, sampler="hf", precompute_ref_logps=False)
    values.update(dataset_name=settings["dataset_name"], seed=values.get("seed", options.seed))
    if options.split is not None:
        values.update(train_split=options.split, eval_split=None)
    if options.columns is not None:  # the run's columns named its training file's; this file may differ
        values["columns"] = options.columns
    try:
        return make_config(values)
    except UserError as exc:
        if options.columns is not None and str(exc).startswith("columns"):
            raise UserError(f"--{exc}") from None
        raise


class Measured(NamedTuple):
    """What an evaluation measured, for the report: the split, how many rows it holds, and whether training
    saw them."""

    split: str  # e.g. "test", "train (the val_fraction 0.05 draw training held out)"
    rows: int
    training_rows: bool


def evaluation_rows(cfg, options: EvalOptions) -> tuple[list[dict] | None, list[dict], Measured]:
    """(pair rows or None when the data has none, prompt rows, what they are) of the evaluated split: `--split`
    whole, else the part training held out (`mixture.load_rows`: eval splits, or the run's val_fraction draw, of
    each source), else the whole training data, which training saw (said in one warning)."""
    with _columns_hint(cfg, options):
        if options.split is not None:
            mode, rows, name = _named_split(cfg, options)
            label, trained_on = cfg.dataset_name, False
        else:
            loaded = load_rows(cfg)
            mode, rows, label = loaded.mode, loaded.val or loaded.train, loaded.label
            name = loaded.val_origin if loaded.val else loaded.train_origin
            trained_on = not loaded.val and options.dataset_name is None
    if trained_on:
        log.warning(
            "evaluating %s[%s] whole: the training run held none of it out (val_fraction 0, no eval split), so these "
            "are pairs it trained on; pass --split or --dataset_name to measure unseen ones",
            label,
            name,
        )
    pairs = rows if mode != "online" else None
    prompts = unique_prompts(rows) if pairs is not None else rows
    return pairs, prompts, Measured(name, len(rows), trained_on)


def _named_split(cfg, options: EvalOptions) -> tuple[str, list[dict], str]:
    """(mode, rows, split name) of `--split` whole, of one dataset."""
    if is_mixture(cfg.dataset_name):
        raise UserError(
            f"--split names a split of one dataset, but dataset_name lists {len(cfg.dataset_name)} sources "
            f"({dataset_label(cfg.dataset_name)}); pass --dataset_name with one of them beside --split"
        )
    raw = load_splits(cfg, split_key="--split")
    convert = normalize_prompts if raw.mode == "online" else normalize
    rows = convert(raw.train, label=cfg.dataset_name, **row_options(cfg)).rows
    return raw.mode, rows, str(raw.train.split or options.split)


@contextmanager
def _columns_hint(cfg, options: EvalOptions):
    """A columns error says that the map is the training run's, which the evaluated file may not share."""
    try:
        yield
    except UserError as exc:
        if options.columns is None and cfg.columns and " in columns " in str(exc):
            raise UserError(
                f"{exc}; the columns map is the training run's, {json.dumps(cfg.columns)}: pass --columns for this "
                "dataset ('{}' reads its prompt, chosen and rejected columns by name)"
            ) from None
        raise


def _sample(rows: list[dict], count: int, seed: int) -> list[dict]:
    """At most `count` rows, a seeded draw in the data's order (so a report says which rows it measured)."""
    if count >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in keep]


def pair_batches(rows: list[dict], tokenizer, cfg, batch_size: int) -> tuple[list[dict], list[dict]]:
    """Collated pair batches and the rows they hold (pairs left without a completion token are dropped)."""
    kept, items = [], []
    for row in rows:
        item = tokenize_pair(
            tokenizer,
            row["prompt"],
            row["chosen"],
            row["rejected"],
            max_prompt_length=cfg.max_prompt_length,
            max_length=cfg.max_length,
            max_completion_length=cfg.max_completion_length,
        )
        if item is not None:
            kept.append(row)
            items.append(item)
    return collate_in_batches(items, PairCollator(tokenizer.pad_token_id), batch_size), kept


def prompt_batches(rows: list[dict], tokenizer, cfg, batch_size: int) -> list:
    data = tokenize_prompts(rows, tokenizer, max_prompt_length=cfg.max_prompt_length).dataset
    return collate_in_batches(data, PromptCollator(tokenizer.pad_token_id), batch_size)


def _completion_text(completion) -> str:
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


# ----------------------------------------------------------------------------- the run


def _progress(items: list, description: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="batch", leave=False, disable=None)  # None: off where no terminal


class Models(NamedTuple):
    policy: torch.nn.Module
    reference: Reference
    tokenizer: Any
    judge: Any  # a Judge, or None
    device: torch.device
    logps_chunk_size: int  # the run's (see DPOConfig.logps_chunk_size)


def preference_section(models: Models, rows: list[dict], cfg, settings: dict, batch_size: int) -> dict[str, Any]:
    """The report's "preference" part: DPO metrics of the pairs and, with a reward model, its agreement."""
    batches, kept = pair_batches(rows, models.tokenizer, cfg, batch_size)
    result = evaluate_pairs(
        models.policy,
        models.reference,
        _progress(batches, "pairs"),
        settings=LossSettings.of(settings),
        chunk_size=models.logps_chunk_size,
    )
    metrics = dict(result.metrics)
    if models.judge is not None:
        prompts = [row["prompt"] for row in kept]
        chosen = models.judge.score(prompts, [_completion_text(r["chosen"]) for r in kept])
        rejected = models.judge.score(prompts, [_completion_text(r["rejected"]) for r in kept])
        metrics["reward_model/agreement"] = reward_agreement(chosen, rejected)
    return {"num_pairs": len(kept), "beta": settings["beta"], "metrics": metrics, "margins": result.margins}


def generation_section(models: Models, rows: list[dict], cfg, settings: dict, options: EvalOptions) -> dict[str, Any]:
    """The report's "generation" part: policy vs reference completions, judged by the reward model."""
    sampling = SamplingSettings(
        max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        stop_ids=tuple(stop_token_ids(models.policy, models.tokenizer)),
        pad_id=models.tokenizer.pad_token_id,
    )
    result = compare_generations(
        models.policy,
        models.reference,
        models.tokenizer,
        _progress(prompt_batches(rows, models.tokenizer, cfg, options.batch_size), "prompts"),
        models.judge,
        sampling,
        seed=options.seed,
        logps_chunk_size=models.logps_chunk_size,
    )
    return {
        "num_prompts": len(result.policy_scores),
        "metrics": result.metrics,
        "policy_scores": result.policy_scores,
        "reference_scores": result.reference_scores,
        "samples": result.samples,
    }


def load_models(
    options: EvalOptions, policy_source: ModelSource, reference_source, tokenizer, probe, chunk_size: int
) -> Models:
    """The judge first, probed on one sample (one that cannot score fails before the policy loads), then the
    policy and the reference (the policy itself when there is none)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, options.dtype)
    judge = None
    if options.reward_model is not None:
        judge = load_judge(options.reward_model, dtype=dtype, key="--reward_model").to(device)
        judge.score([probe], ["probe"])
    load = {"dtype": dtype, "attn_implementation": "sdpa", "trust_remote_code": False}
    policy = freeze(load_causal_lm(policy_source, **load)).to(device)
    reference = freeze(load_causal_lm(reference_source, **load)).to(device) if reference_source else policy
    return Models(policy, FrozenReference(reference, chunk_size), tokenizer, judge, device, chunk_size)


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Run the evaluation and return the report dict."""
    resolved = resolve_model_path(options.model_path)
    settings = run_settings(options, resolved.record)
    check_options(options, settings)
    reference_source = resolve_model(settings["reference"], "ref_model_path") if settings["reference"] else None
    cfg = _data_config(options, settings, resolved.record)
    tokenizer = load_tokenizer(resolved.source)
    pairs, prompts, measured = evaluation_rows(cfg, options)
    pairs = _sample(pairs, options.num_pairs, options.seed) if pairs else None
    prompts = _sample(prompts, settings["num_prompts"], options.seed)
    if not pairs and not prompts:
        raise UserError(
            f"{dataset_label(cfg.dataset_name)}: nothing to evaluate: preference metrics need chosen/rejected pairs "
            "(--num_pairs > 0), generation metrics need prompts and --reward_model"
        )
    probe = prompts[0]["prompt"] if prompts else pairs[0]["prompt"]
    models = load_models(options, resolved.source, reference_source, tokenizer, probe, cfg.logps_chunk_size)
    report = {
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {**asdict(options), **settings},
        "models": {
            "policy": str(resolved.folder),
            "reference": settings["reference"] or f"{resolved.folder} (the policy itself)",
            "reward_model": options.reward_model,
        },
        "data": {
            "dataset": dataset_label(cfg.dataset_name),
            "split": measured.split,
            "rows": measured.rows,
            "pairs_scored": len(pairs) if pairs else 0,
            "prompts_sampled": len(prompts) if models.judge else 0,
            "training_rows": measured.training_rows,
        },
        "versions": library_versions(),
        "preference": preference_section(models, pairs, cfg, settings, options.batch_size) if pairs else None,
        "generation": (
            generation_section(models, prompts, cfg, settings, options) if prompts and models.judge else None
        ),
    }
    for note in small_sample_notes(report):
        log.warning(note)
    return report
