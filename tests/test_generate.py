"""Generation: constrained decoding fuzz, seeds, batching, CFG, streaming, scoring, HF parity."""

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.model.api import random_model
from tessera.model.constrained import FSMConfig, SpanFSM, TEXT
from tessera.unimodal.media import Audio
from tessera.tokenizers import AudioCodes, ImageCodes


@pytest.fixture(scope="module")
def m(fixture_tokenizer):
    return random_model(fixture_tokenizer, "tiny", seed=0)


def random_prompt(rng, tok):
    segs = []
    for _ in range(rng.randint(1, 3)):
        k = rng.random()
        if k < 0.5:
            segs.append("".join(rng.choice("abc xyz日本😀") for _ in range(rng.randint(0, 12))) or "q")
        elif k < 0.75:
            codes = torch.randint(0, 16, (1, rng.randint(1, 3), rng.randint(1, 3)))
            segs.append(tok.decode_image_codes(codes[0].numpy()))
        else:
            segs.append(Audio(np.random.default_rng(rng.randint(0, 99)).uniform(-1, 1, rng.randint(160, 800)), 16000))
    return segs


def random_sampling(rng):
    return dict(temperature=rng.choice([0.0, 0.5, 1.0, 1.5]), top_k=rng.choice([0, 1, 5, 50]),
                top_p=rng.choice([1.0, 0.9, 0.3]), seed=rng.randint(0, 10**6))


@pytest.fixture(scope="module")
def real(codec_bundle):
    """A random tiny decoder over real (untrained) tiny image and audio codecs."""
    from tessera.tokenizers import load_bundle

    return random_model(load_bundle(codec_bundle), "tiny", seed=1)


def test_fuzz_100_images_all_decode_through_the_codec(real):
    rng = random.Random(0)
    tok = real.tokenizer
    for i in range(100):
        size = rng.choice([None, (16, 24), (32, 32), (8, 64)])
        ids = real.generate_ids(random_prompt(rng, tok), output="image", image_size=size,
                                cfg_scale=rng.choice([1.0, 3.0]), **random_sampling(rng))[0]
        out = tok.decode(ids, strict=True)  # raises on a malformed span
        assert len(out) == 1 and isinstance(out[0], Image.Image), out
        h, w = size or tok.image_codec.info.default_size
        assert out[0].size == (w, h)
        a = np.asarray(out[0])
        assert a.shape == (h, w, 3) and a.dtype == np.uint8


def test_fuzz_100_audio_clips_all_decode_through_the_codec(real):
    rng = random.Random(1)
    tok = real.tokenizer
    hop = tok.audio_codec.info.downsample
    for i in range(100):
        secs = rng.choice([0.04, 0.2, 0.5])
        ids = real.generate_ids(random_prompt(rng, tok), output="audio", max_audio_seconds=secs,
                                cfg_scale=rng.choice([1.0, 2.0]), **random_sampling(rng))[0]
        out = tok.decode(ids, strict=True)
        assert len(out) == 1 and isinstance(out[0], Audio), out
        a = out[0]
        assert a.sample_rate == 16000 and a.num_samples > 0 and a.num_samples % hop == 0
        assert np.isfinite(a.waveform).all()
        assert a.num_samples <= max(1, int(np.ceil(secs * 25))) * hop


def test_fuzz_any_output_keeps_spans_whole_within_the_budget(m):
    rng = random.Random(2)
    tok = m.tokenizer
    for i in range(40):
        budget = rng.choice([5, 9, 17, 40])
        ids = m.generate_ids(random_prompt(rng, tok), output="any", max_new_tokens=budget, **random_sampling(rng))[0]
        assert len(ids) <= budget
        tok.parse(ids, strict=True)  # raises on any broken span


def test_text_output_never_emits_codes_or_specials(m):
    L = m.tokenizer.layout
    for seed in range(5):
        ids = m.generate_ids("hello", output="text", max_new_tokens=40, seed=seed, temperature=1.5)[0]
        assert all(i in L.ranges["text"] and i != 1 for i in ids)


