"""Strategy selection: one process, DDP or FSDP under a torchrun-style launcher (FSDP itself needs GPUs)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lightning.config import make_config
from dpo_lightning.errors import UserError
from dpo_lightning.training.strategies import build_strategy, check_strategy, decoder_layer_classes, launcher_layout

LAUNCHED = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


@pytest.fixture
def launched(monkeypatch):
    for key, value in {**LAUNCHED, "TORCHELASTIC_RUN_ID": "x", "GROUP_RANK": "0"}.items():
        monkeypatch.setenv(key, value)


def test_single_process_uses_lightnings_default(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_layout() == ("auto", 1)
    assert build_strategy(make_config({}), torch.nn.Linear(2, 2)) == "auto"


def test_ddp_adopts_the_launchers_processes(launched):
    from lightning.pytorch.plugins.environments import TorchElasticEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    assert launcher_layout() == (2, 2)  # devices per node, nodes
    strategy = build_strategy(make_config({"strategy": "ddp"}), torch.nn.Linear(2, 2))
    assert isinstance(strategy, DDPStrategy) and isinstance(strategy.cluster_environment, TorchElasticEnvironment)


def test_fsdp_wraps_each_decoder_layer_and_shards_checkpoints(launched, tiny_model):
    from lightning.pytorch.strategies import FSDPStrategy

    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert {cls.__name__ for cls in decoder_layer_classes(policy)} == {"Qwen2DecoderLayer"}
    strategy = build_strategy(make_config({"strategy": "fsdp", "fsdp_sharding_strategy": "SHARD_GRAD_OP"}), policy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._state_dict_type == "sharded" and strategy.kwargs["use_orig_params"] is True
    assert str(strategy.sharding_strategy).endswith("SHARD_GRAD_OP")
    with pytest.raises(ValueError, match="_no_split_modules"):
        decoder_layer_classes(torch.nn.Linear(2, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_fsdp_without_gpus_is_a_one_line_error():
    with pytest.raises(UserError, match="strategy: fsdp needs CUDA GPUs"):
        check_strategy(make_config({"strategy": "fsdp"}))
    check_strategy(make_config({"strategy": "ddp"}))
