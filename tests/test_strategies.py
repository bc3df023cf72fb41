"""Strategy selection: one process, DDP or FSDP2 under a torchrun-style launcher, and the combinations refused
before anything loads (FSDP itself runs in test_fsdp.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lightning.config import make_config
from dpo_lightning.errors import ConfigError, UserError
from dpo_lightning.training.fsdp import RESHARD_AFTER_FORWARD, mesh_shape
from dpo_lightning.training.strategies import (
    build_strategy,
    check_strategy,
    decoder_layer_classes,
    launcher_layout,
    trainer_precision,
)

LAUNCHED = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


@pytest.fixture
def launched(monkeypatch):
    for key, value in {**LAUNCHED, "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(key, value)


def test_a_single_process_uses_one_device(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_layout() == (1, 1)  # one process, one device: several run only under a launcher
    assert build_strategy(make_config({}), torch.nn.Linear(2, 2)) == "auto"


def test_ddp_adopts_the_launchers_processes(launched):
    from lightning.pytorch.plugins.environments import TorchElasticEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    assert launcher_layout() == (2, 2)  # devices per node, nodes
    strategy = build_strategy(make_config({"strategy": "ddp"}), torch.nn.Linear(2, 2))
    assert isinstance(strategy, DDPStrategy) and isinstance(strategy.cluster_environment, TorchElasticEnvironment)


def test_fsdp_is_fsdp2_over_every_launched_process(launched, tiny_model):
    from dpo_lightning.training.fsdp import FSDP2Strategy

    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert {cls.__name__ for cls in decoder_layer_classes(policy)} == {"Qwen2DecoderLayer"}
    cfg = make_config({"strategy": "fsdp", "fsdp_sharding_strategy": "SHARD_GRAD_OP", "precision": "bf16-mixed"})
    strategy = build_strategy(cfg, policy)
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.sharding == "SHARD_GRAD_OP" and strategy.bf16
    assert strategy._data_parallel_size == 4 and strategy._tensor_parallel_size == 1
    assert trainer_precision(cfg) == "32-true"  # the sharding's MixedPrecisionPolicy casts, not autocast
    assert trainer_precision(make_config({"precision": "bf16-mixed"})) == "bf16-mixed"
    with pytest.raises(ValueError, match="_no_split_modules"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


def test_decoder_layers_are_found_under_wrappers(tiny_model):
    """A peft model or a reward model holds the transformers model inside; its layers are still the units."""
    from peft import LoraConfig, get_peft_model

    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    wrapped = get_peft_model(policy, LoraConfig(r=2, target_modules=["q_proj"]))
    assert {cls.__name__ for cls in decoder_layer_classes(wrapped)} == {"Qwen2DecoderLayer"}


def test_mesh_shapes():
    assert mesh_shape("FULL_SHARD", 8, 2) == ((8,), ("shard",))
    assert mesh_shape("SHARD_GRAD_OP", 8, 2) == ((8,), ("shard",))
    assert mesh_shape("HYBRID_SHARD", 8, 2) == ((2, 4), ("replicate", "shard"))
    assert RESHARD_AFTER_FORWARD == {"FULL_SHARD": True, "HYBRID_SHARD": True, "SHARD_GRAD_OP": False}


def test_fsdp_combinations_that_cannot_work_are_one_line_errors(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    check_strategy(make_config({"strategy": "fsdp"}))  # one process: runs (a one-GPU smoke run)
    check_strategy(make_config({"strategy": "fsdp", "lora_r": 4}))
    with pytest.raises(UserError, match="HYBRID_SHARD shards within a node"):
        check_strategy(make_config({"strategy": "fsdp", "fsdp_sharding_strategy": "HYBRID_SHARD"}))
    # whatever the launch: the configuration itself refuses
    refused = {
        "export_merged is not supported with strategy: fsdp": {"export_merged": True, "lora_r": 4},
        "bitsandbytes' packed 4-bit weights cannot be sharded": {"lora_r": 4, "load_in_4bit": True},
    }
    for message, values in refused.items():
        with pytest.raises(ConfigError, match=message) as caught:
            make_config({"strategy": "fsdp", **values})
        assert "\n" not in str(caught.value)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    with pytest.raises(UserError, match="started 3 processes but 1 node"):
        check_strategy(make_config({"strategy": "fsdp"}))


def test_qlora_with_the_vllm_sampler_is_refused_in_one_line():
    """The engine takes merged weights, and adapter deltas cannot be added to 4-bit packed ones."""
    values = {"lora_r": 4, "load_in_4bit": True, "sampler": "vllm", "mode": "online", "max_prompt_length": 16}
    with pytest.raises(ConfigError, match="load_in_4bit with sampler: vllm") as caught:
        make_config({**values, "reward_model": "dpo_lightning.builtin:sentiment_reward"})
    assert "\n" not in str(caught.value)
