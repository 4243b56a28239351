"""What every long job shows and records: a progress bar, JSONL metrics, TensorBoard, and a run budget.

- `MetricsLogger` appends one JSON object per line to `metrics.jsonl` (flushed each time, so a crash loses
  nothing already logged) and mirrors numbers to TensorBoard when it is installed. On resume it drops the
  records past the checkpoint's step, so the file never holds two histories.
- `Progress` is a tqdm bar with the step, the losses, a throughput and an ETA that accounts for
  `--max-minutes` as well as `--max-steps`; its total is the budget's planned steps.
- `RunBudget` ends a run at `--max-steps` or `--max-minutes`, whichever comes first, or on SIGINT/SIGTERM;
  under torchrun the ranks agree on the decision, so none is left waiting in a collective. It also plans
  the run's length in steps, which every trainer sizes its lr schedule to: with only a time budget, the
  steps that fit, from measured throughput.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tessera.storage import atomic_write_text
from tessera.runtime.distributed import all_reduce


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


def wsd_factor(step: int, frac: float, warmup_steps: int, cooldown: float) -> float:
    """Warmup-stable-decay lr factor: linear warmup over `warmup_steps`, flat, then a linear decay to 0
    over the last `cooldown` fraction of the run (`frac` from `RunBudget.fraction`; 0: no decay)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if cooldown <= 0 or frac < 1.0 - cooldown:
        return warm
    return warm * max(0.0, (1.0 - frac) / cooldown)


DEFAULT_STEPS = 1000  # the steps of a training run with neither --max-steps nor --max-minutes (every trainer)


def add_budget_arguments(p) -> None:
    """`--max-steps` and `--max-minutes`, the bounds every trainer takes, with the planning rule in their help."""
    p.add_argument("--max-steps", type=int, default=None, help="stop at this step (also the lr schedule's length)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much wall time (this invocation). Without --max-steps the lr schedule "
                        "and the progress bar are sized to the steps that fit, measured from throughput and "
                        "re-planned if it drifts; with both, whichever comes first ends the run")


