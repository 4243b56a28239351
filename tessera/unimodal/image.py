"""The image codec: a convolutional VQ autoencoder that turns pixels into a grid of discrete codes.

- Encoder and decoder follow the taming-transformers / LlamaGen VQGAN layout: ResNet blocks with
  GroupNorm and SiLU, one stride-2 convolution per level (so `len(channel_mult) - 1` halvings give the
  downsampling factor f = 8 or 16), and self-attention only in the middle block, at the coarsest grid,
  where it is cheap. Every layer is convolutional (attention runs over however many positions there
  are), so any height and width that are multiples of f work, not only the training crop size.
- Quantizer, from vector-quantize-pytorch:
  - `fsq` (default, Mentzer et al. 2023): each of a few channels is bounded and rounded to a fixed number
    of levels. The codebook is implicit (the product of the levels), so there are no dead codes, no
    commitment loss and no state to synchronize across processes.
  - `vq`: a learned codebook with LlamaGen's recipe: low-dimensional (8-d), l2-normalized codes (cosine
    similarity), EMA updates and replacement of dead codes; codebook statistics are all-reduced under DDP.
- The quantizer always runs in fp32 with autocast off: rounding and nearest-code search in bf16 would
  pick different codes from one run to the next.
- `decode(encode(x))` equals the eval-mode forward pass. For `vq` the indices are looked up here rather
  than with `VectorQuantize.get_output_from_indices`: in vector-quantize-pytorch 1.32, with
  `accept_image_fmap=True` and `codebook_dim != dim`, that function moves channels first *before* its
  output projection (a Linear over the last axis), so it fails or returns the wrong tensor.

Images enter as float (B, 3, H, W) in [0, 1] (or PIL images) and leave the same way; inside, the network
works on [-1, 1]. Codes are int64 (B, H/f, W/f), row-major like the vocabulary's image spans.

    codec = ImageCodec.load("runs/img")          # codec.json + model.safetensors
    codes = codec.encode(images)                 # (B, H/f, W/f) int64
    images = codec.decode(codes)                 # (B, 3, H, W) float in [0, 1]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from tessera.config import ConfigError, from_dict, preset, to_dict
from tessera.errors import TesseraError
from tessera.storage import atomic_write_json, load_tensors, save_tensors
from tessera.unimodal.media import pil_to_tensor
from tessera.unimodal.protocol import CODEC_FORMAT, CODEC_VERSION, CodecError, CodecInfo, read_codec_meta


class ImageSizeError(TesseraError):
    """An image whose sides are not multiples of the codec's downsampling factor."""


@dataclass
class ImageCodecConfig:
    # network
    channels: int = 128  # width of the first level
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # f = 2 ** (len - 1)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more
    z_channels: int = 256  # width of the latent the quantizer projects from and to
    norm_groups: int = 32
    mid_attention: bool = True
    dropout: float = 0.0
    # quantizer
    quantizer: str = "fsq"  # "fsq" or "vq"
    fsq_levels: list[int] = field(default_factory=lambda: [8, 8, 8, 6, 5])  # 15,360 codes
    vq_codebook_size: int = 16384
    vq_dim: int = 8  # LlamaGen: low-dimensional, l2-normalized codes
    vq_decay: float = 0.99  # EMA decay of the codebook
    vq_commitment_weight: float = 0.25
    vq_dead_code_threshold: float = 2.0  # EMA cluster size below which a code is replaced; 0: never
    # geometry
    image_size: int = 256  # training crop side and the default size the tokenizer uses
    max_size: int = 512  # the longest side the multimodal tokenizer resizes larger images to

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return int(np.prod(self.fsq_levels)) if self.quantizer == "fsq" else self.vq_codebook_size

    def validate(self) -> "ImageCodecConfig":
        if self.quantizer not in ("fsq", "vq"):
            raise ConfigError(f"quantizer must be 'fsq' or 'vq', got {self.quantizer!r}")
        if len(self.channel_mult) < 2:
            raise ConfigError("channel_mult needs at least two levels (one downsampling)")
        for m in self.channel_mult:
            if (self.channels * m) % self.norm_groups:
                raise ConfigError(f"channels*mult = {self.channels * m} is not divisible by norm_groups={self.norm_groups}")
        if self.quantizer == "fsq" and any(lv < 3 for lv in self.fsq_levels):
            raise ConfigError(f"fsq_levels must all be >= 3, got {self.fsq_levels}")
        f = self.downsample
        if self.image_size % f or (self.max_size and self.max_size % f):
            raise ConfigError(f"image_size ({self.image_size}) and max_size ({self.max_size}) must be multiples of f={f}")
        return self

    def info(self) -> CodecInfo:
        s = self.image_size
        return CodecInfo(kind="image", codebook_size=self.codebook_size, levels=1, downsample=self.downsample,
                         default_size=(s, s), max_size=self.max_size)


