import json

import pytest
import torch

from tessera.cli import main as cli
from tessera.storage import atomic_write_json, save_tensors
from tessera.tokenizers import BundleError, build_bundle, load_bundle
from tessera.tokenizers.bundle import read_bundle_spec
from tessera.unimodal.protocol import CodecInfo


def fake_codec(d, info: CodecInfo):
    d.mkdir(parents=True)
    atomic_write_json(d / "codec.json", {"format": "tessera-codec", "version": 1, "kind": info.kind,
                                         "info": info.to_dict(), "config": {}})
    save_tensors(d / "model.safetensors", {"w": torch.zeros(2)})
    return d


def test_text_only_bundle_round_trip(tmp_path, text_dir):
    spec = build_bundle(tmp_path / "b", text_dir)
    tok = load_bundle(tmp_path / "b")
    assert tok.bundle_hash == spec["hash"]
    assert tok.image_codec is None and tok.audio_codec is None
    assert tok.decode(tok.encode("hello 🌍", bos=True, eos=True)) == ["hello 🌍"]
    assert tok.layout.vocab_size == tok.text.vocab_size + tok.layout.n_special


def test_existing_bundle_needs_force(tmp_path, text_dir):
    build_bundle(tmp_path / "b", text_dir)
    with pytest.raises(BundleError, match="--force"):
        build_bundle(tmp_path / "b", text_dir)
    build_bundle(tmp_path / "b", text_dir, force=True)


def test_codec_sizes_enter_the_layout_and_tampering_is_detected(tmp_path, text_dir):
    img = fake_codec(tmp_path / "img", CodecInfo(kind="image", codebook_size=1000, downsample=8))
    aud = fake_codec(tmp_path / "aud", CodecInfo(kind="audio", codebook_size=1024, levels=4, downsample=640,
                                                 sample_rate=16000))
    spec = build_bundle(tmp_path / "b", text_dir, img, aud)
    layout = spec["layout"]
    assert layout["ranges"]["image"]["size"] == 1000 and layout["ranges"]["audio"]["size"] == 4096
    assert layout["padded_vocab_size"] % 128 == 0
    # a codec file changed after the bundle was built
    save_tensors(tmp_path / "b" / "image" / "model.safetensors", {"w": torch.ones(2)})
    with pytest.raises(BundleError, match="image codec .* does not match its recorded hash"):
        load_bundle(tmp_path / "b")
    # tokenizer.json edited by hand
    p = tmp_path / "b" / "tokenizer.json"
    d = json.loads(p.read_text())
    d["layout"]["image_codebook_size"] = 512
    p.write_text(json.dumps(d))
    with pytest.raises(BundleError, match="edited or corrupted"):
        read_bundle_spec(tmp_path / "b")


def test_wrong_kind_is_refused(tmp_path, text_dir):
    aud = fake_codec(tmp_path / "aud", CodecInfo(kind="audio", codebook_size=16, levels=2, sample_rate=16000))
    with pytest.raises(BundleError, match="holds a codec of kind 'audio', but was given as --image"):
        build_bundle(tmp_path / "b", text_dir, image=aud)


def test_cli_build_and_info(tmp_path, text_dir, capsys):
    assert cli(["tokenizer", "build", "--text", str(text_dir), "--out", str(tmp_path / "b")]) == 0
    assert cli(["tokenizer", "info", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "text" in out and "special" in out
    assert cli(["tokenizer", "build", "--text", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "no SentencePiece model" in capsys.readouterr().err


def test_cli_text_training(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("the digit seven\nthe digit eight\n" * 200)
    assert cli(["tokenizer", "train", "text", "--input", str(f), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "spm.model").is_file() and (tmp_path / "t" / "text.json").is_file()
    assert cli(["tokenizer", "train", "text", "--input", str(tmp_path / "none.txt"), "--out", str(tmp_path / "u")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_lists_existing_commands(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    assert "tokenizer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["tokenizer", "--help"])
    out = capsys.readouterr().out
    assert "build" in out and "train" in out


def test_a_bundle_can_keep_the_first_audio_levels_of_a_real_codec(tmp_path, text_dir, codec_bundle):
    import numpy as np

    from tessera.unimodal.media import Audio

    full = load_bundle(codec_bundle)
    assert cli(["tokenizer", "build", "--text", str(text_dir), "--audio", str(codec_bundle / "audio"),
                "--audio-levels", "2", "--out", str(tmp_path / "b2")]) == 0
    tok = load_bundle(tmp_path / "b2")
    assert tok.layout.audio_levels == 2 and set(r for r in tok.layout.ranges if r.startswith("audio.")) == {
        "audio.0", "audio.1"}
    clip = Audio(0.3 * np.sin(np.arange(8000, dtype=np.float32) / 9), 16000)
    codes4, codes2 = full.encode_audios([clip])[0], tok.encode_audios([clip])[0]
    assert codes2.shape[0] == 2 and np.array_equal(codes2, codes4[:2])  # the first two levels, unchanged
    ids = tok.encode([clip])
    assert len(ids) == 2 + 2 * codes2.shape[1]  # <boa>, two codes per frame, <eoa>
    (back,) = tok.decode(ids, strict=True)
    assert back.sample_rate == 16000 and back.num_samples == codes2.shape[1] * full.audio_codec.info.downsample
    for bad in (0, 5):
        with pytest.raises(BundleError, match="between 1 and the audio codec's 4 levels"):
            build_bundle(tmp_path / f"x{bad}", text_dir, audio=codec_bundle / "audio", audio_levels=bad)
