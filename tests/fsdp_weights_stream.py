"""One rank of the vLLM weight-sync check under FSDP2, for tests/test_fsdp.py.

usage (under torchrun): fsdp_weights_stream.py MODEL_DIR OUT_FILE [lora]
Every rank shards the same policy (LoRA adapters with nonzero weights when asked) and consumes the stream a
sampling engine would load (`policy_weights`); rank 0 saves what it received beside the unsharded policy's
stream and the gathered whole-model state (`full_state_dict`).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM

from dpo_lightning.online.vllm_sampler import policy_weights
from dpo_lightning.training.fsdp import full_state_dict, mixed_precision, shard_model
from dpo_lightning.training.strategies import decoder_layer_classes


def policy(model_dir: str, lora: bool) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.1)  # trained adapters: the merged weights differ from the base
    return model


def main(model_dir: str, out: str, *mode: str) -> None:
    dist.init_process_group("gloo")
    lora = "lora" in mode
    whole = {name: value.clone() for name, value in policy_weights(policy(model_dir, lora))}
    sharded = policy(model_dir, lora)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("shard",))
    shard_model(sharded, mesh, decoder_layer_classes(sharded), layers_reshard=True, mp_policy=mixed_precision(False))
    streamed = {name: value.clone() for name, value in policy_weights(sharded)}  # as the engine consumes it
    state = full_state_dict(sharded)
    if dist.get_rank() == 0:
        torch.save({"whole": whole, "streamed": streamed, "state": state}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
