"""Generation arguments out of range are one clear ValueError, never a silent default or a torch error."""

import numpy as np
import pytest

from tessera.model.api import random_model
from tessera.unimodal.media import Audio


@pytest.fixture(scope="module")
def m(fixture_tokenizer):
    return random_model(fixture_tokenizer, "tiny", seed=0)


@pytest.mark.parametrize("output", ["text", "audio", "image", "any"])
@pytest.mark.parametrize("n", [0, -1])
def test_max_new_tokens_below_one_is_refused(m, output, n):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        m.generate_ids("hi", output=output, max_new_tokens=n, seed=0)


def test_max_new_tokens_too_small_for_the_image_span_is_refused(m):
    # the fixture codec's default image is a 4x4 grid: 16 codes and <eoi>
    with pytest.raises(ValueError, match="cannot hold a 4x4-code image"):
        m.generate_ids("hi", output="image", max_new_tokens=5, seed=0)
    ids = m.generate_ids("hi", output="image", max_new_tokens=100, seed=0)[0]
    assert len(ids) == 3 + 17  # <boi> <h> <w>, then the fixed-length span: a larger budget is simply not used


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_audio_seconds": -1.0}, "max_audio_seconds"),
    ({"max_audio_seconds": float("nan")}, "max_audio_seconds"),
])
def test_sampling_arguments_out_of_range_are_refused(m, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        m.generate_ids("hi", output="text", max_new_tokens=4, seed=0, **kwargs)


def test_nan_cfg_scale_is_refused(m):
    with pytest.raises(ValueError, match="^cfg_scale must be a finite number"):
        m.generate_ids("hi", output="image", cfg_scale=float("nan"), seed=0)


def test_prompt_longer_than_max_seq_len_is_refused(m):
    long = " ".join(["seven"] * 2000)
    assert len(m.tokenizer.encode([long])) > m.model.cfg.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate_ids(long, output="text", seed=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        list(m.stream(long, output="text", seed=0))


def test_default_budget_shrinks_to_fit_max_seq_len_but_an_explicit_one_must_fit(m):
    limit = m.model.cfg.max_seq_len
    prompt = " ".join(["seven"] * 2000)
    ids = m.tokenizer.encode([prompt], bos=True)
    prompt = m.tokenizer.text.decode(ids[1:limit - 9])  # about 10 tokens of room
    n = len(m.tokenizer.encode([prompt], bos=True))
    assert limit - 20 < n < limit
    out = m.generate_ids(prompt, output="text", temperature=0.0, seed=0)[0]  # default 64 -> the room left
    assert len(out) <= limit - n
    with pytest.raises(ValueError, match="exceed the model's max_seq_len"):
        m.generate_ids(prompt, output="text", max_new_tokens=64, seed=0)


def test_audio_time_by_channels_is_read_as_channels():
    t = np.zeros((16000, 2), np.float32)
    t[:, 1] = 0.5
    a = Audio(t, 16000)
    assert a.waveform.shape == (2, 16000) and a.num_samples == 16000 and a.duration == 1.0
    assert np.allclose(a.waveform[1], 0.5)
    assert Audio(np.zeros((2, 16000), np.float32), 16000).waveform.shape == (2, 16000)  # channels-first as before
    with pytest.raises(ValueError, match="at most 8 channels"):
        Audio(np.zeros((100, 16000), np.float32), 16000)


def test_a_prompt_of_another_type_is_a_type_error_naming_it(m):
    with pytest.raises(TypeError, match="a prompt is a str, PIL.Image.Image, tessera.Audio or a list of them, not int"):
        m.generate_ids(5, max_new_tokens=2)
