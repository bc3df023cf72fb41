"""Tokenize normalised pairs exactly as TRL 1.16's DPOTrainer does (the README's tokenization contract).

Per pair: tokenize the prompt alone and prompt + completion together; the completion's tokens are the joint
sequence after the prompt's length, where that length is the common prefix of the prompt's ids with both
joint sequences (a chat template or a BPE merge across the boundary can make the prompt alone render
differently). A text completion gets EOS appended once; a chat completion is whatever the template renders
after the generation prompt. Then keep the last `max_prompt_length` prompt tokens and cut prompt + completion
to `max_length` keeping the start of the completion; pairs left without a completion token are dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

from dpo_lightning.data.values import common_prefix_len as common_prefix_length
from dpo_lightning.data.values import row_places
from dpo_lightning.errors import UserError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

CHUNK = 512  # pairs per tokenizer call: big enough for the fast tokenizer's batching, small enough for memory
COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class Truncation(NamedTuple):
    """What truncation did to the pairs of one split (tokens as the joint sequences had them)."""

    pairs: int = 0  # pairs tokenized, dropped ones included
    prompts_cut: int = 0  # prompts longer than max_prompt_length
    prompt_tokens_cut: int = 0
    completions_cut: int = 0  # chosen or rejected completions cut (each counted)
    completion_tokens_cut: int = 0
    emptied: int = 0  # pairs dropped: a completion left without a token
    identical: int = 0  # pairs dropped: chosen and rejected left identical

    def __add__(self, other: Truncation) -> Truncation:
        return Truncation(*(a + b for a, b in zip(self, other, strict=True)))

    def describe(self) -> str:
        """One line: how many prompts and completions were cut and by how much, and the pairs dropped."""
        prompts = _cut_words(self.prompts_cut, self.pairs, "prompts", self.prompt_tokens_cut)
        completions = _cut_words(self.completions_cut, 2 * self.pairs, "completions", self.completion_tokens_cut)
        return (
            f"{prompts}, {completions}; pairs dropped: {self.emptied} left without a completion token, "
            f"{self.identical} left identical"
        )


def _cut_words(cut: int, total: int, what: str, tokens: int) -> str:
    mean = f", {tokens / cut:.1f} each on average" if cut else ""
    return f"{cut} of {total} {what} cut ({tokens} tokens{mean})"


class TokenizedPairs(NamedTuple):
    dataset: datasets.Dataset  # columns prompt_ids, chosen_ids, rejected_ids: variable-length int lists
    dropped: int  # pairs left without a completion token, or identical, after truncation
    truncation: Truncation = Truncation()


SHOWN_DROPS = 10  # positions of dropped pairs named in the log line


def with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def split_and_truncate(prompt_ids: list[int], joint_chosen: list[int], joint_rejected: list[int], **lengths):
    """`truncate_pair`'s pair (a dict of the three id lists), or None when it is dropped."""
    return truncate_pair(prompt_ids, joint_chosen, joint_rejected, **lengths)[0]


def _tally(cut: tuple[int, int, int], why: str | None) -> Truncation:
    prompt, *completions = cut
    return Truncation(
        pairs=1,
        prompts_cut=int(prompt > 0),
        prompt_tokens_cut=prompt,
        completions_cut=sum(c > 0 for c in completions),
        completion_tokens_cut=sum(completions),
        emptied=int(why == EMPTIED),
        identical=int(why == IDENTICAL),
    )


EMPTIED = "left without a completion token"
IDENTICAL = "left with chosen and rejected identical (they differ only past the cut)"


def truncate_pair(
    prompt_ids: list[int],
    joint_chosen: list[int],
    joint_rejected: list[int],
    *,
    max_prompt_length: int | None,
    max_length: int | None,
    max_completion_length: int | None = None,
) -> tuple[dict | None, str | None, tuple[int, int, int]]:
    """Completion ids after the shared prompt, then the truncation (the prompt keeps its end, each completion
    its start: at most `max_completion_length` tokens, then what `max_length` leaves after the prompt). Returns
    the pair, or None and why it is dropped (EMPTIED, IDENTICAL: a pair whose two completions truncation made
    equal would train at a loss of exactly log 2 with no gradient); and the tokens the cut took from the
    prompt, the chosen and the rejected completion."""
    prompt_len = min(common_prefix_length(prompt_ids, joint_chosen), common_prefix_length(prompt_ids, joint_rejected))
    prompt = prompt_ids[:prompt_len]
    chosen, rejected = joint_chosen[prompt_len:], joint_rejected[prompt_len:]
    whole = (len(prompt), len(chosen), len(rejected))
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]  # the end of the prompt is what the answer follows
    if max_completion_length is not None:
        chosen, rejected = chosen[:max_completion_length], rejected[:max_completion_length]
    if max_length is not None:
        room = max(max_length - len(prompt), 0)
        chosen, rejected = chosen[:room], rejected[:room]
    cut = tuple(before - len(after) for before, after in zip(whole, (prompt, chosen, rejected), strict=True))
    if not chosen or not rejected:
        return None, EMPTIED, cut
    if chosen == rejected:
        return None, IDENTICAL, cut
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}, None, cut


