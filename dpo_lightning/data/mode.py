"""What a run trains, decided once from the requested `mode` and the roles the data's columns fill.

`mode: auto` trains offline on preference pairs and online on prompts alone; `offline`, `online` and `reward`
force one (the pair modes refuse data without pairs). The decision is made where the data is first read
(`sources.load_splits`) and travels on as `RawSplits.mode` and `PreparedData.mode`; nothing else decides it.
"""

from __future__ import annotations

from dpo_lightning.config import PAIR_MODES
from dpo_lightning.data.formats import LAYOUTS_HELP, has_pairs, has_prompts
from dpo_lightning.errors import UserError


def decide_mode(requested: str, found: dict[str, str], *, label: str, columns: list[str]) -> str:
    """offline, online or reward: `requested`, or for `auto` pairs -> offline and prompts -> online.

    `found` maps the roles present to their columns; `label` and `columns` name the data in the one-line error
    raised when it cannot train the requested mode.
    """
    shown = ", ".join(columns) or "(none)"
    if requested in PAIR_MODES and not has_pairs(found):
        raise UserError(
            f"{label}: mode {requested} trains on preference pairs, none in columns {shown}; {LAYOUTS_HELP}"
        )
    if requested != "auto":
        return requested
    if has_pairs(found):
        return "offline"
    if not has_prompts(found):
        raise UserError(f"{label}: no preference pairs or prompts in columns {shown}; {LAYOUTS_HELP}")
    return "online"


def known_mode(cfg) -> str:
    """The mode a run trains as far as it is known before the data is read: the requested one, and for `auto`
    on plain text (always prompts) online; `auto` where only the data can tell."""
    from dpo_lightning.config.sources import source_names
    from dpo_lightning.data.text_prompts import is_text_source

    every_text = all(is_text_source(name) for name in source_names(cfg.dataset_name))
    return "online" if cfg.mode == "auto" and every_text else cfg.mode


def needs_judge(mode: str, generation_eval_every: int) -> bool:
    """Whether the run loads its `reward_model`: online runs score their samples, and any run with
    generation metrics judges the policy's completions against the reference's."""
    return mode == "online" or generation_eval_every > 0
