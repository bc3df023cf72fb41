"""The behaviours `dpo_lightning.lightning_compat` stands in for, on a plain LightningModule: if a Lightning
upgrade changes one, these fail (the runs' own tests check the same behaviours end to end, e.g. resume)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from dpo_lightning.lightning_compat import micro_batches_done, validate_now, validate_on_steps


class Probe(L.LightningModule):
    """A linear model that records what the hooks see."""

    def __init__(self, validate_at_start: bool = False, validate_every: int = 0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.validate_at_start = validate_at_start
        self.validate_every = validate_every
        self.events: list[tuple] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def validation_step(self, batch, batch_idx):
        self.events.append(("val", self.global_step, batch_idx))

    def on_train_start(self):
        if self.validate_every:
            validate_on_steps(self.trainer, lambda step: step % self.validate_every == 0)
        if self.validate_at_start:
            validate_now(self.trainer)
            self.events.append(("back in training", self.trainer.training, self.trainer.validating))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.events.append(("done", self.current_epoch, batch_idx, micro_batches_done(self.trainer)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _data(n: int) -> DataLoader:
    return DataLoader(torch.randn(n, 2), batch_size=1)


def test_validate_now_runs_a_whole_validation_inside_fit_and_returns_to_training():
    probe = Probe(validate_at_start=True)
    _trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None).fit(probe, _data(8), _data(3))
    validations = [e for e in probe.events if e[0] == "val"]
    # the baseline at step 0 (all 3 batches), then Lightning's own at steps 2 and 4
    assert [(step, i) for _, step, i in validations] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (2, 2)] + [
        (4, 0),
        (4, 1),
        (4, 2),
    ]
    assert ("back in training", True, False) in probe.events
    assert [e[2] for e in probe.events if e[0] == "done"] == [0, 1, 2, 3]  # training went on, batch by batch


def test_validate_on_steps_counts_optimizer_steps_across_epochs_that_end_mid_accumulation():
    probe = Probe(validate_every=2)
    trainer = _trainer(max_steps=6, accumulate_grad_batches=2, val_check_interval=10**9, check_val_every_n_epoch=None)
    trainer.fit(probe, _data(3), _data(1))  # 3 batches an epoch: 2 optimizer steps
    # after the batch that finishes steps 2, 4 and 6, once each (Lightning's batch count would say 2 and 5)
    assert [step for kind, step, _ in (e for e in probe.events if e[0] == "val")] == [2, 4, 6]


def test_micro_batches_done_counts_the_steps_run_this_epoch():
    probe = Probe()
    _trainer(max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0).fit(probe, _data(4))
    done = [(epoch, i, count) for _, epoch, i, count in (e for e in probe.events if e[0] == "done")]
    # every micro-batch counts, not only those that end an optimizer step; a new epoch starts from 1
    assert done == [(0, 0, 1), (0, 1, 2), (0, 2, 3), (0, 3, 4), (1, 0, 1), (1, 1, 2), (1, 2, 3), (1, 3, 4)]


def test_the_progress_bar_has_no_version_and_no_epoch_total_when_steps_bound_the_run(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from dpo_lightning.lightning_compat import progress_bar

    module = L.LightningModule()
    for max_steps, max_epochs, expected in ((5, None, "Epoch 0"), (-1, 3, "Epoch 0/2")):
        bar = progress_bar()
        trainer = L.Trainer(
            max_steps=max_steps, max_epochs=max_epochs, callbacks=[bar], logger=CSVLogger(tmp_path), accelerator="cpu"
        )
        trainer.strategy.connect(module)
        bar.setup(trainer, module, stage="fit")
        assert "v_num" not in bar.get_metrics(trainer, module)
        if hasattr(bar, "_get_train_description"):  # the Rich bar; the tqdm bar shows no total
            assert bar._get_train_description(0).strip() == expected
