"""Audio codec speed: encode and decode real-time factors of tessera's codec next to Opus, on the same clips.

    python benchmarks/audio_codec.py                                   # untrained tiny preset, synthetic clips
    python benchmarks/audio_codec.py --codec tok/audio --data corpus/speech/test --threads 2

Real-time factor (RTF) = processing seconds / audio seconds (lower is faster; 0.01 = 100x real time).
tessera runs batched (clips of equal length share a batch, as the multimodal tokenizer calls it) on the CPU
with `--threads` threads, and on CUDA when it is available. Opus runs through libsndfile (soundfile's
Ogg/Opus), one clip at a time, single-threaded as libopus is, at `--opus-kbps`. The ratios are Opus RTF /
tessera RTF: above 1, tessera is faster. Speed does not depend on training, so without `--codec` the
benchmark uses an untrained codec of the chosen preset. Results go to benchmarks/results/audio_codec.json.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from common import machine, write_result


def synthetic_clips(n: int, seconds: float, sr: int = 16000) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(int(seconds * sr)) / sr
        f = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + i)
        ph = 2 * np.pi * np.cumsum(f) / sr
        w = sum(np.sin(k * ph) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t)) ** 2
        out.append((0.3 * w / np.abs(w).max() + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
    return out


def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times (the least disturbed run on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_tessera(codec, clips, repeats: int, device: str) -> dict:
    codec.to(device)
    sr = codec.info.sample_rate
    seconds = sum(len(c) for c in clips) / sr
    groups: dict[int, list[np.ndarray]] = {}
    for c in clips:
        groups.setdefault(len(c), []).append(c)
    batches = [torch.from_numpy(np.stack(g)) for g in groups.values()]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def enc():
        out = [codec.encode(b, sr) for b in batches]
        sync()
        return out

    codes = enc()  # warm-up (and k-means init of an untrained codec)

    def dec():
        for c in codes:
            codec.decode(c)
        sync()

    dec()
    t_enc, t_dec = timed(enc, repeats), timed(dec, repeats)
    return {"device": device, "encode_rtf": t_enc / seconds, "decode_rtf": t_dec / seconds,
            "encode_x_realtime": seconds / t_enc, "decode_x_realtime": seconds / t_dec}


def bench_opus(clips, sr: int, kbps: float, repeats: int) -> dict:
    from tessera.unimodal.audio_eval import opus_level

    level = opus_level(kbps)
    seconds = sum(len(c) for c in clips) / sr
    blobs: list[bytes] = []

    def enc():
        blobs.clear()
        for c in clips:
            b = io.BytesIO()
            sf.write(b, c, sr, format="OGG", subtype="OPUS", compression_level=level)
            blobs.append(b.getvalue())

    def dec():
        for blob in blobs:
            sf.read(io.BytesIO(blob), dtype="float32")

    enc()
    t_enc = timed(enc, repeats)
    t_dec = timed(dec, repeats)
    return {"kbps": kbps, "encode_rtf": t_enc / seconds, "decode_rtf": t_dec / seconds,
            "encode_x_realtime": seconds / t_enc, "decode_x_realtime": seconds / t_dec}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec", default=None, help="a trained codec directory (default: untrained --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--data", default=None, help="clips to time (default: synthetic speech-like clips)")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each synthetic clip")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--opus-kbps", type=float, default=6.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "audio_codec.json"))
    args = ap.parse_args(argv)
    load0 = [round(x, 2) for x in os.getloadavg()]

    torch.set_num_threads(args.threads)
    from tessera.unimodal.audio import AudioCodec, SEANetCodec, audio_codec_config, remove_weight_norm

    if args.codec:
        codec = AudioCodec.load(args.codec)
    else:
        torch.manual_seed(0)
        codec = AudioCodec(remove_weight_norm(SEANetCodec(audio_codec_config(args.preset))))
    sr = codec.info.sample_rate
    if args.data:
        from tessera.unimodal.audio_eval import load_eval_clips

        clips, _ = load_eval_clips(args.data, sr, max_clips=args.clips)
    else:
        clips = synthetic_clips(args.clips, args.seconds, sr)
    seconds = sum(len(c) for c in clips) / sr

    rows = [bench_tessera(codec, clips, args.repeats, "cpu")]
    if torch.cuda.is_available():
        rows.append(bench_tessera(codec, clips, args.repeats, "cuda"))
        codec.to("cpu")
    opus = bench_opus(clips, sr, args.opus_kbps, args.repeats)
    for r in rows:
        r["encode_speedup_vs_opus"] = opus["encode_rtf"] / r["encode_rtf"]
        r["decode_speedup_vs_opus"] = opus["decode_rtf"] / r["decode_rtf"]
    result = {
        "benchmark": "audio_codec",
        "codec": args.codec or f"untrained {args.preset} preset",
        "info": codec.info.to_dict(),
        "kbps": codec.info.frame_rate * codec.info.levels * np.log2(codec.info.codebook_size) / 1000,
        "clips": len(clips), "audio_seconds": round(seconds, 2),
        "data": args.data or f"synthetic, {args.clips} x {args.seconds} s",
        "threads": args.threads, "repeats": args.repeats, "timing": "best of repeats",
        "tessera": rows, "opus": opus,
        "peer": "Opus (libopus via libsndfile/soundfile, Ogg container), one clip at a time",
        "machine": machine("cuda" if torch.cuda.is_available() else "cpu", load_average_at_start=load0,
                           libsndfile=sf.__libsndfile_version__),
    }
    write_result(args.out, result)
    for r in rows:
        print(f"tessera {r['device']:4s}: encode RTF {r['encode_rtf']:.4f} ({r['encode_x_realtime']:.0f}x), "
              f"decode RTF {r['decode_rtf']:.4f} ({r['decode_x_realtime']:.0f}x); vs Opus: encode "
              f"{r['encode_speedup_vs_opus']:.2f}x, decode {r['decode_speedup_vs_opus']:.2f}x")
    print(f"opus {opus['kbps']:g} kbps: encode RTF {opus['encode_rtf']:.4f} ({opus['encode_x_realtime']:.0f}x), "
          f"decode RTF {opus['decode_rtf']:.4f} ({opus['decode_x_realtime']:.0f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
