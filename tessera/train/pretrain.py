"""Pretrain the decoder on token shards.

    # one process (CPU or one GPU)
    python -m tessera.train.pretrain --preset demo --tokenizer tok/bundle --data shards/ --out run/
    # several processes: DDP by default, FSDP2 with --fsdp
    torchrun --nproc_per_node=8 -m tessera.train.pretrain --preset 1b --tokenizer tok/bundle --data shards/ \\
        --out run/ --set seq_len=4096 --set batch_size=4 --compile
    # continue an interrupted run from its latest checkpoint
    python -m tessera.train.pretrain ... --out run/ --resume
    # start from another run's weights, or a local Llama/Qwen2/Qwen3 directory (train/init_from.py)
    python -m tessera.train.pretrain --tokenizer tok/bundle --data shards/ --out run2/ --init-from run/
    # a weighted mixture of shard sets (train/mixture.py): each window from one set, drawn by weight
    python -m tessera.train.pretrain --tokenizer tok/bundle --out run/ \\
        --data caption=shards/caption:0.45 --data interleaved=shards/obelics:0.45 --data text=shards/text:0.10

`tessera train ...` takes the same arguments. Overrides: `--set key=value` for training keys and
`--set model.key=value` for model keys; an unknown key is an error.

Every step: the loss is summed over all target tokens of the global batch (all ranks, all micro-steps) and
divided by their global count, so the result does not depend on how the batch is split across processes.
Logged (metrics.jsonl, TensorBoard, progress bar): loss in total and per modality, z-loss, lr, grad norm,
tokens/s, MFU, the planned steps; with a mixture, each set's weight, epochs, tokens and loss
(`data/NAME/...`). A step whose loss or gradient is NaN/Inf is skipped and counted; `max_nan_skips` in a
row stop the run with the last good checkpoint kept.

One run at a time writes a run directory: rank 0 holds an exclusive lock on `OUT/.lock` while it runs, and
a second run into the same `--out` is refused. `--resume` restores every rank's loader state and refuses
`--data` other than the run's (another set, or a mixture with other sets or weights); a new run does not
replace an earlier run's metrics without `--force`. The launch mode is each invocation's own: a run trained
with `--fsdp` resumes in one process or under DDP, and the reverse (the checkpoints hold full, unsharded state).

The LR schedule's length is `steps` when set; otherwise the budget's plan (`RunBudget`): `--max-steps`, or
with `--max-minutes` the steps that fit in the time at the measured throughput (the smaller, with both), so
a time-bounded run ends with its lr decayed. Without either bound a run takes 1000 steps, or on `--resume`
continues the checkpoint's plan.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tessera.config import ConfigError, apply_overrides, from_dict, to_dict
from tessera.errors import TesseraError
from tessera.model.transformer import ModelConfig, Transformer, model_preset
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
    all_gather_object,
    all_reduce,
    barrier,
    destroy_distributed,
    init_distributed,
)
from tessera.runtime.host_memory import keep_freed_memory
from tessera.runtime.monitor import MetricsLogger, Progress
from tessera.runtime.schedule import (
    DEFAULT_STEPS,
    SCHEDULES,
    RunBudget,
    add_budget_arguments,
    check_budget,
    lr_factor,
)
from tessera.storage import atomic_write_json, check_output_dir, read_json, save_tensors
from tessera.tokenizers.bundle import read_bundle_spec
from tessera.tokenizers.layout import VocabLayout
from tessera.train import init_from, mixture
from tessera.train.ema import WeightEMA
from tessera.train.loader import IGNORE, LoaderConfig, PackedLoader, parse_mix
from tessera.train.losses import (LossMeter, add_token_losses, batch_losses, compiled_token_losses, evaluate,
                                  token_losses)
from tessera.train.mfu import peak_flops
from tessera.train.parallel import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    parallelize,
    unwrap,
)
from tessera.train.shards import read_manifest

RUN_FORMAT = "tessera-run"
RUN_VERSION = 1


@dataclass
class TrainConfig:
    seq_len: int = 512
    batch_size: int = 8  # windows per rank per micro-step
    grad_accum: int = 1
    steps: int = 0  # length of the LR schedule (and a step bound); 0: planned from --max-steps/--max-minutes
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    dtype: str = "auto"  # auto (bf16 where the device computes it natively, else fp32; see compute_dtype) | bf16 | fp32
    seed: int = 0
    cond_dropout: float = 0.1
    mix: str = ""  # "source=weight,..."; empty: sources in proportion to their documents
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    # model.safetensors holds the weights of the evaluation with the lowest held-out loss (needs --eval-data;
    # best.json says which step); the checkpoints keep the latest state, so --resume continues from there.
    keep_best: bool = False
    eval_batches: int = 50
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    max_nan_skips: int = 5
    ema_decay: float = 0.0  # > 0: evaluate, keep and export a moving average of the weights (train/ema.py)
    code_embedding_init: bool = True  # start code embeddings from the codecs' code vectors (see below)
    # With --init-from (train/init_from.py): text_rows keeps the imported text rows of the embedding and output
    # tables fixed; all_but_new_rows trains only the rows the source did not have (a warm-up stage).
    freeze: str = ""
    init_allow_vocab_mismatch: bool = False  # for experiments: import an HF model whose vocabulary is not the text range's
    fsdp: bool = False
    compile: str = "auto"  # auto | on | off: torch.compile each block and the loss (see decide_compile)
    activation_checkpointing: bool = False
    # > 0: the output head and the loss a chunk of this many tokens at a time, never the whole batch's logits
    # (model/chunked_ce.py): less memory where tokens x vocab is large, for one more head matmul; 0: off
    loss_chunk: int = 0
    # CPU: keep freed memory for reuse instead of unmapping large blocks every step (runtime/host_memory.py)
    keep_freed_memory: bool = True

    def validate(self) -> "TrainConfig":
        """Refuse values that would crash later or train nothing (e.g. grad_accum=0: no micro-steps)."""
        for key in ("seq_len", "batch_size", "grad_accum", "log_every", "keep_checkpoints", "max_nan_skips",
                    "eval_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("steps", "warmup_steps", "eval_every", "ckpt_every", "loss_chunk"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (0: off or planned), got {getattr(self, key)}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r} (fp16 would need loss "
                              f"scaling, which the trainer does not do)")
        if isinstance(self.compile, bool) or str(self.compile).lower() in ("true", "false"):  # older runs' config
            self.compile = "on" if str(self.compile).lower() == "true" else "off"
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if self.freeze not in init_from.FREEZE_MODES:
            raise ConfigError(f"freeze must be text_rows or all_but_new_rows (or empty: nothing frozen), got {self.freeze!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        for key in ("min_lr_ratio", "decay_fraction", "cond_dropout"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        return self


# A run shorter than this is not worth compiling: on a 2-core CPU, compiling the demo decoder's blocks and
# loss takes 10-25 s and then trains 1.2-1.5x faster (benchmarks/README.md), so it pays back after 1-2 min.
COMPILE_MIN_MINUTES = 2.0
COMPILE_MIN_STEPS = 500


def decide_compile(cfg: TrainConfig, device: torch.device, max_steps: int | None,
                   max_minutes: float | None) -> tuple[bool, str]:
    """Whether to compile, and why (the log says both). `auto` compiles a run long enough to pay the
    compilation back, on a GPU or on a CPU with a C++ compiler for inductor's CPU code."""
    if cfg.compile != "auto":
        return cfg.compile == "on", f"compile={cfg.compile}"
    if device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")):
        return False, "auto: no C++ compiler for inductor's CPU code (install g++, or set compile=off)"
    if device.type not in ("cpu", "cuda"):
        return False, f"auto: compile is not used on {device.type}"
    long_enough = (max_minutes is not None and max_minutes >= COMPILE_MIN_MINUTES) or (
        max_minutes is None and max_steps is not None and max_steps >= COMPILE_MIN_STEPS)
    if not long_enough:
        bound = f"{max_minutes:g} min" if max_minutes is not None else f"{max_steps} steps"
        return False, (f"auto: a run of {bound} is too short to pay back compiling (at least "
                       f"{COMPILE_MIN_MINUTES:g} min or {COMPILE_MIN_STEPS} steps)")
    return True, "auto: a long run on a device inductor compiles for"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls in hardware here (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """`auto`: bf16 autocast on a GPU that supports it, and on a CPU with native bf16 matmuls (the demo's
    decoder trains 1.17x faster that way on a 2-core AVX512-BF16 CPU, with the same loss after 40 steps to
    four digits); fp32 elsewhere."""
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)


