"""The vocabulary layout: one contiguous id space for text, specials, image codes and audio codes.

    [ text | special | image | audio level 0 | audio level 1 | ... ]  padded to a multiple of 128

- text: the text tokenizer's ids, unchanged: SentencePiece's (0 <unk>, 1 <s>, 2 </s>), or all the ids of an
  existing model's HF tokenizer, its added tokens included (`tessera.unimodal.hf_text`).
- special: <boi> <eoi> <boa> <eoa> <pad>, then <h:1>..<h:G> and <w:1>..<w:G> (grid sizes of an image span,
  in codes), then reserved slots for specials added later without moving the code ranges.
- image: `image.offset + code`.
- audio: `audio.offset + q * codebook_size + code` for residual level q; each level is its own sub-range, so
  a constrained decoder can allow exactly the level that comes next in a frame.

A layout is stored in `tokenizer.json` with every range's offset and size written out; loading checks them
against what the layout would compute, so a hand-edited or corrupted file is refused with a message that
names the range at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tessera.errors import TesseraError

LAYOUT_VERSION = 1
SPECIAL_TOKENS = ("<boi>", "<eoi>", "<boa>", "<eoa>", "<pad>")
DEFAULT_MAX_GRID = 128
DEFAULT_RESERVED = 64
PAD_MULTIPLE = 128

# Modality ids used for per-modality losses and masks.
MODALITIES = ("text", "image", "audio")
TEXT, IMAGE, AUDIO = 0, 1, 2


class LayoutError(TesseraError):
    """A vocabulary layout that is inconsistent or does not match its codecs."""


@dataclass(frozen=True)
class TokenRange:
    name: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    def __contains__(self, i: int) -> bool:
        return self.offset <= i < self.end


@dataclass(frozen=True)
class VocabLayout:
    text_size: int
    image_codebook_size: int = 0  # 0: the bundle has no image codec
    audio_codebook_size: int = 0  # 0: the bundle has no audio codec
    audio_levels: int = 0
    max_grid: int = DEFAULT_MAX_GRID
    n_reserved: int = DEFAULT_RESERVED
    version: int = LAYOUT_VERSION
    ranges: dict[str, TokenRange] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.text_size <= 3:
            raise LayoutError(f"text range size {self.text_size} is too small")
        if self.max_grid < 1:
            raise LayoutError(f"max_grid must be >= 1, got {self.max_grid}")
        if self.n_reserved < 0:
            raise LayoutError(f"n_reserved must be >= 0, got {self.n_reserved}")
        if self.image_codebook_size < 0 or self.audio_codebook_size < 0 or self.audio_levels < 0:
            raise LayoutError("codebook sizes and levels must be >= 0")
        if (self.audio_codebook_size == 0) != (self.audio_levels == 0):
            raise LayoutError(
                f"audio codebook size {self.audio_codebook_size} and levels {self.audio_levels} must both be "
                "zero (no audio codec) or both positive"
            )
        r = {}
        off = 0
        for name, size in (
            ("text", self.text_size),
            ("special", self.n_special),
            ("image", self.image_codebook_size),
            ("audio", self.audio_codebook_size * self.audio_levels),
        ):
            r[name] = TokenRange(name, off, size)
            off += size
        for q in range(self.audio_levels):
            r[f"audio.{q}"] = TokenRange(
                f"audio.{q}", r["audio"].offset + q * self.audio_codebook_size, self.audio_codebook_size
            )
        object.__setattr__(self, "ranges", r)

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def n_special(self) -> int:
        return len(SPECIAL_TOKENS) + 2 * self.max_grid + self.n_reserved

    @property
    def vocab_size(self) -> int:
        return self.ranges["audio"].end

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: the vocabulary rounded up to a multiple of 128."""
        return -(-self.vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE

    @property
    def has_image(self) -> bool:
        return self.image_codebook_size > 0

    @property
    def has_audio(self) -> bool:
        return self.audio_levels > 0

    # ---- ids -----------------------------------------------------------------------------------------
    def special_id(self, token: str) -> int:
        try:
            return self.ranges["special"].offset + SPECIAL_TOKENS.index(token)
        except ValueError:
            raise LayoutError(f"unknown special token {token!r}") from None

    @property
    def boi(self) -> int:
        return self.ranges["special"].offset

    @property
    def eoi(self) -> int:
        return self.boi + 1

    @property
    def boa(self) -> int:
        return self.boi + 2

    @property
    def eoa(self) -> int:
        return self.boi + 3

    @property
    def pad(self) -> int:
        return self.boi + 4

    @property
    def h_offset(self) -> int:
        """Id of <h:1>; <h:n> is h_offset + n - 1."""
        return self.boi + len(SPECIAL_TOKENS)

    @property
    def w_offset(self) -> int:
        return self.h_offset + self.max_grid

    @property
    def reserved_offset(self) -> int:
        return self.w_offset + self.max_grid

    def h_token(self, n: int) -> int:
        self._check_grid(n)
        return self.h_offset + n - 1

    def w_token(self, n: int) -> int:
        self._check_grid(n)
        return self.w_offset + n - 1

    def _check_grid(self, n: int) -> None:
        if not 1 <= n <= self.max_grid:
            raise LayoutError(f"grid size {n} is outside 1..{self.max_grid}")

    def image_id(self, code):
        return self.ranges["image"].offset + code

    def audio_id(self, level, code):
        return self.ranges["audio"].offset + level * self.audio_codebook_size + code

    def token_name(self, i: int) -> str:
        """A readable name for a non-text id (for error messages and debugging)."""
        if i < 0 or i >= self.padded_vocab_size:
            return f"<out of range {i}>"
        if i >= self.vocab_size:
            return f"<padding row {i}>"
        if i in self.ranges["text"]:
            return f"<text {i}>"
        if i < self.h_offset:
            return SPECIAL_TOKENS[i - self.boi]
        if i < self.w_offset:
            return f"<h:{i - self.h_offset + 1}>"
        if i < self.reserved_offset:
            return f"<w:{i - self.w_offset + 1}>"
        if i in self.ranges["special"]:
            return f"<reserved:{i - self.reserved_offset}>"
        if i in self.ranges["image"]:
            return f"<img:{i - self.ranges['image'].offset}>"
        q, c = divmod(i - self.ranges["audio"].offset, self.audio_codebook_size)
        return f"<aud{q}:{c}>"

    def modality_table(self) -> np.ndarray:
        """For every id of the padded vocabulary, the modality whose loss it counts towards.

        Image codes, <boi>, <eoi> and the grid tokens count as image; audio codes, <boa> and <eoa> as
        audio; text pieces and the other specials as text.
        """
        t = np.full(self.padded_vocab_size, TEXT, dtype=np.int64)
        img, aud = self.ranges["image"], self.ranges["audio"]
        t[img.offset : img.end] = IMAGE
        t[aud.offset : aud.end] = AUDIO
        t[[self.boi, self.eoi]] = IMAGE
        t[self.h_offset : self.reserved_offset] = IMAGE
        t[[self.boa, self.eoa]] = AUDIO
        return t

    # ---- (de)serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "text_size": self.text_size,
            "image_codebook_size": self.image_codebook_size,
            "audio_codebook_size": self.audio_codebook_size,
            "audio_levels": self.audio_levels,
            "max_grid": self.max_grid,
            "n_reserved": self.n_reserved,
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "ranges": {k: {"offset": v.offset, "size": v.size} for k, v in self.ranges.items()},
            "special_tokens": {t: self.special_id(t) for t in SPECIAL_TOKENS},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "VocabLayout":
        if not isinstance(d, dict):
            raise LayoutError("layout must be a JSON object")
        version = d.get("version")
        if version != LAYOUT_VERSION:
            raise LayoutError(f"layout format version {version!r} is not supported (this tessera reads {LAYOUT_VERSION})")
        try:
            layout = cls(
                text_size=int(d["text_size"]),
                image_codebook_size=int(d.get("image_codebook_size", 0)),
                audio_codebook_size=int(d.get("audio_codebook_size", 0)),
                audio_levels=int(d.get("audio_levels", 0)),
                max_grid=int(d.get("max_grid", DEFAULT_MAX_GRID)),
                n_reserved=int(d.get("n_reserved", DEFAULT_RESERVED)),
            )
        except KeyError as e:
            raise LayoutError(f"layout is missing the key {e.args[0]!r}") from None
        stored = d.get("ranges")
        if stored is not None:
            check_ranges({k: TokenRange(k, int(v["offset"]), int(v["size"])) for k, v in stored.items()})
            for name, r in layout.ranges.items():
                s = stored.get(name)
                if s is None:
                    if r.size:
                        raise LayoutError(f"range {name!r} is missing from the stored layout")
                    continue
                if (int(s["offset"]), int(s["size"])) != (r.offset, r.size):
                    raise LayoutError(
                        f"range {name!r} is stored as offset {s['offset']} size {s['size']}, but the layout's "
                        f"sizes give offset {r.offset} size {r.size}"
                    )
            extra = set(stored) - set(layout.ranges)
            if extra:
                raise LayoutError(f"unknown range(s) in stored layout: {', '.join(sorted(extra))}")
        for key in ("vocab_size", "padded_vocab_size"):
            if key in d and int(d[key]) != getattr(layout, key):
                raise LayoutError(f"{key} is stored as {d[key]} but the ranges give {getattr(layout, key)}")
        if "special_tokens" in d:
            for tok, i in d["special_tokens"].items():
                if tok not in SPECIAL_TOKENS:
                    raise LayoutError(f"unknown special token {tok!r} in stored layout")
                if int(i) != layout.special_id(tok):
                    raise LayoutError(f"special token {tok} is stored as id {i}, expected {layout.special_id(tok)}")
        return layout

    def check_codecs(self, text_size: int, image_info=None, audio_info=None) -> None:
        """Refuse codecs whose sizes disagree with this layout, naming the disagreement."""
        if text_size != self.text_size:
            raise LayoutError(f"text tokenizer has {text_size} pieces but the layout's text range has {self.text_size}")
        if image_info is None and self.has_image:
            raise LayoutError(f"layout has an image range of {self.image_codebook_size} codes but no image codec")
        if image_info is not None and image_info.codebook_size != self.image_codebook_size:
            raise LayoutError(
                f"image codec has {image_info.codebook_size} codes but the layout's image range has "
                f"{self.image_codebook_size}"
            )
        if audio_info is None and self.has_audio:
            raise LayoutError("layout has audio ranges but no audio codec")
        if audio_info is not None:
            if audio_info.codebook_size != self.audio_codebook_size:
                raise LayoutError(
                    f"audio codec has {audio_info.codebook_size} codes per level but the layout has "
                    f"{self.audio_codebook_size}"
                )
            if audio_info.levels < self.audio_levels:
                raise LayoutError(
                    f"audio codec has {audio_info.levels} residual levels but the layout has {self.audio_levels} "
                    "(a layout can use a codec's first levels, not more than it has)"
                )


def check_ranges(ranges: dict[str, TokenRange]) -> None:
    """Top-level ranges must not overlap and must not be negative; sub-ranges (audio.q) nest in their parent."""
    top = sorted((r for k, r in ranges.items() if "." not in k), key=lambda r: r.offset)
    for r in top:
        if r.offset < 0 or r.size < 0:
            raise LayoutError(f"range {r.name!r} has negative offset or size ({r.offset}, {r.size})")
    for a, b in zip(top, top[1:]):
        if a.size and b.size and a.end > b.offset:
            raise LayoutError(
                f"ranges {a.name!r} [{a.offset}, {a.end}) and {b.name!r} [{b.offset}, {b.end}) overlap"
            )
    for k, r in ranges.items():
        if "." in k:
            parent = ranges.get(k.split(".")[0])
            if parent is None or r.offset < parent.offset or r.end > parent.end:
                raise LayoutError(f"sub-range {k!r} [{r.offset}, {r.end}) lies outside its parent range")
