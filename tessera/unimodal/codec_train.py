"""One training skeleton for the image and the audio codec, in one process or under torchrun.

`train_codec(recipe, out, ...)` runs a codec's training; a `CodecRecipe` brings what differs between the
modalities: the configs and presets, the data, the model and discriminator, the loss of a step and the
held-out evaluation. The skeleton owns what they share, so both trainers behave alike, as the decoder's
trainer (`tessera.train.pretrain`) does:

- The run directory: an OUT with checkpoints is resumed with `--resume` and is an error without it; an OUT
  holding a codec without checkpoints is never overwritten. On resume the configs come from the checkpoint
  (the codec's config cannot change; training keys may), and `--preset` must be the run's.
- Configs of runs written before the two trainers shared this module are read with their old key names
  (`save_every` is `ckpt_every`; `precision` and `amp` are `dtype`, with `amp=off` as `dtype=fp32`), in a
  checkpoint and in `--set`.
- Optimizers: AdamW for the codec (and, when the recipe builds one, the discriminator); the lr warms up
  linearly and cools down linearly to 0 over the last `cooldown` fraction of the planned steps
  (`RunBudget`: `--max-steps`, the steps that fit in `--max-minutes`, or with neither
  `schedule.DEFAULT_STEPS`, as for the decoder; a resumed run without bounds continues its checkpoint's
  plan).
- `dtype`: auto (bf16 autocast on a GPU that supports it, fp32 elsewhere), bf16 or fp32.
- DDP: the codec and the discriminator are wrapped separately with `broadcast_buffers=False` (the VQ
  codebooks are synchronized by the quantizers themselves).
- Bad steps: a step whose loss or gradient is NaN/Inf on any rank is skipped on every rank and counted;
  `max_nan_skips` in a row stop the run with an error (the last good checkpoint is kept). A step whose
  batch has no readable sample on some rank is skipped on every rank (an all-reduced flag, so the
  collectives stay aligned) and counted; `max_empty_batches` in a row stop the run.
- Metrics (metrics.jsonl, TensorBoard), the progress bar, evaluations every `eval_every` steps and at the
  end, checkpoints every `ckpt_every` steps and at the end (atomic, each also refreshing the codec directory
  OUT/codec.json + model.safetensors), with every rank's RNG state; train_summary.json at the end.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tessera.config import ConfigError, apply_overrides, from_dict, preset, to_dict
from tessera.config import split_overrides as _split_overrides
from tessera.errors import TesseraError
from tessera.runtime import schedule
from tessera.runtime.checkpoint import (
    CheckpointManager,
    RunLock,
    capture_rng,
    flatten_optimizer_state,
    lock_run,
    restore_rng,
    unflatten_optimizer_state,
)
from tessera.runtime.distributed import (
    DistEnv,
    all_gather_object,
    all_reduce,
    barrier,
    destroy_distributed,
    init_distributed,
    seed_everything,
)
from tessera.runtime.monitor import MetricsLogger, Progress
from tessera.runtime.schedule import RunBudget, add_budget_arguments, check_budget, lr_factor
from tessera.storage import atomic_write_json, check_output_dir

DTYPES = ("auto", "bf16", "fp32")
# Training keys renamed when the two codec trainers were joined: old name -> (new name, old value -> new value)
RENAMED_KEYS: dict[str, tuple[str, dict]] = {
    "save_every": ("ckpt_every", {}),
    "precision": ("dtype", {}),
    "amp": ("dtype", {"off": "fp32"}),
}


class CodecRunError(TesseraError):
    """A codec training run that cannot go on (too many bad steps in a row)."""


# ------------------------------------------------------------------------------------------------ config
@dataclass
class CodecTrainConfig:
    """The training keys both codecs have; `ImageTrainConfig` and `AudioTrainConfig` add theirs (and their
    own defaults)."""

    batch_size: int = 16  # per process
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    cooldown: float = 0.1  # last fraction of the planned steps over which the lr decays linearly to 0; 0: none
    grad_clip: float = 1.0  # 0: off
    disc_lr: float = 1e-4
    dtype: str = "auto"  # auto (bf16 where the GPU supports it, fp32 elsewhere), bf16 or fp32
    log_every: int = 10
    eval_every: int = 1000  # 0: only at the end
    ckpt_every: int = 1000  # 0: only at the end
    keep_checkpoints: int = 2
    max_nan_skips: int = 5  # non-finite steps in a row that stop the run
    max_empty_batches: int = 10  # batches in a row without one readable sample that stop the run
    seed: int = 0

    def validate(self):
        for key in ("batch_size", "log_every", "keep_checkpoints", "max_nan_skips", "max_empty_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "ckpt_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (0: off or only at the end), got {getattr(self, key)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if not 0 <= self.cooldown <= 1:
            raise ConfigError(f"cooldown must be in [0, 1], got {self.cooldown}")
        for key in ("lr", "disc_lr"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ConfigError(f"{key} must be a finite number > 0, got {getattr(self, key)}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas}")
        return self


def rename_old_keys(train_config: dict) -> dict:
    """A training config of an older run with today's key names (see `RENAMED_KEYS`)."""
    out = dict(train_config)
    for old, (new, values) in RENAMED_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, values.get(value, value))
    return out