# ---------------------------------------------------------------------------------------------- setup
class RunError(TesseraError):
    pass


def _parse_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Split `--set` items into model overrides (`model.KEY=V`) and training overrides (`KEY=V`)."""
    model, train = [], []
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in items or []:
        key = item.split("=", 1)[0].strip().replace("-", "_")
        if key in model_keys and key not in train_keys:
            raise ConfigError(f"--set {item}: {key!r} is a model setting; write --set model.{item}")
        (model if item.startswith("model.") else train).append(item[len("model."):] if item.startswith("model.") else item)
    return model, train


def _is_preset(mcfg: ModelConfig, name: str) -> bool:
    """Whether a run's model has the dimensions of preset `name` (its vocabulary is the bundle's)."""
    ref = model_preset(name)  # an unknown name: its own error, listing the presets
    ref.vocab_size = mcfg.vocab_size
    return all(getattr(ref, k) == getattr(mcfg, k) for k in ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim"))


def check_out(args) -> None:
    """--out is no input's directory (nor inside or around one), and holds a training run or nothing."""
    inputs = [*(s.dir for s in mixture.parse_data(args.data)), args.eval_data, args.tokenizer,
              getattr(args, "init_from", None)]
    check_output_dir(args.out, inputs, noun="a training run", markers=("config.json", "checkpoints", "metrics.jsonl"),
                     error=RunError)


