"""The audio codec: shapes and the output-length rule, fewer levels, resampling and mono mixing, files,
metrics, the speech judge, bad input, training through the CLI, resume, and DDP codebook sync."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import torchrun_argv

from tessera.config import ConfigError
from tessera.unimodal import load_codec, read_codec_info
from tessera.unimodal.audio import AudioCodec, AudioCodecConfig, SEANetCodec, audio_codec_config
from tessera.unimodal.audio_eval import codebook_usage, opus_available, opus_roundtrip, si_sdr
from tessera.unimodal.audio_train import (
    AudioTrainConfig,
    CropSampler,
    init_codebooks,
    load_clips,
    split_overrides,
)
from tessera.unimodal.media import MediaError, SkipLog

SR = 16000
# A small network with the tiny preset's frame layout (hop 640, 25 frames/s, 4 levels of 1024 codes).
SMALL = ["channels=4", "max_channels=32", "dim=16", "lstm_layers=0"]


def small_config(**kw) -> AudioCodecConfig:
    cfg = audio_codec_config("tiny", SMALL)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg.validate()


def speechlike(n: int, seed: int = 0, f0: float = 140.0) -> np.ndarray:
    """A chirp with harmonics and an amplitude envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    f = f0 * (1 + 0.3 * np.sin(2 * np.pi * 1.5 * t + seed))
    ph = 2 * np.pi * np.cumsum(f) / SR
    w = sum(np.sin(k * ph) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    return (0.3 * w / np.abs(w).max() + 0.01 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def small_codec() -> AudioCodec:
    """A small untrained codec whose codebooks are k-means initialized on speech-like audio."""
    torch.manual_seed(0)
    cfg = small_config()
    model = SEANetCodec(cfg)
    sampler = CropSampler([speechlike(SR, s) for s in range(8)], 640 * 8, seed=0)
    init_codebooks(model, sampler, n_vectors=2048, batch_size=16, rank=0, device="cpu")
    return AudioCodec(model)


# --------------------------------------------------------------------------------------- shapes, lengths
@pytest.mark.parametrize("T", [1, 639, 640, 641, 12345, 16000])
def test_encode_decode_shapes_follow_the_length_rule(small_codec, T):
    x = torch.from_numpy(np.stack([speechlike(T, 1), speechlike(T, 2)]))
    codes = small_codec.encode(x, SR)
    frames = math.ceil(T / 640)
    assert codes.dtype == torch.int64 and codes.shape == (2, 4, frames)
    assert small_codec.num_frames(T) == frames
    assert 0 <= codes.min() and codes.max() < 1024
    y = small_codec.decode(codes)
    assert y.dtype == torch.float32 and y.shape == (2, frames * 640)
    assert small_codec.reconstruct(x, SR).shape == (2, T)


def test_inputs_of_every_layout_and_type(small_codec):
    w = speechlike(3000, 3)
    c1 = small_codec.encode(w, SR)  # numpy (T,)
    assert c1.shape == (1, 4, 5)
    assert torch.equal(c1, small_codec.encode(torch.from_numpy(w)[None], SR))  # torch (B, T)
    assert torch.equal(c1, small_codec.encode(np.stack([w, w])[None], SR))  # (B, C, T), identical channels
    with pytest.raises(ValueError, match="shape"):
        small_codec.encode(np.zeros((1, 1, 1, 10), np.float32), SR)


def test_decoding_from_fewer_levels(small_codec):
    x = torch.from_numpy(np.stack([speechlike(8000, 4)]))
    codes = small_codec.encode(x, SR)
    outs = []
    for k in range(1, 5):
        y = small_codec.decode(codes[:, :k])
        assert y.shape == (1, 13 * 640)
        assert torch.equal(y, small_codec.decode(codes, n_q=k))
        outs.append(y)
    assert not torch.equal(outs[0], outs[-1])
    # Residual VQ: every further level brings the quantized latent closer to the encoder's output.
    m = small_codec.model
    z = m.encoder(torch.nn.functional.pad(x, (0, 13 * 640 - 8000))[:, None])
    errs = [float((m.quantizer.decode(codes[:, :k]) - z).pow(2).mean()) for k in range(1, 5)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    with pytest.raises(ValueError, match="levels"):
        small_codec.decode(torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        small_codec.decode(torch.full((1, 2, 3), 1024))


def test_resampling_and_mono_mixing(small_codec):
    import torchaudio.functional as AF

    w = torch.from_numpy(speechlike(16000, 5))
    w44 = AF.resample(w, SR, 44100)
    # prepare() brings any rate to the codec's rate: 44.1 kHz -> 16 kHz recovers the band-limited original
    back = small_codec.prepare(w44, 44100)[0]
    assert back.shape[-1] == 16000
    assert float((back[200:-200] - w[200:-200]).abs().max()) < 0.02
    codes44 = small_codec.encode(w44, 44100)
    assert codes44.shape == (1, 4, small_codec.num_frames(len(w44), 44100)) == (1, 4, 25)
    # 8 kHz input: T' = ceil(T * 16000 / 8000)
    assert small_codec.encode(np.zeros(801, np.float32), 8000).shape[-1] == math.ceil(1602 / 640)
    # stereo is the mean of its channels
    left, right = speechlike(4000, 6), speechlike(4000, 7)
    mixed = small_codec.encode(((left + right) / 2)[None], SR)
    assert torch.equal(small_codec.encode(np.stack([left, right])[None], SR), mixed)


def test_encode_refuses_nan_and_empty(small_codec):
    w = speechlike(2000, 8)
    w[100] = np.nan
    with pytest.raises(MediaError, match="NaN or Inf") as e:
        small_codec.encode(w, SR)
    assert e.value.reason == "nonfinite"
    with pytest.raises(MediaError) as e:
        small_codec.encode(np.zeros(0, np.float32), SR)
    assert e.value.reason == "empty"


# ------------------------------------------------------------------------------------------- files
def test_codec_directory_round_trip(small_codec, tmp_path):
    AudioCodec.save_model(small_codec.model, tmp_path / "codec")
    assert sorted(p.name for p in (tmp_path / "codec").iterdir()) == ["codec.json", "model.safetensors"]
    meta = json.loads((tmp_path / "codec" / "codec.json").read_text())
    assert set(meta) == {"format", "version", "kind", "info", "config"}
    assert (meta["format"], meta["version"], meta["kind"]) == ("tessera-codec", 1, "audio")
    info = read_codec_info(tmp_path / "codec")
    assert info == small_codec.info
    assert (info.kind, info.codebook_size, info.levels, info.downsample, info.sample_rate) == ("audio", 1024, 4, 640,
                                                                                              16000)
    loaded = load_codec(tmp_path / "codec")
    assert isinstance(loaded, AudioCodec)
    x = speechlike(5000, 9)
    codes = small_codec.encode(x, SR)
    # weight norm is folded on load: the same codes, and the same waveform up to float rounding
    assert (loaded.encode(x, SR) == codes).float().mean() > 0.95
    assert torch.allclose(loaded.decode(codes), small_codec.decode(codes), atol=1e-4)


def test_presets_and_overrides():
    tiny = audio_codec_config("tiny")
    assert (tiny.hop, tiny.frame_rate, tiny.num_quantizers, tiny.codes_per_level) == (640, 25.0, 4, 1024)
    base = audio_codec_config("base")
    assert base.hop == 320 and base.num_quantizers >= 8
    assert audio_codec_config("tiny", ["strides=8,5,4,2"]).frame_rate == 50.0
    fsq = audio_codec_config("tiny", ["quantizer=fsq"])
    assert fsq.info().codebook_size == 1024
    with pytest.raises(ConfigError, match="no key"):
        audio_codec_config("tiny", ["stridez=2"])
    m, t = split_overrides(["strides=8,5,4,2", "lr=1e-3", "dim=32", "batch_size=4"])
    assert m == ["strides=8,5,4,2", "dim=32"] and t == ["lr=1e-3", "batch_size=4"]
    with pytest.raises(ConfigError, match="unknown audio codec key 'nope'"):
        split_overrides(["nope=1"])


def test_fsq_codec_encodes_and_decodes_fewer_levels():
    model = SEANetCodec(small_config(quantizer="fsq"))
    codec = AudioCodec(model)
    codes = codec.encode(speechlike(3000, 10), SR)
    assert codes.shape == (1, 4, 5) and codes.max() < 1024
    assert codec.decode(codes[:, :2]).shape == (1, 5 * 640)


# ----------------------------------------------------------------------------------------- metrics
def test_si_sdr_and_codebook_usage():
    x = speechlike(8000, 11)
    assert si_sdr(x, x) > 60
    assert abs(si_sdr(0.5 * x, x) - si_sdr(x, x)) < 1e-6 or si_sdr(0.5 * x, x) > 60  # scale invariant
    noisy = x + 0.1 * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
    noisier = x + 0.3 * np.random.default_rng(1).standard_normal(len(x)).astype(np.float32)
    assert si_sdr(x, x) > si_sdr(noisy, x) > si_sdr(noisier, x)
    codes = [torch.tensor([[0, 1, 2, 2], [5, 5, 5, 5]])]
    assert codebook_usage(codes, 8) == [0.375, 0.125]


def test_eval_takes_a_judge_and_needs_a_label_for_every_clip(small_codec, tmp_path):
    """The judge is an argument: scored on the originals and the reconstructions at the codec's rate; a clip
    the judge has no label for is a one-line error naming where the labels come from."""
    from fixtures import ScriptedJudge

    from tessera.unimodal import audio_eval
    from tessera.unimodal.media import MediaError

    clips = [speechlike(SR, s)[: SR // 2] for s in range(4)]
    judge = ScriptedJudge({}, predicted=3)
    r = audio_eval.evaluate_codec(small_codec, clips, labels=[3, 3, 1, 3], judge=judge, opus_kbps=(),
                                  intelligibility=False)
    assert r["judge"] == {"accuracy_original": 0.75, "accuracy_reconstructed": 0.75, "ratio": 1.0}
    assert judge.seen == [(4, {"sample_rate": SR}), (4, {"sample_rate": SR})]
    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    assert audio_eval._labels_for(paths, ScriptedJudge({paths[0]: 1, paths[1]: 2})) == [1, 2]
    with pytest.raises(MediaError, match=r"b.wav \(and 0 more\) are not in the scripted labels"):
        audio_eval._labels_for(paths, ScriptedJudge({paths[0]: 1}))


def test_multiscale_mel_is_torchaudios_mel_spectrogram_and_its_gradient():
    import torchaudio

    from tessera.unimodal.audio_eval import MEL_BINS, MEL_WINDOWS, MultiScaleMel

    mel = MultiScaleMel(SR)
    refs = {w: torchaudio.transforms.MelSpectrogram(SR, n_fft=w, hop_length=w // 4, n_mels=m, power=1.0,
                                                    pad_mode="constant", norm="slaney", mel_scale="slaney")
            for w, m in zip(MEL_WINDOWS, MEL_BINS)}
    g = torch.Generator().manual_seed(0)
    for T in (100, 1000, 7680):  # shorter than the largest window too
        x = torch.randn(3, T, generator=g) * 0.1
        for w, ref in refs.items():
            torch.testing.assert_close(mel.spectrogram(x, w).transpose(1, 2), ref(x), rtol=1e-5, atol=1e-6)
    # the loss and its gradient match a loss written over torchaudio's spectrograms
    x = torch.randn(2, 4000, generator=g) * 0.1
    y = (x + 0.05 * torch.randn(2, 4000, generator=g)).requires_grad_()
    y_ref = y.detach().clone().requires_grad_()
    mel(y, x).backward()
    total = 0.0
    for ref in refs.values():
        my, mx = ref(y_ref), ref(x)
        total = total + (my.clamp_min(1e-5).log10() - mx.clamp_min(1e-5).log10()).abs().mean() + (my - mx).abs().mean()
    (total / len(MEL_WINDOWS)).backward()
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-4, atol=1e-7)
    assert float(mel(x, x)) == 0.0 and float(mel(y.detach(), x)) > 0.0


@pytest.mark.skipif(opus_available() is None, reason="no Opus encoder (libsndfile Ogg/Opus or ffmpeg)")
def test_opus_roundtrip_keeps_length_and_more_bits_help():
    x = speechlike(SR, 12)
    y6, b6 = opus_roundtrip(x, SR, 6.0, opus_available())
    y16, b16 = opus_roundtrip(x, SR, 16.0, opus_available())
    assert len(y6) == len(x) == len(y16)
    assert b16 > b6
    assert np.abs(y16 - x).mean() < np.abs(y6 - x).mean()


def test_speech_judge_learns_and_scores():
    from tessera.eval.judges import SpeechDigitJudge

    # ten "words": harmonic tones whose pitch contour differs per class; train and test on separate takes
    def word(label, seed):
        rng = np.random.default_rng(seed)
        n = int(SR * rng.uniform(0.35, 0.5))
        t = np.arange(n) / SR
        f = 120 + 30 * label + 40 * np.sin(2 * np.pi * (0.5 + 0.3 * label) * t)
        ph = 2 * np.pi * np.cumsum(f * rng.uniform(0.97, 1.03)) / SR
        w = sum(np.sin(k * ph) * (1.0 if (k + label) % 3 else 0.3) / k for k in range(1, 8))
        return (0.3 * w / np.abs(w).max() + 0.005 * rng.standard_normal(n)).astype(np.float32)

    train = [(word(d, 100 * d + k), d) for d in range(10) for k in range(6)]
    test = [(word(d, 10_000 + 100 * d + k), d) for d in range(10) for k in range(2)]
    judge = SpeechDigitJudge().fit([w for w, _ in train], [d for _, d in train])
    assert judge.accuracy([w for w, _ in test], [d for _, d in test]) >= 0.9
    silence = [np.zeros(6000, np.float32) for _ in test]
    assert judge.accuracy(silence, [d for _, d in test]) <= 0.2  # it does not score noise as speech


# ---------------------------------------------------------------------------------------- bad input
def write_bad_corpus(d: Path) -> dict:
    """One file per bad-input kind, plus good clips in every supported encoding."""
    d.mkdir(parents=True, exist_ok=True)
    good = speechlike(SR // 2, 20)
    sf.write(d / "pcm16.wav", good, SR, subtype="PCM_16")
    sf.write(d / "pcm_u8.wav", good, SR, subtype="PCM_U8")
    sf.write(d / "pcm24.wav", good, SR, subtype="PCM_24")
    sf.write(d / "float.wav", good, SR, subtype="FLOAT")
    sf.write(d / "clip.flac", good, SR, format="FLAC")
    sf.write(d / "clip.ogg", good, SR, format="OGG", subtype="VORBIS")
    g44 = speechlike(44100 // 2, 22)
    sf.write(d / "stereo_44k.wav", np.stack([g44, 0.5 * g44], 1), 44100)  # 0.5 s, two channels
    sf.write(d / "clipped.wav", np.clip(good * 8, -1, 1), SR, subtype="PCM_16")
    sf.write(d / "long.wav", speechlike(int(2.5 * SR), 21), SR)  # longer than a 1 s cap
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really a wave file" + bytes(200))
    full = (d / "pcm16.wav").read_bytes()
    (d / "truncated_header.wav").write_bytes(full[:30])
    sf.write(d / "empty.wav", np.zeros(0, np.float32), SR)
    sf.write(d / "short.wav", good[:100], SR)  # fewer samples than one frame (640)
    nan = good.copy()
    nan[10] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    inf = good.copy()
    inf[10] = np.inf
    sf.write(d / "inf.wav", inf, SR, subtype="FLOAT")
    return {"good": 8, "long": 1}


def test_each_bad_input_kind_has_its_outcome(tmp_path):
    write_bad_corpus(tmp_path / "bad")
    tcfg = AudioTrainConfig(max_clip_seconds=1.0, long_clips="split")
    skips, notes = SkipLog(), {}
    clips, names = load_clips(tmp_path / "bad", SR, 640, tcfg, skips, notes)
    counts = skips.to_dict()["counts"]
    assert counts == {"corrupt": 2, "empty": 1, "nonfinite": 2, "too_short": 1}, skips.to_dict()
    assert "NaN or Inf" in " ".join(skips.examples["nonfinite"])
    assert notes == {"clipped": 1, "split": 1}
    # 8 good clips (every encoding, stereo at 44.1 kHz, clipped) + the long one cut into 1 s, 1 s, 0.5 s
    assert len(clips) == 8 + 3
    assert all(len(c) <= SR for c in clips)
    assert max(len(c) for n, c in zip(names, clips) if "stereo" in n) == SR // 2  # resampled to 16 kHz, mono
    refused, notes2 = SkipLog(), {}
    clips2, _ = load_clips(tmp_path / "bad", SR, 640, AudioTrainConfig(max_clip_seconds=1.0, long_clips="refuse"),
                           refused, notes2)
    assert refused.counts["too_long"] == 1 and len(clips2) == 8 and "split" not in notes2


# --------------------------------------------------------------------------------- training via CLI
FAST = ["--set", "channels=4", "--set", "max_channels=16", "--set", "dim=16", "--set", "lstm_layers=0",
        "--set", "batch_size=4", "--set", "crop_seconds=0.32", "--set", "init_vectors=256",
        "--set", "eval_clips=3", "--set", "eval_every=2", "--set", "ckpt_every=2", "--set", "log_every=1",
        "--set", "max_clip_seconds=1.0", "--set", "ae_warmup_steps=1"]


def run_cli(*argv) -> int:
    from tessera.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("speech")
    for i in range(12):
        sf.write(d / f"clip_{i:02d}.wav", speechlike(int(SR * (0.3 + 0.05 * i)), 30 + i), SR, subtype="PCM_16")
    return d


def test_train_resume_and_eval_through_the_cli(tmp_path, speech_dir, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(speech_dir, data)
    write_bad_corpus(data / "bad")  # bad files mixed in never stop a run
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    # no lr cooldown: with one, a 2-step budget would cool down over its own 2 steps
    common = ["tokenizer", "train", "audio", "--data", str(data), "--preset", "tiny", "--no-progress", *FAST,
              "--set", "cooldown=0"]
    assert run_cli(*common, "--out", str(out_a), "--max-steps", "4") == 0
    assert run_cli(*common, "--out", str(out_b), "--max-steps", "2") == 0
    assert run_cli(*common, "--out", str(out_b), "--max-steps", "4", "--resume") == 0
    capsys.readouterr()

    # the output is a codec directory plus the run's files
    for name in ("codec.json", "model.safetensors", "metrics.jsonl", "data.json", "checkpoints"):
        assert (out_a / name).exists(), name
    assert sorted((out_a / "samples" / "step_000004").glob("*.wav"))[:2] == [
        out_a / "samples" / "step_000004" / "00_original.wav",
        out_a / "samples" / "step_000004" / "00_reconstruction.wav"]
    report = json.loads((out_a / "data.json").read_text())
    assert report["skipped"]["counts"] == {"corrupt": 2, "empty": 1, "nonfinite": 2, "too_short": 1}
    assert report["notes"] == {"clipped": 1, "split": 1}
    evals = [r for r in map(json.loads, (out_a / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"si_sdr", "mel_distance", "codebook_usage"} <= set(evals[-1]) and len(evals[-1]["codebook_usage"]) == 4

    # resume: 2 steps + 2 resumed steps == 4 uninterrupted steps, bit for bit
    from tessera.storage import load_tensors

    wa, wb = load_tensors(out_a / "model.safetensors"), load_tensors(out_b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps_b = [r["step"] for r in map(json.loads, (out_b / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "train"]
    assert steps_b == [1, 2, 3, 4]

    # evaluation: one JSON object with the documented keys, next to Opus
    assert run_cli("tokenizer", "eval", "audio", "--codec", str(out_a), "--data", str(speech_dir), "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert {"si_sdr", "mel_distance", "stoi", "kbps", "tokens_per_second", "codebook_usage", "n_clips",
            "opus"} <= set(res)
    assert res["n_clips"] == 12 and res["kbps"] == 1.0 and res["tokens_per_second"] == 100
    assert len(res["codebook_usage"]) == 4
    if opus_available():
        assert [o["kbps"] for o in res["opus"]] == [6.0, 8.0, 12.0]
        assert all(np.isfinite(o["si_sdr"]) for o in res["opus"])
    assert run_cli("tokenizer", "eval", "audio", "--codec", str(out_a), "--data", str(speech_dir),
                   "--opus-kbps", "12") == 0
    table = capsys.readouterr().out
    assert "tessera (4 levels)" in table and "opus" in table


def test_training_refuses_unknown_keys_and_a_new_model_config_on_resume(tmp_path, speech_dir, capsys):
    base = ["tokenizer", "train", "audio", "--data", str(speech_dir), "--out", str(tmp_path / "x")]
    assert run_cli(*base, "--max-steps", "1", "--set", "bogus=1") == 2
    assert "unknown audio codec key 'bogus'" in capsys.readouterr().err
    # a resumed run keeps its model config: repeating it is fine, changing it is an error
    assert run_cli(*base, "--max-steps", "1", "--no-progress", *FAST) == 0
    assert run_cli(*base, "--max-steps", "2", "--no-progress", "--resume", *FAST) == 0
    assert run_cli(*base, "--max-steps", "3", "--no-progress", "--resume", *FAST, "--set", "dim=32") == 2
    assert "cannot change the model config" in capsys.readouterr().err


def test_a_time_budget_alone_sizes_the_lr_schedule_and_the_bar(tmp_path, speech_dir, monkeypatch):
    """--max-minutes only: warmup, cooldown and the progress bar follow the steps that fit (a fake clock
    makes every step take 100 ms: 0.9 s fit 9 steps)."""
    from fixtures import step_clock

    from tessera.unimodal import codec_train

    steps, bars = step_clock(monkeypatch, codec_train, "lr_factor")
    out = tmp_path / "timed"
    assert run_cli("tokenizer", "train", "audio", "--data", str(speech_dir), "--out", str(out), "--preset", "tiny",
                   "--no-progress", "--max-minutes", "0.015", *FAST, "--set", "eval_every=100",
                   "--set", "ckpt_every=100", "--set", "warmup_steps=30", "--set", "cooldown=0.5") == 0
    recs = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert abs(recs[-1]["step"] - 9) <= 1
    assert max(r["lr"] for r in recs) > 0.9 * 2.2e-3  # the warmup takes a tenth of the plan, not 30 steps
    assert recs[-1]["planned_steps"] == recs[-1]["step"] and bars[0].bar.total == recs[-1]["step"]
    assert recs[-2]["lr"] == pytest.approx(2 * recs[-1]["lr"])  # the linear cooldown reaches 0 as the time runs out


def test_ddp_two_processes_keep_codebooks_identical(tmp_path, speech_dir):
    """torchrun, 2 CPU processes (gloo): each rank sees different crops; the VQ all-reduces keep the
    codebooks equal, which the trainer checks at every save (codebook_spread: max |difference| across ranks)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun_argv(2),
           "-m", "tessera", "tokenizer", "train", "audio", "--data", str(speech_dir), "--out", str(out),
           "--preset", "tiny", "--max-steps", "3", "--no-progress", "--device", "cpu", *FAST,
           "--set", "quantizer_dropout=0.5"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["world_size"] == 2
    assert state["codebook_spread"] == 0.0
    assert set(state["rng"]) == {"0", "1"}
    # the codebooks were trained (k-means init + EMA), not left at their zero initialization
    from tessera.storage import load_tensors

    w = load_tensors(out / "model.safetensors")
    embeds = [v for k, v in w.items() if k.endswith("_codebook.embed")]
    assert len(embeds) == 4 and all(float(e.abs().sum()) > 0 for e in embeds)
