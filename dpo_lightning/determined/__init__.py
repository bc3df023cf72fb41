"""The bridge to Determined's Core API, an adapter at the edge: the trial's configuration and start point
(`bridge.py`, the only module of the package that imports `determined`), and the storage a training session
checkpoints, reports and asks about preemption through (`session.py`, duck-typed on the context).

Imports: foundation, config, data, models, dpo, online, training
"""