def prepare_run(args, env) -> tuple[ModelConfig, TrainConfig, dict, bool, dict | None]:
    """Resolve configs, check the bundle against the data and any existing run; returns (model cfg, train
    cfg, bundle spec, resuming, the --init-from record or None). Reads only: nothing is written or deleted
    here."""
    out = Path(args.out)
    check_budget(args.max_steps, args.max_minutes)
    if getattr(args, "init_from", None) and args.resume:
        raise RunError("--init-from and --resume are mutually exclusive: --resume continues a run from its checkpoint "
                       "(which holds the imported weights); --init-from starts a new one")
    spec = read_bundle_spec(args.tokenizer)
    layout = VocabLayout.from_dict(spec["layout"])
    data_sets = mixture.parse_data(args.data)  # one shard set, or a weighted mixture (train/mixture.py)
    manifests = mixture.read_sets(data_sets, spec, args.tokenizer)
    if args.eval_data:
        em = read_manifest(args.eval_data)
        if em["tokenizer_hash"] != spec["hash"]:
            raise RunError(f"{args.eval_data} was tokenized with another bundle than {args.tokenizer}")
    model_over, train_over = _parse_overrides(args.set)
    has_ckpt = CheckpointManager(out).latest_step() is not None
    resuming, init, resumed_freeze = False, None, None
    if (out / "config.json").exists():
        run = read_json(out / "config.json")
        if run.get("tokenizer_hash") != spec["hash"]:
            raise RunError(f"{out} was trained with bundle {str(run.get('tokenizer_hash'))[:12]}; this bundle is "
                           f"{spec['hash'][:12]}: the embedding rows would not mean the same ids")
        if has_ckpt and not args.resume:
            raise RunError(f"{out} already holds a run with checkpoints; pass --resume to continue it, or use a new --out")
        if has_ckpt:
            resuming = True
            mixture.check_resume(run, data_sets, manifests, out)
            mcfg = from_dict(ModelConfig, run["model"])
            tcfg = apply_overrides(from_dict(TrainConfig, run["train"]), train_over)
            init, resumed_freeze = run.get("init_from"), run["train"].get("freeze", "")
            if model_over:
                raise RunError("model overrides cannot change a run being resumed")
            if args.preset and not _is_preset(mcfg, args.preset):
                raise RunError(f"{out} holds a run whose model is not the {args.preset!r} preset; --resume continues "
                               f"the run's own model: drop --preset, or use a new --out")
    if not resuming and (out / "metrics.jsonl").exists() and not (getattr(args, "force", False) or args.resume):
        raise RunError(f"{out} holds the metrics.jsonl of an earlier run that left no checkpoint; pass --force to "
                       f"start over (it is replaced), or use a new --out")
    if not resuming:
        tcfg = apply_overrides(TrainConfig(), train_over)
        if getattr(args, "init_from", None):
            mcfg, init = init_from.plan(args.init_from, spec, tcfg, args.preset, model_over)
        else:
            try:  # a model setting that does not fit (heads, backend, dropout) is the user's to fix: one line
                mcfg = apply_overrides(model_preset(args.preset or "demo"), model_over)
                mcfg.vocab_size = layout.padded_vocab_size
                mcfg = from_dict(ModelConfig, to_dict(mcfg))  # re-validate after overrides
            except ValueError as e:
                raise ConfigError(str(e)) from None
    tcfg.validate()
    if resuming and not any(item.split("=", 1)[0].strip() == "fsdp" for item in train_over):
        # How a run was launched does not carry over: its checkpoints hold full state dicts, which load in one
        # process, under DDP or under FSDP2 alike.
        tcfg.fsdp = False
    if args.fsdp:
        tcfg.fsdp = True
    if tcfg.fsdp and not env.is_distributed:
        raise ConfigError("FSDP2 shards over several processes: launch with torchrun --nproc_per_node=N, or leave "
                          "out --fsdp")
    init_from.check(tcfg, init, layout, resumed_freeze)
    if args.compile:
        tcfg.compile = args.compile
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"seq_len {tcfg.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    if mcfg.vocab_size != layout.padded_vocab_size:
        raise RunError(f"the model has {mcfg.vocab_size} embedding rows but the bundle's vocabulary needs "
                       f"{layout.padded_vocab_size}")
    parse_mix(tcfg.mix)  # fail early on a bad --mix
    mixture.check_options(data_sets, tcfg.mix)
    if tcfg.keep_best and not args.eval_data:
        raise ConfigError("keep_best keeps the weights with the lowest held-out loss: it needs --eval-data")
    return mcfg, tcfg, spec, resuming, init


