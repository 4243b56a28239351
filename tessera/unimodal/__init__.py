"""One codec per modality: text (SentencePiece), image (conv VQ autoencoder), audio (SEANet + residual VQ).

A codec directory holds `codec.json` (`{"format": "tessera-codec", "version": 1, "kind": "image"|"audio",
"info": CodecInfo, "config": ...}`) and `model.safetensors`. `load_codec` dispatches on `kind`.
"""

from __future__ import annotations

from pathlib import Path

from tessera.errors import TesseraError
from tessera.storage import read_json
from tessera.unimodal.protocol import CodecInfo

CODEC_FORMAT = "tessera-codec"
CODEC_VERSION = 1
CODEC_FILES = ("codec.json", "model.safetensors")


class CodecError(TesseraError):
    """A codec directory that is missing or inconsistent."""


def read_codec_meta(path: str | Path) -> dict:
    p = Path(path) / "codec.json"
    if not p.is_file():
        raise CodecError(f"{path} is not a codec directory: {p} is missing")
    meta = read_json(p)
    if meta.get("format") != CODEC_FORMAT:
        raise CodecError(f"{p}: format is {meta.get('format')!r}, expected {CODEC_FORMAT!r}")
    if meta.get("version") != CODEC_VERSION:
        raise CodecError(f"{p}: codec version {meta.get('version')} is not supported (expected {CODEC_VERSION})")
    if meta.get("kind") not in ("image", "audio"):
        raise CodecError(f"{p}: unknown codec kind {meta.get('kind')!r}")
    if not (Path(path) / "model.safetensors").is_file():
        raise CodecError(f"{path}: model.safetensors is missing")
    return meta


def read_codec_info(path: str | Path) -> CodecInfo:
    """The codec's `CodecInfo`, read from codec.json without loading weights."""
    return CodecInfo.from_dict(read_codec_meta(path)["info"])


def load_codec(path: str | Path, device="cpu"):
    kind = read_codec_meta(path)["kind"]
    if kind == "image":
        from tessera.unimodal.image import ImageCodec

        return ImageCodec.load(path, device=device)
    from tessera.unimodal.audio import AudioCodec

    return AudioCodec.load(path, device=device)
