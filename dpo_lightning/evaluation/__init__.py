"""Measuring a trained model (evaluate.py): DPO's implicit-reward metrics on preference pairs with
validation's code (`pairs.py`), the evaluation run top to bottom (`run.py`) and its report, JSON, Markdown and
plots (`report.py`). Generation metrics come from `online.comparison`, which validation shares.

Imports: foundation, config, data, models, dpo, online
"""