def rename_old_overrides(overrides: list[str] | None) -> list[str]:
    """`--set` items with today's key names; an old name still works, with a FutureWarning."""
    out = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        old = key.strip().replace("-", "_")
        if sep and old in RENAMED_KEYS:
            new, values = RENAMED_KEYS[old]
            value = values.get(value.strip(), value)
            warnings.warn(f"--set {old}=... is now --set {new}={value}", FutureWarning, stacklevel=3)
            item = f"{new}={value}"
        out.append(item)
    return out


def use_bf16(dtype: str, device: torch.device) -> bool:
    """Whether a codec trains under bf16 autocast: `bf16`, or `auto` on a GPU that computes it natively.
    (`auto` stays fp32 on a CPU, as both codec trainers always did: bf16 on CPUs was measured for the decoder
    only.)"""
    if dtype == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return dtype == "bf16"


# ------------------------------------------------------------------------------------------------ recipe
class CodecRecipe:
    """What one modality brings to `train_codec`. Hooks run on every rank unless their docstring says so;
    `run` is the `CodecRun` (configs, model, optimizers, budget, metrics, `run.log`)."""

    name = "codec"  # "image codec": progress bar and messages
    model_config: ClassVar[type] = object  # the codec's config dataclass
    train_config: ClassVar[type] = CodecTrainConfig
    train_presets: ClassVar[dict] = {}
    unknown_key = "unknown codec key {key}"  # the message of an override no config has
    throughput_key = "items_per_s"  # metrics.jsonl: the throughput's name and unit
    record_tags: ClassVar[dict] = {}  # keys every training record in metrics.jsonl carries

    # configs
    def codec_preset(self, name: str):
        raise NotImplementedError

    def split_overrides(self, overrides: list[str]) -> tuple[list[str], list[str]]:
        """Route `key=value` overrides to the codec config or the training config; unknown keys are errors."""
        return _split_overrides(overrides, self.model_config, self.train_config, self.unknown_key)

    # setup
    def setup(self, run: CodecRun) -> None:
        """Read the data (before the model is built; `run.state` holds a resumed checkpoint's state)."""

    def build_model(self, run: CodecRun) -> nn.Module:
        raise NotImplementedError

    def build_discriminator(self, run: CodecRun) -> nn.Module | None:
        return None

    def describe(self, run: CodecRun) -> str:
        """The model and the data, for the first log line."""
        return ""

    def before_training(self, run: CodecRun) -> None:
        """After the weights, optimizers and RNG are in place and the model is wrapped for DDP."""

    # a step
    def next_batch(self, run: CodecRun, step: int) -> torch.Tensor | None:
        """The batch of step `step` (counted from 1) on the device, or None when no sample of it could be read."""
        raise NotImplementedError

    def generator_loss(self, run: CodecRun, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict, Any]:
        """(loss to backpropagate, scalars to log, what `discriminator_loss` needs or None: no discriminator
        step this time). Runs the model through `run.g_model` (the DDP wrapper under torchrun)."""
        raise NotImplementedError

    def discriminator_loss(self, run: CodecRun, carry: Any, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, run: CodecRun, step: int) -> None:
        """After every step (skipped or not), before its evaluation and checkpoint."""

    def items(self, batch: torch.Tensor) -> float:
        """How much data a batch holds, in the unit of `throughput_key`, on this rank."""
        return float(batch.shape[0])

    def train_record(self, avg: dict, step: int) -> dict:
        """The metrics.jsonl keys of the averaged step scalars."""
        return {f"train/{k}": v for k, v in avg.items()}

    def empty_hint(self, run: CodecRun) -> str:
        """Why the batches may be empty, for the error that stops a run of them."""
        return ""

    def postfix(self, avg: dict, rate: float) -> dict:
        """The progress bar's postfix."""
        return {"loss": avg["loss"]}

    # evaluation, checkpoints, the end
    def evaluate(self, run: CodecRun, step: int) -> dict | None:
        """Score the held-out data and log it; None when there is nothing to score yet."""
        return None

    def rank_state(self, run: CodecRun) -> dict:
        """This rank's own JSON state for a checkpoint (restored on the same rank by `load_rank_state`)."""
        return {}

    def load_rank_state(self, run: CodecRun, state: dict) -> None:
        pass

    def checkpoint_state(self, run: CodecRun) -> dict:
        """JSON state for a checkpoint (rank 0's is written)."""
        return {}

    def save_codec(self, run: CodecRun) -> None:
        """Write the codec directory (codec.json, model.safetensors) into run.out; rank 0 only."""
        raise NotImplementedError

    def finish(self, run: CodecRun, step: int) -> None:
        """When the run ends, before its last evaluation and checkpoint."""

    def summarize(self, run: CodecRun, summary: dict) -> dict:
        """Keys to add to train_summary.json."""
        return {}

    def report(self, run: CodecRun, summary: dict) -> None:
        """The last lines on the console (rank 0 only)."""


