"""The audio codec: a SEANet convolutional encoder/decoder around a residual quantizer (the EnCodec family).

- Encoder: a 7-tap conv, then one stage per stride (residual units with dilations 1, 3, 9, ..., ELU, and a
  strided conv of kernel 2*stride that doubles the channels), an optional LSTM over frames, ELU and a 7-tap
  conv down to the latent dimension. The decoder mirrors it with transposed convs. Weight norm everywhere
  (SEANet, EnCodec, DAC). `strides` are listed in decoder order, as in EnCodec: the encoder applies them in
  reverse, so `[8, 5, 4, 2]` first halves the rate and `[8, 5, 4, 4]` first quarters it.
- Quantizer: `ResidualVQ` from vector-quantize-pytorch on EnCodec's recipe (EMA codebooks, k-means init,
  dead-code replacement, 1024 codes per level), or `ResidualFSQ` (levels 4^5 = 1024 codes per level). It
  always runs in fp32 outside autocast. Quantizer dropout (EnCodec's variable bandwidth) trains one model
  for every number of levels, so `decode` accepts the first k levels for any k.
- Under torchrun the VQ codebook statistics (cluster sizes, sums, k-means, dead-code samples) are
  all-reduced by the quantizer itself, so every rank keeps the same codebooks.

Output length (the rule the multimodal tokenizer relies on): a clip of T samples at rate r is first
resampled to the codec's rate, giving T' = ceil(T * sample_rate / r) samples (torchaudio's rule), then
padded with zeros on the right to a whole number of frames. So

    frames = ceil(T' / hop)            hop = product(strides)
    decode(codes) has frames * hop samples at `info.sample_rate`

and the first T' samples of the decoded waveform line up with the input; trim the rest if needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from tessera.config import ConfigError, from_dict, preset, to_dict
from tessera.errors import TesseraError
from tessera.storage import atomic_write_json, load_tensors, save_tensors
from tessera.unimodal.media import MediaError
from tessera.unimodal.protocol import CODEC_FORMAT, CODEC_VERSION, CodecError, CodecInfo, read_codec_meta


# ------------------------------------------------------------------------------------------------ config
@dataclass
class AudioCodecConfig:
    sample_rate: int = 16000
    strides: list[int] = field(default_factory=lambda: [8, 5, 4, 2])  # decoder order; hop = product
    channels: int = 32  # width of the first conv; doubled at every stride
    max_channels: int = 512
    dim: int = 128  # latent (and codebook) dimension
    residual_layers: int = 1  # residual units per stage, dilations 1, 3, 9, ...
    lstm_layers: int = 2  # LSTM over frames at the bottleneck (0: none)
    quantizer: str = "rvq"  # "rvq" (ResidualVQ) or "fsq" (ResidualFSQ)
    num_quantizers: int = 8
    codebook_size: int = 1024  # rvq; fsq uses prod(fsq_levels)
    fsq_levels: list[int] = field(default_factory=lambda: [4, 4, 4, 4, 4])
    ema_decay: float = 0.99
    kmeans_iters: int = 10
    # A code whose EMA count per step falls below this is replaced by a random current input (EnCodec: 2,
    # for ~38k vectors per step). Scale it with the vectors per step: batch * frames per crop * ranks.
    dead_code_threshold: float = 2.0
    commitment_weight: float = 1.0
    activation: str = "elu"  # "elu" (SEANet) or "snake" (BigVGAN/DAC: learns periodic structure faster)

    @property
    def hop(self) -> int:
        return int(math.prod(self.strides))

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def levels(self) -> int:
        return self.num_quantizers

    @property
    def codes_per_level(self) -> int:
        return int(math.prod(self.fsq_levels)) if self.quantizer == "fsq" else self.codebook_size

    def validate(self) -> AudioCodecConfig:
        if self.quantizer not in ("rvq", "fsq"):
            raise ConfigError(f"quantizer must be 'rvq' or 'fsq', got {self.quantizer!r}")
        if not self.strides or any(s < 1 for s in self.strides):
            raise ConfigError(f"strides must be positive integers, got {self.strides}")
        if self.num_quantizers < 1:
            raise ConfigError("num_quantizers must be at least 1")
        if self.sample_rate <= 0:
            raise ConfigError("sample_rate must be positive")
        return self

    def info(self) -> CodecInfo:
        return CodecInfo(kind="audio", codebook_size=self.codes_per_level, levels=self.num_quantizers,
                         downsample=self.hop, sample_rate=self.sample_rate)


AUDIO_PRESETS: dict[str, AudioCodecConfig] = {
    # CPU: tests and the demo. 25 frames/s x 4 levels = 100 tokens/s (1.0 kbps); 0.7 M parameters. Narrow
    # full-rate stages (8 channels: the cost of a step is mostly there) and one LSTM layer at 25 frames/s
    # (almost free). EMA decay 0.9, not EnCodec's 0.99: with ~50 vectors per step (the tiny training
    # preset's batch of 4 crops of 12 frames) the codebooks must follow a fast-moving encoder; the dead-code
    # threshold is scaled to those vectors. See docs/audio_codec.md for the runs behind these choices.
    "tiny": AudioCodecConfig(strides=[8, 5, 4, 4], channels=8, max_channels=256, dim=64, lstm_layers=1,
                             num_quantizers=4, ema_decay=0.9, dead_code_threshold=0.0125),
    # GPU: 50 frames/s x 8 levels (4.0 kbps at full depth; quantizer dropout covers 1..8 levels).
    "base": AudioCodecConfig(strides=[8, 5, 4, 2], channels=32, max_channels=512, dim=128, lstm_layers=2,
                             num_quantizers=8, dead_code_threshold=2.0),
}


def audio_codec_config(name: str, overrides=None) -> AudioCodecConfig:
    from tessera.config import apply_overrides

    return apply_overrides(preset(AUDIO_PRESETS, name, "audio codec"), overrides).validate()


# ------------------------------------------------------------------------------------------------ layers
class SConv1d(nn.Module):
    """Weight-normed Conv1d padded so that an input of length L (a multiple of the stride) gives L / stride."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        total = (kernel - 1) * dilation - (stride - 1)  # EnCodec's non-causal padding, split evenly
        # The conv pads total // 2 on both sides itself (no padded copy of the input); an odd total puts
        # its extra sample on the left.
        self.conv = weight_norm(nn.Conv1d(cin, cout, kernel, stride=stride, dilation=dilation,
                                          padding=total // 2))
        self.extra_left = total % 2

    def forward(self, x):
        return self.conv(F.pad(x, (self.extra_left, 0)) if self.extra_left else x)


class SConvTranspose1d(nn.Module):
    """Weight-normed ConvTranspose1d trimmed so that length L becomes exactly L * stride."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.conv = weight_norm(nn.ConvTranspose1d(cin, cout, kernel, stride=stride))
        total = kernel - stride
        self.trim = (total - total // 2, total // 2)

    def forward(self, x):
        y = self.conv(x)
        left, right = self.trim
        return y[..., left: y.shape[-1] - right]


class Snake(nn.Module):
    """x + sin^2(a x) / a with a learned per channel (BigVGAN, DAC): a periodic bias that waveform decoders
    otherwise take many steps to learn."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        a = self.alpha
        return x + torch.sin(a * x).pow(2) / (a + 1e-9)


def activation(kind: str, channels: int) -> nn.Module:
    if kind == "elu":
        return nn.ELU()
    if kind == "snake":
        return Snake(channels)
    raise ValueError(f"unknown activation {kind!r}: elu or snake")


class ResidualUnit(nn.Module):
    """SEANet residual unit: act, dilated 3-tap conv to half width, act, 1x1 conv back; identity skip."""

    def __init__(self, dim: int, dilation: int, act: str = "elu"):
        super().__init__()
        self.block = nn.Sequential(activation(act, dim), SConv1d(dim, dim // 2, 3, dilation=dilation),
                                   activation(act, dim // 2), SConv1d(dim // 2, dim, 1))

    def forward(self, x):
        return x + self.block(x)


class FrameLSTM(nn.Module):
    """LSTM over the frame axis with a skip connection; (B, C, T) in and out."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, batch_first=True)

    def forward(self, x):
        y, _ = self.lstm(x.transpose(1, 2))
        return x + y.transpose(1, 2)


def _stage_channels(cfg: AudioCodecConfig) -> list[int]:
    """Channels before each encoder stage and after the last: [C, 2C, 4C, ...] capped at max_channels."""
    return [min(cfg.channels * 2**i, cfg.max_channels) for i in range(len(cfg.strides) + 1)]


class SEANetEncoder(nn.Module):
    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        ch = _stage_channels(cfg)
        layers: list[nn.Module] = [SConv1d(1, ch[0], 7)]
        act = cfg.activation
        for i, s in enumerate(reversed(cfg.strides)):
            layers += [ResidualUnit(ch[i], 3**j, act) for j in range(cfg.residual_layers)]
            layers += [activation(act, ch[i]), SConv1d(ch[i], ch[i + 1], 2 * s, stride=s)]
        if cfg.lstm_layers:
            layers.append(FrameLSTM(ch[-1], cfg.lstm_layers))
        layers += [activation(act, ch[-1]), SConv1d(ch[-1], cfg.dim, 7)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, 1, T) -> (B, dim, T / hop)
        return self.net(x)


class SEANetDecoder(nn.Module):
    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        ch = _stage_channels(cfg)[::-1]
        layers: list[nn.Module] = [SConv1d(cfg.dim, ch[0], 7)]
        if cfg.lstm_layers:
            layers.append(FrameLSTM(ch[0], cfg.lstm_layers))
        act = cfg.activation
        for i, s in enumerate(cfg.strides):
            layers += [activation(act, ch[i]), SConvTranspose1d(ch[i], ch[i + 1], 2 * s, stride=s)]
            layers += [ResidualUnit(ch[i + 1], 3**j, act) for j in range(cfg.residual_layers)]
        layers += [activation(act, ch[-1]), SConv1d(ch[-1], 1, 7)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # (B, dim, F) -> (B, 1, F * hop)
        return self.net(z)


class ResidualQuantizer(nn.Module):
    """ResidualVQ or ResidualFSQ behind one interface; codes are (B, n_q, frames)."""

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.kind = cfg.quantizer
        self.num_quantizers = cfg.num_quantizers
        try:  # k-means init warns (through loguru) on small batches; the trainer reports its own init size
            from loguru import logger

            logger.disable("vector_quantize_pytorch")
        except ImportError:
            pass
        if cfg.quantizer == "rvq":
            from vector_quantize_pytorch import ResidualVQ

            # Built with dropout on so that fewer levels can always be decoded; the trainer decides per
            # step whether dropout applies (set_dropout). Codebook sync under DDP is the library's default
            # whenever a process group exists at construction time.
            self.rq = ResidualVQ(dim=cfg.dim, num_quantizers=cfg.num_quantizers, codebook_size=cfg.codebook_size,
                                 decay=cfg.ema_decay, kmeans_init=True, kmeans_iters=cfg.kmeans_iters,
                                 threshold_ema_dead_code=cfg.dead_code_threshold,
                                 commitment_weight=cfg.commitment_weight, quantize_dropout=True)
        else:
            from vector_quantize_pytorch import ResidualFSQ

            self.rq = ResidualFSQ(dim=cfg.dim, levels=list(cfg.fsq_levels), num_quantizers=cfg.num_quantizers,
                                  quantize_dropout=True)

    def set_dropout(self, on: bool) -> None:
        self.rq.quantize_dropout = bool(on) and self.num_quantizers > 1

    def forward(self, z: torch.Tensor):
        """z (B, D, F) -> quantized (B, D, F), codes (B, n_q, F) (-1 for dropped levels), commitment loss."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = z.float().transpose(1, 2)  # (B, F, D)
            if self.kind == "rvq":
                q, codes, losses = self.rq(x)
                commit = losses.sum()
            else:
                q, codes = self.rq(x)
                commit = x.new_zeros(())
            return q.transpose(1, 2), codes.transpose(1, 2).long(), commit

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, k, F) with k <= n_q -> (B, D, F); the missing levels count as zero."""
        saved = self.rq.quantize_dropout
        self.rq.quantize_dropout = True  # the library accepts fewer levels than it has only with dropout on
        try:
            with torch.autocast(device_type=codes.device.type, enabled=False):
                return self.rq.get_output_from_indices(codes.transpose(1, 2)).transpose(1, 2).float()
        finally:
            self.rq.quantize_dropout = saved

    def codebooks(self) -> torch.Tensor | None:
        """The VQ codebooks (n_q, K, D), or None for FSQ (which has no learned codebook)."""
        return self.rq.codebooks if self.kind == "rvq" else None


class SEANetCodec(nn.Module):
    """The trainable network: encoder -> residual quantizer -> decoder."""

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = SEANetEncoder(cfg)
        self.quantizer = ResidualQuantizer(cfg)
        self.decoder = SEANetDecoder(cfg)

    def forward(self, wav: torch.Tensor, quantize: bool = True):
        """wav (B, 1, T), T a multiple of hop -> reconstruction (B, 1, T), codes (B, n_q, F), commitment loss.

        quantize=False bypasses the quantizer (a plain autoencoder; codes are None), for warm-up steps.
        """
        z = self.encoder(wav)
        if not quantize:
            return self.decoder(z), None, z.new_zeros(())
        q, codes, commit = self.quantizer(z)
        return self.decoder(q), codes, commit


def remove_weight_norm(model: nn.Module) -> nn.Module:
    """Fold weight norm into plain weights (faster inference; the outputs are the same)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


# -------------------------------------------------------------------------------------------------- API
def as_batch(waveform) -> torch.Tensor:
    """numpy or torch, (T,), (B, T) or (B, C, T) -> float32 (B, T), channels mixed to mono."""
    if isinstance(waveform, np.ndarray):
        waveform = torch.from_numpy(np.ascontiguousarray(waveform))
    if not isinstance(waveform, torch.Tensor):
        raise TypeError(f"waveform must be a numpy array or a torch tensor, got {type(waveform).__name__}")
    x = waveform.float()
    if x.ndim == 1:
        x = x[None]
    elif x.ndim == 3:
        x = x.mean(1)
    elif x.ndim != 2:
        raise ValueError(f"waveform must be (T,), (B, T) or (B, C, T), got shape {tuple(waveform.shape)}")
    if x.shape[-1] == 0:
        raise MediaError("empty", "zero-length audio")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise MediaError("nonfinite", f"{bad} NaN or Inf sample(s); refusing to encode")
    return x


class AudioCodec:
    """A trained audio codec: `encode(waveform, sample_rate) -> codes (B, n_q, F)`, `decode(codes) -> (B, F*hop)`.

    Always in eval mode; encode and decode run without gradients. See the module docstring for the
    output-length rule.
    """

    def __init__(self, model: SEANetCodec, device="cpu"):
        self.config = model.cfg
        self.info = self.config.info()
        self.model = model.eval()
        self.device = torch.device(device)
        self.model.to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str | Path, device="cpu") -> AudioCodec:
        meta = read_codec_meta(path)
        if meta["kind"] != "audio":
            raise CodecError(f"{path} holds a codec of kind {meta['kind']!r}, not an audio codec")
        try:
            cfg = from_dict(AudioCodecConfig, meta["config"]).validate()
        except (KeyError, ConfigError) as e:
            raise CodecError(f"{path}/codec.json: bad audio codec config ({e})") from None
        model = SEANetCodec(cfg)
        state = load_tensors(Path(path) / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CodecError(f"{path}/model.safetensors does not match its config: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        stored = CodecInfo.from_dict(meta["info"])
        if stored != cfg.info():
            raise CodecError(f"{path}/codec.json: info {stored} disagrees with the config ({cfg.info()})")
        # A codebook whose k-means init never ran would initialize itself from the first batch it encodes,
        # making codes depend on what was encoded first: refuse it rather than encode non-deterministically.
        fresh = [n for n, b in model.named_buffers() if n.endswith("initted") and not bool(b.all())]
        if fresh:
            raise CodecError(f"{path}: codebook(s) {', '.join(fresh)} were never initialized (saved before training "
                             "reached the quantizer's k-means init)")
        return cls(remove_weight_norm(model), device=device)

    @staticmethod
    def save_model(model: SEANetCodec, path: str | Path) -> None:
        """Write a codec directory (model.safetensors, then codec.json, each atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tensors(path / "model.safetensors", dict(model.state_dict()))
        atomic_write_json(path / "codec.json", {"format": CODEC_FORMAT, "version": CODEC_VERSION, "kind": "audio",
                                                "info": model.cfg.info().to_dict(), "config": to_dict(model.cfg)})

    def code_vectors(self) -> torch.Tensor:
        """The vector each code stands for, per level: (n_q, codebook_size, dim)."""
        q = self.model.quantizer
        if q.kind == "rvq":
            return q.codebooks().detach().float().cpu()
        implicit = q.rq.layers[0].implicit_codebook.detach().float().cpu()  # FSQ: the same grid at every level
        return implicit[None].expand(q.num_quantizers, -1, -1).clone()

    def to(self, device) -> AudioCodec:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ------------------------------------------------------------------------------ lengths
    def num_frames(self, num_samples: int, sample_rate: int | None = None) -> int:
        """Frames `encode` returns for a clip of `num_samples` at `sample_rate` (the codec's rate by default)."""
        sr = sample_rate or self.info.sample_rate
        n = math.ceil(num_samples * self.info.sample_rate / sr) if sr != self.info.sample_rate else num_samples
        return math.ceil(n / self.info.downsample)

    def prepare(self, waveform, sample_rate: int) -> torch.Tensor:
        """Any input -> mono float (B, T') at the codec's rate (not yet padded)."""
        x = as_batch(waveform)
        if int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if int(sample_rate) != self.info.sample_rate:
            import torchaudio.functional as AF

            x = AF.resample(x, int(sample_rate), self.info.sample_rate)
        return x

    # ------------------------------------------------------------------------------- codec
    @torch.no_grad()
    def encode(self, waveform, sample_rate: int, batch_size: int = 32) -> torch.Tensor:
        """waveform (T,), (B, T) or (B, C, T), numpy or torch, any rate -> int64 codes (B, n_q, ceil(T'/hop))."""
        x = self.prepare(waveform, sample_rate)
        hop = self.info.downsample
        frames = math.ceil(x.shape[-1] / hop)
        x = F.pad(x, (0, frames * hop - x.shape[-1]))
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i: i + batch_size, None].to(self.device)
            _, codes, _ = self.model.quantizer(self.model.encoder(xb))
            out.append(codes.cpu())
        return torch.cat(out).long()

    @torch.no_grad()
    def decode(self, codes, n_q: int | None = None) -> torch.Tensor:
        """codes (B, k, F) for any k <= n_q (the first k levels) -> float waveform (B, F * hop) in [-1, 1]."""
        c = torch.as_tensor(codes)
        if c.ndim != 3:
            raise ValueError(f"codes must be (B, levels, frames), got shape {tuple(c.shape)}")
        if n_q is not None:
            if not 1 <= n_q <= c.shape[1]:
                raise ValueError(f"n_q={n_q} must be between 1 and the {c.shape[1]} levels given")
            c = c[:, :n_q]
        if not 1 <= c.shape[1] <= self.info.levels:
            raise ValueError(f"codes have {c.shape[1]} levels; this codec has {self.info.levels}")
        if c.shape[-1] == 0:
            raise ValueError("codes have zero frames")
        if c.min() < 0 or c.max() >= self.info.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.info.codebook_size})")
        c = c.long().to(self.device)
        y = self.model.decoder(self.model.quantizer.decode(c))
        return y[:, 0].clamp(-1.0, 1.0).float().cpu()

    def reconstruct(self, waveform, sample_rate: int, n_q: int | None = None) -> torch.Tensor:
        """encode then decode, trimmed to the input's length at the codec's rate."""
        x = self.prepare(waveform, sample_rate)
        return self.decode(self.encode(x, self.info.sample_rate), n_q=n_q)[..., : x.shape[-1]]

    def __repr__(self) -> str:
        i = self.info
        return (f"AudioCodec({i.sample_rate} Hz, hop {i.downsample} ({i.frame_rate:g} frames/s), "
                f"{i.levels} x {i.codebook_size} codes, {self.config.quantizer})")


class AudioCodecError(TesseraError):
    """A problem with audio codec training or evaluation input that the user can fix."""
