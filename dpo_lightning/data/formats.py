"""Detect a preference dataset's layout and normalise every row to {prompt, chosen, rejected}.

Layouts (after `columns` maps role -> column name):
- explicit: prompt, chosen, rejected (all text, or a message-list prompt with message or text completions);
- implicit: chosen, rejected only; the prompt is what the two share (Anthropic HH transcripts end it at the
  last shared "\\n\\nAssistant:"; other text at the last shared whitespace; conversations at the last shared
  message);
- messages: a `messages` column holds the conversational prompt, chosen/rejected are text or messages.

Text rows come out as three strings; conversational rows as a message-list prompt and assistant message
lists for chosen/rejected.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

from dpo_lightning.config import CONTEXT_ROLES, LABEL_ROLES, PAIR_ROLES, PROMPT_ROLES
from dpo_lightning.data.labels import Tie, is_labelled, labelled, with_system
from dpo_lightning.data.values import (
    BadRow,
    Messages,
    Row,
    as_assistant,
    common_prefix_len,
    is_blank,
    message_list,
    present,
    text_or_messages,
)
from dpo_lightning.errors import UserError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

HH_MARKER = "\n\nAssistant:"
ROLES = (*PROMPT_ROLES, *PAIR_ROLES, *CONTEXT_ROLES, *LABEL_ROLES)
LAYOUTS_HELP = (
    "accepted layouts: prompt+chosen+rejected, chosen+rejected (prompt implicit, e.g. Anthropic HH), "
    "messages+chosen+rejected, two responses and a label (response_a, response_b, label, with an optional prompt), "
    "or prompts alone (prompt or messages) for online DPO; "
    'map other column names with columns, e.g. {"prompt": "question"}'
)


class NormalizedPairs(NamedTuple):
    rows: list[dict]  # each {"prompt": str | Messages, "chosen": str | Messages, "rejected": str | Messages}
    skipped: int  # bad rows skipped (on_bad_rows="skip")


class NormalizedPrompts(NamedTuple):
    rows: list[dict]  # each {"prompt": str | Messages}
    skipped: int


def _check_completions(pair: dict, implicit: bool = False) -> dict:
    """Reject empty completions and identical pairs; returns the pair unchanged."""
    for role in ("chosen", "rejected"):
        if is_blank(pair[role]):
            raise BadRow(f"'{role}' has nothing after the shared prompt" if implicit else f"'{role}' is empty")
    if pair["chosen"] == pair["rejected"]:
        raise BadRow("'chosen' and 'rejected' are identical")
    return pair


# ----------------------------------------------------------------------------- implicit prompts


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic HH: the prompt ends at (and includes) the last "\\n\\nAssistant:" both transcripts share."""
    shared = common_prefix_len(chosen, rejected)
    cut = chosen.rfind(HH_MARKER, 0, shared)
    if cut < 0:
        raise BadRow("'chosen' and 'rejected' differ before their first '\\n\\nAssistant:', so they share no prompt")
    end = cut + len(HH_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Generic text: the shared prefix cut back to its last whitespace, which starts the completions.

    TRL moves a space before the divergence to the completions; cutting at a word boundary also keeps
    "blue"/"black" from being split into a prompt ending in "bl".
    """
    shared = chosen[: common_prefix_len(chosen, rejected)]
    cut = max(shared.rfind(ws) for ws in " \n\t\r")
    cut = max(cut, 0)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """Conversations: the shared leading messages are the prompt, the rest are the completions, which must
    start with the assistant's turn (TRL's implicit conversational prompt)."""
    n = common_prefix_len(chosen, rejected)
    if n == 0:
        raise BadRow("'chosen' and 'rejected' share no leading messages to use as the prompt")
    if len(chosen) == n or len(rejected) == n:
        return chosen[:n], chosen[n:], rejected[n:]  # nothing after the prompt: `_check_completions` says so
    for role, side in (("chosen", chosen), ("rejected", rejected)):
        if side[n]["role"] != "assistant":
            raise BadRow(
                f"'{role}' departs from the shared conversation at message {n + 1}, a {side[n]['role']} turn; "
                "the two must differ first in an assistant turn"
            )
    return chosen[:n], chosen[n:], rejected[n:]


def text_prompt_conversation(prompt: str, chosen: Messages, rejected: Messages) -> tuple[Messages, ...]:
    """A text prompt beside conversational completions (UltraFeedback-binarized, Capybara-Preferences: the
    completions repeat the conversation). Completions that share leading messages hold the prompt: the text must
    be one of their shared user turns (the first or the last of a multi-turn one), and the split is theirs.
    Completions of assistant turns alone get the text as the user turn."""
    if common_prefix_len(chosen, rejected) == 0:
        return [{"role": "user", "content": prompt}], chosen, rejected
    split = split_messages(chosen, rejected)
    users = {m["content"].strip() for m in split[0] if m["role"] == "user"}
    if prompt.strip() not in users:
        raise BadRow(
            "'prompt' is text that is none of the user turns 'chosen' and 'rejected' share; give the prompt as "
            "messages, or completions without the conversation"
        )
    return split


def _is_whole_conversation(prompt: Messages, chosen: Messages) -> bool:
    """Whether a message-list prompt is the chosen conversation itself (UltraFeedback's `messages` column):
    then the prompt is what chosen and rejected share, never the conversation with its answer."""
    return len(prompt) > 0 and prompt == chosen and prompt[-1]["role"] == "assistant"


# ----------------------------------------------------------------------------- one row per layout


def explicit_row(row: dict) -> dict:
    prompt = text_or_messages(present(row, "prompt"), "prompt")
    chosen = text_or_messages(present(row, "chosen"), "chosen")
    rejected = text_or_messages(present(row, "rejected"), "rejected")
    if isinstance(prompt, str):
        kinds = {isinstance(value, str) for value in (chosen, rejected)}
        if kinds == {True}:
            return _check_completions({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        if kinds != {False}:
            raise BadRow("one of 'chosen' and 'rejected' is text and the other a list of messages")
        split = text_prompt_conversation(prompt, chosen, rejected)
        return _check_completions(dict(zip(("prompt", "chosen", "rejected"), split, strict=True)))
    return _conversation_row(prompt, chosen, rejected, "prompt")


def messages_row(row: dict) -> dict:
    prompt = message_list(present(row, "messages"), "messages")
    chosen = text_or_messages(present(row, "chosen"), "chosen")
    rejected = text_or_messages(present(row, "rejected"), "rejected")
    return _conversation_row(prompt, chosen, rejected, "messages")


def _conversation_row(prompt: Messages, chosen, rejected, role: str) -> dict:
    """A message-list prompt with its completions; a prompt that is the chosen conversation itself gives way
    to the prompt the completions share."""
    if not prompt:
        raise BadRow(f"'{role}' has no messages")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if _is_whole_conversation(prompt, chosen):
            split = split_messages(chosen, rejected)
            return _check_completions(dict(zip(("prompt", "chosen", "rejected"), split, strict=True)), implicit=True)
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt:  # completions that repeat the prompt's turns
            chosen, rejected = chosen[n:], rejected[n:]
    return _check_completions({"prompt": prompt, "chosen": as_assistant(chosen), "rejected": as_assistant(rejected)})


def implicit_row(row: dict) -> dict:
    chosen = text_or_messages(present(row, "chosen"), "chosen")
    rejected = text_or_messages(present(row, "rejected"), "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise BadRow("one of 'chosen' and 'rejected' is text and the other a list of messages")
    if chosen == rejected:
        raise BadRow("'chosen' and 'rejected' are identical")
    if isinstance(chosen, list):
        split = split_messages(chosen, rejected)
    elif HH_MARKER in chosen and HH_MARKER in rejected:
        split = split_hh(chosen, rejected)
    else:
        split = split_text(chosen, rejected)
    return _check_completions(dict(zip(("prompt", "chosen", "rejected"), split, strict=True)), implicit=True)


LAYOUTS = {"explicit": explicit_row, "messages": messages_row, "implicit": implicit_row}


# ----------------------------------------------------------------------------- the dataset


def role_columns(column_names: list[str], columns: dict[str, str], label: str) -> dict[str, str]:
    """Role -> column present in the data, after applying the `columns` mapping."""
    for role, column in columns.items():
        if column not in column_names:
            raise UserError(
                f"{label}: column '{column}' (columns.{role}) not found; available columns: {', '.join(column_names)}"
            )
    return present_roles(column_names, columns)


def present_roles(column_names: list[str], columns: dict[str, str]) -> dict[str, str]:
    """Role -> column of the roles whose column (after the `columns` mapping) is among `column_names`."""
    return {role: columns.get(role, role) for role in ROLES if columns.get(role, role) in column_names}


def has_pairs(found) -> bool:
    """Whether the roles `found` (a role -> column map, or a row) hold both completions of a pair, or two
    responses and the label that orders them."""
    return all(role in found for role in PAIR_ROLES) or is_labelled(found)


def has_prompts(found) -> bool:
    return prompt_role(found) is not None


def prompt_role(found) -> str | None:
    """The role the prompt is read from: the first of PROMPT_ROLES present in `found` (roles, or a row)."""
    return next((role for role in PROMPT_ROLES if role in found), None)


def row_roles(found: dict[str, str], trains_pairs: bool) -> tuple[str, ...]:
    """The roles every row of data whose roles are `found` must fill: its prompt role, and both completions
    when it has them or the run trains on pairs."""
    prompt = prompt_role(found)
    if prompt is not None and not trains_pairs and not any(role in found for role in PAIR_ROLES):
        return (prompt,)
    return (*([prompt] if prompt else []), *(LABEL_ROLES if is_labelled(found) else PAIR_ROLES))


def detect_layout(found: dict[str, str], column_names: list[str], label: str) -> str:
    """'explicit', 'messages' or 'implicit' from the roles present."""
    if not has_pairs(found):
        raise UserError(
            f"{label}: no preference pairs in columns {', '.join(column_names) or '(none)'}; {LAYOUTS_HELP}"
        )
    return {"prompt": "explicit", "messages": "messages", None: "implicit"}[prompt_role(found)]


def prompt_row(row: dict) -> dict:
    """A prompt for online DPO: `prompt` (text or messages), else the `messages` conversation."""
    role = prompt_role(row) or PROMPT_ROLES[-1]  # a row with neither: said missing by `_present`
    prompt = text_or_messages(present(row, role), role)
    if is_blank(prompt) if isinstance(prompt, str) else not prompt:
        raise BadRow(f"'{role}' is empty")
    return {"prompt": prompt}


def row_options(cfg) -> dict:
    """The configuration's say in how rows normalise (`normalize`, `normalize_prompts`)."""
    return {"columns": dict(cfg.columns), "on_bad_rows": cfg.on_bad_rows, "label_values": dict(cfg.label_values)}


def dataset_roles(dataset: datasets.Dataset, columns: dict[str, str], label: str) -> dict[str, str]:
    return role_columns(list(dataset.column_names), dict(columns), label)


def normalize(
    dataset: datasets.Dataset,
    *,
    columns: dict[str, str],
    on_bad_rows: str,
    label: str,
    label_values: dict[str, str] | None = None,
) -> NormalizedPairs:
    """Every row as {prompt, chosen, rejected}; a bad row raises UserError or, with "skip", is counted; a tie of
    labelled data is dropped and counted."""
    found = dataset_roles(dataset, columns, label)
    convert = LAYOUTS[detect_layout(found, list(dataset.column_names), label)]
    convert = with_system(convert) if "system" in found else convert
    convert = labelled(convert, dict(label_values or {})) if is_labelled(found) else convert
    rows, skipped = _convert_rows(dataset, found, convert, on_bad_rows, label)
    return NormalizedPairs(rows, skipped)


def normalize_prompts(
    dataset: datasets.Dataset,
    *,
    columns: dict[str, str],
    on_bad_rows: str,
    label: str,
    label_values: dict[str, str] | None = None,
) -> NormalizedPrompts:
    """Every row's prompt as {prompt}: from a prompt-only dataset, or the prompts of a preference dataset
    (each distinct prompt once, in order of first appearance)."""
    found = dataset_roles(dataset, columns, label)
    if has_pairs(found):
        pairs = normalize(dataset, columns=columns, on_bad_rows=on_bad_rows, label=label, label_values=label_values)
        return NormalizedPrompts(unique_prompts(pairs.rows), pairs.skipped)
    if not has_prompts(found):
        raise UserError(f"{label}: no prompts in columns {', '.join(dataset.column_names) or '(none)'}; {LAYOUTS_HELP}")
    convert = with_system(prompt_row) if "system" in found else prompt_row
    rows, skipped = _convert_rows(dataset, found, convert, on_bad_rows, label)
    return NormalizedPrompts(rows, skipped)


def unique_prompts(rows: list[dict]) -> list[dict]:
    """{prompt} of each distinct prompt of `rows`, in order of first appearance."""
    unique: dict = {}
    for row in rows:
        unique.setdefault(_prompt_key(row["prompt"]), row["prompt"])
    return [{"prompt": prompt} for prompt in unique.values()]


def _prompt_key(prompt: str | Messages) -> str | tuple:
    return prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)


def _convert_rows(dataset, found: dict[str, str], convert, on_bad_rows: str, label: str) -> tuple[list[dict], int]:
    data = dataset.select_columns(list(found.values())).to_dict()
    values = [data[column] for column in found.values()]
    rows, skipped, first, ties = [], 0, "", 0
    for i, record in enumerate(zip(*values, strict=True), 1):
        try:
            rows.append(Row(convert(dict(zip(found, record, strict=True))), (label, i)))
        except Tie:
            ties += 1
        except BadRow as problem:
            if on_bad_rows != "skip":
                raise UserError(f"{label} row {i}: {problem}") from None
            skipped += 1
            first = first or f"row {i}: {problem}"
    if skipped:
        logger.warning("%s: skipped %d bad rows (first: %s)", label, skipped, first)
    if ties:
        logger.info("%s: dropped %d ties (rows whose label prefers neither response)", label, ties)
    return rows, skipped