def write_run_files(out: Path, mcfg: ModelConfig, tcfg: TrainConfig, spec: dict, args, init: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer" / "tokenizer.json").exists():
        tmp = out / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(args.tokenizer, tmp)
        os.replace(tmp, out / "tokenizer")
    atomic_write_json(out / "config.json", {
        "format": RUN_FORMAT, "version": RUN_VERSION, "model": to_dict(mcfg), "train": to_dict(tcfg),
        "tokenizer_hash": spec["hash"], "layout": spec["layout"],
        **mixture.run_config(*_data_sets(args.data)),
        "eval_data": str(Path(args.eval_data).resolve()) if args.eval_data else None,
        **({"init_from": init} if init else {}),
    })


def _data_sets(data) -> tuple[list, list[dict]]:
    sets = mixture.parse_data(data)
    return sets, [read_manifest(s.dir) for s in sets]


def restore_loader(loader: PackedLoader, state: dict, env, tcfg: TrainConfig) -> None:
    """Each rank's loader state from a checkpoint: its own when the number of processes is the one saved;
    with another number, every rank continues the global stream at the first window no rank had taken
    (`PackedLoader.load_rank_states`), and the global batch changes with the number of processes."""
    if "loaders" not in state:  # an older checkpoint holds rank 0's state only
        loader.load_state_dict(state["loader"], any_world=True)
        saved_world = int(state["loader"].get("world_size", 1))
        if saved_world > 1 and env.is_main:
            print(f"[tessera] warning: this checkpoint holds only rank 0's loader state (of {saved_world} "
                  f"processes): up to {saved_world - 1} windows are seen twice")
        return
    states = state["loaders"]
    if loader.load_rank_states(states) and env.is_main:
        print(f"[tessera] the checkpoint was saved by {len(states)} process(es), this run has {env.world_size}: "
              f"the data continues at window {loader.window} of the global stream, none repeated or skipped; the "
              f"global batch is {tcfg.batch_size * tcfg.grad_accum * env.world_size} windows")


# ----------------------------------------------------------------------------------------------- train
def train(args) -> dict:
    env = init_distributed(args.device)
    if env.device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    try:
        return _train(args, env)
    finally:
        destroy_distributed()


def _train(args, env) -> dict:
    """Lock --out (rank 0 holds `OUT/.lock` for the life of the run), check the arguments, then train. A run
    in progress is reported before anything else; bad input fails before --out is created."""
    lock = RunLock(args.out)
    try:
        check_out(args)  # before the lock (its file must not land in an input's directory), on every rank at once
        lock_run(lock, env, only_an_existing_dir=True)
        prepare_run(args, env)
        lock_run(lock, env, only_an_existing_dir=False)
        return _train_locked(args, env)
    finally:
        lock.release()


def _train_locked(args, env) -> dict:
    out = Path(args.out)
    # Again under the lock: another run may have written --out since the first check.
    mcfg, tcfg, spec, resuming, init = prepare_run(args, env)
    layout = VocabLayout.from_dict(spec["layout"])
    if env.is_main:
        removed = CheckpointManager(out).clean()
        if removed:
            print(f"[tessera] removed what an interrupted save or prune left in {out / 'checkpoints'}: "
                  f"{', '.join(removed)}")
        if not resuming:
            (out / "best.json").unlink(missing_ok=True)  # from an earlier run that left no checkpoint
            if args.resume:
                print(f"[tessera] {out} holds no checkpoint yet: starting from step 0")
        write_run_files(out, mcfg, tcfg, spec, args, init)
    barrier()
    dtype = compute_dtype(tcfg, env.device)
    bound_steps = args.max_steps or tcfg.steps or (None if args.max_minutes else DEFAULT_STEPS)
    compiled, why = decide_compile(tcfg, env.device, bound_steps, args.max_minutes)
    if env.is_main:
        print(f"[tessera] compile: {'on' if compiled else 'off'} ({why})")
    if tcfg.keep_freed_memory and env.device.type == "cpu":
        kept, why = keep_freed_memory()
        if env.is_main:
            print(f"[tessera] host memory: {'freed memory kept for reuse' if kept else 'unchanged'} ({why})")
    losses_fn = compiled_token_losses if compiled else token_losses
    torch.manual_seed(tcfg.seed)

    def initial_model() -> Transformer:
        """The seeded starting weights, the same for every launch mode (one process, DDP, FSDP2)."""
        m = Transformer(mcfg)
        m.init_weights(seed=tcfg.seed)
        if init and not resuming:  # weights of another run or an HF model; its new rows as below, rescaled
            init_from.initialize(m, init, args.tokenizer, tcfg, log=print if env.is_main else None)
        elif tcfg.code_embedding_init and not resuming:
            inited = init_from.init_code_embeddings(m, args.tokenizer, tcfg.seed)
            if inited and env.is_main:
                print(f"[tessera] code embeddings initialized from codec code vectors: {', '.join(inited)}")
        return m

    if tcfg.fsdp:
        # Rank 0 builds the full model on CPU; every rank builds an empty one on the meta device, shards it,
        # allocates only its shards, and receives them from rank 0 (so memory per rank stays one shard, and
        # the start is exactly the one a DDP run gets).
        full = initial_model().state_dict() if env.is_main else {}
        with torch.device("meta"):
            model = Transformer(mcfg)
        model = parallelize(model, env, fsdp=True, compile=compiled,
                            activation_checkpointing=tcfg.activation_checkpointing,
                            param_dtype=dtype if dtype != torch.float32 else None)
        model.to_empty(device=env.device)
        model.init_rope()  # not in the state dict below
        load_full_model_state(model, full, broadcast_from_rank0=True)
        del full
        autocast_dtype = torch.float32  # FSDP's mixed-precision policy casts instead of autocast
    else:
        model = initial_model()
        init_from.freeze_parameters(model, tcfg)
        model = parallelize(model.to(env.device), env, compile=compiled,
                            activation_checkpointing=tcfg.activation_checkpointing)
        autocast_dtype = dtype
    core = unwrap(model)
    optimizer = build_optimizer(model, tcfg, env.device)
    loader = mixture.make_loader(mixture.parse_data(args.data),
                                 LoaderConfig(seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed,
                                              mix=parse_mix(tcfg.mix) or None, cond_dropout=tcfg.cond_dropout),
                                 layout, rank=env.rank, world_size=env.world_size)
    mix_meter = mixture.MixtureMeter(loader, tcfg.seq_len) if isinstance(loader, mixture.MixtureLoader) else None
    if mix_meter and env.is_main:
        print(f"[tessera] data: a mixture of {loader.describe()}")
    ckpt = CheckpointManager(out, keep=tcfg.keep_checkpoints)
    step, nan_skips, tokens_seen = 0, 0, 0
    schedule = None
    saved_ema = None
    if resuming:
        tensors, state = ckpt.load(device="cpu")
        load_full_model_state(model, tensors["model"])
        load_full_optimizer_state(model, optimizer,
                                  unflatten_optimizer_state(tensors["optimizer"], state["optimizer"]))
        restore_loader(loader, state, env, tcfg)
        restore_rng(tensors["rng"], state["rng"])
        saved_ema = (tensors["ema"], state["ema"]) if "ema" in tensors else None
        step, nan_skips, tokens_seen = state["step"], state["nan_skips"], state["tokens_seen"]
        schedule = state.get("schedule")
        if env.is_main:
            print(f"[tessera] resumed {out} at step {step}")
    init_from.freeze_rows(core, optimizer, init, layout, tcfg)

    # The average starts from the weights above (a resumed run without one starts it at the resumed weights).
    ema = WeightEMA(model, tcfg.ema_decay) if tcfg.ema_decay else None
    averaged = ema.swapped if ema else contextlib.nullcontext  # the weights that are evaluated and exported
    if ema and resuming and saved_ema:
        with ema.swapped(capture=True):
            load_full_model_state(model, saved_ema[0])
        ema.load_state_dict(saved_ema[1])

    # The run stops at --max-steps, else at the end of a fixed schedule (`steps`), else at --max-minutes alone;
    # with no bound at all, at the resumed run's plan or DEFAULT_STEPS.
    max_steps = args.max_steps
    if max_steps is None and tcfg.steps:
        max_steps = tcfg.steps
    elif max_steps is None and args.max_minutes is None:
        max_steps = (schedule or {}).get("planned_steps") or DEFAULT_STEPS
    budget = RunBudget(max_steps, args.max_minutes, start_step=step)
    if schedule:
        budget.load_state_dict(schedule, step)

    def set_lr() -> None:
        """The lr of the next step: a fixed `steps` schedule, or one sized to the budget's plan."""
        if tcfg.steps:
            frac, warmup = step / tcfg.steps, tcfg.warmup_steps
        else:
            frac, warmup = budget.fraction(step), budget.warmup(tcfg.warmup_steps)
        lr = tcfg.lr * lr_factor(step, frac, warmup, tcfg.schedule, min_ratio=tcfg.min_lr_ratio,
                                 decay_fraction=tcfg.decay_fraction)
        for g in optimizer.param_groups:
            g["lr"] = lr

    set_lr()
    metrics = MetricsLogger(out, enabled=env.is_main, resume_step=step if resuming else None)
    progress = Progress(budget, start_step=step, desc="pretrain", unit="step",
                        enabled=env.is_main and not getattr(args, "no_progress", False))
    modality = torch.as_tensor(layout.modality_table(), device=env.device)
    flops_per_token = core.flops_per_token(tcfg.seq_len)
    peak, peak_src = peak_flops(env.device, dtype)
    if env.is_main:
        print(f"[tessera] {core.num_params(False) / 1e6:.2f}M parameters ({core.num_params() / 1e6:.2f}M without "
              f"embeddings), {env.world_size} process(es) on {env.device}, {dtype}, "
              f"global batch {tcfg.batch_size * tcfg.grad_accum * env.world_size} x {tcfg.seq_len} tokens")

    def save_checkpoint():
        # Every rank takes part in gathering the full state; only rank 0 receives it and writes. Each rank's
        # loader is at its own place in the global stream, so every rank's state is saved.
        model_sd = full_model_state(model)
        opt_sd = full_optimizer_state(model, optimizer)
        ema_sd = None
        if ema:
            with ema.swapped():  # a copy: on CPU the full state can share the parameters' storage
                ema_sd = {k: v.clone() for k, v in full_model_state(model).items()}
        loader_states = all_gather_object(loader.state_dict())
        if env.is_main:
            opt_t, opt_meta = flatten_optimizer_state(opt_sd)
            rng_t, rng_meta = capture_rng()
            ckpt.save(step, {"model": model_sd, "optimizer": opt_t, "rng": rng_t, **({"ema": ema_sd} if ema else {})}, {
                "optimizer": opt_meta, "rng": rng_meta, "world_size": env.world_size, "loaders": loader_states,
                "nan_skips": nan_skips, "tokens_seen": tokens_seen, "train": to_dict(tcfg),
                "schedule": budget.state_dict(), **({"ema": ema.state_dict()} if ema else {}),
            })
            if not tcfg.keep_best:
                save_tensors(out / "model.safetensors", ema_sd if ema else model_sd, metadata={"format": "pt"})
        barrier()

    def note_eval(result: dict) -> None:
        """Log an evaluation; with keep_best, write model.safetensors when it is the best so far."""
        metrics.log(step, **result)
        if not tcfg.keep_best or not result.get("eval_loss", math.inf) < best["eval_loss"]:
            return
        best.update(step=step, eval_loss=result["eval_loss"])
        with averaged():
            model_sd = {k: v.clone() for k, v in full_model_state(model).items()} if ema else full_model_state(model)
        if env.is_main:
            save_tensors(out / "model.safetensors", model_sd, metadata={"format": "pt"})
            atomic_write_json(out / "best.json", {"step": step, **result})
        barrier()

    window = {"losses": LossMeter(), "tokens": 0, "t0": time.perf_counter(), "steps": 0}
    consecutive_nan = 0
    last_eval: dict = {}
    best = {"step": None, "eval_loss": math.inf}
    if resuming and (out / "best.json").exists():
        b = read_json(out / "best.json")
        best.update(step=b["step"], eval_loss=b["eval_loss"])
    stop_error = None
    start_step = step
    model.train()
    while not budget.should_stop(step):
        batches = [loader.next_batch() for _ in range(tcfg.grad_accum)]
        batches = [{k: v.to(env.device, non_blocking=True) for k, v in b.items()} for b in batches]
        n_tokens = torch.tensor([sum(int((b["targets"] != IGNORE).sum()) for b in batches)], device=env.device)
        global_count = max(1, int(all_reduce(n_tokens.clone()).item()))
        step_losses = LossMeter()
        mix_sums = torch.zeros(mix_meter.width, dtype=torch.float64, device=env.device) if mix_meter else None
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext()
            if not last and env.is_distributed:
                if tcfg.fsdp:
                    model.set_requires_gradient_sync(False)
                else:
                    sync = model.no_sync()
            elif last and tcfg.fsdp:
                model.set_requires_gradient_sync(True)
            with sync:
                r = batch_losses(model, b, modality, autocast_dtype, tcfg.z_loss, tcfg.loss_chunk, losses_fn)
                loss = r["ce"] + tcfg.z_loss * r.get("z", 0.0)
                # DDP/FSDP average gradients over ranks; scale so the result is sum / global count.
                (loss * env.world_size / global_count).backward()
            add_token_losses(step_losses, r)
            if mix_meter:
                mix_sums += mix_meter.sums(r, b)
        step_loss = step_losses.all_reduce().mean("loss", empty=0.0)
        if mix_meter:  # per-set sums: a second collective, for mixtures only
            all_reduce(mix_sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        step += 1
        if compiled and step == start_step + 1:  # compilation happens in the first step
            compile_seconds = time.perf_counter() - window["t0"]
            metrics.log(step, compile_seconds=compile_seconds)
            progress.write(f"[tessera] first step, compiling included: {compile_seconds:.1f}s")
        budget.plan(step)
        tokens_seen += sum(b["input_ids"].numel() for b in batches) * env.world_size
        if mix_meter:
            mix_meter.update(mix_sums, finite=math.isfinite(step_loss) and math.isfinite(grad_norm))
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            nan_skips += 1
            consecutive_nan += 1
            metrics.log(step, nan_skip=1, loss=step_loss, grad_norm=grad_norm, nan_skips=nan_skips)
            progress.write(f"[tessera] step {step}: non-finite loss or gradient, step skipped ({consecutive_nan} in a row)")
            if consecutive_nan >= tcfg.max_nan_skips:
                stop_error = (f"{consecutive_nan} non-finite steps in a row at step {step}; stopping. The last good "
                              f"checkpoint ({ckpt.latest_step()}) is kept; lower lr or check the data.")
                break
            set_lr()
            continue
        consecutive_nan = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            ema.update()
        set_lr()

        window["losses"].merge(step_losses)
        window["tokens"] += sum(b["input_ids"].numel() for b in batches) * env.world_size
        window["steps"] += 1
        if step % tcfg.log_every == 0 or budget.should_stop(step):
            dt = time.perf_counter() - window["t0"]
            tps = window["tokens"] / dt
            # loss, z_loss and loss_<modality> (those the window saw), as token means
            rec = {"loss": 0.0, **window["losses"].means(), "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": grad_norm, "tokens_per_sec": tps, "tokens_seen": tokens_seen,
                   "mfu": flops_per_token * tps / (peak * env.world_size) if peak else None,
                   "planned_steps": budget.planned_steps}
            if nan_skips:
                rec["nan_skips"] = nan_skips
            if mix_meter:
                rec.update(mix_meter.record())
            metrics.log(step, **rec)
            progress.update(step, loss=rec["loss"], lr=rec["lr"], tok_s=f"{tps:.0f}",
                            **({"mfu": f"{100 * rec['mfu']:.1f}%"} if rec["mfu"] else {}))
            window.update(losses=LossMeter(), tokens=0, steps=0, t0=time.perf_counter())
        else:
            progress.update(step)
        if args.eval_data and tcfg.eval_every and step % tcfg.eval_every == 0:
            with averaged():
                last_eval = evaluate(model, args.eval_data, layout, tcfg.seq_len, tcfg.batch_size, tcfg.eval_batches,
                                     env, autocast_dtype, tcfg.loss_chunk)
            note_eval(last_eval)
            progress.write(f"[tessera] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
            window["t0"] = time.perf_counter()
        if tcfg.ckpt_every and step % tcfg.ckpt_every == 0:
            save_checkpoint()
            window["t0"] = time.perf_counter()  # throughput counts training time only
    progress.close()
    if stop_error:
        metrics.close()
        raise RunError(stop_error)
    if ckpt.latest_step() != step:
        save_checkpoint()
    if args.eval_data:
        with averaged():
            last_eval = evaluate(model, args.eval_data, layout, tcfg.seq_len, tcfg.batch_size, tcfg.eval_batches, env,
                                 autocast_dtype, tcfg.loss_chunk)
        note_eval(last_eval)
    metrics.close()
    if tcfg.keep_best and env.is_main and best["step"] is not None:
        print(f"[tessera] model.safetensors holds step {best['step']}, the lowest held-out loss "
              f"({best['eval_loss']:.4g}); the checkpoints hold step {step}")
    summary = {"step": step, "stopped_by": budget.reason, "planned_steps": budget.planned_steps,
               **({"best_step": best["step"]} if tcfg.keep_best else {}),
               "seconds": round(budget.elapsed, 1), "tokens_seen": tokens_seen, "nan_skips": nan_skips, **last_eval}
    if env.is_main:
        atomic_write_json(out / "train_summary.json", summary)
        print(f"[tessera] stopped at step {step} after {budget.elapsed:.0f}s: {budget.stop_message()}"
              + "".join(f", {k} {v:.4g}" for k, v in last_eval.items()))
    return summary


# ------------------------------------------------------------------------------------------------ CLI
def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset: tiny, demo (the default), small, 1b, 7b")
    p.add_argument("--tokenizer", required=True, metavar="BUNDLE")
    p.add_argument("--data", required=True, action="append", metavar="SHARDS | NAME=SHARDS:WEIGHT",
                   help="the shard set of `tessera data pretokenize`; or, repeated with names and weights, a mixture: "
                        "--data caption=DIR1:0.45 --data text=DIR2:0.55 draws each window from a set with probability "
                        "weight / sum of weights (seeded; every set must share --tokenizer's bundle; a set that runs "
                        "out starts a new epoch; metrics.jsonl logs data/NAME/{weight,epochs,tokens,loss}; "
                        "docs/data.md)")
    p.add_argument("--eval-data", metavar="SHARDS", help="held-out shards for periodic per-modality loss")
    p.add_argument("--out", required=True, metavar="RUN")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from the weights of a tessera run, or of a local Hugging Face Llama, Qwen2 or Qwen3 "
                        "directory (safetensors), with a new optimizer, schedule and loader")
    p.add_argument("--force", action="store_true",
                   help="start over in an --out whose earlier run left no checkpoint (its metrics.jsonl is replaced)")
    add_budget_arguments(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training key (lr=1e-3) or a model key (model.dim=512)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (metrics.jsonl and the [tessera] lines stay)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (torchrun)")
    p.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"], default=None,
                   help="torch.compile each block and the loss (default auto: on for runs long enough to pay "
                        "it back, where a compiler is available; the log says which and why)")


def run_pretrain(args) -> int:
    train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tessera.train.pretrain", description=__doc__.split("\n\n")[0])
    add_pretrain_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_pretrain(args)
    except (TesseraError, FileNotFoundError) as e:
        if os.environ.get("TESSERA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
