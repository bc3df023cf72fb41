"""FSDP2: torch's per-parameter sharding (`fully_shard`), driven by Lightning's `ModelParallelStrategy`.

Each decoder layer is one unit and the model itself (the policy, not the LightningModule) is the root, so
`policy(...)` and `generate` gather what they need wherever they are called. A root keeps its parameters whole
from its forward to its backward (FSDP2's default for a root; the chunked head reads the head's weight after
the forward); a frozen network, which has no backward, is resharded after each use. Checkpoints are torch
distributed checkpoints of the trained model's trainable parameters and the optimizer state, one file per
rank; frozen networks (the reference, a LoRA base) are rebuilt from the configuration and never saved.

torch's own reader unpickles a checkpoint's `.metadata` and its non-tensor items with plain pickle; a sharded
checkpoint is read here through `safe_reader` and `safe_planner` instead, which accept the checkpoint format's
own types and plain values only, so a planted object never runs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from dpo_lightning.integrity import DamagedCheckpoint, safe_torch_load
from dpo_lightning.models.sharding import full_tensor

# Lightning's name for the non-tensor part of a sharded checkpoint (loops, schedulers, callbacks)
LIGHTNING_METADATA = "meta.pt"

# fsdp_sharding_strategy -> whether decoder layers free their gathered parameters after forward
RESHARD_AFTER_FORWARD = {"FULL_SHARD": True, "HYBRID_SHARD": True, "SHARD_GRAD_OP": False}


def mesh_shape(sharding: str, world_size: int, num_nodes: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The device mesh FSDP2 shards over: one dimension of every rank, or for HYBRID_SHARD (replicate across
    nodes, shard within one) nodes x ranks per node."""
    if sharding == "HYBRID_SHARD":
        return (num_nodes, world_size // num_nodes), ("replicate", "shard")
    return (world_size,), ("shard",)


def mixed_precision(bf16: bool):
    """bf16 compute with fp32 master weights and fp32 gradient reduction, or plain fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: torch.nn.Module, mesh, layer_classes, *, layers_reshard: bool, mp_policy) -> None:
    """Shard `model` in place: each decoder layer a unit, the model the root (tied embeddings and head, final
    norm). Every root keeps its parameters whole after its forward, since the chunked head reads the head's
    weight after it; a frozen network is resharded by its caller once its log-probs are taken.

    `generate` counts as a forward of the root: peft's `generate` calls the wrapped causal LM below the root,
    whose forward hook (which gathers the root's own parameters, and on a run's first call sets up the root)
    would otherwise never run."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in list(model.modules()):
        if type(module) in layer_classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=layers_reshard, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters (a LoRA base) come back from the configuration, never from a checkpoint
    return StateDictOptions(ignore_frozen_params=True, **kwargs)


def full_state_dict(model: torch.nn.Module, *, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The whole trained weights on global rank 0's CPU (an empty dict elsewhere), gathered one parameter at a
    time; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return without_tied_duplicates(model, get_model_state_dict(model, options=options))


def sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """This rank's shards of the trained parameters (DTensors), each tied weight once."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return without_tied_duplicates(model, get_model_state_dict(model, options=_options()))


def without_tied_duplicates(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`state` without the names of tied weights (a head that is the embedding): saved once, as an unsharded
    model's `save_pretrained` does, and loaded back through the name that remains."""
    for name in tied_duplicates(model):
        state.pop(name, None)
    return state


def tied_duplicates(model: torch.nn.Module) -> list[str]:
    """Names of parameters that are another, earlier-named parameter (a head tied to the embedding)."""
    first: dict[int, str] = {}
    later = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            later.append(name)
        else:
            first[id(param)] = name
    return later


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """The global gradient norm as a plain tensor (clipping DTensor gradients returns a DTensor)."""
    return full_tensor(norm)


# What a torch distributed checkpoint's `.metadata` may name besides torch dtypes: its own record types, and the
# few helpers they are rebuilt with (none has a side effect)
_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
}
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Python's restricted unpickler: the checkpoint format's record types only, everything else refused."""

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == _METADATA_MODULE and isinstance(found := super().find_class(module, name), type):
            return found  # a record type (a dataclass) or an enum of the format
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def safe_reader(folder: Path):
    """torch's file-system reader, its `.metadata` read by `_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with self.fs.create_stream(path, "rb") as stream:
                    metadata = _MetadataUnpickler(stream).load()
            except FileNotFoundError:
                raise
            except Exception as exc:
                raise DamagedCheckpoint(
                    f"damaged checkpoint: {path} is not a checkpoint's metadata ({str(exc)[:200]}); it was not run"
                ) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(folder))


