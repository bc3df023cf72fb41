"""From `cfg.dataset_name` to tokenized train and validation data, with one log line of counts.

What is prepared follows the mode (decided once by `sources.load_splits`, see `mode.py`): preference pairs for
offline DPO, prompts for online DPO, and pairs as the reward model reads them for reward training.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

from dpo_lightning.config import mode_problem
from dpo_lightning.data.formats import normalize, normalize_prompts, row_options, unique_prompts
from dpo_lightning.data.reward_text import encode_for_reward
from dpo_lightning.data.sources import RawSplits, load_splits, resolve_source, split_labels
from dpo_lightning.data.split import split_by_prompt
from dpo_lightning.data.text_prompts import check_text_source, is_text_source
from dpo_lightning.data.tokenize import TokenizedPairs as TokenizedRows
from dpo_lightning.data.tokenize import Truncation, tokenize_prompts, tokenize_rows
from dpo_lightning.errors import UserError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class PreparedPairs(NamedTuple):
    train: datasets.Dataset  # columns prompt_ids, chosen_ids, rejected_ids
    val: datasets.Dataset | None  # None when validation is skipped
    val_rows: list[dict] | None = None  # the normalised validation rows (their prompts feed generation metrics)
    truncation: Truncation | None = None  # what truncation did to both splits


class PreparedData(NamedTuple):
    mode: str  # "offline" | "online" | "reward": what the data trains
    train: datasets.Dataset  # pairs (offline, reward: prompt_ids, chosen_ids, rejected_ids) or prompts (online)
    val: datasets.Dataset | None
    val_prompts: datasets.Dataset | None = None  # held-out prompts for generation metrics (generation_eval_every)
    source_fingerprint: str | None = None  # the `datasets` fingerprint of the rows as loaded (a Hub dataset's)
    truncation: Truncation | None = None  # pairs: what truncation did (`--show_data` says it)


def check_source(cfg) -> None:
    """Fail fast, before models load, when `dataset_name` is a local path that is missing or unusable, or a
    remote text (tiny_shakespeare) neither cached nor reachable."""
    if is_text_source(cfg.dataset_name):
        check_text_source(cfg.dataset_name)
    else:
        resolve_source(cfg.dataset_name)


def check_decided_mode(cfg, raw: RawSplits) -> None:
    """The mode `mode: auto` chose from the data must be one this configuration can train (`mode_problem`; an
    explicit mode was checked with the rest of the configuration)."""
    if cfg.mode != "auto":
        return
    problem = mode_problem(cfg, raw.mode)
    if problem:
        train_label, _ = split_labels(raw)
        holds = "prompts, not preference pairs" if raw.mode == "online" else "preference pairs"
        raise UserError(f"{train_label} holds {holds}, so mode auto trains {raw.mode}: {problem}")


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Load the configured dataset once and prepare what the run's mode trains on."""
    raw = load_splits(cfg)
    check_decided_mode(cfg, raw)
    mode = raw.mode
    origin = getattr(raw.train, "_fingerprint", None)
    if mode == "online":
        train, val = prepare_prompts(cfg, tokenizer, raw)
        return PreparedData(mode, train, val, _first(val, cfg.generation_eval_prompts), origin)
    if mode == "reward":
        pairs = prepare_pairs(cfg, tokenizer, raw, encode=reward_pair_tokenizer(cfg, tokenizer))
        return PreparedData(mode, pairs.train, pairs.val, source_fingerprint=origin, truncation=pairs.truncation)
    pairs = prepare_pairs(cfg, tokenizer, raw)
    val_prompts = None
    if cfg.generation_eval_every > 0 and pairs.val_rows:
        rows = unique_prompts(pairs.val_rows)[: cfg.generation_eval_prompts]
        val_prompts = tokenize_prompts(rows, tokenizer, max_prompt_length=cfg.max_prompt_length).dataset
    return PreparedData(mode, pairs.train, pairs.val, val_prompts, origin, pairs.truncation)


def _first(data: datasets.Dataset | None, count: int) -> datasets.Dataset | None:
    return data.select(range(min(count, len(data)))) if data is not None else None


def _split(cfg, raw: RawSplits, train_rows: list[dict], eval_rows: list[dict] | None, eval_label: str):
    """(train rows, validation rows, where validation comes from) for the log line."""
    if eval_rows is not None:
        if cfg.val_fraction == 0:  # the user may have meant "no validation": say what happens instead
            logger.warning(
                "val_fraction 0 holds out none of the training pairs, but validation still runs on %s, the "
                "source's own split (val_fraction applies only to sources without one)",
                eval_label,
            )
        return train_rows, eval_rows, f"split {eval_label}"
    train, val = split_by_prompt(train_rows, cfg.val_fraction, cfg.seed)
    return train, val, f"val_fraction={cfg.val_fraction}"


