"""Models as loaded from disk or the Hub: names resolved before anything heavy happens (`loading.py`), causal
LMs and tokenizers for the policy and the reference, and `RewardModel`, the scalar-head network that
`mode: reward` trains (`reward_model.py`), and what any layer may ask of a model FSDP has sharded
(`sharding.py`). How a model is used (a frozen reference, a judge, a sampler) is
decided in the layers above.

Imports: foundation, config
"""

from dpo_lightning.models.loading import (
    ModelSource,
    disable_dropout,
    freeze,
    load_causal_lm,
    load_policy,
    load_reference,
    load_tokenizer,
    resolve_model,
)
from dpo_lightning.models.reward_model import REWARD_FORMAT, REWARD_MARKER, RewardModel, set_pad_token_id

__all__ = [
    "REWARD_FORMAT",
    "REWARD_MARKER",
    "ModelSource",
    "RewardModel",
    "disable_dropout",
    "freeze",
    "load_causal_lm",
    "load_policy",
    "load_reference",
    "load_tokenizer",
    "resolve_model",
    "set_pad_token_id",
]
