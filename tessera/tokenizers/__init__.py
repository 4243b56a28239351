"""The unified multimodal tokenizer: vocabulary layout, span formats, bundles."""

from tessera.tokenizers.bundle import BundleError, build_bundle, load_bundle
from tessera.tokenizers.layout import LayoutError, TokenRange, VocabLayout
from tessera.tokenizers.multimodal import (
    AudioCodes,
    ImageCodes,
    MalformedSpanError,
    MalformedSpanWarning,
    MultimodalTokenizer,
)

__all__ = [
    "AudioCodes",
    "BundleError",
    "ImageCodes",
    "LayoutError",
    "MalformedSpanError",
    "MalformedSpanWarning",
    "MultimodalTokenizer",
    "TokenRange",
    "VocabLayout",
    "build_bundle",
    "load_bundle",
]
