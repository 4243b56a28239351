"""The codec protocol: what the multimodal tokenizer needs from an image or audio codec.

A codec turns a tensor into integer codes and back, and states the facts the vocabulary layout needs.

    image codec:  encode(images (B, 3, H, W) float in [0, 1]) -> codes (B, H/f, W/f) int64
                  decode(codes (B, h, w)) -> images (B, 3, h*f, w*f) float in [0, 1]
    audio codec:  encode(waveform (B, T) float, sample_rate) -> codes (B, n_q, frames) int64
                  decode(codes (B, k, frames), n_q=None) -> waveform (B, frames * hop) at info.sample_rate

`ImageCodec` and `AudioCodec` implement it with neural nets; `tests/fixtures.py` implements it with
arithmetic, so the span logic can be tested without training anything.

A codec directory holds `codec.json` (format, version, kind, `CodecInfo`, the codec's config) and
`model.safetensors`; `read_codec_meta` checks one without loading weights.

A codec evaluation may also take a `MediaJudge`: a classifier whose accuracy on the reconstructions, next to
its accuracy on the originals, says how much of what matters a codec keeps. The evaluations take the judge
as an argument; the command line builds one (the digits judges of `tessera.eval.judges`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from tessera.errors import TesseraError
from tessera.storage import read_header


@dataclass(frozen=True)
class CodecInfo:
    kind: str  # "image" or "audio"
    codebook_size: int  # codes per level
    levels: int = 1  # residual levels (audio); 1 for images
    downsample: int = 1  # image: pixels per code along a side; audio: samples per frame (hop length)
    sample_rate: int = 0  # audio: the codec's rate in Hz; 0 for images
    default_size: tuple[int, int] | None = None  # image: (H, W) in pixels used when none is asked for
    max_size: int = 0  # image: the longest side, in pixels, the tokenizer resizes larger images to; 0: none

    def to_dict(self) -> dict:
        d = asdict(self)
        d["default_size"] = list(self.default_size) if self.default_size else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CodecInfo":
        d = dict(d)
        if d.get("default_size") is not None:
            d["default_size"] = tuple(int(x) for x in d["default_size"])
        return cls(**d)

    @property
    def frame_rate(self) -> float:
        """Audio frames per second."""
        return self.sample_rate / self.downsample if self.kind == "audio" else 0.0


@runtime_checkable
class ImageCodecLike(Protocol):
    info: CodecInfo

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class AudioCodecLike(Protocol):
    info: CodecInfo

    def encode(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor, n_q: int | None = None) -> torch.Tensor: ...


CODEC_FORMAT = "tessera-codec"
CODEC_VERSION = 1
CODEC_FILES = ("codec.json", "model.safetensors")


class CodecError(TesseraError):
    """A codec directory that is missing or inconsistent."""


def read_codec_meta(path: str | Path) -> dict:
    p = Path(path) / "codec.json"
    meta = read_header(p, CODEC_FORMAT, CODEC_VERSION, "codec", CodecError)
    if meta.get("kind") not in ("image", "audio"):
        raise CodecError(f"{p}: unknown codec kind {meta.get('kind')!r}")
    if not (Path(path) / "model.safetensors").is_file():
        raise CodecError(f"{path}: model.safetensors is missing")
    return meta


def read_codec_info(path: str | Path) -> CodecInfo:
    """The codec's `CodecInfo`, read from codec.json without loading weights."""
    return CodecInfo.from_dict(read_codec_meta(path)["info"])


@runtime_checkable
class MediaJudge(Protocol):
    """What a codec evaluation needs from a judge: the true label of an evaluated file, and the labels the
    judge reads in media (PIL images, or 1-D waveforms with `sample_rate=`)."""

    source: str  # where the labels come from, for messages ("corpus/meta.json")

    def label(self, path: str | Path) -> int | None:
        """The file's true label; None when the judge has none for it."""
        ...

    def predict(self, media: Sequence, **kwargs) -> Sequence[int]: ...


def judge_accuracy(judge: MediaJudge, media: Sequence, labels: Sequence[int], **kwargs) -> float:
    """The fraction of `media` the judge labels as `labels`."""
    return float((np.asarray(judge.predict(media, **kwargs)) == np.asarray(labels)).mean())


def fit_image_size(width: int, height: int, factor: int, max_side: int = 0) -> tuple[int, int]:
    """The (width, height) an image is resized to before encoding.

    Each side becomes a multiple of `factor` (rounded to the nearest, at least one code); if `max_side` is
    set, the image is first scaled down, keeping its aspect ratio, so its longer side is at most `max_side`.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    scale = 1.0
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
    w = max(factor, int(round(width * scale / factor)) * factor)
    h = max(factor, int(round(height * scale / factor)) * factor)
    if max_side:
        w, h = min(w, max_side // factor * factor), min(h, max_side // factor * factor)
    return w, h


def fit_image_area(width: int, height: int, factor: int, max_pixels: int, max_side: int = 0) -> tuple[int, int]:
    """`fit_image_size`, and then, when that holds more than `max_pixels`, the image scaled down (aspect ratio
    kept) to at most `max_pixels`, each side rounded down to a multiple of `factor`. A side is never less than
    one code; when a very elongated image holds its short side at one code, its long side takes the rest of
    the budget."""
    w, h = fit_image_size(width, height, factor, max_side)
    if max_pixels and w * h > max_pixels:
        scale = (max_pixels / (width * height)) ** 0.5
        w = max(factor, int(width * scale / factor) * factor)
        h = max(factor, int(height * scale / factor) * factor)
        if w * h > max_pixels:  # a side held at one code
            if h == factor:
                w = max(factor, max_pixels // h // factor * factor)
            else:
                h = max(factor, max_pixels // w // factor * factor)
    return w, h
