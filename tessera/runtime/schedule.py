"""How long a run is and its lr at each step: the run budget and the lr schedules every trainer uses.

- `RunBudget` ends a run at `--max-steps` or `--max-minutes`, whichever comes first, or on SIGINT/SIGTERM;
  under torchrun the ranks agree on the decision, so none is left waiting in a collective. It also plans
  the run's length in steps: with only a time budget, the steps that fit, from measured throughput.
- `lr_factor` is the lr multiplier of a step: a linear warmup times a cosine, warmup-stable-decay (WSD) or
  no decay, as a function of how far through the plan the run is (`RunBudget.fraction`), so a time-bounded
  run ends with its lr decayed. The decoder uses cosine or WSD to a floor (`min_lr_ratio`); the codecs use
  WSD down to 0 over their `cooldown`; the learnability prior, a linear decay to 0 over its whole run.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable

import torch

from tessera.runtime.distributed import all_reduce

SCHEDULES = ("cosine", "wsd", "constant")


def lr_factor(step: int, frac: float, warmup: int, schedule: str = "wsd", *, min_ratio: float = 0.0,
              decay_fraction: float = 0.0) -> float:
    """The lr multiplier after `step` steps, `frac` of the way through the run (`RunBudget.fraction`): a
    linear warmup over `warmup` steps times the decay of `schedule`:

    - cosine: from 1 down to `min_ratio` over the whole run;
    - wsd: flat, then linear down to `min_ratio` over the last `decay_fraction` of the run (0: no decay);
    - constant: none.

    The decay is a function of `frac`, not of the step, so it follows a re-planned run continuously."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * frac))
    elif schedule == "wsd":
        decay = 1.0 if decay_fraction <= 0 or frac < 1.0 - decay_fraction else max(0.0, (1.0 - frac) / decay_fraction)
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: {', '.join(SCHEDULES)}")
    return warm * (min_ratio + (1.0 - min_ratio) * decay)


DEFAULT_STEPS = 1000  # the steps of a training run with neither --max-steps nor --max-minutes (every trainer)


def add_budget_arguments(p) -> None:
    """`--max-steps` and `--max-minutes`, the bounds every trainer takes, with the planning rule in their help."""
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop at this step (also the lr schedule's length; 0: write the starting weights and stop)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much wall time (this invocation). Without --max-steps the lr schedule "
                        "and the progress bar are sized to the steps that fit, measured from throughput and "
                        "re-planned if it drifts; with both, whichever comes first ends the run")


def check_budget(max_steps, max_minutes) -> None:
    """The bounds a trainer was given, checked before it writes anything (a `TesseraError` names the flag)."""
    from tessera.errors import TesseraError

    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
        raise TesseraError(f"--max-steps must be an integer >= 0 (0: write the starting weights, no step), "
                           f"got {max_steps!r}")
    if max_minutes is not None and not (isinstance(max_minutes, (int, float)) and 0 <= max_minutes < math.inf):
        raise TesseraError(f"--max-minutes must be a finite number >= 0, got {max_minutes!r}")


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
        check_budget(max_steps, max_minutes)
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
