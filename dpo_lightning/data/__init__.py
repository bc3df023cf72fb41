"""Preference data: sources -> formats -> tokenize -> (collate, LightningDataModule)."""

from dpo_lightning.data.pipeline import PreparedPairs, check_source, prepare_pairs

__all__ = ["PreparedPairs", "check_source", "prepare_pairs"]
