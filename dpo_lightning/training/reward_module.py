"""RewardModelModule: trains a RewardModel on preference pairs with the Bradley-Terry loss (`mode: reward`).

The pairs are tokenized as the model will later read them when it judges (`data.reward_text.encode_for_reward`:
prompt and completion rendered whole, through the chat template when the tokenizer has one), so the model is
trained on exactly the inputs it judges. Checkpoints and reports go through the same Lightning and Determined
paths as DPO; the checkpoint is a RewardModel folder that `reward_model:` loads back as a judge.
"""

from __future__ import annotations

import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.data.batch import PairBatch
from dpo_lightning.dpo.metrics import RewardMetrics
from dpo_lightning.losses import bradley_terry_loss, weighted_mean
from dpo_lightning.models import RewardModel
from dpo_lightning.training.module import TrainingModule
from dpo_lightning.training.sinks import ReportSink


class RewardModelModule(TrainingModule):
    DESCRIPTION = "reward model"
    PROGRESS_BAR = ("loss", "accuracy")

    def __init__(self, cfg: DPOConfig, reward_model: RewardModel, sinks: list[ReportSink] | None = None) -> None:
        super().__init__(cfg, sinks)
        self.reward_model = reward_model
        self.train_metrics = RewardMetrics()
        self.val_metrics = RewardMetrics()

    @property
    def trained(self) -> torch.nn.Module:
        return self.reward_model

    def shared_step(self, batch: PairBatch, metrics: RewardMetrics) -> torch.Tensor:
        """Scores of the pairs' rows, the per-pair loss, the metrics' update."""
        chosen, rejected = batch.split(self.reward_model(batch.input_ids, batch.attention_mask))
        losses = bradley_terry_loss(chosen, rejected)
        metrics.update(losses, chosen, rejected, batch)
        return weighted_mean(losses, batch.pair_weight)

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, self.train_metrics)

    def validation_step(self, batch: PairBatch, batch_idx: int) -> None:
        self.shared_step(batch, self.val_metrics)

    def save_pretrained(self, folder, state_dict: dict | None) -> None:
        self.reward_model.save_pretrained(folder, state_dict=state_dict, base_model=self.cfg.model_name)
