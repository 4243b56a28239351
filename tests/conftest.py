from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests run on CPU with few threads; keep them from oversubscribing small machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

MIXED_TEXT = [
    "a drawing of the digit seven",
    "what digit is this? it is 7.",
    "Съешь же ещё этих мягких французских булок",
    "日本語のテキストと中文文本混在",
    "Ελληνικά κείμενα και αριθμοί 1234567890",
    "مرحبا بالعالم",
    "emoji 😀🚀🎉 👍🏽 🇯🇵 ❤️",
    "हिन्दी पाठ",
    "tabs\tand  double  spaces",
]


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """A small SentencePiece model trained on mixed-script text."""
    from tessera.unimodal.text import TextTrainConfig, train_text_tokenizer

    d = tmp_path_factory.mktemp("text")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(MIXED_TEXT * 40) + "\n", encoding="utf-8")
    train_text_tokenizer([corpus], d / "tok", TextTrainConfig(vocab_size=400), progress=False)
    return d / "tok"


@pytest.fixture(scope="session")
def text_bundle(tmp_path_factory, text_dir):
    """A text-only tokenizer bundle over `text_dir`."""
    from tessera.tokenizers import build_bundle

    d = tmp_path_factory.mktemp("text_bundle")
    build_bundle(d / "bundle", text_dir)
    return d / "bundle"


def fixture_codecs_tokenizer(text):
    """A multimodal tokenizer over `text` and the deterministic fixture codecs."""
    from fixtures import FrameLevelAudioCodec, PatchMeanImageCodec

    from tessera.tokenizers import MultimodalTokenizer, VocabLayout

    img, aud = PatchMeanImageCodec(), FrameLevelAudioCodec()
    layout = VocabLayout(
        text_size=text.vocab_size,
        image_codebook_size=img.info.codebook_size,
        audio_codebook_size=aud.info.codebook_size,
        audio_levels=aud.info.levels,
        max_grid=16,
        n_reserved=8,
    )
    return MultimodalTokenizer(layout, text, img, aud)


@pytest.fixture(scope="session")
def fixture_tokenizer(text_dir):
    """A multimodal tokenizer over the deterministic fixture codecs."""
    from tessera.unimodal.text import TextTokenizer

    return fixture_codecs_tokenizer(TextTokenizer.load(text_dir))


@pytest.fixture(scope="session")
def codec_bundle(tmp_path_factory, text_dir):
    """A bundle with real (untrained, tiny) image and audio codecs."""
    from tessera.tokenizers import build_bundle
    from tessera.unimodal.audio import AudioCodec, SEANetCodec, audio_codec_config
    from tessera.unimodal.image import ImageCodec, image_preset

    d = tmp_path_factory.mktemp("codecs")
    torch.manual_seed(0)
    ImageCodec(image_preset("tiny")).save(d / "image")
    audio = SEANetCodec(audio_codec_config("tiny"))
    audio.train()
    audio.quantizer.set_dropout(False)
    with torch.no_grad():  # one training-mode pass runs the quantizer's k-means initialization
        audio(0.1 * torch.randn(4, 1, 16000))
    AudioCodec.save_model(audio, d / "audio")
    build_bundle(d / "bundle", text_dir, d / "image", d / "audio", max_grid=16)
    return d / "bundle"


@pytest.fixture(scope="session")
def hf_text_dir(tmp_path_factory):
    """A tiny Llama-style Hugging Face tokenizer folder (byte-level BPE; <unk> <s> </s> at 0, 1, 2)."""
    from fixtures import make_hf_tokenizer

    d = tmp_path_factory.mktemp("hf_text") / "tok"
    make_hf_tokenizer(d, "llama")
    return d


@pytest.fixture(scope="session")
def hf_fixture_tokenizer(hf_text_dir):
    """`fixture_tokenizer` with the HF tokenizer of `hf_text_dir` as its text part."""
    from tessera.unimodal.hf_text import HFTextTokenizer

    return fixture_codecs_tokenizer(HFTextTokenizer.from_folder(hf_text_dir))
