import json

import numpy as np
import pytest

from tessera.tokenizers.layout import SPECIAL_TOKENS, LayoutError, VocabLayout, check_ranges, TokenRange
from tessera.unimodal.protocol import CodecInfo


def make(**kw):
    base = dict(text_size=1000, image_codebook_size=512, audio_codebook_size=256, audio_levels=4)
    base.update(kw)
    return VocabLayout(**base)


def test_ranges_are_contiguous_and_padded():
    L = make()
    r = L.ranges
    assert r["text"].offset == 0 and r["special"].offset == 1000
    assert r["image"].offset == r["special"].end and r["audio"].offset == r["image"].end
    assert [r[f"audio.{q}"].offset for q in range(4)] == [r["audio"].offset + q * 256 for q in range(4)]
    assert L.vocab_size == r["audio"].end == 1000 + L.n_special + 512 + 1024
    assert L.padded_vocab_size % 128 == 0 and 0 <= L.padded_vocab_size - L.vocab_size < 128


def test_specials_and_grid_tokens():
    L = make(max_grid=128)
    assert [L.special_id(t) for t in SPECIAL_TOKENS] == [L.boi, L.eoi, L.boa, L.eoa, L.pad]
    assert L.token_name(L.h_token(1)) == "<h:1>" and L.token_name(L.w_token(128)) == "<w:128>"
    assert L.token_name(L.reserved_offset) == "<reserved:0>"
    assert L.token_name(L.audio_id(3, 5)) == "<aud3:5>" and L.token_name(L.image_id(7)) == "<img:7>"
    with pytest.raises(LayoutError, match="grid size 129"):
        L.h_token(129)


def test_json_round_trip():
    L = make()
    d = json.loads(json.dumps(L.to_dict()))
    assert VocabLayout.from_dict(d) == L


def test_text_only_layout():
    L = VocabLayout(text_size=500)
    assert not L.has_image and not L.has_audio
    assert L.vocab_size == 500 + L.n_special


def test_overlapping_ranges_are_refused_with_names():
    with pytest.raises(LayoutError, match=r"ranges 'special' .* and 'image' .* overlap"):
        check_ranges({"text": TokenRange("text", 0, 100), "special": TokenRange("special", 100, 50),
                      "image": TokenRange("image", 120, 64)})
    d = make().to_dict()
    d["ranges"]["image"]["offset"] -= 10
    with pytest.raises(LayoutError, match="overlap"):
        VocabLayout.from_dict(d)


def test_tampered_ranges_are_refused():
    d = make().to_dict()
    d["ranges"]["audio.2"]["offset"] += 1
    with pytest.raises(LayoutError, match="audio.2"):
        VocabLayout.from_dict(d)
    d = make().to_dict()
    d["vocab_size"] += 1
    with pytest.raises(LayoutError, match="vocab_size"):
        VocabLayout.from_dict(d)
    d = make().to_dict()
    d["version"] = 99
    with pytest.raises(LayoutError, match="version"):
        VocabLayout.from_dict(d)


def test_codec_sizes_must_match():
    L = make()
    img = CodecInfo(kind="image", codebook_size=512, downsample=8)
    aud = CodecInfo(kind="audio", codebook_size=256, levels=4, downsample=320, sample_rate=16000)
    L.check_codecs(1000, img, aud)
    with pytest.raises(LayoutError, match="image codec has 1024 codes but the layout's image range has 512"):
        L.check_codecs(1000, CodecInfo(kind="image", codebook_size=1024), aud)
    with pytest.raises(LayoutError, match="audio codec has 2 residual levels but the layout has 4"):
        L.check_codecs(1000, img, CodecInfo(kind="audio", codebook_size=256, levels=2, sample_rate=16000))
    # a layout may use the first levels of a codec with more (tessera tokenizer build --audio-levels)
    L.check_codecs(1000, img, CodecInfo(kind="audio", codebook_size=256, levels=8, sample_rate=16000))
    with pytest.raises(LayoutError, match="text tokenizer has 999 pieces"):
        L.check_codecs(999, img, aud)
    with pytest.raises(LayoutError, match="no image codec"):
        L.check_codecs(1000, None, aud)


def test_inconsistent_audio_sizes_refused():
    with pytest.raises(LayoutError, match="both"):
        VocabLayout(text_size=100, audio_codebook_size=16, audio_levels=0)


def test_modality_table():
    L = make()
    t = L.modality_table()
    assert t.shape == (L.padded_vocab_size,)
    assert t[5] == 0 and t[L.image_id(3)] == 1 and t[L.audio_id(2, 9)] == 2
    assert t[L.boi] == 1 and t[L.h_token(4)] == 1 and t[L.boa] == 2 and t[L.pad] == 0
    assert np.isin(t, [0, 1, 2]).all()
