"""Evaluate an audio codec on held-out clips, side by side with Opus at its lowest usable bitrates.

    tessera tokenizer eval audio --codec tok/audio --data corpus/speech/test [--json]
    tessera tokenizer eval audio --codec tok/audio --data corpus/speech/test --digits-corpus corpus/

Metrics, each over the same clips for the codec and for Opus:
- `si_sdr` (dB, mean over clips): scale-invariant signal-to-distortion ratio. Neither a neural codec at
  ~1 kbps nor Opus/SILK keeps the waveform's phase, so it is low for both; it ranks, it does not judge.
- `mel_distance`: L1 between log10 mel spectrograms at window sizes 64..2048 (mean over scales and clips).
- `stoi`: short-time objective intelligibility (pystoi), on all clips laid end to end: STOI needs about
  0.4 s of speech after dropping silent frames, longer than many single words.
- `pesq` (wide band, also on the concatenation): only where the `pesq` package is installed.
- `kbps`: the codec's bitrate, frames/s * levels * log2(codebook size); for Opus the bitrate asked of the
  encoder, with `kbps_file` the bitrate of the Ogg files including their headers (large for short clips).
- `tokens_per_second`, `codebook_usage` (the fraction of each level's codes used on these clips), `n_clips`.
- with a judge (a `MediaJudge`; on the command line `--digits-corpus`, the digits corpus's speech-digit
  judge trained on its real training clips): the judge classifies the originals and the reconstructions
  (`judge`: accuracies and their ratio).

Opus runs through libsndfile (soundfile, Ogg/Opus; its compression level maps linearly onto 6..256 kbps),
or through ffmpeg when libsndfile lacks Opus.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from tessera.unimodal.media import MediaError, SkipLog, list_media, load_audio
from tessera.unimodal.protocol import MediaJudge, judge_accuracy

MEL_WINDOWS = (64, 128, 256, 512, 1024, 2048)
MEL_BINS = (8, 16, 32, 64, 128, 128)
OPUS_KBPS = (6.0, 8.0, 12.0)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


# ------------------------------------------------------------------------------------------------ metrics
class MultiScaleMel(torch.nn.Module):
    """Magnitude mel spectrograms at several window sizes (hop = window / 4), for losses and distances.

    The numbers are torchaudio's `MelSpectrogram(n_fft=w, hop_length=w // 4, n_mels=m, power=1.0,
    pad_mode="constant", norm="slaney", mel_scale="slaney")`; the frames are cut with `unfold` instead of
    `torch.stft`, whose backward pass (an overlap-add through `index_add_`) cost more on CPU than the rest
    of the loss together.
    """

    def __init__(self, sample_rate: int, windows=MEL_WINDOWS, bins=MEL_BINS):
        super().__init__()
        import torchaudio.functional as AF

        if len(windows) != len(bins):
            raise ValueError(f"mel windows {list(windows)} and bins {list(bins)} differ in length")
        self.windows = tuple(int(w) for w in windows)
        for w, m in zip(self.windows, bins):
            self.register_buffer(f"window_{w}", torch.hann_window(w), persistent=False)
            fb = AF.melscale_fbanks(w // 2 + 1, 0.0, sample_rate / 2, m, sample_rate, norm="slaney",
                                    mel_scale="slaney")
            self.register_buffer(f"fb_{w}", fb, persistent=False)  # (w // 2 + 1, m)

    def spectrogram(self, x: torch.Tensor, w: int) -> torch.Tensor:
        """x (B, T) -> mel magnitudes (B, frames, n_mels), frames = 1 + T // (w // 4) (centered frames)."""
        frames = F.pad(x, (w // 2, w // 2)).unfold(-1, w, w // 4) * getattr(self, f"window_{w}")
        return torch.fft.rfft(frames).abs() @ getattr(self, f"fb_{w}")

    def forward(self, y: torch.Tensor, x: torch.Tensor, linear_weight: float = 1.0) -> torch.Tensor:
        """Mean over scales of L1(log10 mel) + linear_weight * L1(mel); y, x (B, T) or (B, 1, T)."""
        y, x = y.reshape(y.shape[0], -1).float(), x.reshape(x.shape[0], -1).float()
        total = y.new_zeros(())
        for w in self.windows:
            my, mx = self.spectrogram(y, w), self.spectrogram(x, w)
            total = total + (my.clamp_min(1e-5).log10() - mx.clamp_min(1e-5).log10()).abs().mean()
            if linear_weight:
                total = total + linear_weight * (my - mx).abs().mean()
        return total / len(self.windows)


def si_sdr(estimate: np.ndarray, reference: np.ndarray, eps: float = 1e-8) -> float:
    """Scale-invariant SDR in dB (Le Roux et al., 2019), both signals mean-removed."""
    n = min(len(estimate), len(reference))
    s, r = np.asarray(estimate[:n], np.float64), np.asarray(reference[:n], np.float64)
    s, r = s - s.mean(), r - r.mean()
    alpha = np.dot(s, r) / (np.dot(r, r) + eps)
    target = alpha * r
    noise = s - target
    return float(10 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))


def stoi_score(estimates: list[np.ndarray], references: list[np.ndarray], sample_rate: int) -> float | None:
    try:
        from pystoi import stoi
    except ImportError:
        return None
    x, y = _concat(references, estimates, sample_rate)
    return float(stoi(x, y, sample_rate, extended=False))


def pesq_score(estimates, references, sample_rate: int) -> float | None:
    """Wide-band PESQ (16 kHz) on the concatenation; None where `pesq` is not installed or fails."""
    try:
        from pesq import pesq
    except ImportError:
        return None
    x, y = _concat(references, estimates, sample_rate)
    if sample_rate != 16000:
        import torchaudio.functional as AF

        x = AF.resample(torch.from_numpy(x), sample_rate, 16000).numpy()
        y = AF.resample(torch.from_numpy(y), sample_rate, 16000).numpy()
    try:
        return float(pesq(16000, x, y, "wb"))
    except Exception:  # pesq raises when it finds no utterance
        return None


def _concat(refs, ests, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    gap = np.zeros(int(0.05 * sample_rate), np.float32)
    xs, ys = [], []
    for r, e in zip(refs, ests):
        n = len(r)
        xs += [np.asarray(r, np.float32), gap]
        ys += [np.asarray(e[:n], np.float32) if len(e) >= n else np.pad(e, (0, n - len(e))).astype(np.float32), gap]
    return np.concatenate(xs), np.concatenate(ys)


def codebook_usage(codes: list[torch.Tensor], codebook_size: int) -> list[float]:
    """Fraction of each level's codes that occur at least once; codes: list of (n_q, frames)."""
    allc = torch.cat([c.reshape(c.shape[0], -1) for c in codes], dim=1)
    return [round(float(torch.unique(allc[q]).numel()) / codebook_size, 4) for q in range(allc.shape[0])]


def score_pairs(refs, ests, sample_rate: int, mel: MultiScaleMel | None = None, intelligibility: bool = True) -> dict:
    """SI-SDR, mel distance (and STOI, PESQ) of reconstructions `ests` against `refs` (lists of 1-D arrays)."""
    mel = mel or MultiScaleMel(sample_rate)
    sdrs, mels = [], []
    for r, e in zip(refs, ests):
        e = e[: len(r)]
        sdrs.append(si_sdr(e, r))
        with torch.no_grad():
            mels.append(float(mel(torch.as_tensor(e)[None], torch.as_tensor(r)[None], linear_weight=0.0)))
    out = {"si_sdr": round(float(np.mean(sdrs)), 3), "mel_distance": round(float(np.mean(mels)), 4)}
    if intelligibility:
        s = stoi_score(ests, refs, sample_rate)
        out["stoi"] = None if s is None else round(s, 4)
        p = pesq_score(ests, refs, sample_rate)
        if p is not None:
            out["pesq"] = round(p, 3)
    return out


# ------------------------------------------------------------------------------------------------- Opus
def opus_level(kbps: float) -> float:
    """libsndfile's compression level for an Opus bitrate: it maps level 1..0 linearly onto 6..256 kbps."""
    return float(min(1.0, max(0.0, 1.0 - (kbps * 1000 - 6000) / 250000)))


def opus_available() -> str | None:
    """"soundfile" where libsndfile writes Ogg/Opus, else "ffmpeg" where it is installed, else None."""
    if "OPUS" in sf.available_subtypes("OGG"):
        return "soundfile"
    return "ffmpeg" if shutil.which("ffmpeg") else None


def opus_roundtrip(wave: np.ndarray, sample_rate: int, kbps: float, backend: str = "soundfile") -> tuple[np.ndarray, int]:
    """Encode one mono clip with Opus at `kbps` and decode it; returns (decoded at `sample_rate`, bytes)."""
    w = np.asarray(wave, np.float32)
    rate = sample_rate if sample_rate in OPUS_RATES else 48000
    if rate != sample_rate:
        import torchaudio.functional as AF

        w = AF.resample(torch.from_numpy(w), sample_rate, rate).numpy()
    if backend == "soundfile":
        buf = io.BytesIO()
        sf.write(buf, np.clip(w, -1, 1), rate, format="OGG", subtype="OPUS", compression_level=opus_level(kbps))
        nbytes = len(buf.getvalue())
        buf.seek(0)
        y, _ = sf.read(buf, dtype="float32")
    else:
        with tempfile.TemporaryDirectory() as d:
            src, dst, back = Path(d) / "in.wav", Path(d) / "x.opus", Path(d) / "out.wav"
            sf.write(src, np.clip(w, -1, 1), rate, subtype="PCM_16")
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(src), "-c:a", "libopus", "-b:a",
                            f"{kbps}k", str(dst)], check=True)
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(dst), "-ar", str(rate), str(back)],
                           check=True)
            nbytes = dst.stat().st_size
            y, _ = sf.read(back, dtype="float32")
    if y.ndim > 1:
        y = y.mean(1)
    if rate != sample_rate:
        import torchaudio.functional as AF

        y = AF.resample(torch.from_numpy(np.ascontiguousarray(y)), rate, sample_rate).numpy()
    n = len(wave)
    y = y[:n] if len(y) >= n else np.pad(y, (0, n - len(y)))
    return y.astype(np.float32), nbytes


# ------------------------------------------------------------------------------------------------ data
def load_eval_clips(source, sample_rate: int, max_clips: int | None = None, max_seconds: float = 30.0,
                    min_samples: int = 1, skips: SkipLog | None = None) -> tuple[list[np.ndarray], list[Path]]:
    """Mono clips at `sample_rate` from a directory or documents JSONL; bad files are counted in `skips`.

    Clips longer than `max_seconds` are cut to their first `max_seconds` (evaluation keeps one piece per
    file, so every file counts once); clips shorter than `min_samples` are skipped as "too_short".
    """
    skips = skips if skips is not None else SkipLog()
    clips, paths = [], []
    for p in list_media(source, "audio", skips):
        if max_clips and len(clips) >= max_clips:
            break
        try:
            a = load_audio(p, sample_rate=sample_rate, max_seconds=None)
        except MediaError as e:
            skips.add(e.reason, str(e))
            continue
        w = a.waveform[: int(max_seconds * sample_rate)] if max_seconds else a.waveform
        if len(w) < min_samples:
            skips.add("too_short", f"{p}: {len(w)} samples, fewer than one frame ({min_samples})")
            continue
        clips.append(np.ascontiguousarray(w, dtype=np.float32))
        paths.append(p)
    return clips, paths


# ---------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def reconstruct_clips(codec, clips: list[np.ndarray], n_q: int | None = None,
                      decode: bool = True) -> tuple[list[np.ndarray | None], list]:
    """Encode and decode each clip (clips of equal length share a batch); returns waves and codes (n_q, F).
    With `decode=False` only the codes are computed (the waves are None)."""
    sr = codec.info.sample_rate
    outs: list = [None] * len(clips)
    codes_out: list = [None] * len(clips)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(clips):
        groups.setdefault(len(c), []).append(i)
    for n, idx in groups.items():
        for s in range(0, len(idx), 16):
            chunk = idx[s: s + 16]
            x = torch.from_numpy(np.stack([clips[i] for i in chunk]))
            codes = codec.encode(x, sr)
            y = codec.decode(codes, n_q=n_q)[:, :n].numpy() if decode else [None] * len(chunk)
            for j, i in enumerate(chunk):
                outs[i], codes_out[i] = y[j], codes[j, : (n_q or codes.shape[1])]
    return outs, codes_out


def evaluate_codec(codec, clips: list[np.ndarray], *, n_q: int | None = None, opus_kbps=OPUS_KBPS,
                   intelligibility: bool = True, labels=None, judge: MediaJudge | None = None) -> dict:
    """The metrics of the module docstring, as one dict (the `--json` output); with a `judge` and the clips'
    `labels`, its accuracy on the originals, the reconstructions and the Opus round trips."""
    info = codec.info
    sr = info.sample_rate
    k = n_q or info.levels
    mel = MultiScaleMel(sr)
    recon, codes = reconstruct_clips(codec, clips, n_q=k)
    result = score_pairs(clips, recon, sr, mel, intelligibility)
    result.setdefault("stoi", None)
    bits = math.log2(info.codebook_size)
    result.update({
        "kbps": round(info.frame_rate * k * bits / 1000, 3),
        "tokens_per_second": round(info.frame_rate * k, 2),
        "codebook_usage": codebook_usage(codes, info.codebook_size),
        "n_clips": len(clips),
        "n_q": k,
        "seconds": round(sum(len(c) for c in clips) / sr, 2),
    })
    if judge is not None and labels is not None:
        acc_o = judge_accuracy(judge, clips, labels, sample_rate=sr)
        acc_r = judge_accuracy(judge, recon, labels, sample_rate=sr)
        result["judge"] = {"accuracy_original": round(acc_o, 4), "accuracy_reconstructed": round(acc_r, 4),
                           "ratio": round(acc_r / acc_o, 4) if acc_o else None}
    backend = opus_available() if opus_kbps else None
    result["opus"] = []
    for kb in (opus_kbps if backend else ()):
        ys, nbytes = [], 0
        for c in clips:
            y, nb = opus_roundtrip(c, sr, kb, backend)
            ys.append(y)
            nbytes += nb
        row = {"kbps": kb, "kbps_file": round(nbytes * 8 / max(1e-9, result["seconds"]) / 1000, 2),
               **score_pairs(clips, ys, sr, mel, intelligibility), "backend": backend}
        row.setdefault("stoi", None)
        if judge is not None and labels is not None:
            row["judge_accuracy"] = round(judge_accuracy(judge, ys, labels, sample_rate=sr), 4)
        result["opus"].append(row)
    if opus_kbps and backend is None:
        result["opus_note"] = "Opus unavailable: libsndfile has no Ogg/Opus and ffmpeg is not installed"
    return result


# ------------------------------------------------------------------------------------------------- CLI
def add_eval_arguments(p) -> None:
    p.add_argument("--codec", required=True, help="audio codec directory (codec.json + model.safetensors)")
    p.add_argument("--data", required=True, help="directory of audio files or a documents .jsonl")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--n-q", type=int, default=None, help="decode from the first N levels (default: all)")
    p.add_argument("--max-clips", type=int, default=200, help="evaluate at most this many clips (0: all)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="use at most this much of each clip")
    p.add_argument("--opus-kbps", default=",".join(f"{k:g}" for k in OPUS_KBPS),
                   help="Opus bitrates to compare with, comma-separated ('' for none)")
    p.add_argument("--prior-data", default=None, metavar="DIR_OR_JSONL",
                   help="training clips: report the codes' learnability (a small code prior trained on their "
                        "codes, scored on --data's codes; see tessera.unimodal.learnability)")
    p.add_argument("--prior-steps", type=int, default=300, help="training steps of the learnability prior")
    p.add_argument("--device", default="cpu")


def frame_sequence(codes, codebook_size: int) -> np.ndarray:
    """(n_q, F) codes -> the decoder's order: frame by frame, levels interleaved, level q offset by q * K."""
    c = np.asarray(codes.cpu() if hasattr(codes, "cpu") else codes, dtype=np.int64)
    return (c + codebook_size * np.arange(c.shape[0])[:, None]).T.reshape(-1)


def _labels_for(paths: list[Path], judge: MediaJudge) -> list[int]:
    labels = [judge.label(p) for p in paths]
    missing = [p for p, label in zip(paths, labels) if label is None]
    if missing:
        raise MediaError("unlabelled", f"{missing[0]} (and {len(missing) - 1} more) are not in {judge.source}")
    return labels


def run_eval(args, judge: MediaJudge | None = None) -> int:
    from tessera.unimodal.audio import AudioCodec, AudioCodecError

    codec = AudioCodec.load(args.codec, device=args.device)
    skips = SkipLog()
    clips, paths = load_eval_clips(args.data, codec.info.sample_rate, max_clips=args.max_clips or None,
                                   max_seconds=args.max_seconds, min_samples=1, skips=skips)
    if not clips:
        raise AudioCodecError(f"{args.data}: no usable audio clips ({skips.summary()})")
    if args.n_q is not None and not 1 <= args.n_q <= codec.info.levels:
        raise AudioCodecError(f"--n-q must be between 1 and {codec.info.levels}")
    kbps = [float(x) for x in str(args.opus_kbps).split(",") if x.strip()]
    labels = _labels_for(paths, judge) if judge is not None else None
    result = evaluate_codec(codec, clips, n_q=args.n_q, opus_kbps=kbps, labels=labels, judge=judge)
    result["skipped"] = skips.to_dict()
    if args.prior_data:
        from tessera.unimodal.learnability import code_learnability

        k, K = args.n_q or codec.info.levels, codec.info.codebook_size
        train_clips, _ = load_eval_clips(args.prior_data, codec.info.sample_rate, max_seconds=args.max_seconds,
                                         min_samples=1, skips=SkipLog())
        if not train_clips:
            raise AudioCodecError(f"{args.prior_data}: no usable training clips for the learnability prior")
        _, train_codes = reconstruct_clips(codec, train_clips, n_q=k, decode=False)
        _, test_codes = reconstruct_clips(codec, clips, n_q=k, decode=False)
        result["learnability"] = code_learnability([frame_sequence(c, K) for c in train_codes],
                                                   [frame_sequence(c, K) for c in test_codes], k * K,
                                                   steps=args.prior_steps)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result, args.codec))
    return 0


def format_table(r: dict, name: str = "tessera") -> str:
    cols = ["kbps", "si_sdr", "mel_distance", "stoi"] + (["pesq"] if "pesq" in r else []) + (
        ["judge"] if "judge" in r else [])
    rows = [[f"tessera ({r['n_q']} levels)", r["kbps"], r["si_sdr"], r["mel_distance"], r["stoi"]]
            + ([r["pesq"]] if "pesq" in r else []) + ([r["judge"]["accuracy_reconstructed"]] if "judge" in r else [])]
    for o in r["opus"]:
        rows.append([f"opus ({o['backend']})", o["kbps"], o["si_sdr"], o["mel_distance"], o["stoi"]]
                    + ([o.get("pesq")] if "pesq" in r else []) + ([o.get("judge_accuracy")] if "judge" in r else []))
    if "judge" in r:
        rows.append(["original", None, None, None, None] + ([None] if "pesq" in r else [])
                    + [r["judge"]["accuracy_original"]])
    head = ["codec"] + cols
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    table = [head] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    usage = ", ".join(f"{u:.2f}" for u in r["codebook_usage"])
    lines += ["", f"{name}: {r['n_clips']} clips ({r['seconds']} s), {r['tokens_per_second']:g} tokens/s, "
                  f"codebook usage per level: {usage}"]
    if "learnability" in r:
        from tessera.unimodal.learnability import format_learnability

        lines.append(format_learnability(r["learnability"]))
    if r.get("skipped", {}).get("total"):
        lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in r["skipped"]["counts"].items()))
    return "\n".join(lines)
