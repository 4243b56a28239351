"""The multimodal tokenizer: documents of text, images and audio <-> one list of ids.

Span formats (ids from `VocabLayout`):

    image:  <boi> <h:H> <w:W> code(0,0) ... code(H-1,W-1) <eoi>           row-major, H*W codes
    audio:  <boa> c(0,0) c(0,1) .. c(0,n_q-1)  c(1,0) ... c(F-1,n_q-1) <eoa>   frame by frame; c(t,q) is a
            level-q id, so position q of every frame holds a level-q code (AnyGPT's flattening)

Text pieces are the text tokenizer's ids (SentencePiece, or an existing model's HF tokenizer); its BOS and EOS
(`<s>`/`</s>` for SentencePiece) mark document boundaries.

Decoding policy for malformed id sequences (what a sampled or corrupted sequence can contain):

- A span runs from its opener (<boi>/<boa>) to its closer (<eoi>/<eoa>), or, if the closer is missing, to
  the first text piece or the next opener. It is malformed if the closer is missing, the grid header is
  not <h:H> <w:W>, the number of codes is not H*W (image) or not a whole number of frames (audio: an <eoa>
  inside a frame), or a code lies outside the range its position allows ("out-of-range code": another
  modality's id, the wrong residual level, a special, an id beyond the vocabulary).
- A token outside any span that only makes sense inside one (a code, a closer, a grid token, a reserved
  id, an id beyond the vocabulary) is a stray token.
- strict mode raises `MalformedSpanError` naming the problem and its position.
- lenient mode (the default) drops the broken span or stray token with a `MalformedSpanWarning` and keeps
  every text piece around it. `<pad>`, BOS and EOS are dropped silently in both modes.

`decode` returns normalized segments: adjacent text is merged, empty text is dropped.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image

from tessera.errors import TesseraError
from tessera.tokenizers.chat import DEFAULT_CHAT, ChatTemplate
from tessera.tokenizers.layout import VocabLayout
from tessera.unimodal.hf_text import HFTextTokenizer
from tessera.unimodal.media import Audio, audio_to_tensor, pil_to_tensor, tensor_to_pil, to_rgb
from tessera.unimodal.protocol import AudioCodecLike, ImageCodecLike, fit_image_size
from tessera.unimodal.text import TextTokenizer


class MalformedSpanError(TesseraError):
    """An id sequence that breaks the span grammar (strict decoding)."""

    def __init__(self, reason: str, position: int, message: str):
        super().__init__(f"{message} (at id position {position})")
        self.reason = reason
        self.position = position


class MalformedSpanWarning(UserWarning):
    """A broken span or stray token dropped by lenient decoding."""


@dataclass
class ImageCodes:
    """Image codes (H, W) that stand for an image without running the codec."""

    codes: np.ndarray

    def __post_init__(self):
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or 0 in self.codes.shape:
            raise ValueError(f"image codes must be a non-empty (H, W) array, got shape {self.codes.shape}")

    def __eq__(self, other):
        return isinstance(other, ImageCodes) and np.array_equal(self.codes, other.codes)


@dataclass
class AudioCodes:
    """Audio codes (n_q, frames) that stand for a clip without running the codec."""

    codes: np.ndarray

    def __post_init__(self):
        self.codes = np.asarray(self.codes, dtype=np.int64)
        if self.codes.ndim != 2 or 0 in self.codes.shape:
            raise ValueError(f"audio codes must be a non-empty (n_q, frames) array, got shape {self.codes.shape}")

    def __eq__(self, other):
        return isinstance(other, AudioCodes) and np.array_equal(self.codes, other.codes)


Segment = Union[str, Image.Image, Audio]
Piece = Union[str, ImageCodes, AudioCodes]


class MultimodalTokenizer:
    """Text tokenizer + optional image and audio codecs laid out in one vocabulary."""

    def __init__(
        self,
        layout: VocabLayout,
        text: TextTokenizer | HFTextTokenizer,
        image_codec: ImageCodecLike | None = None,
        audio_codec: AudioCodecLike | None = None,
        *,
        bundle_hash: str | None = None,
        strict: bool = False,
        device: str | torch.device = "cpu",
        chat: ChatTemplate = DEFAULT_CHAT,
    ):
        layout.check_codecs(
            text.vocab_size,
            image_codec.info if image_codec is not None else None,
            audio_codec.info if audio_codec is not None else None,
        )
        self.layout = layout
        self.text = text
        self.image_codec = image_codec
        self.audio_codec = audio_codec
        self.bundle_hash = bundle_hash
        self.strict = strict
        self.device = torch.device(device)
        self.chat = chat  # renders conversations (tessera.tokenizers.chat)
        L = layout
        self.bos_id, self.eos_id, self.pad_id = text.bos_id, text.eos_id, L.pad
        self._text_range = L.ranges["text"]
        self._silent = {self.bos_id, self.eos_id, L.pad}

    # ------------------------------------------------------------------------------------------ info
    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size

    def to(self, device) -> "MultimodalTokenizer":
        self.device = torch.device(device)
        for c in (self.image_codec, self.audio_codec):
            if c is not None and hasattr(c, "to"):
                c.to(self.device)
        return self

    # ------------------------------------------------------------------------------ spans from codes
    def image_span(self, codes) -> list[int]:
        c = np.asarray(codes, dtype=np.int64)
        L = self.layout
        if not L.has_image:
            raise ValueError("this tokenizer has no image codec")
        if c.ndim != 2:
            raise ValueError(f"image codes must be (H, W), got shape {c.shape}")
        h, w = c.shape
        if not (1 <= h <= L.max_grid and 1 <= w <= L.max_grid):
            raise ValueError(f"image grid {h}x{w} is outside 1..{L.max_grid} codes per side")
        if c.min() < 0 or c.max() >= L.image_codebook_size:
            raise ValueError(f"image codes must lie in [0, {L.image_codebook_size})")
        return [L.boi, L.h_token(h), L.w_token(w), *(L.ranges["image"].offset + c.reshape(-1)).tolist(), L.eoi]

    def audio_span(self, codes) -> list[int]:
        c = np.asarray(codes, dtype=np.int64)
        L = self.layout
        if not L.has_audio:
            raise ValueError("this tokenizer has no audio codec")
        if c.ndim != 2 or c.shape[0] != L.audio_levels or c.shape[1] == 0:
            raise ValueError(f"audio codes must be ({L.audio_levels}, frames>0), got shape {c.shape}")
        if c.min() < 0 or c.max() >= L.audio_codebook_size:
            raise ValueError(f"audio codes must lie in [0, {L.audio_codebook_size})")
        ids = L.ranges["audio"].offset + np.arange(L.audio_levels)[:, None] * L.audio_codebook_size + c
        return [L.boa, *ids.T.reshape(-1).tolist(), L.eoa]  # frame-major: all levels of frame 0, then frame 1

    # -------------------------------------------------------------------------------- codec encoding
    def image_size_for(self, im: Image.Image, size: tuple[int, int] | None = None) -> tuple[int, int]:
        """(width, height) an image is resized to before encoding."""
        info = self.image_codec.info
        if size is not None:
            h, w = size
            f = info.downsample
            if h % f or w % f:
                raise ValueError(f"image size {h}x{w} must be a multiple of the codec's factor {f}")
            return w, h
        return fit_image_size(im.width, im.height, info.downsample, info.max_size)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], size=None, batch_size: int = 64) -> list[np.ndarray]:
        """Encode PIL images to code grids, batching images that share a size."""
        if self.image_codec is None:
            raise ValueError("this tokenizer has no image codec; build the bundle with --image")
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        tensors = []
        for i, im in enumerate(images):
            im = to_rgb(im)
            wh = self.image_size_for(im, size)
            if im.size != wh:
                im = im.resize(wh, Image.Resampling.BICUBIC)
            tensors.append(pil_to_tensor(im))
            groups.setdefault(wh, []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                x = torch.stack([tensors[i] for i in chunk]).to(self.device)
                codes = self.image_codec.encode(x).cpu().numpy()
                for j, i in enumerate(chunk):
                    out[i] = codes[j]
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def encode_audios(self, clips: Sequence[Audio], batch_size: int = 32) -> list[np.ndarray]:
        """Encode clips to (n_q, frames) codes, batching clips of equal length; n_q is the layout's number of
        audio levels (the codec's first n_q levels)."""
        if self.audio_codec is None:
            raise ValueError("this tokenizer has no audio codec; build the bundle with --audio")
        sr = self.audio_codec.info.sample_rate
        waves = [audio_to_tensor(a, sr) for a in clips]
        out: list[np.ndarray | None] = [None] * len(clips)
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            groups.setdefault(int(w.shape[-1]), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                x = torch.stack([waves[i] for i in chunk]).to(self.device)
                codes = self.audio_codec.encode(x, sr)[:, : self.layout.audio_levels].cpu().numpy()
                for j, i in enumerate(chunk):
                    out[i] = codes[j]
        return out  # type: ignore[return-value]

    # --------------------------------------------------------------------------------------- encode
    def encode(self, segments, *, bos: bool = False, eos: bool = False, image_size=None) -> list[int]:
        """Encode a document (a segment or a list of segments) to ids."""
        return self.encode_many([segments], bos=bos, eos=eos, image_size=image_size)[0]

    def encode_many(self, documents, *, bos=False, eos=False, image_size=None) -> list[list[int]]:
        """Encode several documents, running each codec once over all their images and clips."""
        docs = [list(d) if isinstance(d, (list, tuple)) else [d] for d in documents]
        images = [s for d in docs for s in d if isinstance(s, Image.Image)]
        clips = [s for d in docs for s in d if isinstance(s, Audio)]
        image_codes = iter(self.encode_images(images, size=image_size) if images else [])
        audio_codes = iter(self.encode_audios(clips) if clips else [])
        out = []
        for d in docs:
            ids = [self.bos_id] if bos else []
            for s in d:
                if isinstance(s, str):
                    ids += self.text.encode(s)
                elif isinstance(s, Image.Image):
                    ids += self.image_span(next(image_codes))
                elif isinstance(s, Audio):
                    ids += self.audio_span(next(audio_codes))
                elif isinstance(s, ImageCodes):
                    ids += self.image_span(s.codes)
                elif isinstance(s, AudioCodes):
                    ids += self.audio_span(s.codes)
                else:
                    raise TypeError(
                        f"cannot encode a segment of type {type(s).__name__}: use str, PIL.Image.Image, "
                        "tessera.Audio, ImageCodes or AudioCodes"
                    )
            if eos:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    # ---------------------------------------------------------------------------------------- parse
    def _problem(self, strict: bool, reason: str, pos: int, msg: str) -> None:
        if strict:
            raise MalformedSpanError(reason, pos, msg)
        warnings.warn(f"dropped {msg} at id position {pos}", MalformedSpanWarning, stacklevel=4)

    def _span_end(self, ids: Sequence[int], start: int, closer: int) -> tuple[int, bool]:
        """End (exclusive) of the span opened at `start`, and whether it is closed by `closer`."""
        L = self.layout
        j = start + 1
        n = len(ids)
        while j < n:
            t = ids[j]
            if t == closer:
                return j + 1, True
            if t in self._text_range or t in (L.boi, L.boa):
                return j, False
            j += 1
        return n, False

    def _check_image(self, body: Sequence[int]) -> tuple[str, str] | np.ndarray:
        L = self.layout
        if not L.has_image:
            return "out_of_range", "image span in a bundle without an image codec"
        if len(body) < 2 or not (L.h_offset <= body[0] < L.w_offset) or not (L.w_offset <= body[1] < L.reserved_offset):
            return "bad_header", "image span without a <h:H> <w:W> grid header"
        h, w = body[0] - L.h_offset + 1, body[1] - L.w_offset + 1
        codes = np.asarray(body[2:], dtype=np.int64) - L.ranges["image"].offset
        if ((codes < 0) | (codes >= L.image_codebook_size)).any():
            return "out_of_range", "image span with an out-of-range code"
        if codes.size != h * w:
            return "wrong_count", f"image span with {codes.size} codes where its {h}x{w} grid needs {h * w}"
        return codes.reshape(h, w)

    def _check_audio(self, body: Sequence[int]) -> tuple[str, str] | np.ndarray:
        L = self.layout
        if not L.has_audio:
            return "out_of_range", "audio span in a bundle without an audio codec"
        nq, cb = L.audio_levels, L.audio_codebook_size
        rel = np.asarray(body, dtype=np.int64) - L.ranges["audio"].offset
        level = np.arange(rel.size) % nq
        code = rel - level * cb
        if ((code < 0) | (code >= cb)).any():
            return "out_of_range", "audio span with an out-of-range code (a wrong residual level or another id)"
        if rel.size == 0:
            return "wrong_count", "empty audio span"
        if rel.size % nq:
            return "eoa_in_frame", f"audio span closed inside a frame ({rel.size} codes, {nq} per frame)"
        return code.reshape(-1, nq).T

    def parse(self, ids: Iterable[int], strict: bool | None = None) -> list[Piece]:
        """Split ids into text and code spans without running any codec."""
        strict = self.strict if strict is None else strict
        L = self.layout
        ids = [int(i) for i in ids]
        out: list[Piece] = []
        buf: list[int] = []

        def flush():
            if buf:
                s = self.text.decode(buf)
                if s:
                    if out and isinstance(out[-1], str):
                        out[-1] += s
                    else:
                        out.append(s)
                buf.clear()

        i, n = 0, len(ids)
        while i < n:
            t = ids[i]
            if t in self._silent:
                i += 1
            elif t in self._text_range:
                buf.append(t)
                i += 1
            elif t in (L.boi, L.boa):
                flush()
                is_image = t == L.boi
                end, closed = self._span_end(ids, i, L.eoi if is_image else L.eoa)
                kind = "image" if is_image else "audio"
                if not closed:
                    self._problem(strict, "missing_close", i, f"{kind} span without its {'<eoi>' if is_image else '<eoa>'}")
                else:
                    body = ids[i + 1 : end - 1]
                    r = self._check_image(body) if is_image else self._check_audio(body)
                    if isinstance(r, tuple):
                        self._problem(strict, r[0], i, r[1])
                    else:
                        out.append(ImageCodes(r) if is_image else AudioCodes(r))
                i = end
            else:
                flush()
                self._problem(strict, "stray_token", i, f"stray token {L.token_name(t)} outside any span")
                i += 1
        flush()
        return out

    # --------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode_image_codes(self, codes: np.ndarray) -> Image.Image:
        if self.image_codec is None:
            raise ValueError("this tokenizer has no image codec")
        x = torch.as_tensor(codes, dtype=torch.long, device=self.device)[None]
        return tensor_to_pil(self.image_codec.decode(x)[0])

    @torch.no_grad()
    def decode_audio_codes(self, codes: np.ndarray) -> Audio:
        if self.audio_codec is None:
            raise ValueError("this tokenizer has no audio codec")
        x = torch.as_tensor(codes, dtype=torch.long, device=self.device)[None]
        w = self.audio_codec.decode(x)[0]
        return Audio(w.float().cpu().numpy(), self.audio_codec.info.sample_rate)

    def decode(self, ids: Iterable[int], strict: bool | None = None) -> list[Segment]:
        """ids -> segments (str, PIL.Image.Image, tessera.Audio); see the module docstring for the policy."""
        out: list[Segment] = []
        for p in self.parse(ids, strict=strict):
            if isinstance(p, ImageCodes):
                out.append(self.decode_image_codes(p.codes))
            elif isinstance(p, AudioCodes):
                out.append(self.decode_audio_codes(p.codes))
            else:
                out.append(p)
        return out

    def __repr__(self) -> str:
        L = self.layout
        return (
            f"MultimodalTokenizer(text={L.text_size}, image={L.image_codebook_size}, "
            f"audio={L.audio_levels}x{L.audio_codebook_size}, vocab={L.vocab_size}, padded={L.padded_vocab_size})"
        )