def test_fsm_masks_respect_the_budget(fixture_tokenizer):
    fsm = SpanFSM(fixture_tokenizer.layout, fixture_tokenizer.eos_id)
    L = fixture_tokenizer.layout
    assert fsm.rows.dtype == torch.bool and fsm.rows.shape[1] == L.padded_vocab_size
    cfg = FSMConfig(allow_image=True, allow_audio=True)
    st = fsm.init_state(3, TEXT, budget=4)
    st["budget"] = torch.tensor([4, 5, 6])
    mask = fsm.allowed(st, cfg)
    # a minimal image span is 5 tokens, a minimal audio span n_q + 2 = 5
    assert mask[:, L.boi].tolist() == [False, True, True] and mask[:, L.boa].tolist() == [False, True, True]
    # grid sizes: with 9 tokens left after <boi>, <h:n> needs n + 3 <= 9
    st = fsm.init_state(1, 1, budget=9)
    allowed_h = fsm.allowed(st, cfg)[0, L.h_offset : L.w_offset].nonzero().squeeze(1) + 1
    assert allowed_h.tolist() == list(range(1, 7))
    # text never allows codes, grid tokens, closers or padding rows
    text_row = fsm.rows[fsm.R_TEXT]
    assert not text_row[L.ranges["image"].offset:].any() and not text_row[L.ranges["special"].offset:].any()


def test_same_seed_same_output(m):
    a = m.generate_ids("draw", output="image", seed=7, temperature=1.0)
    b = m.generate_ids("draw", output="image", seed=7, temperature=1.0)
    c = m.generate_ids("draw", output="image", seed=8, temperature=1.0)
    assert a == b and a != c


def test_batched_generation_matches_single_prompts(m, fixture_tokenizer):
    prompts = [["a"], ["a much longer prompt with more words"], ["x", ImageCodes(np.ones((2, 2), int))]]
    prompts[2][1] = fixture_tokenizer.decode_image_codes(np.ones((2, 2), int))
    for output in ("text", "image", "audio"):
        batched = m.generate_ids(prompts, output=output, temperature=0, max_new_tokens=24 if output != "image" else None)
        single = [m.generate_ids(p, output=output, temperature=0, max_new_tokens=24 if output != "image" else None)[0]
                  for p in prompts]
        assert batched == single, output


def test_per_prompt_seeds_make_sampled_batches_match_single_prompts(m):
    prompts = [["one"], ["two two"], ["three"]]
    for output in ("image", "audio"):
        kw = dict(output=output, temperature=1.0, top_k=20, cfg_scale=2.0, max_audio_seconds=0.2)
        batched = m.generate_ids(prompts, seed=[5, 6, 7], **kw)
        single = [m.generate_ids(p, seed=s, **kw)[0] for p, s in zip(prompts, [5, 6, 7])]
        assert batched == single


def test_cfg_changes_only_spans_and_batch_returns_lists(m):
    out = m.generate([["one"], ["two"]], output="image", cfg_scale=4.0, seed=0)
    assert len(out) == 2 and all(isinstance(o[0], Image.Image) for o in out)
    with pytest.raises(ValueError, match="cfg_scale applies"):
        m.generate("x", output="text", cfg_scale=2.0)


def test_stream_matches_generate(m):
    for output, kw in (("text", {"max_new_tokens": 30}), ("any", {"max_new_tokens": 60}), ("audio", {}), ("image", {})):
        pieces = list(m.stream("tell me", output=output, seed=3, **kw))
        full = m.generate("tell me", output=output, seed=3, **kw)
        merged = []
        for p in pieces:
            if isinstance(p, str) and merged and isinstance(merged[-1], str):
                merged[-1] += p
            else:
                merged.append(p)
        assert len(merged) == len(full)
        for a, b in zip(merged, full):
            if isinstance(a, str):
                assert a == b
            elif isinstance(a, Image.Image):
                assert np.array_equal(np.asarray(a), np.asarray(b))
            else:
                assert np.array_equal(a.waveform, b.waveform)


def test_score_is_the_summed_log_probability(m):
    tok = m.tokenizer
    p, c = tok.encode(["what is this"], bos=True), tok.encode([" seven"])
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = m.model(ids).float().log_softmax(-1)[0]
    manual = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
    assert m.score("what is this", " seven") == pytest.approx(manual, abs=1e-4)
    assert m.score("x", "") == 0.0


