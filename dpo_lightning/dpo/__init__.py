"""The preference objective on pair batches: per-sequence log-probs (`logprobs.py`), the reference seam
(`reference.py`), one DPO evaluation of a pair batch shared by every caller, with the losses of
`dpo_lightning.losses` (`objective.py`), and the pair-weighted metrics that training, validation and
evaluate.py report (`metrics.py`). The pair batch itself is made by the data layer (`data.batch.PairBatch`).

Imports: foundation, config, data, models
"""