PRESETS: dict[str, ImageCodecConfig] = {
    # CPU: tests and the digits demo. f=8 at 32 px: a 4x4 grid of 16 codes, 1,000 codes in the codebook.
    # Narrow at full resolution (16 channels), where CPU time goes; wider at the coarse levels.
    "tiny": ImageCodecConfig(channels=16, channel_mult=[1, 2, 4, 8], num_res_blocks=1, z_channels=64,
                             norm_groups=4, fsq_levels=[8, 5, 5, 5], vq_codebook_size=1024, image_size=32,
                             max_size=64),
    # GPU: f=16 at 256 px (16x16 = 256 codes), LlamaGen-sized network, 15,360 FSQ codes.
    "base": ImageCodecConfig(),
    # GPU: wider deeper levels and a 64,000-code FSQ codebook.
    "large": ImageCodecConfig(channels=128, channel_mult=[1, 2, 2, 4, 4], num_res_blocks=3, z_channels=256,
                              fsq_levels=[8, 8, 8, 5, 5, 5], vq_codebook_size=65536, image_size=256, max_size=1024),
}


def image_preset(name: str) -> ImageCodecConfig:
    return preset(PRESETS, name, "image codec")


# ---------------------------------------------------------------------------------------------- blocks
def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions (runs at the coarsest grid only)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: exactly H/2 x W/2 for even sides


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool, dropout: float):
        super().__init__()
        self.block1 = ResnetBlock(ch, ch, groups, dropout)
        self.attn = AttnBlock(ch, groups) if attention else nn.Identity()
        self.block2 = ResnetBlock(ch, ch, groups, dropout)

    def forward(self, x):
        return self.block2(self.attn(self.block1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: ImageCodecConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels = []
        cin = ch
        for i, m in enumerate(cfg.channel_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * m, g, cfg.dropout))
                cin = ch * m
            level = nn.Module()
            level.blocks = nn.Sequential(*blocks)
            level.down = Downsample(cin) if i < len(cfg.channel_mult) - 1 else nn.Identity()
            levels.append(level)
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(cin, g, cfg.mid_attention, cfg.dropout)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, z, H/f, W/f)
        h = self.conv_in(x)
        for level in self.levels:
            h = level.down(level.blocks(h))
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: ImageCodecConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        cin = ch * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = MidBlock(cin, g, cfg.mid_attention, cfg.dropout)
        levels = []
        for i, m in reversed(list(enumerate(cfg.channel_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * m, g, cfg.dropout))
                cin = ch * m
            level = nn.Module()
            level.blocks = nn.Sequential(*blocks)
            level.up = Upsample(cin) if i > 0 else nn.Identity()
            levels.append(level)
        self.levels = nn.ModuleList(levels)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):  # (B, z, h, w) -> (B, 3, h*f, w*f) in about [-1, 1]
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level.up(level.blocks(h))
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------- quantizer
class Quantizer(nn.Module):
    """FSQ or VectorQuantize behind one interface; always fp32, autocast off.

    forward(z (B, C, h, w)) -> (zq (B, C, h, w), codes (B, h, w) int64, aux loss (scalar))
    latent(codes (B, h, w)) -> zq (B, C, h, w), equal to forward's zq in eval mode
    """

    def __init__(self, cfg: ImageCodecConfig, sync_codebook: bool = False):
        super().__init__()
        self.kind = cfg.quantizer
        if self.kind == "fsq":
            from vector_quantize_pytorch import FSQ

            self.q = FSQ(levels=list(cfg.fsq_levels), dim=cfg.z_channels)
        else:
            from vector_quantize_pytorch import VectorQuantize

            self.q = VectorQuantize(
                dim=cfg.z_channels,
                codebook_size=cfg.vq_codebook_size,
                codebook_dim=cfg.vq_dim,
                use_cosine_sim=True,
                decay=cfg.vq_decay,
                commitment_weight=cfg.vq_commitment_weight,
                threshold_ema_dead_code=cfg.vq_dead_code_threshold,
                kmeans_init=False,
                accept_image_fmap=True,
                sync_codebook=sync_codebook,
            )

    def _fp32(self, device: torch.device):
        return torch.autocast(device_type=device.type, enabled=False)

    def forward(self, z: torch.Tensor):
        with self._fp32(z.device):
            z = z.float()
            if self.kind == "fsq":
                zq, codes = self.q(z)
                aux = z.new_zeros(())
            else:
                zq, codes, aux = self.q(z)
        return zq, codes.long(), aux

    def latent(self, codes: torch.Tensor) -> torch.Tensor:
        with self._fp32(codes.device):
            if self.kind == "fsq":
                return self.q.indices_to_codes(codes)  # (B, C, h, w): projected and channels first
            # Not get_output_from_indices (broken for image fmaps with codebook_dim != dim in 1.32; see top).
            e = self.q.codebook[codes]  # (B, h, w, vq_dim), l2-normalized codes
            return self.q.project_out(e).permute(0, 3, 1, 2).contiguous()

    @property
    def codebook(self) -> torch.Tensor | None:
        """The learned codebook (vq), or None (fsq's codebook is implicit)."""
        return self.q.codebook if self.kind == "vq" else None


