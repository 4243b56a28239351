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
- The loop, shared with the image codec, is `tessera.unimodal.codec_train`: resume, the run budget and the
  lr schedule, bf16 autocast on GPUs (`dtype=auto`), DDP, skipped non-finite steps, checkpoints (with every
  rank's RNG state).
- The output directory is a codec directory (`codec.json`, `model.safetensors`) refreshed at every
  checkpoint, plus `checkpoints/`, `metrics.jsonl`, `data.json`, `train_summary.json` and `samples/step_N/`
  (original and reconstruction WAVs).

Bad input never stops a run: unreadable, empty, too short and non-finite clips are skipped and counted,
clipped clips are kept and counted, and clips longer than `max_clip_seconds` are split (or refused, with
`long_clips=refuse`). The counts go to the log, to metrics.jsonl (`skipped`) and to `data.json`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import ConfigError, preset
from tessera.storage import atomic_write_json
from tessera.runtime.distributed import all_reduce
from tessera.unimodal.audio import AUDIO_PRESETS, AudioCodec, AudioCodecConfig, AudioCodecError, SEANetCodec
from tessera.unimodal.audio_eval import MultiScaleMel, codebook_usage, score_pairs
from tessera.unimodal.codec_train import CodecRecipe, CodecTrainConfig, add_codec_train_arguments, train_codec
from tessera.unimodal.media import Audio, MediaError, SkipLog, check_waveform, list_media, load_audio, split_audio


# ------------------------------------------------------------------------------------------------ config
@dataclass
class AudioTrainConfig(CodecTrainConfig):
    """The shared keys (`CodecTrainConfig`: batch_size, lr, betas, weight_decay, warmup_steps, cooldown,
    grad_clip, disc_lr, dtype, log_every, eval_every, ckpt_every, keep_checkpoints, max_nan_skips,
    max_empty_batches, seed) with the audio codec's defaults, and the audio codec's own."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # EnCodec's Adam betas
    disc_lr: float = 3e-4
    eval_every: int = 200
    ckpt_every: int = 500
    crop_seconds: float = 1.0
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
    adv_weight: float = 3.0  # EnCodec: lambda_g = 3, lambda_feat = 3
    feat_weight: float = 3.0
    max_clip_seconds: float = 30.0
    long_clips: str = "split"  # "split": cut into pieces of max_clip_seconds; "refuse": skip and count
    eval_clips: int = 16  # held-out clips taken from --data when no --eval-data is given
    sample_clips: int = 4  # WAV pairs written at each evaluation

    def validate(self) -> AudioTrainConfig:
        super().validate()
        if self.long_clips not in ("split", "refuse"):
            raise ConfigError(f"long_clips must be 'split' or 'refuse', got {self.long_clips!r}")
        return self


TRAIN_PRESETS: dict[str, AudioTrainConfig] = {
    # Tuned for minutes on two CPU cores (see docs/audio_codec.md): small batches of short crops (4 x 0.48 s:
    # per second of compute, more steps on fewer crops learned faster than fewer steps on more; digit words
    # last ~0.5 s, and zero padding would make the log-mel loss mostly about silence), no waveform L1 (with
    # phase not yet learned it pulls the output toward silence), plain Adam betas, and 80 autoencoder
    # warm-up steps so the k-means init sees trained latents. lr 2.2e-3, decaying linearly to 0 over the
    # last 60% of the run.
    "tiny": AudioTrainConfig(batch_size=4, crop_seconds=0.48, lr=2.2e-3, betas=[0.9, 0.999], warmup_steps=30,
                             wave_weight=0.0, init_vectors=2048, ae_warmup_steps=80, quantizer_dropout=0.3,
                             cooldown=0.6, eval_every=1000, ckpt_every=500),
    "base": AudioTrainConfig(batch_size=32, crop_seconds=1.0, lr=3e-4, warmup_steps=500, init_vectors=16384,
                             discriminator=True, disc_start_step=2000, eval_every=1000, ckpt_every=2000),
}


def split_overrides(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """Route `key=value` overrides to the codec config or the training config; unknown keys are errors."""
    return AudioRecipe(None).split_overrides(overrides)


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


# ------------------------------------------------------------------------------------------------ train
class AudioRecipe(CodecRecipe):
    """The audio codec's pieces for `train_codec`: clips in memory, seeded crops, the mel + waveform +
    commitment (+ MS-STFT GAN) losses, the autoencoder warm-up and the k-means codebook init."""

    name = "audio codec"
    model_config = AudioCodecConfig
    train_config = AudioTrainConfig
    train_presets = TRAIN_PRESETS
    unknown_key = "unknown audio codec key {key}"
    throughput_key = "audio_seconds_per_s"
    record_tags: ClassVar[dict] = {"split": "train"}

    def __init__(self, data, eval_data=None):
        self.data, self.eval_data = data, eval_data
        self.drop = False

    def codec_preset(self, name: str) -> AudioCodecConfig:
        return preset(AUDIO_PRESETS, name, "audio codec")

    # ---- data (every rank reads it; the skip report comes from rank 0)
    def setup(self, run) -> None:
        cfg, tcfg = run.mcfg, run.tcfg
        sr, hop = cfg.sample_rate, cfg.hop
        self.sr = sr
        self.crop = max(1, round(tcfg.crop_seconds * sr / hop)) * hop
        self.skips, self.notes = SkipLog(), {}
        t0 = time.monotonic()
        clips, _ = load_clips(self.data, sr, hop, tcfg, self.skips, self.notes)
        eval_skips = SkipLog()
        if self.eval_data:
            eval_clips, _ = load_clips(self.eval_data, sr, hop, tcfg, eval_skips, {})
            eval_clips = eval_clips[: max(tcfg.eval_clips, 1) * 4]
        else:
            order = np.random.default_rng(tcfg.seed).permutation(len(clips))
            n_eval = min(tcfg.eval_clips, len(clips) // 10) if len(clips) >= 2 else 0
            held = set(order[:n_eval].tolist())
            eval_clips = [clips[i] for i in sorted(held)]
            clips = [c for i, c in enumerate(clips) if i not in held]
        self.eval_clips = [c[: int(10 * sr)] for c in eval_clips]  # keep each evaluation cheap
        if not clips:
            raise AudioCodecError(f"{self.data}: no usable training clips ({self.skips.summary()})")
        self.n_clips = len(clips)
        self.seconds = sum(len(c) for c in clips) / sr
        run.log(f"data: {len(clips)} training clips ({self.seconds:.1f} s), {len(self.eval_clips)} held-out clips, "
                f"{self.skips.summary()}" + (f"; kept but noted: {self.notes}" if self.notes else "")
                + f" ({time.monotonic() - t0:.1f} s)")
        if run.main:
            atomic_write_json(run.out / "data.json", {
                "train_clips": len(clips), "train_seconds": round(self.seconds, 2), "eval_clips": len(self.eval_clips),
                "skipped": self.skips.to_dict(), "eval_skipped": eval_skips.to_dict(), "notes": self.notes})
        self.sampler = CropSampler(clips, self.crop, tcfg.seed)

    def describe(self, run) -> str:
        cfg = run.mcfg
        return (f"{cfg.quantizer}, strides {cfg.strides} (hop {cfg.hop}, {cfg.frame_rate:g} frames/s), "
                f"{cfg.num_quantizers} x {cfg.codes_per_level} codes; {self.n_clips} training clips "
                f"({self.seconds:.1f} s), {len(self.eval_clips)} held-out")

    def build_model(self, run) -> nn.Module:
        return SEANetCodec(run.mcfg)  # after the process group: the VQ synchronizes its codebooks

    def build_discriminator(self, run) -> nn.Module | None:
        t = run.tcfg
        return MultiScaleSTFTDiscriminator(t.disc_ffts, t.disc_channels) if t.discriminator else None

    def init_vq(self, run, step: int) -> None:
        t = time.monotonic()
        tcfg = run.tcfg
        init_codebooks(run.model, self.sampler, tcfg.init_vectors, tcfg.batch_size, run.env.rank, run.device)
        run.log(f"step {step}: codebooks initialized by k-means on ~{tcfg.init_vectors} latent vectors "
                f"({time.monotonic() - t:.1f} s)")

    def before_training(self, run) -> None:
        self.mel = MultiScaleMel(run.mcfg.sample_rate).to(run.device)
        self.eval_mel = MultiScaleMel(run.mcfg.sample_rate)
        if run.start_step == 0 and run.tcfg.ae_warmup_steps == 0:
            self.init_vq(run, 0)

    # ---- a step
    def next_batch(self, run, step: int) -> torch.Tensor:
        return self.sampler.batch(step, run.env.rank, run.tcfg.batch_size).to(run.device)[:, None]  # (B, 1, T)

    def items(self, batch: torch.Tensor) -> float:
        return batch.shape[0] * batch.shape[-1] / self.sr  # seconds of audio

    def generator_loss(self, run, x, step):
        tcfg = run.tcfg
        self.drop = random.Random(tcfg.seed * 1_000_003 + step).random() < tcfg.quantizer_dropout
        run.model.quantizer.set_dropout(self.drop)
        warm = step <= tcfg.ae_warmup_steps
        with run.autocast():
            y, _, commit = run.g_model(x, quantize=not warm)
        y = y.float()
        loss_mel = self.mel(y[:, 0], x[:, 0], linear_weight=tcfg.mel_linear_weight)
        loss_wave = (y - x).abs().mean()
        total = tcfg.mel_weight * loss_mel + tcfg.wave_weight * loss_wave + tcfg.commit_weight * commit
        parts = {"loss_mel": loss_mel.detach(), "loss_wave": loss_wave.detach(), "loss_commit": commit.detach()}
        if run.disc is None or step <= tcfg.disc_start_step:
            return total, parts, None
        with run.autocast():
            real_out, fake_out = run.d_model(x[:, 0]), run.d_model(y[:, 0])
        adv, feat = generator_losses(real_out, fake_out)
        total = total + tcfg.adv_weight * adv + tcfg.feat_weight * feat
        parts.update(loss_adv=adv.detach(), loss_feat=feat.detach())
        return total, parts, (x, y.detach())

    def discriminator_loss(self, run, carry, step):
        x, y = carry
        with run.autocast():
            d_loss = discriminator_loss(run.d_model(x[:, 0]), run.d_model(y[:, 0]))
        return d_loss, {"loss_disc": d_loss.detach()}

    def after_step(self, run, step: int) -> None:
        if step == run.tcfg.ae_warmup_steps:
            self.init_vq(run, step)

    def train_record(self, avg: dict, step: int) -> dict:
        return {**avg, "dropout": self.drop}

    def postfix(self, avg: dict, rate: float) -> dict:
        return {"loss": avg["loss"], "mel": avg["loss_mel"], "x_rt": rate}

    # ---- evaluation, checkpoints, the end
    def evaluate(self, run, step: int) -> dict | None:
        if step <= run.tcfg.ae_warmup_steps:  # no codebooks yet
            return None
        m = None
        if run.main and self.eval_clips:
            m, recons = evaluate_model(run.model, self.eval_clips, self.eval_mel, run.device)
            save_samples(run.out, step, self.eval_clips, recons, run.mcfg.sample_rate, run.tcfg.sample_clips)
        spread = codebook_spread(run.model)
        if m is not None:
            run.metrics.log(step, split="eval", **m, codebook_spread=spread)
            usage = ", ".join(f"{u:.2f}" for u in m["codebook_usage"])
            run.log(f"step {step}: eval si_sdr {m['si_sdr']:.2f} dB, mel {m['mel_distance']:.3f}, usage [{usage}]")
        return m

    def checkpoint_state(self, run) -> dict:
        return {"codebook_spread": codebook_spread(run.model)}

    def save_codec(self, run) -> None:
        AudioCodec.save_model(run.model, run.out)

    def finish(self, run, step: int) -> None:
        if 0 < step < run.tcfg.ae_warmup_steps:  # stopped during warm-up: still leave a usable codec
            self.init_vq(run, step)

    def summarize(self, run, summary: dict) -> dict:
        return {"train_clips": self.n_clips, "skipped": self.skips.to_dict(), "notes": self.notes,
                "codebook_spread": codebook_spread(run.model)}

    def report(self, run, summary: dict) -> None:
        print(f"stopped at step {summary['step']} after {summary['minutes']} min ({run.budget.stop_message()}); "
              f"codec written to {run.out}", flush=True)


def train_audio_codec(data, out, *, preset_name: str | None = None, overrides=None, eval_data=None,
                      max_steps: int | None = None, max_minutes: float | None = None, resume: bool = False,
                      device: str | None = None, progress: bool = True) -> dict:
    """Train (or resume) a codec into `out`; returns the summary also written to train_summary.json.
    Works under torchrun."""
    return train_codec(AudioRecipe(data, eval_data), out, preset_name=preset_name, overrides=overrides,
                       max_steps=max_steps, max_minutes=max_minutes, resume=resume, device=device,
                       progress=progress)


# ------------------------------------------------------------------------------------------------- CLI
def add_train_arguments(p) -> None:
    add_codec_train_arguments(
        p, data_help="directory of audio files (recursive) or a documents .jsonl",
        eval_help="held-out clips (default: a few clips held out of --data)",
        preset_help=f"model + training preset: {', '.join(sorted(AUDIO_PRESETS))}",
        set_help="override a model or training config key (repeatable), e.g. --set strides=8,5,4,2")
    p.add_argument("overrides_pos", nargs="*", metavar="KEY=VALUE", help="config overrides (same as --set)")


def run_train(args) -> int:
    summary = train_audio_codec(args.data, args.out, preset_name=args.preset,
                                overrides=list(args.overrides) + list(args.overrides_pos),
                                eval_data=args.eval_data, max_steps=args.max_steps, max_minutes=args.max_minutes,
                                resume=args.resume, device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0