def safe_planner():
    """torch's default load planner, its non-tensor items (optimizer hyperparameters) read with
    `weights_only=True`."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                loaded = torch.load(value, weights_only=True)
            except Exception as exc:
                raise DamagedCheckpoint(
                    f"damaged checkpoint: item {read_item.dest_index.fqn} is not a plain value ({str(exc)[:200]}); "
                    "it was not run"
                ) from None
            super().load_bytes(read_item, _saved(loaded))

    return SafePlanner()


def _saved(value: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def load_sharded(state: dict[str, Any], folder: Path) -> None:
    """`dcp.load` of `state` from `folder`, through the safe reader and planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader = safe_reader(folder)
    reader.read_metadata()  # a refusal here is said; inside dcp.load torch would fall back and mask it
    try:
        dcp.load(state, storage_reader=reader, planner=safe_planner())
    except CheckpointException as exc:  # torch gathers each rank's failure: a refusal is said as it is
        refusals = [error for error, _ in exc.failures.values() if isinstance(error, DamagedCheckpoint)]
        if refusals:
            raise refusals[0] from None
        raise


def load_sharded_weights(model: torch.nn.Module, folder: Path) -> None:
    """Only the trained weights of a sharded checkpoint (a warm start from another trial's checkpoint)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = {"state_dict": sharded_state_dict(model)}
    load_sharded(state, folder)
    set_model_state_dict(model, state["state_dict"], options=_options(strict=False))


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's model-parallel strategy as pure data-parallel FSDP2 (tensor parallel size 1), whose
    checkpoints hold the LightningModule's trained model (`module.trained`) and its optimizer only."""

    def __init__(self, *, sharding: str, world_size: int, num_nodes: int, bf16: bool, cluster_environment=None):
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True)
        self.cluster_environment = cluster_environment
        self.sharding = sharding
        self.bf16 = bf16
        self._mesh_shape = mesh_shape(sharding, world_size, num_nodes)
        self._fsdp_mesh = None

    @property
    def fsdp_mesh(self):
        """The mesh parameters are sharded (and, for HYBRID_SHARD, replicated) over."""
        if self._fsdp_mesh is None:
            if len(self._mesh_shape[0]) == 1:
                self._fsdp_mesh = self.device_mesh["data_parallel"]
            else:
                from torch.distributed.device_mesh import init_device_mesh

                shape, names = self._mesh_shape
                self._fsdp_mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=names)
        return self._fsdp_mesh

    def shard(self, model: torch.nn.Module, layer_classes) -> None:
        """Shard one network of the LightningModule (the trained model, or a frozen reference)."""
        shard_model(
            model,
            self.fsdp_mesh,
            layer_classes,
            layers_reshard=RESHARD_AFTER_FORWARD[self.sharding],
            mp_policy=mixed_precision(self.bf16),
        )

    def _trained(self) -> torch.nn.Module:
        return self.lightning_module.trained

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return sharded_state_dict(self._trained())

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        return get_optimizer_state_dict(self._trained(), optimizer, options=_options())

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Each rank reads its shards of the trained weights and optimizer state back into place; returns the
        rest (loops, schedulers) for Lightning to restore."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        path = Path(self.broadcast(checkpoint_path))
        model = self._trained()
        load_sharded_weights(model, path)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(model, optimizer, options=_options())}
            load_sharded(state, path)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=state[key], options=_options())
        return safe_torch_load(path / LIGHTNING_METADATA)
