"""`python entrypoint.py --help`: every configuration key, grouped as schema.py groups them, with its default
and the first sentence of its documentation, read from schema.py itself so that the two never disagree."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re

from dpo_lightning.config import schema

GROUP = re.compile(r"^\s*# --- (.+?)(?: \(.*\))? ---\s*$")


def first_sentence(text: str) -> str:
    """The documentation's first sentence, on one line."""
    flat = " ".join(text.split())
    match = re.match(r"(.+?(?<!e\.g)(?<!i\.e)\.)(\s|$)", flat)
    return match.group(1) if match else flat


def key_docs() -> list[tuple[str, list[tuple[str, str]]]]:
    """(group, [(key, documentation)]) in schema.py's order."""
    source = inspect.getsource(schema.DPOConfig)
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    groups: list[tuple[str, list[tuple[str, str]]]] = []
    for node, following in zip(body, [*body[1:], None], strict=True):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        heading = next(
            (GROUP.match(line).group(1) for line in reversed(lines[: node.lineno - 1]) if GROUP.match(line)), "other"
        )
        doc = ""
        if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
            doc = str(following.value.value)
        if not groups or groups[-1][0] != heading:
            groups.append((heading, []))
        groups[-1][1].append((node.target.id, doc))
    return groups


def default_text(key: str) -> str:
    field = schema.DPOConfig.__dataclass_fields__[key]
    if field.default is not dataclasses.MISSING:
        value = field.default
    else:
        value = field.default_factory()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if value != {} else "{}"


def help_text(usage: str) -> str:
    """The whole help: usage, then each group's keys with default and first sentence."""
    out = [usage, "", "Every key below is a hyperparameter of the experiment file, overridden as --key value."]
    for group, keys in key_docs():
        out += ["", f"{group}:"]
        for key, doc in keys:
            out.append(f"  --{key} (default: {default_text(key)})")
            if doc:
                out.append(f"      {first_sentence(doc)}")
    return "\n".join(out)