def _chat_ids(tokenizer, conversations: list[list[dict]], generation_prompt: bool) -> list[list[int]]:
    """Token ids of each rendered conversation; always passed as a batch so that the output is (N, T_i)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the data is conversational (message lists, or a system column), but the tokenizer of "
            f"{getattr(tokenizer, 'name_or_path', 'the model')} has no chat template to render it; use an instruct "
            "model's tokenizer, or text prompts and completions"
        )
    out = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )
    return [list(ids) for ids in out["input_ids"]]


def _joint_ids(tokenizer, rows: list[dict]) -> tuple[list, list, list]:
    """(prompt ids, prompt+chosen ids, prompt+rejected ids) for rows all text or all conversational."""
    if isinstance(rows[0]["prompt"], str):
        eos = tokenizer.eos_token
        if not eos:
            raise UserError("the tokenizer has no eos_token, which text completions end with; set one in its files")
        prompts = [r["prompt"] for r in rows]
        chosen = [r["prompt"] + with_eos(r["chosen"], eos) for r in rows]
        rejected = [r["prompt"] + with_eos(r["rejected"], eos) for r in rows]
        ids = tokenizer(text=prompts + chosen + rejected, return_attention_mask=False)["input_ids"]
        n = len(rows)
        return ids[:n], ids[n : 2 * n], ids[2 * n :]
    return (
        _chat_ids(tokenizer, [r["prompt"] for r in rows], True),
        _chat_ids(tokenizer, [r["prompt"] + r["chosen"] for r in rows], False),
        _chat_ids(tokenizer, [r["prompt"] + r["rejected"] for r in rows], False),
    )


def tokenize_pair(
    tokenizer,
    prompt,
    chosen,
    rejected,
    *,
    max_prompt_length: int | None,
    max_length: int | None,
    max_completion_length: int | None = None,
) -> dict | None:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} (int lists) for one pair, or None when it is dropped.

    `prompt` is a string (then chosen/rejected are strings) or a list of {role, content} messages (then
    chosen/rejected are lists of assistant messages).
    """
    ids = _joint_ids(tokenizer, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    return split_and_truncate(
        ids[0][0],
        ids[1][0],
        ids[2][0],
        max_prompt_length=max_prompt_length,
        max_length=max_length,
        max_completion_length=max_completion_length,
    )


def _chunks(rows: list[dict]):
    """Consecutive runs of at most CHUNK rows of one kind (text or conversational), with their start index."""
    start = 0
    while start < len(rows):
        kind = isinstance(rows[start]["prompt"], str)
        end = start + 1
        while end < len(rows) and end - start < CHUNK and isinstance(rows[end]["prompt"], str) == kind:
            end += 1
        yield rows[start:end]
        start = end


def tokenize_rows(
    rows: list[dict],
    tokenizer,
    *,
    max_prompt_length: int | None,
    max_length: int | None,
    max_completion_length: int | None = None,
) -> TokenizedPairs:
    """Tokenize normalised rows in batches; returns the kept pairs as a Dataset and the number dropped."""
    import datasets

    columns: dict[str, list[list[int]]] = {name: [] for name in COLUMNS}
    drops: dict[str, list[tuple[int, dict]]] = {EMPTIED: [], IDENTICAL: []}  # why -> (position, row) dropped
    position, truncation = 0, Truncation()
    for chunk in _chunks(rows):
        for row, ids in zip(chunk, zip(*_joint_ids(tokenizer, chunk), strict=True), strict=True):
            position += 1
            pair, why, cut = truncate_pair(
                *ids,
                max_prompt_length=max_prompt_length,
                max_length=max_length,
                max_completion_length=max_completion_length,
            )
            truncation = truncation + _tally(cut, why)
            if pair is None:
                drops[why].append((position, row))
                continue
            for name in COLUMNS:
                columns[name].append(pair[name])
    features = datasets.Features({name: datasets.List(datasets.Value("int32")) for name in COLUMNS})
    dropped = sum(map(len, drops.values()))
    for why, places in drops.items():
        if places:
            logger.warning(
                "dropped %d of %d pairs %s by truncation (max_length=%s, max_prompt_length=%s, "
                "max_completion_length=%s): %s",
                len(places),
                len(rows),
                why,
                max_length,
                max_prompt_length,
                max_completion_length,
                row_places(places, SHOWN_DROPS),
            )
    return TokenizedPairs(datasets.Dataset.from_dict(columns, features=features), dropped, truncation)


PROMPT_COLUMNS = ("prompt_ids", "prompt_json")


class TokenizedPrompts(NamedTuple):
    dataset: datasets.Dataset  # columns prompt_ids (int list) and prompt_json (the prompt as JSON, for the reward)
    dropped: int  # prompts with no token


def tokenize_prompts(rows: list[dict], tokenizer, *, max_prompt_length: int | None) -> TokenizedPrompts:
    """Prompt ids as generation starts from them: text as is, conversations with the generation prompt;
    the last `max_prompt_length` tokens kept, as for offline pairs."""
    import json

    import datasets

    columns: dict[str, list] = {name: [] for name in PROMPT_COLUMNS}
    dropped = 0
    for chunk in _chunks(rows):
        prompts = [row["prompt"] for row in chunk]
        if isinstance(prompts[0], str):
            ids = tokenizer(text=prompts, return_attention_mask=False)["input_ids"]
        else:
            ids = _chat_ids(tokenizer, prompts, True)
        for prompt, prompt_ids in zip(prompts, ids, strict=True):
            if max_prompt_length is not None:
                prompt_ids = prompt_ids[-max_prompt_length:]
            if not prompt_ids:
                dropped += 1
                continue
            columns["prompt_ids"].append(list(prompt_ids))
            columns["prompt_json"].append(json.dumps(prompt, ensure_ascii=False))
    features = datasets.Features(
        {"prompt_ids": datasets.List(datasets.Value("int32")), "prompt_json": datasets.Value("string")}
    )
    return TokenizedPrompts(datasets.Dataset.from_dict(columns, features=features), dropped)
