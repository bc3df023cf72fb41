"""dpo-lightning: Direct Preference Optimization as a PyTorch Lightning module."""

__version__ = "0.1.0"
