import itertools
import json
from dataclasses import dataclass, field

import pytest
import torch

from tessera.config import ConfigError, apply_overrides, from_dict, to_dict
from tessera.runtime.checkpoint import (
    CheckpointManager,
    capture_rng,
    flatten_optimizer_state,
    restore_rng,
    unflatten_optimizer_state,
)
from tessera.runtime.monitor import MetricsLogger, Progress, read_metrics
from tessera.runtime.schedule import RunBudget, lr_factor


@dataclass
class Cfg:
    dim: int = 8
    lr: float = 1e-3
    strides: list[int] = field(default_factory=lambda: [8, 5])
    name: str = "x"
    flag: bool = False
    maybe: int | None = None


def test_overrides_are_typed_and_unknown_keys_refused():
    c = apply_overrides(Cfg(), ["dim=16", "lr=3e-4", "strides=8,5,4,2", "flag=true", "maybe=none"])
    assert (c.dim, c.lr, c.strides, c.flag, c.maybe) == (16, 3e-4, [8, 5, 4, 2], True, None)
    assert apply_overrides(Cfg(), ["strides=[2,2]"]).strides == [2, 2]
    with pytest.raises(ConfigError, match="no key 'dimm'; valid keys: dim, flag"):
        apply_overrides(Cfg(), ["dimm=3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(Cfg(), ["dim=3.5"])
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(Cfg, {"dim": 3, "bogus": 1})
    assert from_dict(Cfg, to_dict(c)) == c


def test_checkpoint_round_trip_and_atomic_latest(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    assert m.latest_step() is None
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    t, meta = flatten_optimizer_state(opt.state_dict())
    for step in (10, 20, 30):
        m.save(step, {"model": lin.state_dict(), "optimizer": t}, {"optimizer": meta, "x": step})
    assert m.latest_step() == 30
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000020", "step_000030"]
    tensors, state = m.load()
    assert state["x"] == 30 and torch.equal(tensors["model"]["weight"], lin.weight)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(unflatten_optimizer_state(tensors["optimizer"], state["optimizer"]))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path)
    m.save(1, {"model": {"w": torch.ones(2)}}, {})

    def boom(*a, **k):
        raise OSError("disk full")

    import tessera.runtime.checkpoint as ck

    monkeypatch.setattr(ck, "atomic_write_json", boom)
    with pytest.raises(OSError):
        m.save(2, {"model": {"w": torch.zeros(2)}}, {})
    monkeypatch.undo()
    assert m.latest_step() == 1
    assert torch.equal(m.load()[0]["model"]["w"], torch.ones(2))
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_rng_capture_restore():
    t, meta = capture_rng()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    restore_rng(t, json.loads(json.dumps(meta)))
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_metrics_resume_drops_later_records(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for s in range(1, 6):
        log.log(s, loss=1.0 / s, nan=float("nan"))
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path)[0]["nan"] == "nan"
    log = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    log.log(4, loss=0.0)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_budget():
    b = RunBudget(max_steps=5, handle_signals=False)
    assert not b.should_stop(4) and b.should_stop(5) and b.reason == "max_steps"
    b = RunBudget(max_minutes=0.0, handle_signals=False)
    assert b.should_stop(0) and b.reason == "max_minutes"


def test_budget_fraction_and_warmup_stable_decay():
    b = RunBudget(max_steps=100, handle_signals=False)
    assert b.fraction(0) == 0.0 and b.fraction(50) == 0.5 and b.fraction(250) == 1.0
    assert RunBudget(handle_signals=False).fraction(10**6) == 0.0  # unbounded: never cools down
    assert RunBudget(max_minutes=1, handle_signals=False).fraction(1) == 0.0  # no plan measured yet
    # wsd: warmup over 10 steps, flat, then linear to 0 over the last 30% (the codecs' cooldown)
    wsd = lambda step, frac, decay=0.3: lr_factor(step, frac, 10, "wsd", decay_fraction=decay)
    assert wsd(0, 0.0) == pytest.approx(0.1)
    assert wsd(50, 0.5) == 1.0 and wsd(50, 0.7) == pytest.approx(1.0)
    assert wsd(85, 0.85) == pytest.approx(0.5) and wsd(100, 1.0) == 0.0
    assert wsd(100, 1.0, decay=0.0) == 1.0  # cooldown 0: no decay


def test_lr_schedules_decay_to_their_floor_as_the_plan_runs_out():
    """The decoder's schedules: cosine and WSD end at min_ratio, constant does not decay, warmup multiplies."""
    cos = lambda step, frac: lr_factor(step, frac, 10, "cosine", min_ratio=0.1)
    assert cos(0, 0.0) == pytest.approx(0.1) and cos(10, 0.0) == 1.0
    assert cos(50, 0.5) == pytest.approx(0.55) and cos(100, 1.0) == pytest.approx(0.1)
    wsd = lambda frac: lr_factor(100, frac, 10, "wsd", min_ratio=0.1, decay_fraction=0.2)
    assert wsd(0.7) == 1.0 and wsd(0.9) == pytest.approx(0.55) and wsd(1.0) == pytest.approx(0.1)
    assert lr_factor(4, 1.0, 10, "constant") == pytest.approx(0.5) and lr_factor(40, 1.0, 10, "constant") == 1.0
    # the learnability prior's linear decay over its whole run, no warmup
    assert [lr_factor(s, s / 4, 0, "wsd", decay_fraction=1.0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_factor(0, 0.0, 1, "linear")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(budget: RunBudget, clock: FakeClock, seconds_per_step, progress: Progress | None = None):
    """Run steps of `seconds_per_step(step)` seconds until the budget stops; returns the steps and the
    fraction after each step, and how often the plan changed."""
    step, fracs, replans = budget.start_step, [], 0
    while not budget.should_stop(step):
        clock.t += seconds_per_step(step)
        step += 1
        replans += budget.plan(step)
        fracs.append(budget.fraction(step))
        if progress is not None:
            progress.update(step)
    return step, fracs, replans


def test_a_time_budget_alone_sizes_the_plan_to_the_steps_that_fit():
    clock = FakeClock()
    b = RunBudget(max_minutes=1, handle_signals=False, clock=clock)
    assert b.planned_steps is None
    bar = Progress(b, enabled=False)
    # two slow first steps (compilation), then 20 ms a step: 2 + 58 s / 20 ms = 2902 steps fit
    step, fracs, replans = simulate(b, clock, lambda s: 1.0 if s < 2 else 0.02, bar)
    assert b.reason == "max_minutes" and abs(step - 2902) <= 1
    assert abs(b.planned_steps - step) <= 1 and bar.bar.total == b.planned_steps
    assert replans == 1  # a steady rate: planned once, never re-planned
    assert fracs[-1] == pytest.approx(1.0, abs=1e-3) and fracs[len(fracs) // 2] == pytest.approx(0.5, abs=0.01)
    assert b.warmup(500) == b.planned_steps // 10 and b.warmup(50) == 50  # warmup: at most a tenth of the plan
    assert "time limit (1 min) ended the run" in b.stop_message()


def test_a_drifting_rate_is_re_planned_and_the_fraction_stays_continuous():
    clock = FakeClock()
    b = RunBudget(max_minutes=1, handle_signals=False, clock=clock)
    # 10 ms a step for 20 s, then 20 ms: the first plan (~6000 steps) is too long by half
    step, fracs, replans = simulate(b, clock, lambda s: 0.01 if clock.t < 20 else 0.02)
    assert b.reason == "max_minutes" and abs(step - 4000) <= 2
    assert replans > 1 and abs(b.planned_steps - step) <= 1
    assert fracs[-1] == pytest.approx(1.0, abs=1e-3)  # the lr schedule still ends at the end of the budget
    jumps = [b - a for a, b in itertools.pairwise(fracs)]
    assert min(jumps) >= 0 and max(jumps) < 0.002  # monotone, and no jump where the plan changed


def test_with_both_bounds_the_first_one_ends_the_run_and_says_so():
    clock = FakeClock()
    b = RunBudget(max_steps=100, max_minutes=1, handle_signals=False, clock=clock)
    step, fracs, _ = simulate(b, clock, lambda s: 0.02)
    assert (step, b.reason, b.planned_steps) == (100, "max_steps", 100) and fracs[-1] == 1.0
    assert b.stop_message() == "the step limit (100 steps) ended the run, 1.0 min before the time limit (1 min)"
    clock = FakeClock()
    b = RunBudget(max_steps=10**6, max_minutes=1, handle_signals=False, clock=clock)
    assert b.planned_steps == 10**6
    step, fracs, _ = simulate(b, clock, lambda s: 0.02)
    assert b.reason == "max_minutes" and abs(step - 3000) <= 1 and abs(b.planned_steps - step) <= 1
    assert fracs[-1] == pytest.approx(1.0, abs=1e-3)
    assert "time limit (1 min) ended the run, before the step limit (1000000 steps)" in b.stop_message()


def test_a_step_bound_alone_is_the_plan_and_resumes_continue_it():
    clock = FakeClock()
    b = RunBudget(max_steps=100, handle_signals=False, clock=clock)
    _, fracs, replans = simulate(b, clock, lambda s: 1.0)
    assert replans == 0 and b.planned_steps == 100 and fracs == [s / 100 for s in range(1, 101)]
    assert b.warmup(50) == 50  # no time budget: warmup as configured
    state = RunBudget(max_steps=100, handle_signals=False).state_dict()
    again = RunBudget(max_steps=100, handle_signals=False, start_step=40)
    again.load_state_dict(state, 40)
    assert again.fraction(50) == 0.5
    longer = RunBudget(max_steps=200, handle_signals=False, start_step=40)
    longer.load_state_dict(state, 40)  # a new bound: the rest of the schedule spreads over the new steps
    assert longer.fraction(40) == pytest.approx(0.4) and longer.fraction(120) == pytest.approx(0.7)
    assert longer.fraction(200) == 1.0
    unbounded = RunBudget(handle_signals=False, start_step=40)
    unbounded.load_state_dict(longer.state_dict(), 40)
    assert unbounded.planned_steps == 200 and unbounded.fraction(120) == pytest.approx(0.7)
