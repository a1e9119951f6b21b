"""Where a run's metrics go: ``metrics.jsonl`` always, and the loggers of ``train.report_to``.

``metrics.jsonl`` (one JSON object per logged step; ``eval/*`` keys on the steps that were
evaluated) is the run's own record: resume truncates it, plots and studies read it. The
loggers are optional mirrors of the same records, each through its own package (the
``loggers`` extra, ``pip install 'aligndistil[loggers]'``):

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing ``<output_dir>/tensorboard``,
  one scalar per key (tag = the key, e.g. ``loss``, ``rewards/margins``, ``eval/loss``).
- ``wandb``: ``wandb.init(dir=<output_dir>)``, so its files go to ``<output_dir>/wandb``;
  project, entity, mode (``WANDB_MODE=offline`` needs no account) and the API key come from
  the environment as wandb reads them (``WANDB_PROJECT`` defaults to ``aligndistil`` here).
  A resumed run starts a new wandb run with the same name.

Only the main process reports (:class:`Reporter` with ``active=False`` does nothing), so a
multi-process run writes each record once.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from aligndistil.config import ConfigError

#: The package each logger needs (the ``loggers`` extra installs them all).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
EXTRA_HINT = "pip install 'aligndistil[loggers]'"


def check_available(report_to: list) -> None:
    """Refuse, before anything is loaded, a logger whose package is not installed."""
    for name in report_to:
        pkg = PACKAGES.get(name)
        if pkg is not None and importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"train.report_to includes {name}, but the {pkg} package is not installed: "
                              f"{EXTRA_HINT} (or pip install {pkg})")


class StepMetrics:
    """A step's metrics, averaged over every element the method reported on every process.

    A method's loss returns each metric as a tensor (one value per sequence or token); the
    sums stay on the device as the micro-batches go by, and :meth:`means` moves them to the
    host once per step, reduced over processes in one collective, instead of synchronising
    with the GPU for every metric of every micro-batch. Every process must report the same
    metric names in the same order (the methods do: the names depend on the config only).
    """

    def __init__(self, device):
        self.device = device
        self.sums: dict = {}  # name -> [float64 sum on the device, element count]

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = v.detach().reshape(-1).to(self.device, torch.float64)
            s = self.sums.setdefault(k, [torch.zeros((), dtype=torch.float64, device=self.device), 0])
            s[0] = s[0] + v.sum()
            s[1] += v.numel()

    def means(self, reduce=None) -> dict:
        """``name -> mean``; ``reduce`` sums a tensor over processes (None: one process).
        A metric with no elements anywhere is left out."""
        if not self.sums:
            return {}
        names = list(self.sums)
        table = torch.stack([torch.stack([s, torch.tensor(float(n), dtype=torch.float64, device=self.device)])
                             for s, n in self.sums.values()])
        if reduce is not None:
            table = reduce(table)
        return {k: s / n for k, (s, n) in zip(names, table.tolist()) if n > 0}


class Reporter:
    """Writes each logged record to ``metrics.jsonl`` and to the configured loggers.

    Args:
        out: the run's output folder.
        report_to: ``train.report_to``.
        run_config: the run config as a dict (wandb stores it with the run).
        active: False on every process but the main one: then nothing is written or opened.
    """

    def __init__(self, out: Path, report_to: list, run_config: dict, active: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.active = active
        self.tensorboard = self.wandb = None
        if not active:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter  # presence checked up front (check_available)

            self.tensorboard = SummaryWriter(str(Path(out) / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "aligndistil"), name=Path(out).name,
                                    dir=str(out), config=run_config)

    def log(self, record: dict) -> None:
        """Append ``record`` (it holds ``step``) to ``metrics.jsonl`` and send its numbers to the loggers."""
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record["step"])
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        """Flush and close the loggers (wandb marks the run failed when ``failed``)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            import wandb

            self.wandb.finish(exit_code=1 if failed else 0)
            # finish() can return before wandb's service process has written the run's records
            # (offline, the .wandb file was seen holding only its header); teardown waits for it.
            wandb.teardown(exit_code=1 if failed else 0)
            self.wandb = None