def test_greedy_text_matches_hf_generate(m):
    from transformers import LogitsProcessor, LogitsProcessorList

    from tessera.model.hf_export import to_hf_model

    tok = m.tokenizer
    hf = to_hf_model(m.model, tok.bos_id, tok.eos_id, tok.pad_id)
    allowed = SpanFSM(tok.layout, tok.eos_id).rows[0]  # the TEXT row: what output="text" may emit

    class TextOnly(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    for prompt in ("hello", "a drawing of the digit 7", "😀"):
        ours = m.generate_ids(prompt, output="text", temperature=0, max_new_tokens=30)[0]
        ids = torch.tensor([tok.encode([prompt], bos=True)])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                             logits_processor=LogitsProcessorList([TextOnly()]), eos_token_id=tok.eos_id,
                             pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
        while theirs and theirs[-1] == tok.pad_id:
            theirs.pop()
        assert ours == theirs


def test_static_cache_equals_dynamic(m):
    from tessera.model.generate import GenerationConfig, decode

    tok = m.tokenizer
    fsm = SpanFSM(tok.layout, tok.eos_id)
    cfg = GenerationConfig(max_new_tokens=20, temperature=0)
    args = dict(start_state=TEXT, pad_id=tok.pad_id)
    prompts = [tok.encode(["hi"], bos=True), tok.encode(["a longer one"], bos=True)]
    a = torch.stack(list(decode(m.model, prompts, fsm, FSMConfig(), cfg, **args)))
    b = torch.stack(list(decode(m.model, prompts, fsm, FSMConfig(), cfg, static_cache=True, **args)))
    assert torch.equal(a, b)


def test_untracked_span_kinds_change_nothing(m, monkeypatch):
    """The decoder skips the FSM work of span kinds a generation cannot reach; tracking every kind gives the
    same tokens, for each output kind and for sampled and padded batches."""
    cases = [("text", dict(temperature=0)), ("text", dict(temperature=1.5, seed=3)),
             ("image", dict(temperature=1.0, seed=4)), ("audio", dict(temperature=1.0, seed=5, max_audio_seconds=0.5))]
    prompts = ["hi", "a somewhat longer prompt"]
    fast = [m.generate_ids(prompts, output=o, max_new_tokens=24, **kw) for o, kw in cases]
    assert SpanFSM.reachable(m.fsm, FSMConfig(), TEXT) == (False, False)
    monkeypatch.setattr(SpanFSM, "reachable", lambda self, cfg, start: (True, True))
    full = [m.generate_ids(prompts, output=o, max_new_tokens=24, **kw) for o, kw in cases]
    assert fast == full


def test_bad_requests_are_clear(m):
    with pytest.raises(ValueError, match="multiples"):
        m.generate("x", output="image", image_size=(10, 10))
    with pytest.raises(ValueError, match="output must be"):
        m.generate("x", output="video")
    with pytest.raises(TypeError, match="prompt segment"):
        m.generate([3], output="text")


def test_a_generation_config_is_the_keyword_arguments_as_one_object(m):
    from tessera.model.generate import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=6, temperature=0.8, top_k=5, seed=3)
    keywords = m.generate_ids("hi", output="text", max_new_tokens=6, temperature=0.8, top_k=5, seed=3)
    assert m.generate_ids("hi", output="text", config=cfg) == keywords
    # keywords given beside a config override its fields
    assert m.generate_ids("hi", config=cfg, seed=4) == m.generate_ids("hi", max_new_tokens=6, temperature=0.8,
                                                                      top_k=5, seed=4)
    assert "".join(m.stream("hi", config=cfg)) == m.generate("hi", config=cfg)[0]
    with pytest.raises(TypeError, match="unknown generation option.* temprature"):
        m.generate_ids("hi", temprature=0.5)
    with pytest.raises(ValueError, match="^top_p must be in"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="^draft_tokens must be an integer >= 1"):
        GenerationConfig(draft_tokens=0)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(  # inductor's C++ kernels: 15 s with a warm cache, a minute cold
        shutil.which("g++") is None, reason="inductor's CPU backend needs a C++ compiler (g++)")),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_compiled_decoding_equals_plain(fixture_tokenizer, device):
    """`Tessera.compile()`: a static KV cache and a compiled step (on CUDA captured as CUDA graphs, replayed
    from the second call on) give plain decoding's greedy ids, for text and for an image with CFG."""
    from tessera.model.api import Tessera

    m = Tessera(random_model(fixture_tokenizer, "tiny", seed=0).model.to(device), fixture_tokenizer)
    cases = [("text", {"max_new_tokens": 24}), ("image", {"cfg_scale": 3.0})]
    plain = [m.generate_ids(["hi", "a longer prompt"], output=o, temperature=0, **kw) for o, kw in cases]
    m.compile()
    for _ in range(2):
        assert [m.generate_ids(["hi", "a longer prompt"], output=o, temperature=0, **kw) for o, kw in cases] == plain
