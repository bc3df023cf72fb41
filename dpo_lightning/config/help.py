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


def _text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict) and value.get("type") not in (None, "const"):
        return f"a {value['type']} search space"
    if isinstance(value, dict) and value.get("type") == "const":
        return _text(value.get("val"))
    return str(value) if value != {} else "{}"


def default_text(key: str) -> str:
    """The schema's default of `key`."""
    field = schema.DPOConfig.__dataclass_fields__[key]
    return _text(field.default if field.default is not dataclasses.MISSING else field.default_factory())


def help_text(usage: str, config_path=None, file_values: dict | None = None) -> str:
    """The whole help: usage, then each group's keys with the value a run takes and the first sentence of its
    documentation. With `file_values` (the `hyperparameters:` of `config_path`, the file a run without
    --config reads, or the one given), a key's value is the file's (the schema's where the file leaves it out)."""
    if file_values is None:
        where = "Values shown are the configuration schema's defaults"
        where += f" ({config_path} could not be read)." if config_path is not None else "."
    else:
        where = f"Values shown are those a run with --config {config_path} takes (the schema's where it has none)."
    out = [usage, "", "Every key below is a hyperparameter of the experiment file, overridden as --key value.", where]
    for group, keys in key_docs():
        out += ["", f"{group}:"]
        for key, doc in keys:
            value = _text(file_values[key]) if file_values is not None and key in file_values else default_text(key)
            out.append(f"  --{key} ({value})")
            if doc:
                out.append(f"      {first_sentence(doc)}")
    return "\n".join(out)
