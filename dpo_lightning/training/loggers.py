"""`report_to`: the experiment trackers a run writes to, as Lightning loggers fed by the one report path
(`sinks.LightningLoggerSink`), so each sees the reports metrics.jsonl holds, at the same optimizer steps.

Every logger writes under `<output_dir>/logs/` in a folder of a fixed name (no `version_N` per launch), and a
resumed run continues the same TensorBoard folder, CSV file, W&B run and MLflow run. On a Determined cluster
Determined's own TensorBoard is the writer; `wandb` may be added there.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from dpo_lightning.config import DPOConfig
from dpo_lightning.errors import UserError
from dpo_lightning.training.sinks import kept_on_resume

LOGS = "logs"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # target -> import name


def report_targets(cfg: DPOConfig, *, on_cluster: bool = False) -> list[str]:
    """The trackers this run writes to (`report_to`); on a cluster only those beside Determined's TensorBoard."""
    targets = [t for t in cfg.report_to.replace(" ", "").split(",") if t and t != "none"]
    return [t for t in targets if t == "wandb"] if on_cluster else targets


def check_loggers(cfg: DPOConfig) -> None:
    """One line for a tracker whose package is missing, before anything loads."""
    missing = [t for t in report_targets(cfg) if t in PACKAGES and importlib.util.find_spec(PACKAGES[t]) is None]
    if missing:
        raise UserError(
            f"report_to: {', '.join(missing)} needs its package: pip install {' '.join(missing)} "
            "(or leave it out of report_to)"
        )


def build_loggers(
    cfg: DPOConfig,
    *,
    on_cluster: bool,
    write_files: bool,
    resumed_step: int | None = None,
    revalidated: bool = False,
) -> list[Logger]:
    """Lightning loggers for the run's `report_to`, each resuming where an earlier launch left off; after a
    crash (`resumed_step`: the checkpoint's step), without what the crashed launch wrote past it
    (`sinks.kept_on_resume`)."""
    targets = report_targets(cfg, on_cluster=on_cluster)
    if not (write_files or on_cluster):
        return []
    root = Path(cfg.output_dir) / LOGS
    return [_logger(target, cfg, root, resumed_step, revalidated) for target in targets]


def _logger(
    target: str, cfg: DPOConfig, root: Path, resumed_step: int | None = None, revalidated: bool = False
) -> Logger:
    if target == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        # TensorBoard purges by step alone, every tag at once: from the checkpoint's step on when its validation
        # is repeated (else from the next step), and that step's training report is written to it again
        purge_step = None if resumed_step is None else resumed_step + (0 if revalidated else 1)
        purge = {} if purge_step is None else {"purge_step": purge_step}
        logger = TensorBoardLogger(save_dir=str(root), name="", version="tensorboard", default_hp_metric=False, **purge)
        logger.purges_from = purge_step  # read by run.drop_reports_past
        return logger
    if target == "csv":
        return AppendingCSVLogger(root / "metrics.csv", resumed_step=resumed_step, revalidated=revalidated)
    if target == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        run_id = _stable_id(root, "wandb_id", cfg)
        return WandbLogger(save_dir=str(root), id=run_id, resume="allow", name=Path(cfg.output_dir).name)
    if target == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        saved = root / "mlflow_run_id"
        run_id = saved.read_text().strip() if saved.is_file() else None
        logger = MLFlowLogger(experiment_name="dpo-lightning", run_name=Path(cfg.output_dir).name, run_id=run_id)
        return _RememberMLflowRun(logger, saved)
    raise ValueError(f"unknown report_to target {target}")  # the configuration check lists the valid ones


def _stable_id(root: Path, name: str, cfg: DPOConfig) -> str:
    """An id kept in `root/name`: made once per output folder, read back by every later launch (resume)."""
    path = root / name
    if path.is_file():
        return path.read_text().strip()
    run_id = hashlib.blake2b(f"{Path(cfg.output_dir).resolve()}:{cfg.seed}".encode(), digest_size=6).hexdigest()
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


class _RememberMLflowRun(Logger):
    """An MLflow logger that writes its run id into the output folder, so that a resumed launch continues it."""

    def __init__(self, logger: Logger, path: Path) -> None:
        super().__init__()
        self.inner, self.path = logger, path

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def version(self) -> str:
        return self.inner.version

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.inner.log_hyperparams(params, *args, **kwargs)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.inner.log_metrics(metrics, step)
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(str(self.inner.run_id))

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self.inner.finalize(status)


class AppendingCSVLogger(Logger):
    """One CSV file of every report, a row per (report, step), appended across launches: a resumed run adds
    its rows after the earlier ones, and a new metric name rewrites the header once."""

    def __init__(self, path: Path, resumed_step: int | None = None, revalidated: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self._header: list[str] | None = None  # read from the file once, kept in step with it after
        self.resumed_step = resumed_step  # rows past it, written by a crashed launch, go before the first write
        self.revalidated = revalidated

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args, **kwargs) -> None:
        pass  # the run record (run_config.json) holds the configuration

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if self.resumed_step is not None:
            self._drop_past(self.resumed_step)
            self.resumed_step = None
        if self._header is None:
            self._header = self._read_header()
        fields = self._header + [key for key in row if key not in self._header]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fields != self._header:  # a new column: write the file again under the wider header
            self._rewrite(fields, [*self._read_rows(), row])
        else:
            with self.path.open("a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=fields).writerow(row)
        self._header = fields

    def _drop_past(self, resumed_step: int) -> None:
        """Rewrite the file without the rows a run resumed from `resumed_step` writes again."""
        rows = self._read_rows()
        if rows:
            kept = [
                row
                for row in rows
                if kept_on_resume(_row_group(row), int(float(row["step"])), resumed_step, self.revalidated)
            ]
            self._rewrite(self._read_header(), kept)

    def _rewrite(self, fields: list[str], rows: list[dict]) -> None:
        """The whole file again, under `fields`, replaced at once (a crash leaves the old file or the new)."""
        partial = self.path.with_name(f".{self.path.name}.partial")
        with partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        partial.replace(self.path)

    def _read_header(self) -> list[str]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return next(csv.reader(handle), [])

    def _read_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))


def _row_group(row: dict) -> str:
    """A CSV row's report group: validation rows fill `val/` columns only."""
    return "validation" if any(key.startswith("val/") and value for key, value in row.items()) else "training"
