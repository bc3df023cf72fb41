"""LightningDataModule over tokenized preference pairs (offline, reward) or prompts (online)."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, SequentialSampler

from dpo_lightning.config import DPOConfig
from dpo_lightning.data.collate import REF_COLUMNS, PairCollator, PromptCollator, collate_in_batches
from dpo_lightning.data.fingerprint import data_fingerprint
from dpo_lightning.data.pipeline import PreparedData, prepare_data
from dpo_lightning.data.sampler import EvalShard, ResumableSampler
from dpo_lightning.lightning_compat import micro_batches_done


class DPODataModule(L.LightningDataModule):
    """Tokenizes once (`prepare`, callable before the models load so that data errors come first).

    Samplers are our own, not Lightning's DistributedSampler (the Trainer runs with
    `use_distributed_sampler=False`), so that the training position can be saved and restored mid-epoch.
    """

    def __init__(self, cfg: DPOConfig, tokenizer) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.data: PreparedData | None = None
        self.train_sampler: ResumableSampler | None = None
        self._sampler_state: dict | None = None  # restored before the sampler exists
        self._generation_batches: list[dict] | None = None  # collated once, reused by every validation
        self._fingerprint: dict | None = None

    def prepare(self) -> PreparedData:
        if self.data is None:
            self.data = prepare_data(self.cfg, self.tokenizer)
        return self.data

    def fingerprint(self) -> dict:
        """The prepared data's fingerprint for the run record (`fingerprint.data_fingerprint`), taken once,
        before precomputed reference columns are added."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.cfg, self.prepare())
        return self._fingerprint

    @property
    def mode(self) -> str:
        """offline, online or reward: what the data trains (`mode: auto` resolved)."""
        return self.prepare().mode

    @property
    def collate(self):
        pad = self.tokenizer.pad_token_id
        return (
            PromptCollator(pad)
            if self.mode == "online"
            else PairCollator(pad, packed=self.cfg.padding_free, shared=self.cfg.prefix_sharing)
        )

    def attach_reference_logps(self, values: dict) -> None:
        """Add the precomputed reference log-probs ((pairs, 2) per split: chosen, rejected) as two columns, which
        the collator puts into every batch (`PairBatch.ref_logps`)."""
        data = self.prepare()
        splits = {"train": data.train, "val": data.val}
        for name, logps in values.items():
            split = splits[name]
            for index, column in enumerate(REF_COLUMNS):
                split = split.add_column(column, logps[:, index].tolist())
            splits[name] = split
        self.data = data._replace(train=splits["train"], val=splits["val"])

    @property
    def has_validation(self) -> bool:
        return self.prepare().val is not None

    def setup(self, stage: str) -> None:
        self.prepare()

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._world()
        data = self.prepare().train
        if self.train_sampler is None:
            self.train_sampler = ResumableSampler(
                len(data), seed=self.cfg.seed, shuffle=True, num_replicas=world_size, rank=rank
            )
            if self._sampler_state is not None:
                self.train_sampler.load_state_dict(self._sampler_state)
        return self._loader(data, self.train_sampler)

    def val_dataloader(self) -> DataLoader:
        world_size, rank = self._world()
        data = self.prepare().val
        if data is None:
            return []
        shard = EvalShard(data, num_replicas=world_size, rank=rank)
        return self._loader(shard, SequentialSampler(shard), self.cfg.eval_batch_size or self.cfg.batch_size)

    def generation_batches(self) -> list[dict]:
        """Held-out prompts for generation metrics, whole on every rank (they are few and sampling needs no
        collective), in PromptCollator's batches, collated once."""
        if self._generation_batches is None:
            data = self.prepare().val_prompts
            pad = self.tokenizer.pad_token_id
            self._generation_batches = (
                []
                if data is None
                else collate_in_batches(data, PromptCollator(pad), self.cfg.eval_batch_size or self.cfg.batch_size)
            )
        return self._generation_batches

    def state_dict(self) -> dict:
        """The training data position, saved with every checkpoint (Lightning calls this on rank 0).

        The position counts the micro-batches this epoch whose step has run, from Lightning's loop progress
        (`lightning_compat.micro_batches_done`) rather than from the sampler, which the DataLoader has already
        read ahead of the step.
        """
        if self.train_sampler is None:
            return {}
        consumed = micro_batches_done(self.trainer) * self.cfg.batch_size
        return {"train_sampler": self.train_sampler.state_dict(consumed)}

    def load_state_dict(self, state: dict) -> None:
        sampler_state = state.get("train_sampler")
        if sampler_state is None:
            return
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(sampler_state)
        else:
            self._sampler_state = sampler_state

    def _loader(self, data, sampler, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            data,
            batch_size=batch_size or self.cfg.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )
