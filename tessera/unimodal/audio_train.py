"""Train the audio codec (SEANet + residual VQ), in one process or under torchrun.

    tessera tokenizer train audio --data corpus/speech/train --eval-data corpus/speech/test \\
        --out tok/audio --preset tiny --max-minutes 3
    torchrun --nproc_per_node=2 -m tessera tokenizer train audio --data DIR --out DIR --preset base
    tessera tokenizer train audio ... --resume            # continue from DIR/checkpoints/latest

- Batches are random crops of `crop_seconds` (clips shorter than a crop are zero-padded at a random
  offset). Crops for step s on rank r come from a generator seeded by (seed, s, r), so a resumed run draws
  exactly the batches the uninterrupted run would have.
- Losses: multi-scale mel (L1 on log10 mel + L1 on mel, torchaudio MelSpectrogram at windows 64..2048),
  L1 on the waveform, the VQ commitment loss, and, where `discriminator=true` (the GPU presets), a
  multi-scale STFT discriminator (EnCodec's MS-STFTD) with hinge losses and relative feature matching.
- Quantizer dropout: with probability `quantizer_dropout` a step keeps only the first k levels, k uniform
  in 1..n_q, the same k on every rank. The codebooks are k-means initialized on `init_vectors` latent
  vectors before the first step.
- The output directory is a codec directory (`codec.json`, `model.safetensors`) refreshed at every
  checkpoint, plus `checkpoints/`, `metrics.jsonl` and `samples/step_N/` (original and reconstruction WAVs).

Bad input never stops a run: unreadable, empty, too short and non-finite clips are skipped and counted,
clipped clips are kept and counted, and clips longer than `max_clip_seconds` are split (or refused, with
`long_clips=refuse`). The counts go to the log, to metrics.jsonl (`skipped`) and to `data.json`.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import ConfigError, apply_overrides, from_dict, preset, to_dict
from tessera.config import split_overrides as _split_overrides
from tessera.storage import atomic_write_json
from tessera.train.checkpoint import (CheckpointManager, capture_rng, flatten_optimizer_state, restore_rng,
                                      unflatten_optimizer_state)
from tessera.train.distributed import (all_gather_object, all_reduce, barrier, destroy_distributed,
                                       init_distributed, seed_everything)
from tessera.train.monitor import MetricsLogger, Progress, RunBudget, add_budget_arguments, wsd_factor
from tessera.unimodal.audio import (AUDIO_PRESETS, AudioCodec, AudioCodecConfig, AudioCodecError, SEANetCodec)
from tessera.unimodal.audio_eval import MultiScaleMel, codebook_usage, score_pairs
from tessera.unimodal.media import Audio, MediaError, SkipLog, check_waveform, list_media, load_audio, split_audio


# ------------------------------------------------------------------------------------------------ config
@dataclass
class AudioTrainConfig:
    batch_size: int = 16
    crop_seconds: float = 1.0
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # EnCodec's Adam betas
    warmup_steps: int = 100
    cooldown: float = 0.1  # last fraction of the planned steps (RunBudget) over which the lr decays to 0
    grad_clip: float = 1.0  # 0: off
    mel_weight: float = 1.0
    mel_linear_weight: float = 1.0  # inside the mel loss: L1(log mel) + this * L1(mel)
    wave_weight: float = 0.1
    commit_weight: float = 1.0
    quantizer_dropout: float = 0.5  # probability that a step keeps only the first k levels
    init_vectors: int = 4096  # latent vectors for the k-means codebook init
    # Steps trained as a plain autoencoder (quantizer bypassed) before the codebooks are k-means initialized
    # on the trained latents: the codebooks start on informative features instead of a random encoder's.
    ae_warmup_steps: int = 0
    discriminator: bool = False
    disc_ffts: list[int] = field(default_factory=lambda: [1024, 512, 256])
    disc_channels: int = 32
    disc_start_step: int = 0
    disc_lr: float = 3e-4
    adv_weight: float = 3.0  # EnCodec: lambda_g = 3, lambda_feat = 3
    feat_weight: float = 3.0
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32"
    max_clip_seconds: float = 30.0
    long_clips: str = "split"  # "split": cut into pieces of max_clip_seconds; "refuse": skip and count
    eval_clips: int = 16  # held-out clips taken from --data when no --eval-data is given
    eval_every: int = 200
    save_every: int = 500
    log_every: int = 10
    sample_clips: int = 4  # WAV pairs written at each evaluation
    keep_checkpoints: int = 2
    seed: int = 0


TRAIN_PRESETS: dict[str, AudioTrainConfig] = {
    # Tuned for minutes on two CPU cores (see docs/audio_codec.md): small batches of short crops (4 x 0.48 s:
    # per second of compute, more steps on fewer crops learned faster than fewer steps on more; digit words
    # last ~0.5 s, and zero padding would make the log-mel loss mostly about silence), no waveform L1 (with
    # phase not yet learned it pulls the output toward silence), plain Adam betas, and 80 autoencoder
    # warm-up steps so the k-means init sees trained latents. lr 2.2e-3, decaying linearly to 0 over the
    # last 60% of the run.
    "tiny": AudioTrainConfig(batch_size=4, crop_seconds=0.48, lr=2.2e-3, betas=[0.9, 0.999], warmup_steps=30,
                             wave_weight=0.0, init_vectors=2048, ae_warmup_steps=80, quantizer_dropout=0.3,
                             cooldown=0.6, eval_every=1000, save_every=500),
    "base": AudioTrainConfig(batch_size=32, crop_seconds=1.0, lr=3e-4, warmup_steps=500, init_vectors=16384,
                             discriminator=True, disc_start_step=2000, eval_every=1000, save_every=2000),
}


def split_overrides(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """Route `key=value` overrides to the codec config or the training config; unknown keys are errors."""
    return _split_overrides(overrides, AudioCodecConfig, AudioTrainConfig, "unknown audio codec key {key}")


# ----------------------------------------------------------------------------------------- discriminator
class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's MS-STFT discriminator: 2-D convs over the complex STFT (real, imag)."""

    def __init__(self, n_fft: int, channels: int = 32):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        c = channels
        convs = [weight_norm(nn.Conv2d(2, c, (3, 9), padding=(1, 4)))]
        for d in (1, 2, 4):  # dilate along time, stride along frequency
            convs.append(weight_norm(nn.Conv2d(c, c, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4))))
        convs.append(weight_norm(nn.Conv2d(c, c, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(convs)
        self.out = weight_norm(nn.Conv2d(c, 1, (3, 3), padding=(1, 1)))

    def forward(self, x):  # x (B, T) -> logits, features
        spec = torch.stft(x.float(), self.n_fft, hop_length=self.n_fft // 4, window=self.window,
                          return_complex=True)  # (B, F, frames)
        h = torch.stack([spec.real, spec.imag], 1).transpose(2, 3)  # (B, 2, frames, F)
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return self.out(h), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, ffts=(1024, 512, 256), channels: int = 32):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, channels) for n in ffts)

    def forward(self, x):
        return [d(x) for d in self.discs]


def discriminator_loss(real_out, fake_out) -> torch.Tensor:
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real_out, fake_out)) / len(real_out)


def generator_losses(real_out, fake_out) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge adversarial loss and feature matching (L1 relative to the real features' mean magnitude)."""
    adv = sum(F.relu(1 - f).mean() for f, _ in fake_out) / len(fake_out)
    feat, n = 0.0, 0
    for (_, fr), (_, ff) in zip(real_out, fake_out):
        for a, b in zip(fr, ff):
            feat = feat + (a.detach() - b).abs().mean() / (a.detach().abs().mean() + 1e-8)
            n += 1
    return adv, feat / max(1, n)


# ------------------------------------------------------------------------------------------------- data
def load_clips(source, sample_rate: int, min_samples: int, tcfg: AudioTrainConfig,
               skips: SkipLog, notes: dict) -> tuple[list[np.ndarray], list[str]]:
    """Read every clip of a directory or documents JSONL into memory at the codec's rate.

    Skips (counted in `skips` by reason): missing, corrupt, empty, nonfinite, too_short (fewer samples than
    one frame), too_long (only with long_clips=refuse). Counted but kept (`notes`): clipped, split.
    """
    if tcfg.long_clips not in ("split", "refuse"):
        raise ConfigError(f"long_clips must be 'split' or 'refuse', got {tcfg.long_clips!r}")
    cap = tcfg.max_clip_seconds
    clips, names = [], []
    for path in list_media(source, "audio", skips):
        try:
            a = load_audio(path, sample_rate=sample_rate,
                           max_seconds=cap if tcfg.long_clips == "refuse" else None)
            if check_waveform(a.waveform, str(path))["clipped"] > 0:
                notes["clipped"] = notes.get("clipped", 0) + 1
        except MediaError as e:
            skips.add(e.reason, str(e))
            continue
        pieces = [a] if a.duration <= cap else split_audio(a, cap)
        if len(pieces) > 1:
            notes["split"] = notes.get("split", 0) + 1
        for i, piece in enumerate(pieces):
            if piece.num_samples < min_samples:
                if i == 0:  # a short tail of a split clip is dropped silently; a short clip is a skip
                    skips.add("too_short", f"{path}: {piece.num_samples} samples, fewer than one frame "
                                           f"({min_samples})")
                continue
            clips.append(np.ascontiguousarray(piece.waveform, dtype=np.float32))
            names.append(f"{path}#{i}" if len(pieces) > 1 else str(path))
    return clips, names


class CropSampler:
    """Deterministic random crops: batch (step, rank) is a pure function of the seed."""

    def __init__(self, clips: list[np.ndarray], crop: int, seed: int):
        self.clips, self.crop, self.seed = clips, crop, seed
        lens = np.array([max(len(c), crop) for c in clips], dtype=np.float64)
        self.p = lens / lens.sum()  # long clips are drawn in proportion to their length

    def batch(self, step: int, rank: int, batch_size: int, stream: int = 0) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, stream, step, rank])
        out = np.zeros((batch_size, self.crop), np.float32)
        for b, i in enumerate(rng.choice(len(self.clips), size=batch_size, p=self.p)):
            c = self.clips[i]
            if len(c) >= self.crop:
                s = int(rng.integers(0, len(c) - self.crop + 1))
                out[b] = c[s: s + self.crop]
            else:
                s = int(rng.integers(0, self.crop - len(c) + 1))
                out[b, s: s + len(c)] = c
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------- helpers
def codebook_spread(model: SEANetCodec) -> float:
    """Largest elementwise difference of the VQ codebooks between ranks (0.0 when in sync or single process)."""
    cb = model.quantizer.codebooks()
    if cb is None:
        return 0.0
    cb = cb.detach().float().flatten()
    hi, lo = all_reduce(cb.clone(), op="max"), all_reduce(cb.clone(), op="min")
    return float((hi - lo).abs().max())


@torch.no_grad()
def init_codebooks(model: SEANetCodec, sampler: CropSampler, n_vectors: int, batch_size: int, rank: int,
                   device) -> None:
    """k-means init of every level on `n_vectors` latent vectors per rank (no dropout: every level is fitted).

    The EMA cluster sizes k-means leaves behind count the vectors of every rank; they are rescaled
    to the vectors of one training step, which the EMA and the dead-code threshold are measured in, so
    unused codes start being replaced as soon as they fall out of use.
    """
    q = model.quantizer
    if q.kind != "rvq":
        return
    frames = sampler.crop // model.cfg.hop
    n_batches = math.ceil(max(batch_size, math.ceil(n_vectors / max(1, frames))) / batch_size)
    x = torch.cat([sampler.batch(i, rank, batch_size, stream=1) for i in range(n_batches)])
    z = torch.cat([model.encoder(xb[:, None].to(device)) for xb in x.split(batch_size)], dim=-1)
    q.set_dropout(False)
    model.train()
    q(z)
    scale = (batch_size * frames) / (x.shape[0] * frames)
    for layer in q.rq.layers:
        cb = layer._codebook
        cb.cluster_size.mul_(scale)
        cb.embed_avg.mul_(scale)


@torch.no_grad()
def evaluate_model(model: SEANetCodec, clips: list[np.ndarray], mel: MultiScaleMel, device) -> tuple[dict, list]:
    """Held-out metrics of the model being trained, at full depth: SI-SDR, mel distance, codebook usage."""
    was_training = model.training
    model.eval()
    hop = model.cfg.hop
    recons, codes = [], []
    for c in clips:
        n = len(c)
        frames = math.ceil(n / hop)
        x = F.pad(torch.from_numpy(c), (0, frames * hop - n))[None, None].to(device)
        z = model.encoder(x)
        qz, cz, _ = model.quantizer(z)
        y = model.decoder(qz)[0, 0, :n].clamp(-1, 1).float().cpu().numpy()
        recons.append(y)
        codes.append(cz[0].cpu())
    m = score_pairs(clips, recons, model.cfg.sample_rate, mel, intelligibility=False)
    m["codebook_usage"] = codebook_usage(codes, model.cfg.codes_per_level)
    model.train(was_training)
    return m, recons


def save_samples(out: Path, step: int, clips, recons, sample_rate: int, n: int) -> None:
    d = out / "samples" / f"step_{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(list(zip(clips, recons))[:n]):
        Audio(x, sample_rate).save(d / f"{i:02d}_original.wav", subtype="PCM_16")
        Audio(y, sample_rate).save(d / f"{i:02d}_reconstruction.wav", subtype="PCM_16")


def _lr_at(step: int, budget: RunBudget, tcfg: AudioTrainConfig) -> float:
    """The lr of step `step` (counted from 1): warmup, flat, linear cooldown over the budget's planned steps."""
    return tcfg.lr * wsd_factor(step - 1, budget.fraction(step), budget.warmup(tcfg.warmup_steps), tcfg.cooldown)


# ------------------------------------------------------------------------------------------------ train
def train_audio_codec(data, out, *, preset_name: str = "tiny", overrides=None, eval_data=None,
                      max_steps: int | None = None, max_minutes: float | None = None, resume: bool = False,
                      device: str | None = None, progress: bool = True) -> dict:
    """Train (or resume) a codec into `out`; returns a summary dict. Works under torchrun."""
    env = init_distributed(device)
    try:
        return _train(env, data, Path(out), preset_name, overrides, eval_data, max_steps, max_minutes, resume,
                      progress)
    finally:
        destroy_distributed()


def _train(env, data, out: Path, preset_name, overrides, eval_data, max_steps, max_minutes, resume, progress):
    main = env.is_main
    log = (lambda msg: print(f"[tessera] {msg}", file=sys.stderr, flush=True)) if main else (lambda msg: None)
    ckpt = CheckpointManager(out, keep=2)

    # -------- configs: from the preset (+ overrides), or from the checkpoint when resuming
    mover, tover = split_overrides(list(overrides or []))
    resume_step = ckpt.latest_step() if resume else None
    if resume and resume_step is None:
        log(f"--resume: no checkpoint in {out}/checkpoints; starting from scratch")
    if resume_step is not None:
        tensors, state = ckpt.load(resume_step, device="cpu")
        cfg = from_dict(AudioCodecConfig, state["model_config"]).validate()
        tcfg = from_dict(AudioTrainConfig, state["train_config"])
        if apply_overrides(cfg, mover) != cfg:
            raise ConfigError(f"cannot change the model config of a run being resumed: {', '.join(mover)}")
        tcfg = apply_overrides(tcfg, tover)
    else:
        tensors, state = None, None
        cfg = apply_overrides(preset(AUDIO_PRESETS, preset_name, "audio codec"), mover).validate()
        tcfg = apply_overrides(preset(TRAIN_PRESETS, preset_name, "audio training"), tover)
        if out.exists() and (out / "checkpoints").exists() and ckpt.latest_step() is not None and main:
            log(f"{out} already holds checkpoints; they are replaced as this run saves (use --resume to continue)")
    keep = tcfg.keep_checkpoints
    ckpt.keep = max(1, keep)
    sr, hop = cfg.sample_rate, cfg.hop
    crop = max(1, round(tcfg.crop_seconds * sr / hop)) * hop

    # -------- data (every rank reads it; the skip report comes from rank 0)
    skips, notes = SkipLog(), {}
    t0 = time.monotonic()
    clips, _ = load_clips(data, sr, hop, tcfg, skips, notes)
    eval_skips = SkipLog()
    if eval_data:
        eval_clips, _ = load_clips(eval_data, sr, hop, tcfg, eval_skips, {})
        eval_clips = eval_clips[: max(tcfg.eval_clips, 1) * 4]
    else:
        order = np.random.default_rng(tcfg.seed).permutation(len(clips))
        n_eval = min(tcfg.eval_clips, len(clips) // 10) if len(clips) >= 2 else 0
        held = set(order[:n_eval].tolist())
        eval_clips = [clips[i] for i in sorted(held)]
        clips = [c for i, c in enumerate(clips) if i not in held]
    eval_clips = [c[: int(10 * sr)] for c in eval_clips]  # keep each evaluation cheap
    if not clips:
        raise AudioCodecError(f"{data}: no usable training clips ({skips.summary()})")
    seconds = sum(len(c) for c in clips) / sr
    log(f"data: {len(clips)} training clips ({seconds:.1f} s), {len(eval_clips)} held-out clips, "
        f"{skips.summary()}" + (f"; kept but noted: {notes}" if notes else "") + f" ({time.monotonic() - t0:.1f} s)")
    if main:
        atomic_write_json(out / "data.json", {"train_clips": len(clips), "train_seconds": round(seconds, 2),
                                              "eval_clips": len(eval_clips), "skipped": skips.to_dict(),
                                              "eval_skipped": eval_skips.to_dict(), "notes": notes})
    sampler = CropSampler(clips, crop, tcfg.seed)

    # -------- model, discriminator, optimizers (built after the process group, so the VQ syncs)
    seed_everything(tcfg.seed)
    dev = env.device
    model = SEANetCodec(cfg).to(dev)
    disc = MultiScaleSTFTDiscriminator(tcfg.disc_ffts, tcfg.disc_channels).to(dev) if tcfg.discriminator else None
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=0.0, fused=True)
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=tcfg.disc_lr, betas=tuple(tcfg.betas), fused=True)
             if disc else None)
    step = 0
    if tensors is not None:
        model.load_state_dict(tensors["model"])
        opt.load_state_dict(unflatten_optimizer_state(tensors["optimizer"], state["optimizer"]))
        if disc is not None and "disc" in tensors:
            disc.load_state_dict(tensors["disc"])
            opt_d.load_state_dict(unflatten_optimizer_state(tensors["optimizer_d"], state["optimizer_d"]))
        step = int(state["step"])
        rng_t = {k.split(".", 1)[1]: v for k, v in tensors["rng"].items() if k.startswith(f"r{env.rank}.")}
        if rng_t and str(env.rank) in state["rng"]:
            restore_rng(rng_t, state["rng"][str(env.rank)])
        log(f"resumed from step {step}")
    else:
        seed_everything(tcfg.seed + 1000 * env.rank)  # ranks draw their own dead-code samples
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {cfg.quantizer}, strides {cfg.strides} (hop {hop}, {cfg.frame_rate:g} frames/s), "
        f"{cfg.num_quantizers} x {cfg.codes_per_level} codes, {n_params / 1e6:.2f} M parameters; "
        f"{env.world_size} process(es) on {dev}")

    ddp_model = model
    ddp_disc = disc
    if env.is_distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Codebook buffers are synchronized by the quantizer's own all-reduces, not by DDP's broadcast.
        ddp_model = DDP(model, broadcast_buffers=False)
        if disc is not None:
            ddp_disc = DDP(disc, broadcast_buffers=False)

    mel = MultiScaleMel(sr).to(dev)
    eval_mel = MultiScaleMel(sr)
    amp = tcfg.precision == "bf16" or (tcfg.precision == "auto" and dev.type == "cuda")
    if tcfg.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {tcfg.precision!r}")

    def init_vq() -> None:
        t = time.monotonic()
        init_codebooks(model, sampler, tcfg.init_vectors, tcfg.batch_size, env.rank, dev)
        log(f"step {step}: codebooks initialized by k-means on ~{tcfg.init_vectors} latent vectors "
            f"({time.monotonic() - t:.1f} s)")

    if step == 0 and tcfg.ae_warmup_steps == 0:
        init_vq()

    metrics = MetricsLogger(out, enabled=main, resume_step=step if resume_step is not None else None)
    budget = RunBudget(max_steps=max_steps, max_minutes=max_minutes, start_step=step)
    bar = Progress(budget, start_step=step, desc="audio codec", enabled=main and progress)
    model.train()

    def save(step: int) -> None:
        rng_t, rng_m = capture_rng()
        gathered = all_gather_object(({k: v.tolist() for k, v in rng_t.items()}, rng_m))  # every rank's RNG
        spread = codebook_spread(model)
        if main:
            opt_t, opt_m = flatten_optimizer_state(opt.state_dict())
            tens = {"model": dict(model.state_dict()), "optimizer": opt_t, "rng": {}}
            st = {"model_config": to_dict(cfg), "train_config": to_dict(tcfg), "optimizer": opt_m, "rng": {},
                  "world_size": env.world_size, "codebook_spread": spread}
            for r, (rt, rm) in enumerate(gathered):
                for k, v in rt.items():
                    tens["rng"][f"r{r}.{k}"] = torch.tensor(v, dtype=torch.uint8)
                st["rng"][str(r)] = rm
            if disc is not None:
                d_t, d_m = flatten_optimizer_state(opt_d.state_dict())
                tens["disc"], tens["optimizer_d"], st["optimizer_d"] = dict(disc.state_dict()), d_t, d_m
            ckpt.save(step, tens, st)
            AudioCodec.save_model(model, out)
        barrier()

    def evaluate(step: int) -> None:
        if main and eval_clips:
            m, recons = evaluate_model(model, eval_clips, eval_mel, dev)
            save_samples(out, step, eval_clips, recons, sr, tcfg.sample_clips)
        else:
            m = None
        spread = codebook_spread(model)
        if main and m is not None:
            metrics.log(step, split="eval", **m, codebook_spread=spread)
            usage = ", ".join(f"{u:.2f}" for u in m["codebook_usage"])
            bar.write(f"step {step}: eval si_sdr {m['si_sdr']:.2f} dB, mel {m['mel_distance']:.3f}, "
                      f"usage [{usage}]")
        barrier()

    t_last, s_last = time.monotonic(), step
    agg: dict[str, float] = {}
    finished = False
    try:
        while not budget.should_stop(step):
            step += 1
            lr = _lr_at(step, budget, tcfg)
            for g in opt.param_groups:
                g["lr"] = lr
            x = sampler.batch(step, env.rank, tcfg.batch_size).to(dev)[:, None]  # (B, 1, T)
            drop = random.Random(tcfg.seed * 1_000_003 + step).random() < tcfg.quantizer_dropout
            model.quantizer.set_dropout(drop)
            warm = step <= tcfg.ae_warmup_steps
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                y, _, commit = ddp_model(x, quantize=not warm)
            y = y.float()
            loss_mel = mel(y[:, 0], x[:, 0], linear_weight=tcfg.mel_linear_weight)
            loss_wave = (y - x).abs().mean()
            total = tcfg.mel_weight * loss_mel + tcfg.wave_weight * loss_wave + tcfg.commit_weight * commit
            parts = {"loss_mel": float(loss_mel.detach()), "loss_wave": float(loss_wave.detach()),
                     "loss_commit": float(commit.detach())}
            use_disc = disc is not None and step > tcfg.disc_start_step
            if use_disc:
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    real_out, fake_out = ddp_disc(x[:, 0]), ddp_disc(y[:, 0])
                adv, feat = generator_losses(real_out, fake_out)
                total = total + tcfg.adv_weight * adv + tcfg.feat_weight * feat
                parts.update(loss_adv=float(adv.detach()), loss_feat=float(feat.detach()))
            opt.zero_grad(set_to_none=True)
            total.backward()
            if tcfg.grad_clip:
                parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip))
            opt.step()
            if use_disc:
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                    d_loss = discriminator_loss(ddp_disc(x[:, 0]), ddp_disc(y[:, 0].detach()))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                parts["loss_disc"] = float(d_loss.detach())
            parts["loss"] = float(total.detach())
            if not math.isfinite(parts["loss"]):
                raise AudioCodecError(f"step {step}: the loss is {parts['loss']}; lower lr or check the data")
            for k, v in parts.items():
                agg[k] = agg.get(k, 0.0) + v
            budget.plan(step)
            if step % tcfg.log_every == 0 or step == 1:
                n = max(1, step - s_last)
                dt = time.monotonic() - t_last
                rec = {k: v / n for k, v in agg.items()}
                rec["lr"] = lr
                rec["audio_seconds_per_s"] = n * tcfg.batch_size * env.world_size * crop / sr / max(dt, 1e-9)
                rec["dropout"] = drop
                rec["planned_steps"] = budget.planned_steps
                if main:
                    metrics.log(step, split="train", **rec)
                agg, t_last, s_last = {}, time.monotonic(), step
                bar.update(step, loss=rec["loss"], mel=rec["loss_mel"], x_rt=rec["audio_seconds_per_s"])
            else:
                bar.update(step)
            if step == tcfg.ae_warmup_steps:
                init_vq()
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step > tcfg.ae_warmup_steps:
                evaluate(step)
            if tcfg.save_every and step % tcfg.save_every == 0:
                save(step)
        finished = True
    finally:
        bar.close()
        if finished or budget.signal_received is not None:
            if 0 < step < tcfg.ae_warmup_steps:  # stopped during warm-up: still leave a usable codec
                init_vq()
            if not (tcfg.eval_every and step % tcfg.eval_every == 0) and step > tcfg.ae_warmup_steps:
                evaluate(step)
            if not (tcfg.save_every and step % tcfg.save_every == 0) and step > 0:
                save(step)
        metrics.close()
    summary = {"step": step, "stopped": budget.reason, "planned_steps": budget.planned_steps,
               "minutes": round(budget.elapsed / 60, 2),
               "train_clips": len(clips), "skipped": skips.to_dict(), "notes": notes,
               "codebook_spread": codebook_spread(model)}
    log(f"stopped at step {step} after {summary['minutes']} min ({budget.stop_message()}); codec written to {out}")
    return summary


# ------------------------------------------------------------------------------------------------- CLI
def add_train_arguments(p) -> None:
    p.add_argument("--data", required=True, help="directory of audio files (recursive) or a documents .jsonl")
    p.add_argument("--out", required=True, help="output directory: the codec, checkpoints, metrics, samples")
    p.add_argument("--preset", default="tiny", choices=sorted(AUDIO_PRESETS), help="model + training preset")
    p.add_argument("--eval-data", default=None, help="held-out clips (default: a few clips held out of --data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training config key (repeatable), e.g. --set strides=8,5,4,2")
    add_budget_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides_pos", nargs="*", metavar="KEY=VALUE", help="config overrides (same as --set)")


def run_train(args) -> int:
    if args.max_steps is None and args.max_minutes is None:
        raise AudioCodecError("give --max-steps N and/or --max-minutes M")
    summary = train_audio_codec(args.data, args.out, preset_name=args.preset,
                                overrides=list(args.overrides) + list(args.overrides_pos),
                                eval_data=args.eval_data, max_steps=args.max_steps, max_minutes=args.max_minutes,
                                resume=args.resume, device=args.device, progress=not args.no_progress)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
