"""The bridge to Determined's Core API: the trial's configuration and start point, and a session that
reports metrics, writes checkpoints through the sharded `store_path` protocol and answers preemption
(`session.py`, duck-typed on the context). `bridge.py` is the only module of the package that imports
`determined`.

Imports: foundation, config, data, models, dpo, online, training
"""
