"""From `cfg.dataset_name` (one source or several: `mixture.py`) to tokenized train and validation data, with
one log line of counts.

What is prepared follows the mode (decided once by `sources.load_splits`, see `mode.py`): preference pairs for
offline DPO, prompts for online DPO, and pairs as the reward model reads them for reward training.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, NamedTuple

from dpo_lightning.config import mode_problem
from dpo_lightning.config.sources import data_sources, is_mixture
from dpo_lightning.data.formats import unique_prompts
from dpo_lightning.data.mixture import Rows, load_rows
from dpo_lightning.data.reward_text import encode_for_reward
from dpo_lightning.data.sources import resolve_source
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
    source_fingerprints: tuple = ()  # each source's `datasets` fingerprint of its rows as loaded (a Hub dataset's)
    truncation: Truncation | None = None  # pairs: what truncation did (`--show_data` says it)


def check_source(cfg) -> None:
    """Fail fast, before models load, when `dataset_name` is a local path that is missing or unusable, or a
    remote text (tiny_shakespeare) neither cached nor reachable."""
    for source in data_sources(cfg):
        try:
            if is_text_source(source.name):
                check_text_source(source.name)
            else:
                resolve_source(source.name)
        except UserError as exc:
            if not is_mixture(cfg.dataset_name):
                raise
            raise UserError(f"{source.key}: {exc}") from None


def check_decided_mode(cfg, mode: str, label: str) -> None:
    """The mode `mode: auto` chose from the data (`label`) must be one this configuration can train
    (`mode_problem`; an explicit mode was checked with the rest of the configuration)."""
    if cfg.mode != "auto":
        return
    problem = mode_problem(cfg, mode)
    if problem:
        holds = "prompts, not preference pairs" if mode == "online" else "preference pairs"
        raise UserError(f"{label} holds {holds}, so mode auto trains {mode}: {problem}")


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Load the configured data once and prepare what the run's mode trains on."""
    rows = load_rows(cfg)
    check_decided_mode(cfg, rows.mode, rows.label)
    mode = rows.mode
    if mode == "online":
        train, val = prepare_prompts(cfg, tokenizer, rows)
        return PreparedData(mode, train, val, _first(val, cfg.generation_eval_prompts), rows.fingerprints)
    if mode == "reward":
        pairs = prepare_pairs(cfg, tokenizer, rows, encode=reward_pair_tokenizer(cfg, tokenizer))
        return PreparedData(mode, pairs.train, pairs.val, None, rows.fingerprints, pairs.truncation)
    pairs = prepare_pairs(cfg, tokenizer, rows)
    val_prompts = None
    if cfg.generation_eval_every > 0 and pairs.val_rows:
        prompts = unique_prompts(pairs.val_rows)[: cfg.generation_eval_prompts]
        val_prompts = tokenize_prompts(prompts, tokenizer, max_prompt_length=cfg.max_prompt_length).dataset
    return PreparedData(mode, pairs.train, pairs.val, val_prompts, rows.fingerprints, pairs.truncation)


def _first(data: datasets.Dataset | None, count: int) -> datasets.Dataset | None:
    return data.select(range(min(count, len(data)))) if data is not None else None


def prepare_prompts(cfg, tokenizer, rows: Rows) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Prompts for online DPO (normalised, split by prompt and drawn by `mixture.load_rows`), tokenized for
    generation."""
    tok_train = tokenize_prompts(rows.train, tokenizer, max_prompt_length=cfg.max_prompt_length)
    tok_val = tokenize_prompts(rows.val, tokenizer, max_prompt_length=cfg.max_prompt_length) if rows.val else None
    n_val = len(tok_val.dataset) if tok_val else 0
    logger.info(
        "%s: %d prompts (%d bad rows skipped); %d train prompts, %d validation prompts",
        rows.label,
        len(rows.train) + len(rows.val),
        rows.skipped,
        len(tok_train.dataset),
        n_val,
    )
    if len(tok_train.dataset) == 0:
        raise UserError(f"{rows.label}: no training prompts left ({rows.skipped} bad rows skipped); check the data")
    if n_val == 0:
        logger.info("validation skipped: no validation prompts (%s)", rows.val_origin)
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


def prepare_pairs(cfg, tokenizer, rows: Rows | None = None, encode=None) -> PreparedPairs:
    """Load (unless given: `mixture.load_rows`) and tokenize preference pairs.

    `encode(rows, tokenizer, max_prompt_length=, max_length=)` tokenizes; the default is the DPO contract.
    """
    rows = rows if rows is not None else load_rows(cfg)
    encode = encode or tokenize_rows
    report_duplicates(rows.train, rows.label)
    lengths = {
        "max_prompt_length": cfg.max_prompt_length,
        "max_length": cfg.max_length,
        "max_completion_length": cfg.max_completion_length,
    }
    tok_train = encode(rows.train, tokenizer, **lengths)
    tok_val = encode(rows.val, tokenizer, **lengths) if rows.val else None
    dropped = tok_train.dropped + (tok_val.dropped if tok_val else 0)
    n_val = len(tok_val.dataset) if tok_val else 0
    logger.info(
        "%s: %d rows read, %d bad rows skipped, %d pairs dropped by truncation; %d train pairs, %d validation pairs",
        rows.label,
        rows.read,
        rows.skipped,
        dropped,
        len(tok_train.dataset),
        n_val,
    )
    if len(tok_train.dataset) == 0:
        raise UserError(
            f"{rows.label}: no training pairs left ({rows.read} rows read, {rows.skipped} bad rows skipped, "
            f"{dropped} dropped by truncation); check the data, on_bad_rows, max_length and max_prompt_length"
        )
    truncation = tok_train.truncation + (tok_val.truncation if tok_val else Truncation())
    if truncation.prompts_cut or truncation.completions_cut:
        logger.info("%s: truncation: %s", rows.label, truncation.describe())
    if n_val == 0:
        logger.info("validation skipped: no validation pairs (%s)", rows.val_origin)
        return PreparedPairs(tok_train.dataset, None, truncation=truncation)
    return PreparedPairs(tok_train.dataset, tok_val.dataset, rows.val, truncation)
