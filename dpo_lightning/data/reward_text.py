"""Text as a reward model reads it: the prompt and completion rendered whole (through the chat template when the
tokenizer has one) and tokenized keeping the start. Judging (online) and reward-model training (data) both
encode through `encode_for_reward`, so both see identical inputs."""

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
    """Token ids of each rendered (prompt, completion), at most `max_length`, keeping the start. Scoring and
    reward-model training both encode through here, so both see identical inputs."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    if not prompts:
        return []
    rendered = [render_for_reward(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    add_special_tokens = rendered[0][1]  # the same for every text: it depends on the tokenizer only
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "right"
    try:
        encoded = tokenizer(
            [text for text, _ in rendered],
            add_special_tokens=add_special_tokens,
            truncation=True,
            max_length=max_length,
        )
    finally:
        tokenizer.truncation_side = side
    return [list(ids) for ids in encoded["input_ids"]]
