"""The tokenizer of each modality: text (SentencePiece), and the image (conv VQ autoencoder) and audio (SEANet +
residual VQ) codecs.

A codec directory holds `codec.json` (`{"format": "tessera-codec", "version": 1, "kind": "image"|"audio",
"info": CodecInfo, "config": ...}`) and `model.safetensors` (the format is in `protocol.py`). `load_codec`
dispatches on `kind`.
"""

from __future__ import annotations

from pathlib import Path

from tessera.unimodal.protocol import (
    CODEC_FILES,
    CODEC_FORMAT,
    CODEC_VERSION,
    CodecError,
    CodecInfo,
    read_codec_info,
    read_codec_meta,
)

__all__ = ["CODEC_FILES", "CODEC_FORMAT", "CODEC_VERSION", "CodecError", "CodecInfo", "load_codec",
           "read_codec_info", "read_codec_meta"]


def load_codec(path: str | Path, device="cpu"):
    kind = read_codec_meta(path)["kind"]
    if kind == "image":
        from tessera.unimodal.image import ImageCodec

        return ImageCodec.load(path, device=device)
    from tessera.unimodal.audio import AudioCodec

    return AudioCodec.load(path, device=device)