# --------------------------------------------------------------------------------------------- codec
class ImageCodec(nn.Module):
    """The image codec: encoder, quantizer, decoder, and the codec protocol on top."""

    def __init__(self, config: ImageCodecConfig | None = None, sync_codebook: bool = False):
        super().__init__()
        self.config = (config or image_preset("tiny")).validate()
        self.info = self.config.info()
        self.encoder = Encoder(self.config)
        self.quantizer = Quantizer(self.config, sync_codebook=sync_codebook)
        self.decoder = Decoder(self.config)

    # ------------------------------------------------------------------------------ training forward
    def forward(self, x: torch.Tensor):
        """x (B, 3, H, W) in [-1, 1] -> (reconstruction in [-1, 1], codes (B, h, w), quantizer aux loss)."""
        zq, codes, aux = self.quantizer(self.encoder(x))
        return self.decoder(zq), codes, aux  # under autocast the decoder's convs take the fp32 zq as they like

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight: the adaptive GAN weight compares gradient norms here."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------------------------- protocol
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @contextlib.contextmanager
    def _inference(self):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def _as_batch(self, images) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images to encode")
            if isinstance(images[0], Image.Image):
                sizes = {im.size for im in images}
                if len(sizes) > 1:
                    raise ImageSizeError(f"images in one batch must share a size, got {sorted(sizes)}")
                images = [pil_to_tensor(im) for im in images]
            images = torch.stack([torch.as_tensor(t) for t in images])
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ImageSizeError(f"images must be (B, 3, H, W) or (3, H, W), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif not x.is_floating_point():
            raise ImageSizeError(f"images must be float in [0, 1] or uint8, got {x.dtype}")
        f = self.info.downsample
        H, W = x.shape[-2:]
        if H % f or W % f or H == 0 or W == 0:
            raise ImageSizeError(
                f"image size {H}x{W} is not a multiple of the codec's downsampling factor {f}; "
                f"resize to e.g. {max(f, round(H / f) * f)}x{max(f, round(W / f) * f)} first"
            )
        return x.to(self.device, torch.float32)

    def encode(self, images) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1], a PIL image or a list of same-size PIL images -> codes (B, H/f, W/f)."""
        x = self._as_batch(images)
        with self._inference():
            _, codes, _ = self.quantizer(self.encoder(x * 2.0 - 1.0))
        return codes

    def decode(self, codes) -> torch.Tensor:
        """codes (B, h, w) or (h, w), ints in [0, K) -> images (B, 3, h*f, w*f) float in [0, 1]."""
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3 or 0 in c.shape:
            raise ValueError(f"codes must be (B, h, w) or (h, w), got shape {tuple(c.shape)}")
        if c.is_floating_point() or c.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {c.dtype}")
        K = self.info.codebook_size
        if int(c.min()) < 0 or int(c.max()) >= K:
            raise ValueError(f"codes must lie in [0, {K}), got [{int(c.min())}, {int(c.max())}]")
        with self._inference():
            y = self.decoder(self.quantizer.latent(c.to(self.device, torch.long)))
        return ((y.float() + 1.0) / 2.0).clamp_(0.0, 1.0)

    def reconstruct(self, images) -> torch.Tensor:
        """decode(encode(images)): what the multimodal model sees of an image."""
        return self.decode(self.encode(images))

    # ---------------------------------------------------------------------------------------- files
    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """The latent each code stands for (what the decoder receives): (1, codebook_size, z_channels)."""
        codes = torch.arange(self.info.codebook_size, device=self.device).view(1, -1, 1)
        return self.quantizer.latent(codes)[0, :, :, 0].T[None].float().cpu()

    def codec_meta(self) -> dict:
        return {"format": CODEC_FORMAT, "version": CODEC_VERSION, "kind": "image", "info": self.info.to_dict(),
                "config": to_dict(self.config)}

    def save(self, path: str | Path) -> None:
        """Write model.safetensors, then codec.json (last: its presence marks a complete directory)."""
        path = Path(path)
        save_tensors(path / "model.safetensors", self.state_dict())
        atomic_write_json(path / "codec.json", self.codec_meta())

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "ImageCodec":
        meta = read_codec_meta(path)
        if meta["kind"] != "image":
            raise CodecError(f"{path} holds a codec of kind {meta['kind']!r}, not an image codec")
        cfg = from_dict(ImageCodecConfig, meta["config"])
        codec = cls(cfg)
        if codec.info.to_dict() != meta["info"]:
            raise CodecError(f"{path}: codec.json's info {meta['info']} does not match its config ({codec.info})")
        state = load_tensors(Path(path) / "model.safetensors")
        try:
            codec.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CodecError(f"{path}: model.safetensors does not fit codec.json's config ({e})") from None
        return codec.to(device).eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