class RunBudget:
    """Stop at max_steps or max_minutes (this invocation's wall time), or when a signal asks; and plan the
    run's length in steps (`planned_steps`), which lr schedules and progress bars are sized to.

    The plan: with only max_steps, max_steps; with a time budget, the steps that fit in it at this
    invocation's throughput, measured over its recent steps but never its first `SKIP_STEPS` (compilation,
    autotuning and cold caches make them slow), and re-planned when the estimate drifts more than `DRIFT`
    from the plan; with both bounds, the smaller; unbounded, none. `fraction` follows the plan and stays
    continuous: it starts from 0 where a time budget is first planned, and a re-plan spreads the rest of the
    schedule over the new number of remaining steps.
    """

    SKIP_STEPS = 2  # this invocation's first steps are not timed
    CALIBRATION_STEPS = 3  # timed steps before the first plan
    DRIFT = 0.1  # re-plan when the steps that fit differ this much from the planned remaining steps

    def __init__(self, max_steps: int | None = None, max_minutes: float | None = None, handle_signals: bool = True,
                 start_step: int = 0, clock: Callable[[], float] | None = None):
        self.max_steps = max_steps
        self.max_minutes = max_minutes
        self.start_step = start_step
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.planned_steps: int | None = max_steps
        self._anchor: tuple[int, float] = (0, 0.0)  # (step, fraction) where the plan's linear piece starts
        self._timed: list[tuple[int, float]] | None = None  # (step, time) marks; the rate is measured from [0]
        self.signal_received: int | None = None
        self.reason: str | None = None
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    signal.signal(sig, self._on_signal)
                except ValueError:  # not in the main thread
                    pass

    def _on_signal(self, signum, frame):
        if self.signal_received is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal_received = signum
        print(f"\n[tessera] signal {signum} received: saving a checkpoint and stopping (send again to abort)")

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def fraction(self, step: int) -> float:
        """How far through its planned steps the run is, in [0, 1] (0 while there is no plan). The plan is
        the same on every rank, so an lr set from it is too."""
        if not self.planned_steps:
            return 0.0
        s0, f0 = self._anchor
        return max(0.0, min(1.0, f0 + (1.0 - f0) * (step - s0) / max(1, self.planned_steps - s0)))

    def warmup(self, steps: int) -> int:
        """`steps` of lr warmup, capped to a tenth of the plan when a time budget sizes it, so a short budget
        is not spent mostly warming up."""
        if self.max_minutes is None or self.planned_steps is None:
            return steps
        return max(1, min(steps, self.planned_steps // 10))

    def plan(self, step: int) -> bool:
        """Call after every step, on every rank: with a time budget, measure the throughput, estimate the
        steps that fit and re-plan when they drift from the plan. Returns whether `planned_steps` changed.
        The estimate is the slowest rank's, so the ranks agree on the plan."""
        if self.max_minutes is None or (self.max_steps is not None and step >= self.max_steps):
            return False
        done, now = step - self.start_step, self.clock()
        if done < self.SKIP_STEPS:
            return False
        if self._timed is None:
            self._timed = [(step, now), (step, now)]
        elif step - self._timed[1][0] >= 2 * (self._timed[1][0] - self._timed[0][0]):
            self._timed = [self._timed[1], (step, now)]  # measure over the recent half (to 3/4) of the steps
        if done < self.SKIP_STEPS + self.CALIBRATION_STEPS:
            return False
        rate = (step - self._timed[0][0]) / max(1e-9, now - self._timed[0][1])
        fit = all_reduce(torch.tensor([step + rate * self.seconds_left()], dtype=torch.float64), op="min").item()
        if fit <= step:  # the time is up
            return False
        planned = max(step + 1, round(fit))
        if self.max_steps is not None:
            planned = min(planned, self.max_steps)
        if self.planned_steps is not None and \
                abs(planned - self.planned_steps) <= self.DRIFT * max(1, self.planned_steps - step):
            return False
        self._replan(step, planned)
        return True

    def _replan(self, step: int, planned: int) -> None:
        self._anchor = (step, self.fraction(step))
        self.planned_steps = planned

    def state_dict(self) -> dict:
        """The plan, for a checkpoint: a resumed run continues the same schedule."""
        return {"planned_steps": self.planned_steps, "anchor": list(self._anchor)}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Continue a checkpoint's plan at `step`. A step bound that differs from it re-plans from `step`, and
        a time budget re-plans once measured; the fraction carries on from where the checkpoint left it."""
        bound = self.planned_steps
        self.planned_steps = state["planned_steps"]
        self._anchor = (int(state["anchor"][0]), float(state["anchor"][1]))
        if bound is not None and bound != self.planned_steps:
            self._replan(step, bound)

    def seconds_left(self) -> float | None:
        return None if self.max_minutes is None else max(0.0, self.max_minutes * 60 - self.elapsed)

    def should_stop(self, step: int) -> bool:
        """Agreed across ranks; sets `reason` to max_steps, max_minutes or signal."""
        code = 0
        if self.max_steps is not None and step >= self.max_steps:
            code = 1
        elif self.signal_received is not None:
            code = 3
        elif self.max_minutes is not None and self.elapsed >= self.max_minutes * 60:
            code = 2
        t = all_reduce(torch.tensor([code], dtype=torch.int64), op="max")
        code = int(t.item())
        if code:
            self.reason = {1: "max_steps", 2: "max_minutes", 3: "signal"}[code]
        return bool(code)

    def stop_message(self) -> str:
        """Which bound ended the run, in words, and how much of the other one was left."""
        if self.reason == "max_steps":
            msg = f"the step limit ({self.max_steps} steps) ended the run"
            if self.max_minutes is not None:
                msg += f", {self.seconds_left() / 60:.1f} min before the time limit ({self.max_minutes:g} min)"
            return msg
        if self.reason == "max_minutes":
            return f"the time limit ({self.max_minutes:g} min) ended the run" + (
                f", before the step limit ({self.max_steps} steps)" if self.max_steps is not None else "")
        if self.reason == "signal":
            return f"a signal ({signal.Signals(self.signal_received).name}) ended the run"
        return "the run did not reach a bound"


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
