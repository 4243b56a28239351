"""Bad documents and media are counted skips with their reasons, never an abort, a hang or a silent read."""

import json
import shutil
import time

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tessera.cli import main as cli
from tessera.tokenizers import build_bundle, load_bundle
from tessera.tokenizers.bundle import BundleError
from tessera.train import pretokenize as pt
from tessera.train.shards import ShardReader
from tessera.unimodal import media
from tessera.unimodal.media import MediaError, load_audio


def cfg(**kw):
    return pt.PretokenizeConfig(**{"workers": 1, "docs_per_shard": 4, "device": "cpu", **kw})


def write_docs(path, docs):
    path.write_text("".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in docs))
    return path


# ------------------------------------------------------------------------------------------ JSONL lines
def test_lines_the_json_parser_cannot_take_are_counted_skips(tmp_path, text_bundle):
    deep = '{"segments": [{"text": "a"}], "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    big = '{"segments": [{"text": "a"}], "n": ' + "9" * 5000 + "}"
    docs = write_docs(tmp_path / "docs.jsonl", [{"segments": [{"text": "one"}]}, deep, big,
                                                {"segments": [{"text": "two"}]}])
    m = pt.pretokenize(text_bundle, [docs], tmp_path / "s", cfg(), progress=False)
    assert m["complete"] and m["docs"] == 2
    assert m["skipped"]["counts"] == {"bad_json": 2}
    ex = m["skipped"]["examples"]["bad_json"]
    assert ex[0].startswith("docs.jsonl:2:") and "deep" in ex[0]
    assert ex[1].startswith("docs.jsonl:3:") and "digits" in ex[1]


def test_a_line_longer_than_the_cap_is_a_counted_skip(tmp_path, text_bundle):
    long_text = {"segments": [{"text": "x" * 5000}]}
    docs = write_docs(tmp_path / "docs.jsonl", [{"segments": [{"text": "one"}]}, long_text,
                                                {"segments": [{"text": "two"}]}])
    with open(docs, "a") as f:  # the last line has no newline and is too long as well
        f.write(json.dumps(long_text))
    m = pt.pretokenize(text_bundle, [docs], tmp_path / "s", cfg(max_line_bytes=1000), progress=False)
    assert m["docs"] == 2 and m["lines"] == 4
    assert m["skipped"]["counts"] == {"line_too_long": 2}
    assert m["skipped"]["examples"]["line_too_long"][0].startswith("docs.jsonl:2:")
    reader = ShardReader(tmp_path / "s")
    tok = load_bundle(text_bundle)
    assert [tok.decode(reader.doc(i)[0].tolist()) for i in range(2)] == [["one"], ["two"]]


def test_plan_chunks_reads_in_blocks_and_cuts_where_lines_end(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"a\n\nbb\nccc\nd")
    assert pt.plan_chunks([p], 2) == [(0, 0, 2, 1), (0, 3, 2, 3), (0, 10, 1, 5)]
    p.write_bytes(b"a\nb\n")
    assert pt.plan_chunks([p], 2) == [(0, 0, 2, 1)]
    p.write_bytes(b"")
    assert pt.plan_chunks([p], 2) == []


# ------------------------------------------------------------------------------------------ media paths
def test_media_paths_outside_the_jsonl_folder_are_skipped_unless_allowed(tmp_path, codec_bundle):
    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / "in.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "sub").mkdir()
    docs = write_docs(root / "docs.jsonl", [
        {"segments": [{"image": "in.png"}]},
        {"segments": [{"image": "sub/../in.png"}]},  # leaves nothing: still inside
        {"segments": [{"image": "../secret.png"}]},
        {"segments": [{"image": str(tmp_path / "secret.png")}]},
        {"segments": [{"image": "link.png"}]},
    ])
    m = pt.pretokenize(codec_bundle, [docs], tmp_path / "s", cfg(), progress=False)
    assert m["docs"] == 2 and m["skipped"]["counts"] == {"outside_root": 3}
    assert all("outside the data root" in e for e in m["skipped"]["examples"]["outside_root"])
    m = pt.pretokenize(codec_bundle, [docs], tmp_path / "s2", cfg(allow_outside_paths=True), progress=False)
    assert m["docs"] == 5 and m["skipped"]["total"] == 0


# ------------------------------------------------------------------------------------------------ audio
def test_audio_at_an_odd_sample_rate_is_resampled_quickly(tmp_path):
    t = np.arange(800) / 15_999
    sf.write(tmp_path / "odd.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 15_999)
    sf.write(tmp_path / "usual.wav", np.zeros(4410, np.float32), 44_100)
    load_audio(tmp_path / "usual.wav", sample_rate=16_000)  # imports and first calls out of the timing
    t0 = time.perf_counter()
    a = load_audio(tmp_path / "odd.wav", sample_rate=16_000)
    assert time.perf_counter() - t0 < 1.0
    assert a.sample_rate == 16_000 and abs(a.num_samples - 800) <= 1
    ref = 0.3 * np.sin(2 * np.pi * 440 * np.arange(a.num_samples) / 16_000)
    assert np.abs(a.waveform[50:-50] - ref[50:-50]).max() < 0.02  # the same tone, not noise
    ref = 0.3 * np.sin(2 * np.pi * 100 * np.arange(1600) / 16_000)
    for sr in (1_001, 44_056, 191_999):  # other rates of small gcd with 16 kHz: also quick, and the same tone
        t = np.arange(sr // 10) / sr
        a = media.resample(media.Audio((0.3 * np.sin(2 * np.pi * 100 * t)).astype(np.float32), sr), 16_000)
        assert abs(a.num_samples - 1600) <= 1 and np.abs(a.waveform[200:1400] - ref[200:1400]).max() < 0.02, sr
    assert time.perf_counter() - t0 < 2.0


def test_sample_rates_that_need_no_shortcut_resample_as_before():
    import torch
    import torchaudio.functional as AF

    w = np.random.default_rng(0).standard_normal(4410).astype(np.float32)
    for sr in (44_100, 22_050, 8_000, 48_000, 11_025):
        ref = AF.resample(torch.from_numpy(w), sr, 16_000).numpy()
        assert np.array_equal(media.resample(media.Audio(w, sr), 16_000).waveform, ref)


def test_bad_audio_is_a_counted_skip(tmp_path, codec_bundle, monkeypatch):
    d = tmp_path / "c"
    d.mkdir()
    tone = (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    sf.write(d / "ok.wav", tone, 16000)
    sf.write(d / "odd.wav", tone[:800], 15_999)
    sf.write(d / "low.wav", tone[:800], 200)
    sf.write(d / "loud.wav", np.full(1600, 1e6, np.float32), 16000, subtype="FLOAT")
    b = (d / "ok.wav").read_bytes()
    (d / "cut.wav").write_bytes(b[: len(b) // 2])  # the header promises 8,000 frames
    docs = write_docs(d / "docs.jsonl", [{"segments": [{"audio": n}]} for n in
                                         ("ok.wav", "odd.wav", "low.wav", "loud.wav", "cut.wav")])
    m = pt.pretokenize(codec_bundle, [docs], tmp_path / "s", cfg(), progress=False)
    assert m["docs"] == 2
    assert m["skipped"]["counts"] == {"bad_sample_rate": 1, "out_of_range": 1, "truncated": 1}
    ex = m["skipped"]["examples"]
    assert "200 Hz" in ex["bad_sample_rate"][0] and "1e+06" in ex["out_of_range"][0]
    assert "8000 frames" in ex["truncated"][0]

    def broken(audio, sample_rate):
        if audio.sample_rate != sample_rate:
            raise RuntimeError("resampler failed")
        return audio

    monkeypatch.setattr(media, "resample", broken)  # any error while decoding one file is that file's skip
    m = pt.pretokenize(codec_bundle, [docs], tmp_path / "s2", cfg(), progress=False)
    assert m["docs"] == 1 and m["skipped"]["counts"]["decode_error"] == 1
    assert "resampler failed" in m["skipped"]["examples"]["decode_error"][0]


def test_truncated_and_out_of_range_audio_raise_media_errors(tmp_path):
    x = (0.1 * np.sin(np.arange(16000) / 3)).astype(np.float32)
    sf.write(tmp_path / "full.wav", x, 16000)
    b = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(b[: len(b) - 1000])
    with pytest.raises(MediaError) as e:
        load_audio(tmp_path / "cut.wav")
    assert e.value.reason == "truncated"
    with pytest.raises(MediaError) as e:
        load_audio(b[: len(b) - 1000])  # bytes too
    assert e.value.reason == "truncated"
    assert load_audio(b).num_samples == 16000
    sf.write(tmp_path / "hot.wav", 3.0 * x, 16000, subtype="FLOAT")  # hot but plausible: kept
    assert load_audio(tmp_path / "hot.wav").num_samples == 16000
    sf.write(tmp_path / "scaled.wav", 30000.0 * x, 16000, subtype="FLOAT")  # int16 values stored as float
    with pytest.raises(MediaError) as e:
        load_audio(tmp_path / "scaled.wav")
    assert e.value.reason == "out_of_range"


# ----------------------------------------------------------------------------------------------- images
def test_an_image_that_claims_a_huge_size_is_a_counted_skip(tmp_path, codec_bundle):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    d = tmp_path / "c"
    d.mkdir()  # a 100,000 x 100,000 PNG header in a few bytes: refused before any pixel is decoded
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
                                 + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    docs = write_docs(d / "docs.jsonl", [{"segments": [{"image": "bomb.png"}]}, {"segments": [{"text": "ok"}]}])
    m = pt.pretokenize(codec_bundle, [docs], tmp_path / "s", cfg(), progress=False)
    assert m["docs"] == 1 and m["skipped"]["counts"] == {"too_large": 1}


def test_build_refuses_a_max_grid_below_the_image_codecs_largest_grid(tmp_path, codec_bundle, text_dir, capsys):
    # the tiny image codec resizes to at most 64 px at 8 px per code: grids up to 8x8
    with pytest.raises(BundleError, match=r"--max-grid 4 .* 8"):
        build_bundle(tmp_path / "b", text_dir, image=codec_bundle / "image", max_grid=4)
    assert not (tmp_path / "b").exists()
    rc = cli(["tokenizer", "build", "--text", str(text_dir), "--image", str(codec_bundle / "image"),
              "--out", str(tmp_path / "b"), "--max-grid", "7"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "7" in err and "8" in err
    build_bundle(tmp_path / "b", text_dir, image=codec_bundle / "image", max_grid=8)


def test_an_image_beyond_an_old_bundles_max_grid_is_a_counted_skip(tmp_path, codec_bundle):
    from tessera.tokenizers import bundle as bundle_mod
    from tessera.tokenizers.layout import VocabLayout

    # a bundle built before the check: its layout allows 4x4 grids, its codec makes up to 8x8
    old = tmp_path / "old_bundle"
    shutil.copytree(codec_bundle, old)
    spec = json.loads((old / "tokenizer.json").read_text())
    L = VocabLayout.from_dict(spec["layout"])
    spec["layout"] = VocabLayout(text_size=L.text_size, image_codebook_size=L.image_codebook_size,
                                 audio_codebook_size=L.audio_codebook_size, audio_levels=L.audio_levels,
                                 max_grid=4, n_reserved=L.n_reserved).to_dict()
    spec["hash"] = bundle_mod._bundle_hash(spec)
    (old / "tokenizer.json").write_text(json.dumps(spec))
    d = tmp_path / "c"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / "small.png")
    Image.fromarray(rng.integers(0, 255, (64, 48), dtype=np.uint8)).save(d / "big.png")
    docs = write_docs(d / "docs.jsonl", [{"segments": [{"image": "small.png"}]}, {"segments": [{"image": "big.png"}]}])
    m = pt.pretokenize(old, [docs], tmp_path / "s", cfg(), progress=False)
    assert m["docs"] == 1 and m["skipped"]["counts"] == {"grid_too_large": 1}
    assert "8x6" in m["skipped"]["examples"]["grid_too_large"][0]


# ------------------------------------------------------------------------------------ valid input stays
def test_shards_hold_what_the_tokenizer_makes_of_each_document(tmp_path, codec_bundle):
    """The shards of a valid corpus are the tokenizer's encoding of each document, `<s> ... </s>`."""
    d = tmp_path / "c"
    d.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(32, 32), (40, 24), (100, 70)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    for i, sr in enumerate([16000, 44100, 22050]):
        sf.write(d / f"a{i}.wav", (0.2 * rng.standard_normal(int(sr * 0.4))).astype(np.float32), sr)
    segs = [[{"text": "one"}, {"image": "im0.png"}], [{"audio": "a1.wav"}, {"text": "two", "loss": False}],
            [{"image": "im2.png"}, {"audio": "a0.wav"}, {"image": "im1.png"}], [{"audio": "a2.wav"}],
            [{"text": "three"}, {"image": "im0.png"}, {"audio": "a1.wav"}]]
    docs = write_docs(d / "docs.jsonl", [{"segments": s} for s in segs])
    pt.pretokenize(codec_bundle, [docs], tmp_path / "s", cfg(docs_per_shard=2), progress=False)
    tok = load_bundle(codec_bundle)
    reader = ShardReader(tmp_path / "s")
    sr = tok.audio_codec.info.sample_rate
    for i, s in enumerate(segs):
        values = [x["text"] if "text" in x else media.load_image(d / x["image"]) if "image" in x
                  else load_audio(d / x["audio"], sample_rate=sr) for x in s]
        ids = [tok.bos_id] + [t for v in values for t in tok.encode(v)] + [tok.eos_id]
        assert reader.doc(i)[0].tolist() == ids, i


@pytest.mark.parametrize("kwargs, flag", [
    ({"workers": -2}, "--workers"),
    ({"docs_per_shard": 0}, "--docs-per-shard"),
    ({"max_audio_seconds": -1.0}, "--max-audio-seconds"),
    ({"max_audio_seconds": float("nan")}, "--max-audio-seconds"),
    ({"max_media_bytes": 0}, "--max-media-mb"),
])
def test_pretokenize_settings_out_of_range_are_refused_by_name(kwargs, flag):
    """They ran: --workers -2 as one worker, --max-audio-seconds -1 skipping every clip as too long."""
    from tessera.train.pretokenize import PretokenizeConfig
    from tessera.train.shards import ShardError

    with pytest.raises(ShardError, match=f"^{flag} must be"):
        PretokenizeConfig(**kwargs)
