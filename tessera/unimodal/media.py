"""Reading images and audio from files, with every bad input turned into a named reason.

Data pipelines (codec training, pretokenization, evaluation) call `load_image` / `load_audio` and catch
`MediaError`; its `reason` is a short key ("corrupt", "too_large", ...) that they count and report, so a
bad file is a counted skip, never a crash and never a silent loss.

Images: any Pillow format; EXIF orientation applied; grayscale, palette, CMYK and 16-bit images converted
to 8-bit RGB; transparency composited on white; a pixel cap checked *before* decoding (decompression bombs).
Audio: anything libsndfile reads (WAV 8/16/24/32-bit and float, FLAC, OGG/Vorbis, Opus); mixed to mono;
NaN/Inf refused; samples far outside [-1, 1] refused (a float file written unnormalized); a WAV whose header
promises more samples than the file holds refused (libsndfile would read the rest silently); sample rates
outside 1-384 kHz refused; a duration cap checked from the header before reading. Resampling costs at most
about a million kernel taps whatever the two rates (see `resample`).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import ClassVar

import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageOps

from tessera.errors import TesseraError

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_AUDIO_SECONDS = 600.0
CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped
MAX_SAMPLE_ABS = 4.0  # |sample| above this in a decoded file: not audio in [-1, 1] but unnormalized values
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000  # files at other rates are refused (bad_sample_rate)
MAX_RESAMPLE_TAPS = 2**20  # exact resampling when its kernel is at most this large (see `resample`)


class MediaError(TesseraError):
    """A file that cannot be used; `reason` is a short key for counting skips."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------- audio type
@dataclass
class Audio:
    """A waveform with its sample rate: `waveform` is float32, (T,) mono or (C, T).

    A 2-D array given as (T, C), the layout soundfile returns, is transposed: an array with at most
    `MAX_CHANNELS` rows is read as (C, T), else one with at most `MAX_CHANNELS` columns as (T, C); anything
    else is refused rather than read as hundreds of channels.
    """

    MAX_CHANNELS: ClassVar[int] = 8

    waveform: np.ndarray
    sample_rate: int

    def __post_init__(self):
        w = self.waveform
        if isinstance(w, torch.Tensor):
            w = w.detach().float().cpu().numpy()
        w = np.asarray(w, dtype=np.float32)
        if w.ndim not in (1, 2):
            raise ValueError(f"waveform must be (T,) or (C, T), got shape {w.shape}")
        if w.ndim == 2 and w.shape[0] > self.MAX_CHANNELS:
            if w.shape[1] > self.MAX_CHANNELS:
                raise ValueError(f"waveform of shape {w.shape}: expected (T,), (C, T) or (T, C) with at most "
                                 f"{self.MAX_CHANNELS} channels")
            w = np.ascontiguousarray(w.T)  # (T, C) -> (C, T)
        self.waveform = w
        self.sample_rate = int(self.sample_rate)
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[-1])

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    def mono(self) -> np.ndarray:
        return self.waveform if self.waveform.ndim == 1 else self.waveform.mean(axis=0)

    def save(self, path: str | os.PathLike, subtype: str | None = None) -> None:
        data = self.waveform if self.waveform.ndim == 1 else self.waveform.T
        sf.write(str(path), np.clip(data, -1.0, 1.0), self.sample_rate, subtype=subtype)

    @classmethod
    def load(cls, path, **kwargs) -> "Audio":
        return load_audio(path, **kwargs)

    def __repr__(self) -> str:
        return f"Audio({self.duration:.2f}s @ {self.sample_rate} Hz, shape={tuple(self.waveform.shape)})"