# ------------------------------------------------------------------------------------- configs and resume
RUN_MARKERS = ("codec.json", "checkpoints", "metrics.jsonl")  # what a codec run's directory holds from its start


def check_out(recipe: CodecRecipe, out: Path) -> None:
    """OUT is no input's directory (nor inside or around one), and holds a codec run of this kind or nothing."""
    noun = f"{'an' if recipe.name[0] in 'aeiou' else 'a'} {recipe.name} run"
    check_output_dir(out, [getattr(recipe, "data", None), getattr(recipe, "eval_data", None)], noun=noun,
                     markers=RUN_MARKERS, error=ConfigError)


def resolve_run(recipe: CodecRecipe, out: Path, preset_name: str | None, overrides: list[str] | None,
                resume: bool, ckpt: CheckpointManager, log=print):
    """(codec config, training config, preset name, checkpoint tensors, checkpoint state): from the preset
    and overrides, or from OUT's latest checkpoint with `--resume`."""
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise FileExistsError(f"{out} already holds a training run (step {latest}); pass --resume to continue it "
                              "or choose another --out")
    if latest is None and (out / "codec.json").exists():
        raise FileExistsError(f"{out} already holds a codec and no checkpoint to resume; choose another --out")
    m_ov, t_ov = recipe.split_overrides(rename_old_overrides(overrides))
    if latest is not None:
        tensors, state = ckpt.load(latest, device="cpu")
        tensors, state = upgrade_checkpoint(tensors, state)
        mcfg = from_dict(recipe.model_config, state["model_config"]).validate()
        tcfg = from_dict(recipe.train_config, state["train_config"])
        saved = state.get("preset")
        if preset_name is not None and saved is not None and preset_name != saved:
            raise ConfigError(f"{out} was trained with preset {saved!r}, not {preset_name!r}")
        if apply_overrides(mcfg, m_ov) != mcfg:
            raise ConfigError(f"cannot change the model config of a run being resumed: {', '.join(m_ov)}")
        tcfg = apply_overrides(tcfg, t_ov).validate()  # training keys (lr, eval_every, ...) may change
        return mcfg, tcfg, saved or preset_name or "tiny", tensors, state
    if resume:
        log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
    preset_name = preset_name or "tiny"
    mcfg = apply_overrides(recipe.codec_preset(preset_name), m_ov).validate()
    tcfg = apply_overrides(preset(recipe.train_presets, preset_name, f"{recipe.name} training"), t_ov).validate()
    return mcfg, tcfg, preset_name, {}, {}


