"""Built-in tiny model and preference set, so the main job runs offline on a fresh machine.

`builtin:tiny-qwen2` is a randomly initialised Qwen2 with a few layers and a byte-level BPE tokenizer trained
here with Qwen2's own pre-tokenizer, so that `AutoTokenizer` rebuilds it as a Qwen2Tokenizer with the same ids.
`builtin:sentiment-pairs` is a small learnable preference task: for a prompt naming a thing, the chosen answer
describes it with pleasant words and the rejected one with unpleasant words. Train and test use different
things, so held-out accuracy measures a preference that generalises, not memorised pairs.
`builtin:describe-prompts` holds the same prompts alone, for online DPO judged by `sentiment_reward`
(`reward_model: dpo_lightning.builtin:sentiment_reward`), a programmatic reward that needs no model.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from pathlib import Path

BUILTIN_MODEL = "builtin:tiny-qwen2"
BUILTIN_DATASET = "builtin:sentiment-pairs"
BUILTIN_PROMPTS = "builtin:describe-prompts"
BUILTIN_DATASETS = (BUILTIN_DATASET, BUILTIN_PROMPTS)

# The pre-tokenizer regex of Qwen2's tokenizer (transformers' Qwen2Tokenizer rebuilds tokenizers with it).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
# ChatML, as Qwen2.5 renders conversations; lets the tiny model exercise the chat-template path.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

THINGS = (
    "garden river morning window teacher letter bridge forest kitchen village song market harbor castle "
    "meadow library candle bakery orchard lantern painting valley mountain island school festival station "
    "cottage fountain violin blanket sunrise journey museum theater carpet balcony mirror ribbon"
).split()
GOOD_WORDS = "warm bright kind gentle lovely calm cheerful friendly sunny sweet golden peaceful".split()
BAD_WORDS = "cold dark cruel harsh ugly grim gloomy hostile rotten bitter broken noisy".split()
TEST_THINGS = 8


def _pair(thing: str, rng: random.Random) -> dict[str, str]:
    good = rng.sample(GOOD_WORDS, 2)
    bad = rng.sample(BAD_WORDS, 2)
    return {
        "prompt": f"Describe the {thing}.\n",
        "chosen": f"The {thing} is {good[0]} and {good[1]}.",
        "rejected": f"The {thing} is {bad[0]} and {bad[1]}.",
    }


def preference_rows(seed: int = 0, pairs_per_thing: int = 12) -> dict[str, list[dict[str, str]]]:
    """Rows of the built-in preference set, split by thing: `train` and `test` share no prompt."""
    rng = random.Random(seed)
    things = list(THINGS)
    rng.shuffle(things)
    test_things, train_things = things[:TEST_THINGS], things[TEST_THINGS:]
    return {
        "train": [_pair(t, rng) for t in train_things for _ in range(pairs_per_thing)],
        "test": [_pair(t, rng) for t in test_things for _ in range(pairs_per_thing)],
    }


def describe_prompt_rows(seed: int = 0, prompts_per_thing: int = 4) -> dict[str, list[dict[str, str]]]:
    """The built-in prompts alone, split as `preference_rows` splits them (train and test share no thing)."""
    splits = preference_rows(seed, pairs_per_thing=prompts_per_thing)
    return {name: [{"prompt": row["prompt"]} for row in rows] for name, rows in splits.items()}


def sentiment_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Pleasant words minus unpleasant words in each completion: a reward a tiny model can learn to earn."""
    good, bad = set(GOOD_WORDS), set(BAD_WORDS)
    scores = []
    for completion in completions:
        words = [word.strip(".,;:!?").lower() for word in completion.split()]
        scores.append(float(sum(word in good for word in words) - sum(word in bad for word in words)))
    return scores


def corpus(seed: int = 0) -> list[str]:
    """Text the built-in tokenizer is trained on: the whole preference set plus the chat markup."""
    rows = preference_rows(seed)
    texts = [r[k] for split in rows.values() for r in split for k in ("prompt", "chosen", "rejected")]
    return texts + ["user assistant system\n", "The quick brown fox jumps over the lazy dog."]


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` with Qwen2's split pattern, EOS = pad = <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(
    folder: str | Path,
    *,
    seed: int = 0,
    texts: list[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    num_heads: int = 4,
) -> Path:
    """Save a random tiny Qwen2 causal LM and its tokenizer to `folder` in Hugging Face format (head size
    hidden_size / num_heads: vLLM's attention needs one of its supported sizes, e.g. 64 / 2 = 32)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    tokenizer = train_tokenizer(texts if texts is not None else corpus(seed), vocab_size=vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a build of a few kB needs no progress bar (it would trail an error line)
    try:
        model.save_pretrained(folder)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)
    return folder


def builtin_model_dir(seed: int = 0) -> Path:
    """The built-in model's folder in the user cache, built once (a few seconds) and reused."""
    cache = Path(os.environ.get("DPO_LIGHTNING_CACHE", Path.home() / ".cache" / "dpo_lightning"))
    # The folder name carries a hash of the recipe, so a changed recipe never reuses a stale build.
    recipe = hashlib.sha256(f"{QWEN2_SPLIT_PATTERN}{THINGS}{GOOD_WORDS}{BAD_WORDS}{seed}v1".encode()).hexdigest()[:12]
    folder = cache / f"tiny-qwen2-{recipe}"
    if not (folder / "config.json").is_file():
        staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_tiny_model(staging, seed=seed)
        try:
            os.replace(staging, folder)  # atomic: a concurrent rank sees either nothing or a whole folder
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    return folder
