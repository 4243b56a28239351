"""What every long job shows and records: a progress bar and JSONL metrics (mirrored to TensorBoard).

- `MetricsLogger` appends one JSON object per line to `metrics.jsonl` (flushed each time, so a crash loses
  nothing already logged) and mirrors numbers to TensorBoard when it is installed. On resume it drops the
  records past the checkpoint's step, so the file never holds two histories.
- `Progress` is a tqdm bar with the step, the losses, a throughput and an ETA that accounts for
  `--max-minutes` as well as `--max-steps`; its total is the run budget's planned steps
  (`tessera.runtime.schedule.RunBudget`), and it follows the budget's re-plans.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tessera.runtime.schedule import RunBudget
from tessera.storage import atomic_write_text


def progress_bar(*args, **kwargs) -> tqdm:
    """A tqdm bar that redraws at most every 10 s when stderr is not a terminal (CI logs, pipes)."""
    import sys

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(*args, **kwargs)


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            atomic_write_text(self.path, "".join(x + "\n" for x in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step)
            except Exception:  # tensorboard not installed
                self._tb = None

    def log(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            if isinstance(v, float) and not math.isfinite(v):
                v = str(v)  # JSON has no NaN/Inf; keep the fact visible
            rec[k] = v
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class Progress:
    """tqdm bar over the budget's planned steps (following its re-plans), with losses and throughput in the
    postfix and a budget-aware ETA."""

    def __init__(self, budget: RunBudget, start_step: int = 0, desc: str = "train", unit: str = "step",
                 enabled: bool = True):
        self.budget = budget
        self.bar = progress_bar(total=budget.planned_steps, initial=start_step, desc=desc, unit=unit,
                                disable=not enabled, smoothing=0.1)
        self.step = start_step
        self.t0 = time.monotonic()
        self.s0 = start_step

    def update(self, step: int, **postfix) -> None:
        planned = self.budget.planned_steps
        if planned != self.bar.total:  # the budget re-planned
            self.bar.total = planned
        self.bar.update(step - self.step)
        self.step = step
        rate = (step - self.s0) / max(1e-9, time.monotonic() - self.t0)
        eta = []
        if planned is not None and rate > 0:
            eta.append(max(0, planned - step) / rate)
        left = self.budget.seconds_left()
        if left is not None:
            eta.append(left)
        fmt = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if eta:
            fmt["eta"] = time.strftime("%H:%M:%S", time.gmtime(min(eta)))
        self.bar.set_postfix(fmt, refresh=False)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()
