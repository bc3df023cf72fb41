"""Training with Lightning: the LightningModules (`module.py` the shared base, `dpo_module.py` offline and
online DPO, `reward_module.py` reward-model training), the run top to bottom (`run.py`), checkpoint writing
and restoring (`checkpoints.py`), the session and callback that checkpoint, report and stop a run through a
storage (`session.py`), strategies (`strategies.py`, FSDP2 in `fsdp.py`), the optimizer and schedule
(`optim.py`), report sinks (`sinks.py`) and stop signals (`signals.py`). Nothing here imports `determined`:
plain torchrun or SLURM runs through Lightning alone. Lightning's loop internals are reached only through the
foundation module `lightning_compat`.

Imports: foundation, config, data, models, dpo, online
"""
