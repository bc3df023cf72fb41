"""Text as a reward model reads it: the prompt and completion rendered whole (through the chat template when the
tokenizer has one) and tokenized; a text too long for the reward model loses the start of its prompt, never
its completion (what is judged). Judging (online) and reward-model training (data) both encode through
`encode_for_reward`, so both see identical inputs."""

from __future__ import annotations

from collections.abc import Sequence

Prompt = str | list[dict[str, str]]  # text, or chat messages [{"role": ..., "content": ...}]


def prompt_text(prompt: Prompt) -> str:
    """The prompt as a function reward sees it: text unchanged; chat messages as ``"role: content"`` blocks joined
    by a blank line (``"\\n\\n"``), e.g. ``"system: Be brief.\\n\\nuser: Hi"``."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def render_for_reward(tokenizer, prompt: Prompt, completion: str | list[dict[str, str]]) -> tuple[str, bool]:
    """(text, add_special_tokens) a reward model scores. With a chat template: the prompt's messages (or one user
    message holding a text prompt) plus the completion as the assistant's message (or the completion's messages,
    for conversational preference data), rendered by the template, which holds the special tokens itself.
    Without one: prompt text + completion (a conversation's message contents, joined), special tokens added by
    the tokenizer."""
    reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    if getattr(tokenizer, "chat_template", None):
        messages = list(prompt) if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages + reply, tokenize=False), False
    return prompt_text(prompt) + "".join(message["content"] for message in reply), True


def encode_for_reward(
    tokenizer, prompts: Sequence[Prompt], completions: Sequence[str], *, max_length: int
) -> list[list[int]]:
    """Token ids of each rendered (prompt, completion), at most `max_length` (`encode_for_reward_cut`)."""
    return encode_for_reward_cut(tokenizer, prompts, completions, max_length=max_length)[0]


def encode_for_reward_cut(
    tokenizer, prompts: Sequence[Prompt], completions: Sequence[str], *, max_length: int
) -> tuple[list[list[int]], list[bool]]:
    """(token ids, whether each was cut) of each rendered (prompt, completion), at most `max_length`. A text that
    is too long keeps the tokens the tokenizer adds in front (BOS) and its end: the prompt is cut from the
    left and the completion kept whole; a completion longer than `max_length` on its own keeps its start."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    if not prompts:
        return [], []
    rendered = [render_for_reward(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    add_special_tokens = rendered[0][1]  # the same for every text: it depends on the tokenizer only
    fast = getattr(tokenizer, "is_fast", False)  # character offsets tell exactly where the completion starts
    encoded = tokenizer(
        [text for text, _ in rendered], add_special_tokens=add_special_tokens, return_offsets_mapping=fast
    )
    out, cut = [], []
    for index, (prompt, (text, _)) in enumerate(zip(prompts, rendered, strict=True)):
        ids = list(encoded["input_ids"][index])
        if len(ids) <= max_length:
            out.append(ids)
            cut.append(False)
            continue
        head = _rendered_prompt(tokenizer, prompt, text)
        if fast:
            front, start = _spans(encoded["offset_mapping"][index], len(head))
        else:  # a slow tokenizer: the prompt's own token count (the boundary may merge differently)
            special = set(tokenizer.all_special_ids)
            front = next((i for i, token in enumerate(ids) if token not in special), len(ids))
            start = len(tokenizer(head, add_special_tokens=add_special_tokens)["input_ids"]) if head else front
        out.append(_keep_completion(ids, min(front, max_length), max(start, front), max_length))
        cut.append(True)
    return out, cut


def _rendered_prompt(tokenizer, prompt: Prompt, text: str) -> str:
    """The start of the rendered `text` that is the prompt (with the chat template's generation prompt), or ""
    when the text does not start with the prompt rendered alone."""
    if getattr(tokenizer, "chat_template", None):
        messages = list(prompt) if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        head = prompt_text(prompt)
    return head if text.startswith(head) else ""


def _spans(offsets, completion_char: int) -> tuple[int, int]:
    """(tokens added in front, index of the completion's first token) from each token's character span: added
    special tokens span no characters."""
    front = 0
    while front < len(offsets) and tuple(offsets[front]) == (0, 0):
        front += 1
    start = next((i for i in range(front, len(offsets)) if offsets[i][0] >= completion_char), len(offsets))
    return front, start


def _keep_completion(ids: list[int], front: int, start: int, max_length: int) -> list[int]:
    """`max_length` of `ids`: the `front` tokens the tokenizer added, then the end of the text (the prompt cut
    from the left), or the start of the completion (from index `start`) when it alone does not fit."""
    room = max_length - front
    if len(ids) - start > room:
        return ids[:front] + ids[start : start + room]
    return ids[:front] + ids[len(ids) - room :]
