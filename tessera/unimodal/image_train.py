"""`tessera tokenizer train image`: train the image codec, in one process or under torchrun.

    tessera tokenizer train image --data /tmp/digits/images --out runs/img --preset tiny --max-minutes 2
    torchrun --nproc_per_node=8 -m tessera tokenizer train image --data imgs/ --out runs/img --preset base
    tessera tokenizer train image --data imgs/ --out runs/img --resume --max-steps 200000

- Losses (no downloaded weights): L1 or L2, plus 1 - SSIM, plus a hinge PatchGAN whose generator term is
  scaled by the adaptive weight (taming-transformers) and starts at `disc_start`, plus discriminator
  feature matching. Every weight is in `ImageTrainConfig`; a weight of 0 switches its term off.
- The learning rate warms up linearly, stays flat, and cools down linearly to zero over the last
  `cooldown` fraction of the planned steps (warmup-stable-decay): `--max-steps`, or with `--max-minutes`
  the steps that fit at the measured throughput (re-planned if it drifts), so a `--max-minutes` run ends
  cooled down too; the warmup then takes at most a tenth of the plan.
- bf16 autocast on GPUs that support it (`amp=auto`); CPU runs in fp32. The quantizer is always fp32.
- DDP: the autoencoder and the discriminator are wrapped separately with `broadcast_buffers=False`; the
  VQ codebook's EMA statistics and dead-code replacement are all-reduced by the quantizer itself
  (`sync_codebook`), so the codebooks stay identical on every rank without a broadcast; FSQ has no state.
- Every `eval_every` steps and at the end, rank 0 scores the held-out split (PSNR, SSIM, codebook usage,
  code perplexity) into metrics.jsonl and writes samples/step_N.png (originals above reconstructions).
- Checkpoints are atomic (`CheckpointManager`); each one also refreshes the codec directory (codec.json +
  model.safetensors), so the output directory is always a usable codec. `--resume` continues from the
  latest checkpoint: same step, same data order, same optimizer and RNG state.
- Bad files (corrupt, truncated, too small for one token, over the pixel cap) are skipped, counted once
  per file, and reported at the end and in train_summary.json.

Output: OUT/codec.json, OUT/model.safetensors, OUT/checkpoints/, OUT/metrics.jsonl, OUT/samples/,
OUT/train_summary.json.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import ConfigError, apply_overrides, from_dict, preset, to_dict
from tessera.config import split_overrides as _split_overrides
from tessera.storage import atomic_write_json
from tessera.train.checkpoint import (
    CheckpointManager,
    capture_rng,
    flatten_optimizer_state,
    restore_rng,
    unflatten_optimizer_state,
)
from tessera.train.distributed import (
    all_gather_object,
    all_reduce,
    barrier,
    destroy_distributed,
    init_distributed,
    seed_everything,
)
from tessera.train.monitor import MetricsLogger, Progress, RunBudget, add_budget_arguments, wsd_factor
from tessera.unimodal.image import ImageCodec, ImageCodecConfig, image_preset
from tessera.unimodal.image_data import (
    InfiniteBatchSampler,
    TrainImages,
    collate,
    find_splits,
    load_eval_images,
    seed_worker,
)
from tessera.unimodal.image_eval import evaluate_codec, save_grid
from tessera.unimodal.losses import adaptive_weight, feature_matching_loss, hinge_d_loss, hinge_g_loss, ssim
from tessera.unimodal.media import DEFAULT_MAX_PIXELS, SkipLog


@dataclass
class ImageTrainConfig:
    batch_size: int = 32  # per process
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup_steps: int = 500
    cooldown: float = 0.1  # last fraction of the run over which the lr decays linearly to 0; 0: none
    grad_clip: float = 1.0  # 0: off
    # losses
    rec_loss: str = "l1"  # "l1" or "l2"
    rec_weight: float = 1.0
    ssim_weight: float = 0.2
    disc_weight: float = 0.5  # times the adaptive weight; 0 switches the GAN off
    disc_start: int = 20000  # generator and discriminator GAN steps begin here
    feat_weight: float = 0.1  # discriminator feature matching; needs the GAN
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: float = 1e-4
    # data
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random resized crop, area fraction
    flip: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused before decoding
    cache_mb: float = 1024.0  # decoded images kept in memory, per data worker
    # run
    amp: str = "auto"  # "auto" (bf16 where the GPU supports it), "bf16" or "off"
    log_every: int = 20
    eval_every: int = 1000
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    eval_images: int = 256  # held-out images scored at each evaluation
    eval_fraction: float = 0.02  # of the files, when there is no separate held-out set
    sample_images: int = 8  # originals/reconstructions in each samples/step_N.png
    seed: int = 0

    def validate(self) -> "ImageTrainConfig":
        if self.rec_loss not in ("l1", "l2"):
            raise ConfigError(f"rec_loss must be 'l1' or 'l2', got {self.rec_loss!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.batch_size < 1 or not 0 <= self.cooldown <= 1:
            raise ConfigError("batch_size must be >= 1 and cooldown in [0, 1]")
        return self


TRAIN_PRESETS: dict[str, ImageTrainConfig] = {
    # CPU minutes on the digits: no GAN (it would double the step time and costs PSNR), small batches at a
    # high lr, no augmentation (on digits, crops cost 1.4 dB at 300 steps), frequent evals.
    "tiny": ImageTrainConfig(batch_size=16, lr=2e-3, warmup_steps=50, cooldown=0.3, ssim_weight=0.5,
                             disc_weight=0.0, crop_scale=[1.0, 1.0], flip=False, log_every=10, eval_every=250,
                             ckpt_every=500, eval_images=300),
    "base": ImageTrainConfig(),
    "large": ImageTrainConfig(lr=1e-4, disc_start=40000),
}


# ----------------------------------------------------------------------------------------- discriminator
class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, taming's NLayerDiscriminator): one real/fake logit per ~70 px patch.

    GroupNorm instead of BatchNorm: batch statistics would differ across DDP ranks and between the real and
    generated halves of a batch. forward -> (logits (B, 1, h, w), hidden features for feature matching).
    """

    def __init__(self, channels: int = 64, n_layers: int = 3):
        super().__init__()

        def block(cin, cout, stride, norm=True):
            layers = [nn.Conv2d(cin, cout, 4, stride, 1, bias=not norm)]
            if norm:
                layers.append(nn.GroupNorm(math.gcd(32, cout), cout))
            layers.append(nn.LeakyReLU(0.2))
            return nn.Sequential(*layers)

        blocks = [block(3, channels, 2, norm=False)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            blocks.append(block(channels * prev, channels * mult, 2))
        prev, mult = mult, min(2**n_layers, 8)
        blocks.append(block(channels * prev, channels * mult, 1))
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(channels * mult, 1, 4, 1, 1)

    def forward(self, x):
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        return self.out(x), feats


# ---------------------------------------------------------------------------------------------- configs
def split_overrides(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """Route `key=value` overrides to the codec config or the training config; unknown keys are errors."""
    return _split_overrides(overrides, ImageCodecConfig, ImageTrainConfig, "image codec has no key {key}")


def resolve_configs(preset_name: str, overrides: list[str] | None) -> tuple[ImageCodecConfig, ImageTrainConfig]:
    """A named preset plus `key=value` overrides."""
    m_ov, t_ov = split_overrides(overrides)
    mcfg, tcfg = image_preset(preset_name), preset(TRAIN_PRESETS, preset_name, "image training")
    return apply_overrides(mcfg, m_ov).validate(), apply_overrides(tcfg, t_ov).validate()


def state_checksum(module: nn.Module) -> str:
    """sha256 over a module's state (parameters and buffers, sorted by name)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- training
def train_image_codec(data, out, *, preset_name: str | None = None, overrides: list[str] | None = None,
                      eval_data=None, max_steps: int | None = None, max_minutes: float | None = None,
                      resume: bool = False, device: str | None = None, workers: int = 0,
                      progress: bool = True) -> dict:
    """Train (or resume) an image codec into `out`; returns the summary also written to train_summary.json."""
    joined = torch.distributed.is_initialized()  # a caller's process group is left as it was found
    env = init_distributed(device)
    try:
        return _train(env, data, Path(out), preset_name, overrides, eval_data, max_steps, max_minutes, resume,
                      workers, progress)
    finally:
        if not joined:
            destroy_distributed()


def _train(env, data, out: Path, preset_name, overrides, eval_data, max_steps, max_minutes, resume, workers,
           progress) -> dict:
    dev, main = env.device, env.is_main
    ckpt = CheckpointManager(out, keep=2)
    latest = ckpt.latest_step()
    state: dict = {}
    tensors: dict = {}
    if latest is not None and not resume:
        raise FileExistsError(f"{out} already holds a training run (step {latest}); pass --resume to continue it "
                              "or choose another --out")
    if latest is None and (out / "codec.json").exists() and not resume:
        raise FileExistsError(f"{out} already holds a codec; choose another --out")
    if resume and latest is not None:
        tensors, state = ckpt.load(device="cpu")
        mcfg = from_dict(ImageCodecConfig, state["model_config"])
        tcfg = from_dict(ImageTrainConfig, state["train_config"])
        if preset_name is not None and preset_name != state.get("preset"):
            raise ConfigError(f"{out} was trained with preset {state.get('preset')!r}, not {preset_name!r}")
        m_ov, t_ov = split_overrides(overrides)
        if apply_overrides(mcfg, m_ov) != mcfg:
            raise ConfigError(f"the codec's architecture cannot change on resume ({', '.join(m_ov)})")
        tcfg = apply_overrides(tcfg, t_ov).validate()  # training keys (lr, eval_every, ...) may change
        preset_name = state.get("preset", "tiny")
    else:
        preset_name = preset_name or "tiny"
        mcfg, tcfg = resolve_configs(preset_name, overrides)
    ckpt.keep = tcfg.keep_checkpoints
    start_step = int(state.get("step", 0))
    f = mcfg.downsample

    # ---- data
    skips = SkipLog()
    train_files, eval_files, split_how = find_splits(data, eval_data, tcfg.eval_fraction, tcfg.eval_images, skips)
    eval_skips = SkipLog()
    eval_x = None
    if main:
        eval_x, _ = load_eval_images(eval_files, mcfg.image_size, f, tcfg.max_pixels, eval_skips)
    dataset = TrainImages(train_files, mcfg.image_size, f, crop_scale=tuple(tcfg.crop_scale), flip=tcfg.flip,
                          max_pixels=tcfg.max_pixels, cache_mb=tcfg.cache_mb, seed=tcfg.seed + 7919 * env.rank)
    if "dataset_rng" in state and workers == 0 and main:
        r = state["dataset_rng"]
        dataset.rng.setstate((r[0], tuple(r[1]), r[2]))
    batches_seen = int(state.get("batches_seen", 0))
    sampler = InfiniteBatchSampler(len(dataset), tcfg.batch_size, tcfg.seed, env.rank, env.world_size,
                                   start=batches_seen)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
        worker_init_fn=seed_worker if workers > 0 else None, pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(tcfg.seed + 1000 * env.rank + start_step),
    )
    seen_bad: dict[str, tuple[str, str]] = {p: tuple(v) for p, v in state.get("bad_files", {}).items()}

    # ---- model, discriminator, optimizers
    seed_everything(tcfg.seed)  # the same initial weights on every rank (DDP would broadcast them anyway)
    model = ImageCodec(mcfg, sync_codebook=env.is_distributed).to(dev)
    use_gan = tcfg.disc_weight > 0
    disc = PatchDiscriminator(tcfg.disc_channels, tcfg.disc_layers).to(dev) if use_gan else None
    opt_g = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay,
                              fused=True)
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=tcfg.disc_lr, betas=tuple(tcfg.betas),
                               weight_decay=tcfg.weight_decay, fused=True) if use_gan else None)
    if tensors:
        model.load_state_dict(tensors["model"])
        opt_g.load_state_dict(unflatten_optimizer_state(tensors["opt_g"], state["opt_g"]))
        if use_gan and "disc" in tensors:
            disc.load_state_dict(tensors["disc"])
            opt_d.load_state_dict(unflatten_optimizer_state(tensors["opt_d"], state["opt_d"]))
    if tensors and main and "rng" in tensors:
        restore_rng(tensors["rng"], state["rng"])
    else:
        seed_everything(tcfg.seed + 1000 * env.rank + start_step)
    del tensors

    amp = tcfg.amp == "bf16" or (tcfg.amp == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    g_model, d_model = model, disc
    if env.is_distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        g_model = DDP(model, device_ids=ids, broadcast_buffers=False)
        if use_gan:
            d_model = DDP(disc, device_ids=ids, broadcast_buffers=False)

    # ---- bookkeeping
    budget = RunBudget(max_steps=max_steps, max_minutes=max_minutes, start_step=start_step)
    metrics = MetricsLogger(out, enabled=main, resume_step=start_step if state else None)
    bar = Progress(budget, start_step=start_step, desc="image codec", enabled=main and progress)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        bar.write(f"image codec: preset {preset_name}, {model.num_parameters() / 1e6:.2f}M parameters, "
                  f"f={f}, {mcfg.codebook_size} codes ({mcfg.quantizer}); {len(train_files)} training files, "
                  f"{0 if eval_x is None else len(eval_x)} held-out ({split_how}); batch {tcfg.batch_size} x "
                  f"{env.world_size} process(es) on {dev}{', bf16' if amp else ''}"
                  + (f"; resuming at step {start_step}" if state else ""))
        if max_steps is None and max_minutes is None:
            bar.write("no --max-steps or --max-minutes: training until interrupted (Ctrl-C saves a checkpoint); "
                      "the lr does not cool down")

    def note_skips(batch_skips):
        for s in batch_skips:
            if s.path not in seen_bad:
                seen_bad[s.path] = (s.reason, s.message)
                n_reason = sum(1 for r, _ in seen_bad.values() if r == s.reason)
                if n_reason <= 3:
                    bar.write(f"skipped {s.message}")
                elif n_reason == 4:
                    bar.write(f"(further '{s.reason}' skips are counted, not shown)")

    def gathered_bad() -> dict:
        merged: dict = {}
        for part in all_gather_object(seen_bad):
            merged.update(part)
        return merged

    def evaluate(step: int) -> dict | None:
        res = None
        if main and eval_x is not None and len(eval_x):
            res = evaluate_codec(model, eval_x, batch_size=64, keep=tcfg.sample_images)
            n = min(tcfg.sample_images, len(eval_x))
            if n:
                save_grid(eval_x[:n], res["recon"][:n], out / "samples" / f"step_{step:06d}.png")
            res = {k: v for k, v in res.items() if k not in ("recon", "counts")}
            metrics.log(step, **{f"eval/{k}": v for k, v in res.items()})
            bar.write(f"step {step}: held-out PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.3f}, "
                      f"codebook usage {100 * res['codebook_usage']:.1f}%, perplexity {res['perplexity']:.1f}")
        barrier()
        return res

    def save(step: int) -> None:
        bad = gathered_bad()
        if main:
            t_g, m_g = flatten_optimizer_state(opt_g.state_dict())
            rng_t, rng_m = capture_rng()
            tens = {"model": model.state_dict(), "opt_g": t_g, "rng": rng_t}
            st = {"preset": preset_name, "model_config": to_dict(mcfg), "train_config": to_dict(tcfg),
                  "opt_g": m_g, "rng": rng_m, "batches_seen": batches_seen, "world_size": env.world_size,
                  "bad_files": {p: list(v) for p, v in bad.items()}}
            if workers == 0:
                st["dataset_rng"] = [dataset.rng.getstate()[0], list(dataset.rng.getstate()[1]),
                                     dataset.rng.getstate()[2]]
            if use_gan:
                t_d, m_d = flatten_optimizer_state(opt_d.state_dict())
                tens.update(disc=disc.state_dict(), opt_d=t_d)
                st["opt_d"] = m_d
            ckpt.save(step, tens, st)
            model.save(out)  # the codec directory: always the latest checkpoint's weights
        barrier()

    # ---- loop
    step = start_step
    data_iter = iter(loader)
    t_log, n_img_log = time.monotonic(), 0
    sums: dict[str, float] = {}
    last_eval = last_save = None
    last_eval_res = None
    model.train()
    if disc is not None:
        disc.train()
    while not budget.should_stop(step):
        batch, batch_skips = next(data_iter)
        batches_seen += 1
        note_skips(batch_skips)
        if batch is None:
            continue
        x = batch.to(dev, non_blocking=True).float().div_(127.5).sub_(1.0)  # [-1, 1]

        lr_f = wsd_factor(step, budget.fraction(step), budget.warmup(tcfg.warmup_steps), tcfg.cooldown)
        for g in opt_g.param_groups:
            g["lr"] = tcfg.lr * lr_f

        # generator step
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            recon, _, aux = g_model(x)
        recon = recon.float()
        rec = F.l1_loss(recon, x) if tcfg.rec_loss == "l1" else F.mse_loss(recon, x)
        nll = tcfg.rec_weight * rec
        logs = {"rec": rec.detach()}
        if tcfg.ssim_weight > 0:
            s = ssim((recon + 1) / 2, (x + 1) / 2)
            nll = nll + tcfg.ssim_weight * (1.0 - s)
            logs["ssim"] = s.detach()
        loss = nll + aux
        if model.config.quantizer == "vq":
            logs["commit"] = aux.detach()
        gan_on = use_gan and step >= tcfg.disc_start
        if gan_on:
            disc.requires_grad_(False)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits_fake, feats_fake = disc(recon)
            g_adv = hinge_g_loss(logits_fake.float())
            d_weight = tcfg.disc_weight * adaptive_weight(nll, g_adv, model.last_layer)
            d_weight = all_reduce(d_weight.reshape(1).clone()) / env.world_size  # one weight on every rank
            loss = loss + d_weight[0] * g_adv
            logs.update(g_adv=g_adv.detach(), d_weight=d_weight[0])
            if tcfg.feat_weight > 0:
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    _, feats_real = disc(x)
                fm = feature_matching_loss(feats_real, feats_fake)
                loss = loss + tcfg.feat_weight * fm
                logs["feat"] = fm.detach()
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt_g.step()

        # discriminator step (real and generated in one batch: one DDP forward, one all-reduce)
        if gan_on:
            disc.requires_grad_(True)
            for g in opt_d.param_groups:
                g["lr"] = tcfg.disc_lr * lr_f
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits, _ = d_model(torch.cat([x, recon.detach()]))
            l_real, l_fake = logits.float().chunk(2)
            d_loss = hinge_d_loss(l_real, l_fake)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            logs["d_loss"] = d_loss.detach()

        step += 1
        budget.plan(step)
        logs["loss"] = loss.detach()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n_img_log += x.shape[0] * env.world_size
        if step % tcfg.log_every == 0 or step == 1:
            dt = max(1e-9, time.monotonic() - t_log)
            n_steps = tcfg.log_every if step % tcfg.log_every == 0 else 1
            avg = {k: v / n_steps for k, v in sums.items()}
            if main:
                metrics.log(step, **{f"train/{k}": v for k, v in avg.items()}, lr=tcfg.lr * lr_f,
                            images_per_s=n_img_log / dt, planned_steps=budget.planned_steps)
            bar.update(step, loss=avg["loss"], rec=avg["rec"], **{"img/s": f"{n_img_log / dt:.1f}"})
            sums, t_log, n_img_log = {}, time.monotonic(), 0
        else:
            bar.update(step)
        if step % tcfg.eval_every == 0:
            last_eval_res, last_eval = evaluate(step), step
            model.train()
        if step % tcfg.ckpt_every == 0:
            save(step)
            last_save = step

    # ---- end: final eval and checkpoint, skip report
    bar.close()
    if last_eval != step:
        last_eval_res = evaluate(step)
    if last_save != step:
        save(step)
    bad = gathered_bad()
    for _, (reason, msg) in sorted(bad.items()):
        skips.add(reason, msg)
    skips.merge(eval_skips)
    # Every rank must end with the same weights and the same codebook (DDP + the quantizer's own sync).
    sums_by_rank = all_gather_object({"model": state_checksum(model), "quantizer": state_checksum(model.quantizer)})
    in_sync = all(c == sums_by_rank[0] for c in sums_by_rank)
    if main and not in_sync:
        print("warning: model or codebook state differs across ranks; this is a bug, please report it")
    summary = {"step": step, "stopped_by": budget.reason, "planned_steps": budget.planned_steps,
               "minutes": round(budget.elapsed / 60, 2),
               "preset": preset_name, "eval": last_eval_res, "skipped": skips.to_dict(),
               "train_files": len(train_files), "eval_files": len(eval_files), "split": split_how,
               "world_size": env.world_size, "ranks_in_sync": in_sync, "rank_checksums": sums_by_rank}
    if main:
        atomic_write_json(out / "train_summary.json", summary)
        metrics.close()
        ev = last_eval_res or {}
        print(f"image codec -> {out}: step {step} after {summary['minutes']} min ({budget.stop_message()})"
              + (f", held-out PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.3f}, "
                 f"usage {100 * ev['codebook_usage']:.1f}%" if ev else ""))
        print(f"inputs: {skips.summary()}")
        for reason, examples in skips.examples.items():
            for e in examples[:3]:
                print(f"  {reason}: {e}")
    return summary


# ------------------------------------------------------------------------------------------------- CLI
def add_train_arguments(p) -> None:
    p.add_argument("--data", required=True, metavar="DIR_OR_JSONL",
                   help="a directory of images (with train/ and test/ subdirectories, if it has them) or documents.jsonl")
    p.add_argument("--out", required=True, help="output codec directory (also checkpoints, metrics, samples)")
    p.add_argument("--preset", default=None, help="tiny (CPU), base or large (default: tiny; on --resume: the run's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a codec or training config key (repeatable), e.g. --set quantizer=vq")
    p.add_argument("--eval-data", default=None, metavar="DIR_OR_JSONL", help="held-out images (default: see --data)")
    add_budget_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: 0 on CPU, 4 on GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args) -> int:
    workers = args.workers
    if workers is None:
        workers = 4 if (args.device in ("cuda", "auto") and torch.cuda.is_available()) else 0
    train_image_codec(args.data, args.out, preset_name=args.preset, overrides=args.overrides,
                      eval_data=args.eval_data, max_steps=args.max_steps, max_minutes=args.max_minutes,
                      resume=args.resume, device=args.device, workers=workers, progress=not args.no_progress)
    return 0


if __name__ == "__main__":  # python -m tessera.unimodal.image_train ... (same flags)
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_train_arguments(parser)
    sys.exit(run_train(parser.parse_args()))