def upgrade_checkpoint(tensors: dict, state: dict) -> tuple[dict, dict]:
    """A checkpoint of an older image or audio codec run in today's layout: the image trainer called its
    optimizers `opt_g`/`opt_d` and kept rank 0's RNG (and data RNG) only; the audio trainer's layout is
    today's."""
    tensors, state = dict(tensors), dict(state)
    for old, new in (("opt_g", "optimizer"), ("opt_d", "optimizer_d")):
        if old in tensors:
            tensors[new] = tensors.pop(old)
        if old in state:
            state[new] = state.pop(old)
    rng = state.get("rng")
    if isinstance(rng, dict) and "python" in rng:  # one rank's state
        state["rng"] = {"0": rng}
        tensors["rng"] = {f"r0.{k}": v for k, v in tensors.get("rng", {}).items()}
    if "dataset_rng" in state:
        state.setdefault("ranks", {}).setdefault("0", {})["dataset_rng"] = state.pop("dataset_rng")
    state["train_config"] = rename_old_keys(state["train_config"])
    return tensors, state


# ----------------------------------------------------------------------------------------------- the run
class CodecRun:
    """One training run: what the recipe's hooks read (configs, model, optimizers, budget, metrics, log)."""

    def __init__(self, recipe: CodecRecipe, env: DistEnv, out: Path, *, preset_name=None, overrides=None,
                 max_steps=None, max_minutes=None, resume=False, progress=True, lock: RunLock | None = None):
        self.recipe, self.env, self.out = recipe, env, out
        self._progress = progress
        self.device, self.main = env.device, env.is_main
        self.bar: Progress | None = None
        self.ckpt = CheckpointManager(out, keep=2)
        check_budget(max_steps, max_minutes)
        self.mcfg, self.tcfg, self.preset, tensors, self.state = resolve_run(
            recipe, out, preset_name, overrides, resume, self.ckpt, self.log)
        self.resumed = bool(self.state)
        self.ckpt.keep = self.tcfg.keep_checkpoints
        self.start_step = int(self.state.get("step", 0))
        self.nan_skips = int(self.state.get("nan_skips", 0))
        self.empty_batches = int(self.state.get("empty_batches", 0))
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
        if lock is not None:
            lock_run(lock, env, only_an_existing_dir=False)
        recipe.setup(self)

        # model, discriminator, optimizers: the same initial weights on every rank
        tcfg, dev = self.tcfg, self.device
        seed_everything(tcfg.seed)
        self.model = recipe.build_model(self).to(dev)
        disc = recipe.build_discriminator(self)
        self.disc = disc.to(dev) if disc is not None else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas),
                                     weight_decay=tcfg.weight_decay, fused=True)
        self.opt_d = (torch.optim.AdamW(self.disc.parameters(), lr=tcfg.disc_lr, betas=tuple(tcfg.betas),
                                        weight_decay=tcfg.weight_decay, fused=True) if self.disc else None)
        st = self.state
        if tensors:
            self.model.load_state_dict(tensors["model"])
            self.opt.load_state_dict(unflatten_optimizer_state(tensors["optimizer"], st["optimizer"]))
            if self.disc is not None and "disc" in tensors:
                self.disc.load_state_dict(tensors["disc"])
                self.opt_d.load_state_dict(unflatten_optimizer_state(tensors["optimizer_d"], st["optimizer_d"]))
        mine = str(env.rank)
        rng_t = {k.split(".", 1)[1]: v for k, v in tensors.get("rng", {}).items() if k.startswith(f"r{mine}.")}
        if rng_t and mine in st.get("rng", {}):
            restore_rng(rng_t, st["rng"][mine])  # every rank continues its own random stream
        else:
            seed_everything(tcfg.seed + 1000 * env.rank + self.start_step)  # ranks draw their own samples
        if mine in st.get("ranks", {}):
            recipe.load_rank_state(self, st["ranks"][mine])
        del tensors

        self.amp = use_bf16(tcfg.dtype, dev)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.g_model, self.d_model = self.model, self.disc
        if env.is_distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dev.index] if dev.type == "cuda" else None
            self.g_model = DDP(self.model, device_ids=ids, broadcast_buffers=False)
            if self.disc is not None:
                self.d_model = DDP(self.disc, device_ids=ids, broadcast_buffers=False)

        # the budget: --max-steps, --max-minutes, or the resumed run's plan, or DEFAULT_STEPS
        plan = st.get("schedule")
        if max_steps is None and max_minutes is None:
            max_steps = (plan or {}).get("planned_steps") or schedule.DEFAULT_STEPS
            self.log(f"no --max-steps or --max-minutes: {max_steps} steps"
                     + (" (the resumed run's plan)" if plan and plan.get("planned_steps") else ""))
        self.budget = RunBudget(max_steps=max_steps, max_minutes=max_minutes, start_step=self.start_step)
        if plan:
            planned = plan.get("planned_steps")
            finished = planned is not None and self.start_step >= planned
            if finished and (max_minutes is not None or (max_steps is not None and max_steps > planned)):
                # The schedule has cooled the lr down to 0: continuing it would train nothing, so a longer run
                # plans a new one (over --max-steps from step 0, or over the steps that fit in --max-minutes).
                self.log(f"the run's lr schedule ended at step {planned}; this run plans a new one")
            else:
                self.budget.load_state_dict(plan, self.start_step)  # continue the interrupted plan
        self.metrics = MetricsLogger(out, enabled=self.main, resume_step=self.start_step if self.resumed else None)

    # -------------------------------------------------------------------------------------------- helpers
    def log(self, msg: str) -> None:
        if self.main:
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def autocast(self):
        """bf16 autocast when the run's dtype asks for it (the quantizers keep fp32 inside)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def evaluate(self, step: int) -> dict | None:
        res = self.recipe.evaluate(self, step)
        barrier()
        self.model.train()
        return res

    def save(self, step: int) -> None:
        """A checkpoint (model, discriminator, optimizers, every rank's RNG and recipe state, the budget's plan,
        the skip counters) and the codec directory."""
        rng_t, rng_m = capture_rng()
        gathered = all_gather_object(({k: v.tolist() for k, v in rng_t.items()}, rng_m,
                                      self.recipe.rank_state(self)))
        extra = self.recipe.checkpoint_state(self)
        if self.main:
            opt_t, opt_m = flatten_optimizer_state(self.opt.state_dict())
            tens = {"model": dict(self.model.state_dict()), "optimizer": opt_t, "rng": {}}
            st = {"preset": self.preset, "model_config": to_dict(self.mcfg), "train_config": to_dict(self.tcfg),
                  "optimizer": opt_m, "rng": {}, "ranks": {}, "world_size": self.env.world_size,
                  "schedule": self.budget.state_dict(), "nan_skips": self.nan_skips,
                  "empty_batches": self.empty_batches, **extra}
            for r, (rt, rm, rs) in enumerate(gathered):
                for k, v in rt.items():
                    tens["rng"][f"r{r}.{k}"] = torch.tensor(v, dtype=torch.uint8)
                st["rng"][str(r)] = rm
                st["ranks"][str(r)] = rs
            if self.disc is not None:
                d_t, d_m = flatten_optimizer_state(self.opt_d.state_dict())
                tens["disc"], tens["optimizer_d"], st["optimizer_d"] = dict(self.disc.state_dict()), d_t, d_m
            self.ckpt.save(step, tens, st)
            self.recipe.save_codec(self)
        barrier()

    def _bad(self, *values: torch.Tensor) -> bool:
        """Whether any value is NaN/Inf on any rank (every rank gets the same answer)."""
        flag = torch.stack([(~torch.isfinite(v.detach().float())).any() for v in values]).any()
        return bool(all_reduce(flag.float().reshape(1).cpu(), op="max").item())

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        recipe, tcfg, env, budget = self.recipe, self.tcfg, self.env, self.budget
        n_params = sum(p.numel() for p in self.model.parameters())
        self.bar = Progress(budget, start_step=self.start_step, desc=recipe.name, enabled=self.main and self._progress)
        self.log(f"{recipe.name}: preset {self.preset}, {n_params / 1e6:.2f}M parameters; {recipe.describe(self)}; "
                 f"batch {tcfg.batch_size} x {env.world_size} process(es) on {self.device}"
                 f"{', bf16' if self.amp else ', fp32'}" + (f"; resuming at step {self.start_step}" if self.resumed else ""))
        recipe.before_training(self)
        self.model.train()
        if self.disc is not None:
            self.disc.train()
        clip = tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf
        step = self.start_step
        sums: dict[str, float] = {}
        n_good, n_items, t_log = 0, 0.0, time.monotonic()
        bad_run = empty_run = 0
        last_eval = last_eval_res = None
        stop_error = None
        while not budget.should_stop(step):
            n = step + 1  # the step being taken
            lr_f = lr_factor(step, budget.fraction(step), budget.warmup(tcfg.warmup_steps), "wsd",
                             decay_fraction=tcfg.cooldown)
            for g in self.opt.param_groups:
                g["lr"] = tcfg.lr * lr_f
            if self.opt_d is not None:
                for g in self.opt_d.param_groups:
                    g["lr"] = tcfg.disc_lr * lr_f
            batch = recipe.next_batch(self, n)
            empty = bool(all_reduce(torch.tensor([float(batch is None)]), op="max").item())
            skipped = None
            if empty:
                self.empty_batches += 1
                empty_run += 1
                skipped = f"no readable sample in a batch, step skipped ({empty_run} in a row)"
                self.metrics.log(n, **recipe.record_tags, empty_batch=1, empty_batches=self.empty_batches)
                if empty_run >= tcfg.max_empty_batches:
                    stop_error = (f"{empty_run} batches in a row had no readable sample (step {n}); stopping. "
                                  + recipe.empty_hint(self)).rstrip()
            else:
                empty_run = 0
                loss, logs, carry = recipe.generator_loss(self, batch, n)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                bad = self._bad(loss, grad_norm)
                if not bad:
                    self.opt.step()
                    if carry is not None:
                        d_loss, d_logs = recipe.discriminator_loss(self, carry, n)
                        self.opt_d.zero_grad(set_to_none=True)
                        d_loss.backward()
                        bad = self._bad(d_loss)
                        if not bad:
                            self.opt_d.step()
                            logs.update(d_logs)
                        self.opt_d.zero_grad(set_to_none=True)
                self.opt.zero_grad(set_to_none=True)
                if bad:
                    self.nan_skips += 1
                    bad_run += 1
                    skipped = f"non-finite loss or gradient, step skipped ({bad_run} in a row)"
                    self.metrics.log(n, **recipe.record_tags, nan_skip=1, nan_skips=self.nan_skips,
                                     bad_loss=float(loss.detach()), bad_grad_norm=float(grad_norm))
                    if bad_run >= tcfg.max_nan_skips:
                        kept = self.ckpt.latest_step()
                        stop_error = (f"{bad_run} non-finite steps in a row at step {n}; stopping. "
                                      + (f"The last good checkpoint ({kept}) is kept" if kept is not None
                                         else "No checkpoint was written yet")
                                      + "; lower lr or check the data.")
                else:
                    bad_run = 0
                    logs["loss"], logs["grad_norm"] = loss.detach(), grad_norm
                    for k, v in logs.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    n_good += 1
                    n_items += recipe.items(batch) * env.world_size
            step = n
            budget.plan(step)
            if skipped:
                self.log(f"step {step}: {skipped}")
            if stop_error:
                break
            recipe.after_step(self, step)
            if n_good and (step % tcfg.log_every == 0 or step == 1):
                rate = n_items / max(1e-9, time.monotonic() - t_log)
                avg = {k: v / n_good for k, v in sums.items()}
                if self.main:
                    rec = {**recipe.record_tags, **recipe.train_record(avg, step)}
                    rec.update({"lr": tcfg.lr * lr_f, recipe.throughput_key: rate, "planned_steps": budget.planned_steps})
                    if self.nan_skips:
                        rec["nan_skips"] = self.nan_skips
                    if self.empty_batches:
                        rec["empty_batches"] = self.empty_batches
                    self.metrics.log(step, **rec)
                self.bar.update(step, **recipe.postfix(avg, rate))
                sums, n_good, n_items, t_log = {}, 0, 0.0, time.monotonic()
            else:
                self.bar.update(step)
            if tcfg.eval_every and step % tcfg.eval_every == 0:
                last_eval_res, last_eval = self.evaluate(step), step
                t_log = time.monotonic()  # throughput counts training time only
            if tcfg.ckpt_every and step % tcfg.ckpt_every == 0:
                self.save(step)
                t_log = time.monotonic()
        self.bar.close()
        if stop_error:
            self.metrics.close()
            raise CodecRunError(stop_error)

        recipe.finish(self, step)
        if last_eval != step:
            last_eval_res = self.evaluate(step)
        if step > 0 and self.ckpt.latest_step() != step:
            self.save(step)
        summary = {"step": step, "stopped_by": budget.reason, "planned_steps": budget.planned_steps,
                   "minutes": round(budget.elapsed / 60, 2), "preset": self.preset, "world_size": env.world_size,
                   "nan_skips": self.nan_skips, "empty_batches": self.empty_batches, "eval": last_eval_res}
        summary.update(recipe.summarize(self, summary))
        if self.main:
            atomic_write_json(self.out / "train_summary.json", summary)
        self.metrics.close()
        if self.main:
            recipe.report(self, summary)
        return summary


def train_codec(recipe: CodecRecipe, out, *, preset_name: str | None = None, overrides: list[str] | None = None,
                max_steps: int | None = None, max_minutes: float | None = None, resume: bool = False,
                device: str | None = None, progress: bool = True) -> dict:
    """Train (or resume) a codec into `out`; returns the summary also written to train_summary.json.
    Works under torchrun; a process group the caller made is left as it was found."""
    joined = torch.distributed.is_initialized()
    env = init_distributed(device)
    run = None
    lock = RunLock(out)  # one run at a time in `out`, held by rank 0 until the run ends
    try:
        check_out(recipe, Path(out))  # before the lock: its file must not land in an input's directory
        lock_run(lock, env, only_an_existing_dir=True)  # a run in progress is reported before anything else
        run = CodecRun(recipe, env, Path(out), preset_name=preset_name, overrides=overrides, max_steps=max_steps,
                       max_minutes=max_minutes, resume=resume, progress=progress, lock=lock)
        return run.train()
    finally:
        lock.release()
        if run is not None:
            # The DDP wrappers go while the process group lives: each one's reducer holds the group, and a
            # group whose last reference drops in the wrapper's deallocator joins gloo's threads while holding
            # the GIL that one of them may be waiting for (a deadlock at exit, seen in 1 of a few CI runs).
            run.g_model = run.d_model = None
            gc.collect()
        if not joined:
            destroy_distributed()


def add_codec_train_arguments(p, *, data_help: str, eval_help: str, preset_help: str, set_help: str) -> None:
    """The flags both `tessera tokenizer train image|audio` take."""
    p.add_argument("--data", required=True, metavar="DIR_OR_JSONL", help=data_help)
    p.add_argument("--out", required=True, help="output codec directory (also checkpoints, metrics, samples)")
    p.add_argument("--preset", default=None, help=preset_help + " (default: tiny; on --resume: the run's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--eval-data", default=None, metavar="DIR_OR_JSONL", help=eval_help)
    add_budget_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