def prepare_prompts(cfg, tokenizer, raw: RawSplits) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Prompts for online DPO: normalised, split by prompt (seeded) and tokenized for generation."""
    train_label, eval_label = split_labels(raw)
    norm = row_options(cfg)
    train = normalize_prompts(raw.train, label=train_label, **norm)
    evaluation = normalize_prompts(raw.eval, label=eval_label, **norm) if raw.eval is not None else None
    skipped = raw.skipped + train.skipped + (evaluation.skipped if evaluation else 0)
    train_rows, val_rows, val_origin = _split(cfg, raw, train.rows, evaluation and evaluation.rows, eval_label)
    tok_train = tokenize_prompts(train_rows, tokenizer, max_prompt_length=cfg.max_prompt_length)
    tok_val = tokenize_prompts(val_rows, tokenizer, max_prompt_length=cfg.max_prompt_length) if val_rows else None
    n_val = len(tok_val.dataset) if tok_val else 0
    logger.info(
        "%s: %d prompts (%d bad rows skipped); %d train prompts, %d validation prompts",
        raw.label,
        len(train.rows) + (len(evaluation.rows) if evaluation else 0),
        skipped,
        len(tok_train.dataset),
        n_val,
    )
    if len(tok_train.dataset) == 0:
        raise UserError(f"{train_label}: no training prompts left ({skipped} bad rows skipped); check the data")
    if n_val == 0:
        logger.info("validation skipped: no validation prompts (%s)", val_origin)
        return tok_train.dataset, None
    return tok_train.dataset, tok_val.dataset


def reward_pair_tokenizer(cfg, tokenizer):
    """Tokenize rows as the reward model reads them: each of prompt + chosen and prompt + rejected whole, so
    that training and scoring see identical inputs (`reward_text.encode_for_reward`)."""

    def encode(rows: list[dict], _tokenizer, **_lengths):
        import datasets

        prompts = [row["prompt"] for row in rows]
        chosen = encode_for_reward(tokenizer, prompts, [r["chosen"] for r in rows], max_length=cfg.max_length)
        rejected = encode_for_reward(tokenizer, prompts, [r["rejected"] for r in rows], max_length=cfg.max_length)
        columns = {"prompt_ids": [[] for _ in rows], "chosen_ids": chosen, "rejected_ids": rejected}
        features = datasets.Features({name: datasets.List(datasets.Value("int32")) for name in columns})
        return TokenizedRows(datasets.Dataset.from_dict(columns, features=features), 0)

    return encode


DUPLICATE_WARN_SHARE = 0.05  # repeated pairs above this share of the rows are warned about, below it noted


def report_duplicates(rows: list[dict], label: str) -> int:
    """Say how many rows repeat an earlier pair (prompt, chosen and rejected alike), and the most copies of
    one: a dataset built by concatenation often holds the same pairs many times, which weights them silently."""
    counts = Counter(json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True) for row in rows)
    repeats = len(rows) - len(counts)
    if repeats:
        share = repeats / len(rows)
        most = max(counts.values())
        say = logger.warning if share > DUPLICATE_WARN_SHARE else logger.info
        say(
            "%s: %d of %d rows (%.0f%%) repeat an earlier pair; the most repeated pair appears %d times (repeats "
            "train as often as they appear)",
            label,
            repeats,
            len(rows),
            100 * share,
            most,
        )
    return repeats


def prepare_pairs(cfg, tokenizer, raw: RawSplits | None = None, encode=None) -> PreparedPairs:
    """Load (unless given), normalise, split (when the source has no eval split) and tokenize preference pairs.

    `encode(rows, tokenizer, max_prompt_length=, max_length=)` tokenizes; the default is the DPO contract.
    """
    raw = raw if raw is not None else load_splits(cfg)
    encode = encode or tokenize_rows
    train_label, eval_label = split_labels(raw)
    norm = row_options(cfg)
    train = normalize(raw.train, label=train_label, **norm)
    skipped = raw.skipped + train.skipped
    val = normalize(raw.eval, label=eval_label, **norm) if raw.eval is not None else None
    skipped += val.skipped if val else 0
    report_duplicates(train.rows, train_label)
    train_rows, val_rows, val_origin = _split(cfg, raw, train.rows, val and val.rows, eval_label)
    lengths = {
        "max_prompt_length": cfg.max_prompt_length,
        "max_length": cfg.max_length,
        "max_completion_length": cfg.max_completion_length,
    }
    tok_train = encode(train_rows, tokenizer, **lengths)
    tok_val = encode(val_rows, tokenizer, **lengths) if val_rows else None
    read = raw.skipped + len(raw.train) + (len(raw.eval) if raw.eval is not None else 0)
    dropped = tok_train.dropped + (tok_val.dropped if tok_val else 0)
    n_val = len(tok_val.dataset) if tok_val else 0
    logger.info(
        "%s: %d rows read, %d bad rows skipped, %d pairs dropped by truncation; %d train pairs, %d validation pairs",
        raw.label,
        read,
        skipped,
        dropped,
        len(tok_train.dataset),
        n_val,
    )
    if len(tok_train.dataset) == 0:
        raise UserError(
            f"{train_label}: no training pairs left ({read} rows read, {skipped} bad rows skipped, {dropped} "
            "dropped by truncation); check the data, on_bad_rows, max_length and max_prompt_length"
        )
    truncation = tok_train.truncation + (tok_val.truncation if tok_val else Truncation())
    if truncation.prompts_cut or truncation.completions_cut:
        logger.info("%s: truncation: %s", raw.label, truncation.describe())
    if n_val == 0:
        logger.info("validation skipped: no validation pairs (%s)", val_origin)
        return PreparedPairs(tok_train.dataset, None, truncation=truncation)
    return PreparedPairs(tok_train.dataset, tok_val.dataset, val_rows, truncation)
