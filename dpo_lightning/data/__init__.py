"""Preference data: sources -> formats -> mixture -> tokenize -> collate -> LightningDataModule (`mixture.py`
puts the rows of several sources together, as evaluation also reads them). The mode a run trains
(offline, online, reward) is decided here, once, from the data's columns (`mode.py`); the batches every step
reads are typed here (`batch.py`), next to the collators that make them. A row's values are checked in
`values.py`; labelled rows and the system role wrap a layout in `labels.py`; `fingerprint.py` fingerprints the
prepared rows for the run record.

Imports: foundation, config
"""

from dpo_lightning.data.pipeline import PreparedPairs, check_source, prepare_pairs

__all__ = ["PreparedPairs", "check_source", "prepare_pairs"]
