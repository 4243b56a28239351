"""Span logic of the multimodal tokenizer, on deterministic fixture codecs; every test runs with a SentencePiece
text tokenizer and with an existing model's (a Hugging Face byte-level BPE, `--text-from-hf`)."""

import warnings

import numpy as np
import pytest
from fixtures import FrameLevelAudioCodec, PatchMeanImageCodec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.tokenizers import AudioCodes, ImageCodes, MalformedSpanError, MalformedSpanWarning
from tessera.unimodal.media import Audio

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=["sentencepiece", "hf"])
def fixture_tokenizer(request):
    return request.getfixturevalue("fixture_tokenizer" if request.param == "sentencepiece" else "hf_fixture_tokenizer")


def normalize(segments):
    """Merge adjacent text and drop empty text: the form `decode` returns."""
    out = []
    for s in segments:
        if isinstance(s, str):
            if not s:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += s
                continue
        out.append(s)
    return out


@given(st.text())
@SETTINGS
def test_arbitrary_unicode_round_trips(fixture_tokenizer, s):
    tok = fixture_tokenizer
    ids = tok.encode(s)
    assert all(0 <= i < tok.layout.ranges["text"].end for i in ids)
    assert tok.decode(ids, strict=True) == ([s] if s else [])


def image_codes():
    return st.tuples(st.integers(1, 5), st.integers(1, 5)).flatmap(
        lambda hw: st.lists(st.integers(0, 15), min_size=hw[0] * hw[1], max_size=hw[0] * hw[1]).map(
            lambda v: ImageCodes(np.array(v).reshape(hw))
        )
    )


def audio_codes():
    return st.integers(1, 6).flatmap(
        lambda f: st.lists(st.integers(0, 7), min_size=3 * f, max_size=3 * f).map(
            lambda v: AudioCodes(np.array(v).reshape(3, f))
        )
    )


@given(st.lists(st.one_of(st.text(max_size=30), image_codes(), audio_codes()), max_size=8))
@SETTINGS
def test_interleavings_round_trip_exactly(fixture_tokenizer, segments):
    tok = fixture_tokenizer
    ids = tok.encode(segments, bos=True, eos=True)
    assert tok.parse(ids, strict=True) == normalize(segments)


@given(st.lists(st.one_of(st.text(max_size=20), image_codes(), audio_codes()), max_size=5))
@SETTINGS
def test_decoded_media_re_encode_to_the_same_ids(fixture_tokenizer, segments):
    """decode gives PIL images and Audio; encoding those gives back the same ids."""
    tok = fixture_tokenizer
    ids = tok.encode(segments)
    decoded = tok.decode(ids, strict=True)
    assert tok.encode(decoded) == ids


def test_pil_and_audio_inputs(fixture_tokenizer):
    tok = fixture_tokenizer
    img_codec, aud_codec = PatchMeanImageCodec(), FrameLevelAudioCodec()
    import torch

    codes = torch.randint(0, 16, (1, 3, 5))
    from tessera.unimodal.media import tensor_to_pil

    im = tensor_to_pil(img_codec.decode(codes)[0])  # 20 x 12 pixels
    wave = aud_codec.decode(torch.randint(0, 8, (1, 3, 7)))[0]
    au = Audio(wave.numpy(), 16000)
    segs = tok.decode(tok.encode(["look: ", im, " and listen: ", au]))
    assert segs[0] == "look: " and segs[2] == " and listen: "
    assert segs[1].size == (20, 12) and np.array_equal(np.asarray(segs[1]), np.asarray(im))
    assert isinstance(segs[3], Audio) and segs[3].sample_rate == 16000
    assert np.allclose(segs[3].waveform, au.waveform)
    # stereo at another rate is mixed to mono and resampled before encoding
    stereo = Audio(np.stack([au.waveform, au.waveform]), 16000)
    assert tok.encode([stereo]) == tok.encode([au])


def spans(tok):
    L = tok.layout
    img = tok.image_span(np.arange(6).reshape(2, 3))
    aud = tok.audio_span(np.arange(6).reshape(3, 2))
    return L, img, aud


