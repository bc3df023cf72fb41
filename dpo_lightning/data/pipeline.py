"""From `cfg.dataset_name` to tokenized train and validation pairs, with one log line of counts."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

from dpo_lightning.data.formats import normalize
from dpo_lightning.data.sources import RawSplits, load_splits, resolve_source
from dpo_lightning.data.split import split_by_prompt
from dpo_lightning.data.tokenize import tokenize_rows
from dpo_lightning.errors import UserError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class PreparedPairs(NamedTuple):
    train: datasets.Dataset  # columns prompt_ids, chosen_ids, rejected_ids
    val: datasets.Dataset | None  # None when validation is skipped


def check_source(cfg) -> None:
    """Fail fast, before models load, when `dataset_name` is a local path that is missing or unusable."""
    resolve_source(cfg.dataset_name)


def split_labels(raw: RawSplits) -> tuple[str, str]:
    """Labels for error messages: 'NAME[split]' when the source has several splits, else the name alone."""
    if raw.eval is None:
        return raw.label, raw.label
    train_split = str(raw.train.split or "train")
    eval_split = str(raw.eval.split or "eval")
    return f"{raw.label}[{train_split}]", f"{raw.label}[{eval_split}]"


def prepare_pairs(cfg, tokenizer) -> PreparedPairs:
    """Load, normalise, split (when the source has no eval split) and tokenize the configured dataset."""
    raw = load_splits(cfg)
    train_label, eval_label = split_labels(raw)
    norm = {"columns": dict(cfg.columns), "on_bad_rows": cfg.on_bad_rows}
    train = normalize(raw.train, label=train_label, **norm)
    skipped = raw.skipped + train.skipped
    if raw.eval is not None:
        val = normalize(raw.eval, label=eval_label, **norm)
        train_rows, val_rows, skipped = train.rows, val.rows, skipped + val.skipped
        val_origin = f"split {eval_label}"
    else:
        train_rows, val_rows = split_by_prompt(train.rows, cfg.val_fraction, cfg.seed)
        val_origin = f"val_fraction={cfg.val_fraction}"
    lengths = {"max_prompt_length": cfg.max_prompt_length, "max_length": cfg.max_length}
    tok_train = tokenize_rows(train_rows, tokenizer, **lengths)
    tok_val = tokenize_rows(val_rows, tokenizer, **lengths) if val_rows else None
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
    if n_val == 0:
        logger.info("validation skipped: no validation pairs (%s)", val_origin)
        return PreparedPairs(tok_train.dataset, None)
    return PreparedPairs(tok_train.dataset, tok_val.dataset)
