"""RewardModule: trains the project's RewardModel on preference pairs with the Bradley-Terry loss (`mode: reward`).

The pairs are tokenized as the reward model will later read them when it scores (`rewards.encode_for_reward`:
prompt and completion rendered whole, through the chat template when the tokenizer has one), so the model is
trained on exactly the inputs it judges. Checkpoints and reports go through the same Lightning and Determined
paths as DPO; the checkpoint is a RewardModel folder that `reward_model:` loads back.
"""

from __future__ import annotations

import torch

from dpo_lightning.config import DPOConfig
from dpo_lightning.losses import bradley_terry_loss
from dpo_lightning.metrics import RewardMetrics
from dpo_lightning.models import RewardModel
from dpo_lightning.module import Reporter, TrainingModule, weighted_mean


class RewardModule(TrainingModule):
    TRAINED = "reward_model"
    PROGRESS_BAR = ("loss", "accuracy")

    def __init__(self, cfg: DPOConfig, reward_model: RewardModel, reporters: list[Reporter] | None = None) -> None:
        super().__init__(cfg, reporters)
        self.reward_model = reward_model
        self.train_metrics = RewardMetrics()
        self.val_metrics = RewardMetrics()

    def shared_step(self, batch: dict[str, torch.Tensor], metrics: RewardMetrics) -> torch.Tensor:
        """Scores of the 2B rows (B chosen, then B rejected), the per-pair loss, the metrics' update."""
        scores = self.reward_model(batch["input_ids"], batch["attention_mask"])
        chosen, rejected = scores.chunk(2)
        losses = bradley_terry_loss(chosen, rejected)
        metrics.update(losses, chosen, rejected, batch["attention_mask"], batch.get("pair_weight"))
        return weighted_mean(losses, batch.get("pair_weight"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.shared_step(batch, self.train_metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.shared_step(batch, self.val_metrics)

    def save_pretrained(self, folder, state_dict: dict | None) -> None:
        self.reward_model.save_pretrained(folder, state_dict=state_dict, base_model=self.cfg.model_name)
