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
- The loop, shared with the audio codec, is `tessera.unimodal.codec_train`: resume, the run budget, bf16
  autocast on GPUs that support it (`dtype=auto`; CPU runs in fp32; the quantizer is always fp32), DDP,
  skipped non-finite steps, checkpoints. Under DDP the VQ codebook's EMA statistics and dead-code
  replacement are all-reduced by the quantizer itself (`sync_codebook`), so the codebooks stay identical on
  every rank without a broadcast; FSQ has no state.
- Every `eval_every` steps and at the end, rank 0 scores the held-out split (PSNR, SSIM, codebook usage,
  code perplexity) into metrics.jsonl and writes samples/step_N.png (originals above reconstructions).
- Checkpoints are atomic (`CheckpointManager`); each one also refreshes the codec directory (codec.json +
  model.safetensors), so the output directory is always a usable codec. `--resume` continues from the
  latest checkpoint: same step, same data order, same optimizer and RNG state (every rank's).
- Bad files (corrupt, truncated, too small for one token, over the pixel cap) are skipped, counted once
  per file, and reported at the end and in train_summary.json. A batch with no readable image skips its
  step on every rank; `max_empty_batches` of them in a row stop the run with an error.

Output: OUT/codec.json, OUT/model.safetensors, OUT/checkpoints/, OUT/metrics.jsonl, OUT/samples/,
OUT/train_summary.json.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.config import ConfigError, apply_overrides, preset
from tessera.runtime.distributed import all_gather_object, all_reduce
from tessera.unimodal.codec_train import CodecRecipe, CodecTrainConfig, add_codec_train_arguments, train_codec
from tessera.unimodal.image import ImageCodec, ImageCodecConfig, image_preset
from tessera.unimodal.image_data import (
    InfiniteBatchSampler,
    Skip,
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
class ImageTrainConfig(CodecTrainConfig):
    """The shared keys (`CodecTrainConfig`: batch_size, lr, betas, weight_decay, warmup_steps, cooldown,
    grad_clip, disc_lr, dtype, log_every, eval_every, ckpt_every, keep_checkpoints, max_nan_skips,
    max_empty_batches, seed) with the image codec's defaults, and the image codec's own."""

    batch_size: int = 32  # per process
    warmup_steps: int = 500
    log_every: int = 20
    # losses
    rec_loss: str = "l1"  # "l1" or "l2"
    rec_weight: float = 1.0
    ssim_weight: float = 0.2
    disc_weight: float = 0.5  # times the adaptive weight; 0 switches the GAN off
    disc_start: int = 20000  # generator and discriminator GAN steps begin after this many steps
    feat_weight: float = 0.1  # discriminator feature matching; needs the GAN
    disc_channels: int = 64
    disc_layers: int = 3
    # data
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random resized crop, area fraction
    flip: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused before decoding
    cache_mb: float = 1024.0  # decoded images kept in memory, per data worker
    # evaluation
    eval_images: int = 256  # held-out images scored at each evaluation
    eval_fraction: float = 0.02  # of the files, when there is no separate held-out set
    sample_images: int = 8  # originals/reconstructions in each samples/step_N.png

    def validate(self) -> "ImageTrainConfig":
        super().validate()
        if self.rec_loss not in ("l1", "l2"):
            raise ConfigError(f"rec_loss must be 'l1' or 'l2', got {self.rec_loss!r}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {self.crop_scale}")
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
    return ImageRecipe(None).split_overrides(overrides)


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
class ImageRecipe(CodecRecipe):
    """The image codec's pieces for `train_codec`: files, crops, the reconstruction + SSIM + GAN losses."""

    name = "image codec"
    model_config = ImageCodecConfig
    train_config = ImageTrainConfig
    train_presets = TRAIN_PRESETS
    unknown_key = "image codec has no key {key}"
    throughput_key = "images_per_s"

    def __init__(self, data, eval_data=None, workers: int = 0):
        self.data, self.eval_data, self.workers = data, eval_data, workers

    def codec_preset(self, name: str) -> ImageCodecConfig:
        return image_preset(name)

    # ---- data
    def setup(self, run) -> None:
        mcfg, tcfg, env, state = run.mcfg, run.tcfg, run.env, run.state
        f = mcfg.downsample
        self.skips = SkipLog()
        self.train_files, self.eval_files, self.split_how = find_splits(
            self.data, self.eval_data, tcfg.eval_fraction, tcfg.eval_images, self.skips)
        self.eval_skips = SkipLog()
        self.eval_x = None
        if run.main:
            self.eval_x, _ = load_eval_images(self.eval_files, mcfg.image_size, f, tcfg.max_pixels, self.eval_skips)
        self.dataset = TrainImages(self.train_files, mcfg.image_size, f, crop_scale=tuple(tcfg.crop_scale),
                                   flip=tcfg.flip, max_pixels=tcfg.max_pixels, cache_mb=tcfg.cache_mb,
                                   seed=tcfg.seed + 7919 * env.rank)
        self._probe(len(self.train_files))
        self.batches_seen = int(state.get("batches_seen", 0))
        sampler = InfiniteBatchSampler(len(self.dataset), tcfg.batch_size, tcfg.seed, env.rank, env.world_size,
                                       start=self.batches_seen)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=self.workers,
            persistent_workers=self.workers > 0, worker_init_fn=seed_worker if self.workers > 0 else None,
            pin_memory=run.device.type == "cuda",
            generator=torch.Generator().manual_seed(tcfg.seed + 1000 * env.rank + run.start_step),
        )
        self.batches = iter(loader)
        self.seen_bad: dict[str, tuple[str, str]] = {p: tuple(v) for p, v in state.get("bad_files", {}).items()}

    PROBES = 16  # training images decoded before the first step

    def _probe(self, n: int) -> None:
        """Decode up to `PROBES` training images spread over the list (kept in the dataset's cache): a folder
        whose images are all unusable is refused before training, not after steps that skipped every batch."""
        k = min(n, self.PROBES)
        picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
        bad = [im for im in (self.dataset._image(i) for i in picks) if isinstance(im, Skip)]
        if picks and len(bad) == len(picks):
            reasons = sorted({b.reason for b in bad})
            what = "the" if len(picks) == n else f"all {len(picks)} probed of the"
            raise ConfigError(f"{self.data}: {what} {n} training images are unusable ({', '.join(reasons)}; e.g. "
                              f"{bad[0].message})")

    def load_rank_state(self, run, state: dict) -> None:
        r = state.get("dataset_rng")
        if r is not None and self.workers == 0:
            self.dataset.rng.setstate((r[0], tuple(r[1]), r[2]))

    def rank_state(self, run) -> dict:
        if self.workers > 0:  # the crops' RNG lives in the workers
            return {}
        r = self.dataset.rng.getstate()
        return {"dataset_rng": [r[0], list(r[1]), r[2]]}

    def describe(self, run) -> str:
        m = run.mcfg
        return (f"f={m.downsample}, {m.codebook_size} codes ({m.quantizer}); {len(self.train_files)} training files, "
                f"{0 if self.eval_x is None else len(self.eval_x)} held-out ({self.split_how})")

    def build_model(self, run) -> nn.Module:
        return ImageCodec(run.mcfg, sync_codebook=run.env.is_distributed)

    def build_discriminator(self, run) -> nn.Module | None:
        t = run.tcfg
        return PatchDiscriminator(t.disc_channels, t.disc_layers) if t.disc_weight > 0 else None

    # ---- a step
    def note_skips(self, run, batch_skips) -> None:
        for s in batch_skips:
            if s.path not in self.seen_bad:
                self.seen_bad[s.path] = (s.reason, s.message)
                n_reason = sum(1 for r, _ in self.seen_bad.values() if r == s.reason)
                if n_reason <= 3:
                    run.log(f"skipped {s.message}")
                elif n_reason == 4:
                    run.log(f"(further '{s.reason}' skips are counted, not shown)")

    def next_batch(self, run, step: int) -> torch.Tensor | None:
        batch, batch_skips = next(self.batches)
        self.batches_seen += 1
        self.note_skips(run, batch_skips)
        if batch is None:
            return None
        return batch.to(run.device, non_blocking=True).float().div_(127.5).sub_(1.0)  # [-1, 1]

    def empty_hint(self, run) -> str:
        counts: dict[str, int] = {}
        for reason, _ in self.seen_bad.values():
            counts[reason] = counts.get(reason, 0) + 1
        seen = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        return (f"{len(self.seen_bad)} of the {len(self.train_files)} training files could not be used so far"
                + (f" ({seen})" if seen else "") + f"; check {self.data}")

    def generator_loss(self, run, x, step):
        tcfg, model, disc = run.tcfg, run.model, run.disc
        with run.autocast():
            recon, _, aux = run.g_model(x)
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
        if disc is None or step <= tcfg.disc_start:
            return loss, logs, None
        disc.requires_grad_(False)
        with run.autocast():
            logits_fake, feats_fake = disc(recon)
        g_adv = hinge_g_loss(logits_fake.float())
        d_weight = tcfg.disc_weight * adaptive_weight(nll, g_adv, model.last_layer)
        d_weight = all_reduce(d_weight.reshape(1).clone()) / run.env.world_size  # one weight on every rank
        loss = loss + d_weight[0] * g_adv
        logs.update(g_adv=g_adv.detach(), d_weight=d_weight[0])
        if tcfg.feat_weight > 0:
            with torch.no_grad(), run.autocast():
                _, feats_real = disc(x)
            fm = feature_matching_loss(feats_real, feats_fake)
            loss = loss + tcfg.feat_weight * fm
            logs["feat"] = fm.detach()
        return loss, logs, (x, recon.detach())

    def discriminator_loss(self, run, carry, step):
        """Real and generated images in one batch: one DDP forward, one all-reduce."""
        x, recon = carry
        run.disc.requires_grad_(True)
        with run.autocast():
            logits, _ = run.d_model(torch.cat([x, recon]))
        l_real, l_fake = logits.float().chunk(2)
        d_loss = hinge_d_loss(l_real, l_fake)
        return d_loss, {"d_loss": d_loss.detach()}

    def postfix(self, avg: dict, rate: float) -> dict:
        return {"loss": avg["loss"], "rec": avg["rec"], "img/s": f"{rate:.1f}"}

    # ---- evaluation, checkpoints, the end
    def evaluate(self, run, step: int) -> dict | None:
        """Rank 0 scores the held-out images and writes samples/step_N.png (originals above reconstructions)."""
        eval_x, tcfg = self.eval_x, run.tcfg
        if not run.main or eval_x is None or not len(eval_x):
            return None
        res = evaluate_codec(run.model, eval_x, batch_size=64, keep=tcfg.sample_images)
        n = min(tcfg.sample_images, len(eval_x))
        if n:
            save_grid(eval_x[:n], res["recon"][:n], run.out / "samples" / f"step_{step:06d}.png")
        res = {k: v for k, v in res.items() if k not in ("recon", "counts")}
        run.metrics.log(step, **{f"eval/{k}": v for k, v in res.items()})
        run.log(f"step {step}: held-out PSNR {res['psnr']:.2f} dB, SSIM {res['ssim']:.3f}, "
                f"codebook usage {100 * res['codebook_usage']:.1f}%, perplexity {res['perplexity']:.1f}")
        return res

    def gathered_bad(self) -> dict:
        merged: dict = {}
        for part in all_gather_object(self.seen_bad):
            merged.update(part)
        return merged

    def checkpoint_state(self, run) -> dict:
        bad = self.gathered_bad()
        return {"batches_seen": self.batches_seen, "bad_files": {p: list(v) for p, v in bad.items()}}

    def save_codec(self, run) -> None:
        run.model.save(run.out)  # the codec directory: always the latest checkpoint's weights

    def summarize(self, run, summary: dict) -> dict:
        for _, (reason, msg) in sorted(self.gathered_bad().items()):
            self.skips.add(reason, msg)
        self.skips.merge(self.eval_skips)
        # Every rank must end with the same weights and the same codebook (DDP + the quantizer's own sync).
        sums = all_gather_object({"model": state_checksum(run.model), "quantizer": state_checksum(run.model.quantizer)})
        in_sync = all(c == sums[0] for c in sums)
        if run.main and not in_sync:
            print("warning: model or codebook state differs across ranks; this is a bug, please report it")
        return {"skipped": self.skips.to_dict(), "train_files": len(self.train_files),
                "eval_files": len(self.eval_files), "split": self.split_how, "ranks_in_sync": in_sync,
                "rank_checksums": sums}

    def report(self, run, summary: dict) -> None:
        ev = summary["eval"] or {}
        print(f"image codec -> {run.out}: step {summary['step']} after {summary['minutes']} min "
              f"({run.budget.stop_message()})"
              + (f", held-out PSNR {ev['psnr']:.2f} dB, SSIM {ev['ssim']:.3f}, "
                 f"usage {100 * ev['codebook_usage']:.1f}%" if ev else ""))
        print(f"inputs: {self.skips.summary()}")
        for reason, examples in self.skips.examples.items():
            for e in examples[:3]:
                print(f"  {reason}: {e}")


def train_image_codec(data, out, *, preset_name: str | None = None, overrides: list[str] | None = None,
                      eval_data=None, max_steps: int | None = None, max_minutes: float | None = None,
                      resume: bool = False, device: str | None = None, workers: int = 0,
                      progress: bool = True) -> dict:
    """Train (or resume) an image codec into `out`; returns the summary also written to train_summary.json."""
    return train_codec(ImageRecipe(data, eval_data, workers), out, preset_name=preset_name, overrides=overrides,
                       max_steps=max_steps, max_minutes=max_minutes, resume=resume, device=device,
                       progress=progress)


# ------------------------------------------------------------------------------------------------- CLI
def add_train_arguments(p) -> None:
    add_codec_train_arguments(
        p, data_help="a directory of images (with train/ and test/ subdirectories, if it has them) or documents.jsonl",
        eval_help="held-out images (default: see --data)", preset_help="tiny (CPU), base or large",
        set_help="override a codec or training config key (repeatable), e.g. --set quantizer=vq")
    p.add_argument("--workers", type=int, default=None, help="data loader processes (default: 0 on CPU, 4 on GPU)")


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