def _malformed_cases(tok):
    L, img, aud = spans(tok)
    text = tok.encode("hi ")
    tail = tok.encode(" end")
    a_lvl1 = L.audio_id(1, 0)
    return {
        "missing_close": text + img[:-1] + tail,
        "wrong_count": text + img[:3] + img[3:5] + [L.eoi] + tail,  # 2 codes for a 2x3 grid
        "out_of_range": text + img[:4] + [a_lvl1] + img[5:] + tail,  # an audio code inside an image
        "eoa_in_frame": text + aud[:-2] + [L.eoa] + tail,  # 5 codes, 3 per frame
        "bad_header": text + [L.boi, L.w_token(2), L.h_token(3)] + img[3:] + tail,
        "stray_token": text + [L.image_id(3)] + tail,
    }


@pytest.mark.parametrize("reason", ["missing_close", "wrong_count", "out_of_range", "eoa_in_frame", "bad_header", "stray_token"])
def test_malformed_strict_raises(fixture_tokenizer, reason):
    ids = _malformed_cases(fixture_tokenizer)[reason]
    with pytest.raises(MalformedSpanError) as e:
        fixture_tokenizer.decode(ids, strict=True)
    assert e.value.reason == reason


@pytest.mark.parametrize("reason", ["missing_close", "wrong_count", "out_of_range", "eoa_in_frame", "bad_header", "stray_token"])
def test_malformed_lenient_drops_span_keeps_text(fixture_tokenizer, reason):
    ids = _malformed_cases(fixture_tokenizer)[reason]
    with pytest.warns(MalformedSpanWarning):
        out = fixture_tokenizer.decode(ids, strict=False)
    assert out == ["hi  end"]


def test_audio_level_order_is_enforced(fixture_tokenizer):
    tok = fixture_tokenizer
    L = tok.layout
    # A frame whose level-1 and level-2 codes are swapped is out of range for its positions.
    bad = [L.boa, L.audio_id(0, 1), L.audio_id(2, 1), L.audio_id(1, 1), L.eoa]
    with pytest.raises(MalformedSpanError, match="out-of-range"):
        tok.decode(bad, strict=True)


def test_valid_spans_between_broken_ones_survive(fixture_tokenizer):
    tok = fixture_tokenizer
    L, img, aud = spans(tok)
    ids = img[:-1] + aud + tok.encode("x")  # broken image runs into the audio opener
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = tok.parse(ids)
    assert len(w) == 1
    assert out == [AudioCodes(np.arange(6).reshape(3, 2)), "x"]


def test_pad_bos_eos_are_silent(fixture_tokenizer):
    tok = fixture_tokenizer
    ids = [tok.bos_id, *tok.encode("a"), tok.pad_id, *tok.encode("b"), tok.eos_id]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.decode(ids, strict=True) == ["ab"]


def test_bad_codes_are_refused_when_encoding(fixture_tokenizer):
    tok = fixture_tokenizer
    with pytest.raises(ValueError, match="image codes must lie"):
        tok.image_span(np.full((2, 2), 16))
    with pytest.raises(ValueError, match="audio codes must be"):
        tok.audio_span(np.zeros((2, 4)))  # 2 levels, the codec has 3
    with pytest.raises(TypeError, match="cannot encode a segment of type int"):
        tok.encode([3])


def test_codec_sizes_disagreeing_with_layout_are_refused(text_dir):
    from tessera.tokenizers import LayoutError, MultimodalTokenizer, VocabLayout
    from tessera.unimodal.text import TextTokenizer

    text = TextTokenizer.load(text_dir)
    layout = VocabLayout(text_size=text.vocab_size, image_codebook_size=32)
    with pytest.raises(LayoutError, match="image codec has 16 codes but the layout's image range has 32"):
        MultimodalTokenizer(layout, text, PatchMeanImageCodec(codebook_size=16))


def test_the_fixture_codecs_implement_the_codec_protocol():
    """The arithmetic codecs the span tests use stand in for the real ones: same protocol."""
    from tessera.unimodal.protocol import AudioCodecLike, ImageCodecLike

    assert isinstance(PatchMeanImageCodec(), ImageCodecLike) and isinstance(FrameLevelAudioCodec(), AudioCodecLike)
    assert not isinstance(object(), ImageCodecLike)
