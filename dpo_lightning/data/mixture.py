"""From the run's sources to its normalised training and validation rows: each source loaded, normalised and
split as a run of it alone would do, the part of it the configuration asks for drawn with the seed, and the
sources' rows put together in the order listed (the training sampler shuffles them).

One source (`dataset_name` a name) is the mixture of one, taken whole. Training (`pipeline.py`) and
evaluation read their rows here, so that evaluate.py measures exactly what the run held out.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import NamedTuple

from dpo_lightning.config.sources import DataSource, Portion, data_sources, dataset_label, is_mixture
from dpo_lightning.data.formats import normalize, normalize_prompts, row_options
from dpo_lightning.data.sources import RawSplits, load_splits, split_labels
from dpo_lightning.data.split import prompt_key, split_by_prompt
from dpo_lightning.errors import UserError

logger = logging.getLogger(__name__)


class Rows(NamedTuple):
    """The normalised rows of every source together: pairs {prompt, chosen, rejected} (offline, reward) or
    prompts {prompt} (online), each with its `origin` (source label, row number) for messages."""

    mode: str
    train: list[dict]
    val: list[dict]  # empty when nothing is held out
    val_origin: str  # the split validation is, e.g. "test", "train (the val_fraction 0.05 draw training held
    # out)", of each source joined by " + "
    read: int  # rows read, bad ones included
    skipped: int  # bad rows skipped (on_bad_rows: skip)
    label: str  # names the data in the log line: the dataset, or the sources joined by " + "
    train_origin: str  # the training split of each source, joined by " + "
    fingerprints: tuple = ()  # each source's `datasets` fingerprint of its rows as loaded


def source_config(cfg, source: DataSource):
    """`cfg` as a run of this source alone: its name and its own splits, columns and labels."""
    if not is_mixture(cfg.dataset_name):
        return cfg
    return dataclasses.replace(cfg, dataset_name=source.name, **source.values)


def load_rows(cfg, split_key: str = "train_split") -> Rows:
    """Every source of `cfg` loaded, normalised, split and drawn; one UserError line for a user's mistake
    (`split_key`: the option that set train_split, as errors name it)."""
    sources = data_sources(cfg)
    parts = []
    for source in sources:
        one = source_config(cfg, source)
        raw = load_splits(one, split_key)
        if parts and raw.mode != parts[0][1].mode:
            raise UserError(_mode_conflict(sources[0], parts[0][1], source, raw))
        parts.append((source, raw, _source_rows(one, raw, source)))
    mode = parts[0][1].mode
    train = [row for _, _, rows in parts for row in rows.train]
    val = [row for _, _, rows in parts for row in rows.val]
    if is_mixture(cfg.dataset_name):
        _report_mixture(parts, mode)
    _warn_shared_prompts(train, val, mode)
    return Rows(
        mode,
        train,
        val,
        " + ".join(rows.val_origin for _, _, rows in parts),
        sum(rows.read for _, _, rows in parts),
        sum(rows.skipped for _, _, rows in parts),
        dataset_label(cfg.dataset_name),
        " + ".join(str(raw.train.split or cfg.train_split) for _, raw, _ in parts),
        tuple(getattr(raw.train, "_fingerprint", None) for _, raw, _ in parts),
    )


def _mode_conflict(first: DataSource, first_raw: RawSplits, source: DataSource, raw: RawSplits) -> str:
    holds = {"online": "prompts", "offline": "preference pairs", "reward": "preference pairs"}
    return (
        f"{source.where} holds {holds[raw.mode]} (mode {raw.mode}) but {first.where} holds "
        f"{holds[first_raw.mode]} (mode {first_raw.mode}); the sources of one run must train the same way"
    )


class _SourceRows(NamedTuple):
    train: list[dict]
    val: list[dict]
    val_origin: str
    read: int
    skipped: int
    kept: tuple[int, int]  # training and validation rows before the draw


def _source_rows(cfg, raw: RawSplits, source: DataSource) -> _SourceRows:
    """One source's rows: normalised by the run's mode, split, then its portions drawn."""
    train_label, eval_label = split_labels(raw)
    norm = row_options(cfg)
    convert = normalize_prompts if raw.mode == "online" else normalize
    train = convert(raw.train, label=train_label, **norm)
    evaluation = convert(raw.eval, label=eval_label, **norm) if raw.eval is not None else None
    skipped = raw.skipped + train.skipped + (evaluation.skipped if evaluation else 0)
    read = raw.skipped + len(raw.train) + (len(raw.eval) if raw.eval is not None else 0)
    if evaluation is not None:
        if cfg.val_fraction == 0:  # the user may have meant "no validation": say what happens instead
            logger.warning(
                "val_fraction 0 holds out none of the training pairs, but validation still runs on %s, the "
                "source's own split (val_fraction applies only to sources without one)",
                eval_label,
            )
        train_rows, val_rows = train.rows, evaluation.rows
        origin = str(raw.eval.split or "eval")
    else:
        train_rows, val_rows = split_by_prompt(train.rows, cfg.val_fraction, cfg.seed)
        held = f"the val_fraction {cfg.val_fraction} draw training held out" if val_rows else "none held out"
        origin = f"{raw.train.split or cfg.train_split} ({held})"
    kind = "prompts" if raw.mode == "online" else "pairs"
    seed = f"{cfg.seed}:{source.key}"  # by place in the list, so that a renamed file draws the same rows
    taken_train = draw(train_rows, source.train, f"{seed}:train", f"{source.where} {kind} of {train_label}")
    taken_val = draw(val_rows, source.eval, f"{seed}:eval", f"{source.where} validation {kind}", "eval_")
    return _SourceRows(taken_train, taken_val, origin, read, skipped, (len(train_rows), len(val_rows)))


def portion_size(portion: Portion, available: int) -> int:
    """Rows a portion takes of `available`: all, its count, or its share rounded (at least one)."""
    if portion.whole:
        return available
    if portion.rows is not None:
        return portion.rows
    return min(available, max(1, round(portion.fraction * available))) if available else 0


def draw(rows: list[dict], portion: Portion, seed: str, what: str, prefix: str = "") -> list[dict]:
    """The rows a portion takes, a seeded draw kept in the data's order; asking for more than there are is one
    line (never silently fewer)."""
    wanted = portion_size(portion, len(rows))
    if wanted > len(rows):
        raise UserError(
            f"{what}: {prefix}rows {wanted} asks for more than the {len(rows)} there are (after bad rows and "
            f"the validation split); set {prefix}rows to at most {len(rows)}, or {prefix}fraction"
        )
    if wanted == len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), wanted))
    return [rows[i] for i in keep]


def _report_mixture(parts, mode: str) -> None:
    """One line per source: what it gives the mixture, of how much."""
    kind = "prompts" if mode == "online" else "pairs"
    total = sum(len(rows.train) for _, _, rows in parts) or 1
    for source, _, rows in parts:
        logger.info(
            "%s: %d of %d training %s (%.0f%% of the mixture), %d of %d validation %s",
            source.where,
            len(rows.train),
            rows.kept[0],
            kind,
            100 * len(rows.train) / total,
            len(rows.val),
            rows.kept[1],
            kind,
        )


def _warn_shared_prompts(train: list[dict], val: list[dict], mode: str) -> None:
    """Validation prompts that training also sees (a source's own test split, or two sources that share
    prompts) make validation partly measure what the policy trained on: said, with the count."""
    if not val:
        return
    seen = {prompt_key(row["prompt"]) for row in train}
    shared = {key for key in (prompt_key(row["prompt"]) for row in val) if key in seen}
    if shared:
        total = len({prompt_key(row["prompt"]) for row in val})
        logger.warning(
            "%d of %d validation prompts are also training prompts, so validation partly measures %s the policy "
            "trains on",
            len(shared),
            total,
            "prompts" if mode == "online" else "pairs",
        )