# ----------------------------------------------------------------------------------------------- images
def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float images (modes I;16*, I, F) scaled to 8-bit grayscale."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
        a = a / 65535.0 * 255.0
    elif im.mode == "F" and a.max(initial=0) <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any Pillow image to 8-bit RGB: alpha composited on `background`, palette/CMYK/16-bit converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA", "La"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        bg = Image.new("RGB", im.size, background)
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def load_image(source, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open an image file (path, bytes or file object) as 8-bit RGB with EXIF orientation applied.

    Raises `MediaError` with reason "missing", "corrupt" or "too_large"; its message starts with `name`
    (default: the path, or "<image>").
    """
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<image>")
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise MediaError("missing", f"{name}: no such file")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
            w, h = im.size
            if w * h > max_pixels:
                raise MediaError("too_large", f"{name}: {w}x{h} = {w * h} pixels exceeds the cap of {max_pixels}")
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError("too_large", f"{name}: {e}") from None
    except Exception as e:  # Pillow raises many types for truncated or corrupt data
        raise MediaError("corrupt", f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float in [0, 1]."""
    a = np.asarray(to_rgb(im), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    a = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, mode="RGB")


# ------------------------------------------------------------------------------------------------ audio
def check_waveform(w: np.ndarray, name: str = "<audio>") -> dict:
    """Refuse non-finite samples; report clipping (kept, but counted). Returns {"clipped": fraction}."""
    if w.size == 0:
        raise MediaError("empty", f"{name}: zero-length audio")
    if not np.isfinite(w).all():
        bad = int((~np.isfinite(w)).sum())
        raise MediaError("nonfinite", f"{name}: {bad} NaN or Inf sample(s); refusing the clip")
    clipped = float((np.abs(w) >= CLIP_LEVEL).mean())
    return {"clipped": clipped}


def _wav_data_size(f) -> tuple[int, int, int] | None:
    """(bytes the data chunk of a RIFF/WAVE file declares, bytes the file holds after the chunk's header,
    bytes per frame), or None when `f` is not such a file or its size field is a streaming placeholder."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    end = f.seek(0, io.SEEK_END)
    pos, block_align = 12, 0
    while pos + 8 <= end:
        f.seek(pos)
        hdr = f.read(8)
        cid, size = hdr[:4], int.from_bytes(hdr[4:8], "little")
        if cid == b"fmt ":
            fmt = f.read(min(size, 16))
            block_align = int.from_bytes(fmt[12:14], "little") if len(fmt) >= 14 else 0
        elif cid == b"data":
            if size in (0, 0xFFFFFFFF):  # written by a stream that never went back to fill it in
                return None
            return size, end - pos - 8, block_align
        pos += 8 + size + (size & 1)
    return None


def _check_not_truncated(source, name: str) -> None:
    """Refuse a WAV whose header promises more samples than the file holds (libsndfile reads what is there
    without a word)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                found = _wav_data_size(f)
        elif hasattr(source, "seek") and hasattr(source, "read"):
            found = _wav_data_size(source)
            source.seek(0)
        else:
            return
    except OSError:
        return  # unreadable here: soundfile reports it
    if found is None:
        return
    declared, held, align = found
    if held < declared:
        if align:
            raise MediaError("truncated", f"{name}: truncated: the header promises {declared // align} frames, "
                                          f"the file holds {held // align}")
        raise MediaError("truncated", f"{name}: truncated: the header promises {declared} bytes of samples, "
                                      f"the file holds {held}")


def load_audio(
    source,
    *,
    sample_rate: int | None = None,
    max_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
    mono: bool = True,
    name: str | None = None,
) -> Audio:
    """Read an audio file with soundfile, mix to mono and resample to `sample_rate` (if given).

    Raises `MediaError` with reason "missing", "corrupt", "truncated", "empty", "too_long", "nonfinite",
    "out_of_range" (a sample beyond +-`MAX_SAMPLE_ABS`), "bad_sample_rate" (outside `MIN_SAMPLE_RATE` to
    `MAX_SAMPLE_RATE`) or "decode_error" (resampling failed). The duration cap is checked from the header,
    before the samples are read. Callers that want long files split instead of refused read them with
    `max_seconds=None` and call `split_audio`. Messages start with `name` (default: the path, or "<audio>").
    """
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<audio>")
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise MediaError("missing", f"{name}: no such file")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        info = sf.info(source)
        if hasattr(source, "seek"):
            source.seek(0)
    except Exception as e:
        raise MediaError("corrupt", f"{name}: cannot read audio header ({e})") from None
    if info.frames == 0 or info.samplerate <= 0:
        raise MediaError("empty", f"{name}: zero-length audio")
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise MediaError("bad_sample_rate", f"{name}: a sample rate of {info.samplerate} Hz is outside "
                                            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    seconds = info.frames / info.samplerate
    if max_seconds is not None and seconds > max_seconds:
        raise MediaError("too_long", f"{name}: {seconds:.1f} s is longer than the cap of {max_seconds:.1f} s")
    _check_not_truncated(source, name)
    try:
        data, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:
        raise MediaError("corrupt", f"{name}: cannot decode audio ({e})") from None
    if data.shape[0] == 0:
        raise MediaError("empty", f"{name}: zero-length audio")
    w = data.mean(axis=1) if mono else data.T
    check_waveform(w, name)
    peak = float(np.abs(w).max())
    if peak > MAX_SAMPLE_ABS:
        raise MediaError("out_of_range", f"{name}: samples reach {peak:.3g}, far outside [-1, 1] (a float file "
                                         f"written without scaling?)")
    audio = Audio(np.ascontiguousarray(w), sr)
    if sample_rate and sample_rate != sr:
        try:
            audio = resample(audio, sample_rate)
        except Exception as e:  # noqa: BLE001 - a file that cannot be resampled is that file's problem
            raise MediaError("decode_error", f"{name}: cannot resample {sr} Hz to {sample_rate} Hz "
                                             f"({type(e).__name__}: {e})") from None
    return audio


def resample_ratio(orig: int, new: int) -> tuple[int, int]:
    """The (orig, new) rates `resample` hands torchaudio: the exact pair when its kernel (orig/g x new/g taps,
    g their gcd) is at most `MAX_RESAMPLE_TAPS`, else the closest ratio whose kernel is.

    torchaudio's cost grows with (orig/g)(new/g): 15,999 Hz to 16,000 Hz builds a 16,000 x 16,000 kernel
    (seconds and gigabytes for a 50 ms clip). The closest small ratio to 16,000/15,999 is 1: the clip keeps
    its samples and plays 0.006% slower. Every such approximation is off by less than 0.1%.
    """
    g = math.gcd(orig, new)
    if (orig // g) * (new // g) <= MAX_RESAMPLE_TAPS:
        return orig, new
    target = Fraction(new, orig)
    limit = max(1, int(math.sqrt(MAX_RESAMPLE_TAPS / float(target))))
    while True:
        r = target.limit_denominator(limit)
        if r.numerator * r.denominator <= MAX_RESAMPLE_TAPS or limit == 1:
            return r.denominator, r.numerator
        limit //= 2


def resample(audio: Audio, sample_rate: int) -> Audio:
    """Resample with torchaudio's band-limited sinc interpolation, at a bounded cost (`resample_ratio`)."""
    if audio.sample_rate == sample_rate:
        return audio
    orig, new = resample_ratio(audio.sample_rate, sample_rate)
    if orig == new:
        return Audio(audio.waveform, sample_rate)
    import torchaudio.functional as AF

    return Audio(AF.resample(torch.from_numpy(audio.waveform), orig, new).numpy(), sample_rate)


def split_audio(audio: Audio, max_seconds: float) -> list[Audio]:
    """Cut a clip into consecutive pieces of at most `max_seconds` (the last one may be shorter)."""
    n = max(1, int(max_seconds * audio.sample_rate))
    w = audio.waveform
    return [Audio(w[..., i : i + n], audio.sample_rate) for i in range(0, audio.num_samples, n)]


def audio_to_tensor(audio: Audio, sample_rate: int) -> torch.Tensor:
    """An `Audio` (any rate, any channels) -> mono float tensor (T,) at `sample_rate`."""
    a = Audio(audio.mono(), audio.sample_rate)
    check_waveform(a.waveform)
    return torch.from_numpy(resample(a, sample_rate).waveform)


# ------------------------------------------------------------------------------------ skips and sources
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")


class SkipLog:
    """Counts skipped inputs by reason and keeps a few examples of each, for reports and manifests."""

    def __init__(self, max_examples: int = 5):
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.max_examples = max_examples

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(message)

    def merge(self, other: "SkipLog | dict") -> None:
        d = other.to_dict() if isinstance(other, SkipLog) else other
        for reason, n in d.get("counts", {}).items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(d.get("examples", {}).get(reason, [])[: self.max_examples - len(ex)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())), "examples": self.examples}

    def summary(self) -> str:
        if not self.counts:
            return "no inputs skipped"
        return f"{self.total} skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


def list_media(source: str | os.PathLike, kind: str, skips: SkipLog | None = None) -> list[Path]:
    """Files of one modality ("image" or "audio") from a directory (searched recursively) or a JSONL of
    documents (`{"segments": [{"image": "rel/path.png"}, ...]}`, paths relative to the JSONL file).

    Unparseable JSONL lines are counted in `skips` as "bad_json"; missing files are left for the loader to
    count, so every skip has one place that reports it. The list is sorted and deduplicated.
    """
    src = Path(source)
    exts = IMAGE_EXTENSIONS if kind == "image" else AUDIO_EXTENSIONS
    if src.is_dir():
        return sorted(p for p in src.rglob("*") if p.suffix.lower() in exts and p.is_file())
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if src.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{src}: give a directory of {kind} files or a documents .jsonl file")
    found: set[Path] = set()
    with open(src, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                segs = doc["segments"]
                for seg in segs:
                    if kind in seg:
                        found.add((src.parent / seg[kind]).resolve())
            except (ValueError, KeyError, TypeError, RecursionError) as e:  # also too deep or too long a number
                if skips is not None:
                    skips.add("bad_json", f"{src}:{lineno}: {type(e).__name__}: {e}")
    return sorted(found)
