"""Experiment tracking for the trainers: `--report_to tensorboard|wandb|none`.

train-critic logs its per-epoch held-out diagnostics through `Tracker`; `tdreward lora` hands
transformers' own callbacks a writer (`lora_callbacks`). Both write TensorBoard events under
OUTPUT_DIR/runs. The check that the chosen tracker is installed runs when the config is built,
so a missing package is a one-line error before any model loads.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from tdreward.errors import TDRewardError

REPORT_TO = ("none", "tensorboard", "wandb")
RUNS_DIR = "runs"
TAGS = {"loss": "train/td_loss"}  # train-critic's history keys not measured on held-out text
_PACKAGES = {"tensorboard": ("tensorboard", "pip install 'tdreward[tracking]'"),
             "wandb": ("wandb", "pip install wandb")}


def check_report_to(value: str, flag: str = "--report_to") -> None:
    """One line when `value` is unknown or its package is not installed."""
    if value not in REPORT_TO:
        raise TDRewardError(f"{flag} must be one of {', '.join(REPORT_TO)}, got {value!r}")
    if value == "none":
        return
    module, how = _PACKAGES[value]
    # find_spec, not import: wandb and tensorboard take seconds to import.
    if importlib.util.find_spec(module) is None:
        raise TDRewardError(f"{flag} {value} needs the {module} package, which is not "
                            f"installed: {how} (or --report_to none)")


class Tracker:
    """Scalars per step to TensorBoard (OUTPUT_DIR/runs) or wandb; `none` does nothing."""

    def __init__(self, report_to: str, output_dir: str | Path, config: dict | None = None,
                 name: str = "train-critic") -> None:
        check_report_to(report_to)
        self.report_to = report_to
        self._writer = None
        self._run = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(output_dir) / RUNS_DIR))
        elif report_to == "wandb":
            import wandb

            self._run = wandb.init(job_type=name, config=config or {}, dir=str(output_dir))

    def log(self, row: dict, step: int) -> None:
        """Log one epoch's row: `loss` as train/td_loss, the other numbers as validation/KEY
        (a NaN diagnostic is left out rather than drawn)."""
        clean = {TAGS.get(k, f"validation/{k}"): float(v) for k, v in row.items()
                 if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
                 and math.isfinite(float(v))}
        if self._writer is not None:
            for k, v in clean.items():
                self._writer.add_scalar(k, v, step)
            self._writer.flush()  # an interrupted run keeps the epochs it finished
        elif self._run is not None:
            self._run.log(clean, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._run is not None:
            self._run.finish()


def lora_callbacks(report_to: str, output_dir: str | Path) -> list:
    """Trainer callbacks for `tdreward lora`: TensorBoard's writes under OUTPUT_DIR/runs (the
    trainer's own output folder is temporary and removed after the run); wandb goes through
    transformers' `report_to` (training_args), so it needs no callback here."""
    if report_to != "tensorboard":
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(SummaryWriter(log_dir=str(Path(output_dir) / RUNS_DIR)))]


__all__ = ["REPORT_TO", "RUNS_DIR", "Tracker", "check_report_to", "lora_callbacks"]
