"""Rows that are not a pair yet: two responses and a label saying which is preferred (SHP, PKU-SafeRLHF,
Chatbot Arena), and a `system` column beside the prompt (Orca DPO pairs). Each wraps a layout's row
conversion (`formats.LAYOUTS`)."""

from __future__ import annotations

from typing import Any

from dpo_lightning.config import LABEL_ROLES, PAIR_ROLES
from dpo_lightning.data.values import BadRow, as_assistant, present, type_name
from dpo_lightning.errors import UserError


class Tie(Exception):
    """A labelled row that prefers neither response: dropped and counted, not a bad row."""


# labels understood without `label_values`: Chatbot Arena's winners and the plain names of the two sides
KNOWN_LABELS = {"a": "a", "b": "b", "model_a": "a", "model_b": "b", "tie": "tie", "tie (bothbad)": "tie"}


def preferred_side(value: Any, label_values: dict[str, str]) -> str:
    """a, b or tie for one raw label: through `label_values` when given (a value it lacks is a bad row), else the
    names of KNOWN_LABELS. A number without `label_values` refuses the whole dataset: which response 1 means
    is the dataset's convention (SHP: A; PKU-SafeRLHF: B), and a guess would silently train the opposite."""
    if value is None:
        raise BadRow("'label' is missing")
    key = str(value).strip()
    if label_values:
        if key not in label_values:
            raise BadRow(f"label {key!r} is not among label_values ({', '.join(map(repr, label_values))})")
        return label_values[key]
    if key.lower() in KNOWN_LABELS:
        return KNOWN_LABELS[key.lower()]
    if isinstance(value, (int, float)) or key.lstrip("-").replace(".", "", 1).isdigit():
        raise UserError(
            f"label {key!r} is a number, and which response a number prefers is the dataset's own convention: say "
            'it with label_values, e.g. {"1": "a", "0": "b"} (SHP) or {"0": "a", "1": "b"} (PKU-SafeRLHF)'
        )
    raise BadRow(f"label {key!r} is not one of {', '.join(KNOWN_LABELS)}; map yours with label_values")


def labelled(convert, label_values: dict[str, str]):
    """Rows of two responses and a label as {chosen: the preferred response, rejected: the other}, then
    `convert` (the layout of their prompt: explicit, messages or implicit)."""

    def converted(row: dict) -> dict:
        side = preferred_side(row.get("label"), label_values)
        if side == "tie":
            raise Tie
        a, b = present(row, "response_a"), present(row, "response_b")
        chosen, rejected = (a, b) if side == "a" else (b, a)
        rest = {k: v for k, v in row.items() if k not in LABEL_ROLES}
        return convert({**rest, "chosen": chosen, "rejected": rejected})

    return converted


def is_labelled(found) -> bool:
    """Whether the roles `found` are two responses and a label."""
    return all(role in found for role in LABEL_ROLES)


def with_system(convert):
    """`convert`, then the row's `system` text as the conversation's system message: a text row becomes a
    conversation (user: the prompt, assistant: each completion) so that the chat template places it; an empty
    system text adds no message. A prompt that has a system message of its own must agree with it."""

    def converted(row: dict) -> dict:
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise BadRow(f"'system' is {type_name(system)}, expected a string")
        out = convert(row)
        prompt = out["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
            out = {**out, **{role: as_assistant(out[role]) for role in PAIR_ROLES if role in out}}
        if system and system.strip():
            message = {"role": "system", "content": system}
            if prompt[0]["role"] == "system":
                if prompt[0] != message:
                    raise BadRow("'system' differs from the prompt's own system message")
            else:
                prompt = [message, *prompt]
        return {**out, "prompt": prompt}

    return converted
