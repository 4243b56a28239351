"""`tessera data pretokenize` speed and memory: the readers next to the codecs' raw encode rate, one process
next to two, and peak memory as the corpus grows 10x.

The corpus is built offline under --work: scikit-learn's bundled 8x8 digits upscaled to 64 px (the tiny image
codec's largest side, so nothing is resized) and augmented so that no two images are the same (a repeat
would be a cache hit, not an encode), as PNG; and synthetic speech-like clips (harmonic chirps, 1 s at
16 kHz) as WAV. Each goes into a WebDataset tar (`000123.png` + `000123.txt`) and a Parquet file (`image`
or `audio` bytes + `text`). The bundle is the demo's shape with untrained tiny codecs (encoding costs
what a trained codec's does).

1. Rates: images/s and audio seconds/s of `pretokenize` (one process, `--workers 1`: one thread, as each
   pool worker runs) from the tar and from the Parquet file, next to the raw rate on the same media: the
   bytes already in memory, decoded (`load_image`, `load_audio`) and encoded in the batches pretokenize
   forms (`encode_images`, `encode_audios`), one thread, no reader, no shard writing. The sides alternate
   in each of `--rounds` rounds; `ratio` is pretokenize's rate over the raw rate of the same round (the
   median over rounds), from wall time; `cpu_ratio` the same from the CPU time of the process (both sides
   run in this process on one thread), which does not count waiting for a core on a shared machine.
   pretokenize's time is the whole call: loading the bundle, planning, reading, decoding, encoding,
   writing the shards; `cpu_ratio_without_bundle_load` leaves out the bundle's load, a fixed cost of every
   run and every pool worker.
2. Processes: a tar of `--process-images` images through `tessera data pretokenize` as 1 process and as
   2 ranks (`--rank R --world-size 2`, each `--workers 1`, started together; the last to finish merges), wall
   time from start to the merged shard set, alternating. The merge alone is timed again on its own.
3. Memory: the image tar of `--images` and of 10x as many, each through a fresh process running
   pretokenize with `--workers 2`; peak resident memory (ru_maxrss) of the main process and of the largest
   worker.

    python benchmarks/pretokenize.py [--images 1024] [--clips 1024] [--process-images 4096] [--rounds 3]
                                     [--work DIR]
    python benchmarks/pretokenize.py --quick        # 64 images, 16 clips, one round: a check that it runs

Writes benchmarks/results/pretokenize.json (--out).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audio_codec import synthetic_clips
from common import machine, write_result
from generate_throughput import demo_bundle

RESULTS = Path(__file__).parent / "results" / "pretokenize.json"
IMAGE_SIDE = 64
CLIP_SECONDS = 1.0
GOAL = 0.9  # pretokenize at most 10% below the raw encode rate


# ------------------------------------------------------------------------------------------ the corpus
def digit_pngs(n: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """`n` distinct PNGs of digits (64 px, augmented after the first pass) with their captions."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from tessera.data.digits import DIGIT_WORDS, augment_image, digit_image

    digits = load_digits()
    rng = random.Random(seed)
    seen, out, i = set(), [], 0
    while len(out) < n:
        k = i % len(digits.images)
        im = digit_image(digits.images[k], IMAGE_SIDE)
        if i >= len(digits.images):
            im = augment_image(im, rng)
        i += 1
        b = io.BytesIO()
        im.convert("RGB").save(b, format="PNG")
        data = b.getvalue()
        digest = hashlib.sha1(data).digest()
        if digest not in seen:  # the few identical 8x8 digits
            seen.add(digest)
            out.append((data, f"a drawing of the digit {DIGIT_WORDS[int(digits.target[k])]}"))
    assert Image.open(io.BytesIO(out[0][0])).size == (IMAGE_SIDE, IMAGE_SIDE)
    return out


def speech_wavs(n: int, seconds: float) -> list[tuple[bytes, str]]:
    import soundfile as sf

    from tessera.data.digits import DIGIT_WORDS

    out = []
    for i, w in enumerate(synthetic_clips(n, seconds)):
        b = io.BytesIO()
        sf.write(b, w, 16000, format="WAV", subtype="PCM_16")
        out.append((b.getvalue(), DIGIT_WORDS[i % 10]))
    return out


def write_corpus(d: Path, kind: str, samples: list[tuple[bytes, str]]) -> dict[str, Path]:
    """The samples as a WebDataset tar and a Parquet file in `d` (kept: built once per size)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ext = {"image": "png", "audio": "wav"}[kind]
    paths = {"webdataset": d / "shard-000000.tar", "parquet": d / "part-00000.parquet"}
    if all(p.exists() for p in paths.values()):
        return paths
    d.mkdir(parents=True, exist_ok=True)
    tmp = paths["webdataset"].with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tf:
        for i, (data, text) in enumerate(samples):
            for name, blob in ((f"{i:06d}.{ext}", data), (f"{i:06d}.txt", text.encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(blob)
                tf.addfile(ti, io.BytesIO(blob))
    tmp.replace(paths["webdataset"])
    table = pa.table({kind: [s[0] for s in samples], "text": [s[1] for s in samples]})
    pq.write_table(table, tmp)
    tmp.replace(paths["parquet"])
    return paths


def media_of(paths: dict[str, Path], kind: str) -> list[bytes]:
    """The media bytes of a corpus, from its Parquet file."""
    import pyarrow.parquet as pq

    return pq.read_table(paths["parquet"], columns=[kind]).column(kind).to_pylist()


# ------------------------------------------------------------------------------------------- 1. rates
def raw_encode(tok, blobs: list[bytes], kind: str) -> None:
    """Decode in-memory bytes and encode them in pretokenize's batches, on this process's one thread."""
    from tessera.train.pretokenize import AUDIO_BATCH, IMAGE_BATCH
    from tessera.unimodal.media import load_audio, load_image

    size = IMAGE_BATCH if kind == "image" else AUDIO_BATCH
    encode = tok.encode_images if kind == "image" else tok.encode_audios
    batch = []
    for data in blobs:
        if kind == "image":
            batch.append(load_image(data))
        else:
            batch.append(load_audio(data, sample_rate=tok.audio_codec.info.sample_rate))
        if len(batch) == size:
            encode(batch)
            batch = []
    if batch:
        encode(batch)


def run_pretokenize(bundle: Path, inp: Path, out: Path, docs_per_shard: int, workers: int = 1) -> tuple[float, dict]:
    from tessera.train.pretokenize import PretokenizeConfig, pretokenize

    if out.exists():
        shutil.rmtree(out)
    cfg = PretokenizeConfig(workers=workers, docs_per_shard=docs_per_shard, device="cpu")
    t = time.perf_counter()
    m = pretokenize(bundle, [inp], out, cfg, progress=False)
    return time.perf_counter() - t, m


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of `fn(*args)`. On a shared machine the CPU time is
    what the work cost: it does not count the time spent waiting for a core."""
    t, c = time.perf_counter(), time.process_time()
    res = fn(*args)
    return time.perf_counter() - t, time.process_time() - c, res


def bench_rates(bundle: Path, corpora: dict, rounds: int, docs_per_shard: int, work: Path) -> dict:
    import torch

    from tessera.tokenizers import load_bundle

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = load_bundle(bundle, device="cpu")  # the first load also imports the codecs' modules
    _, load_cpu, _ = timed(load_bundle, bundle, "cpu")  # what each pretokenize call pays again
    out = {"bundle_load_cpu_s": round(load_cpu, 3)}
    for kind, (paths, n, units) in corpora.items():
        blobs = media_of(paths, kind)
        raw_encode(tok, blobs[:8], kind)  # warm-up
        times = {"raw": [], "webdataset": [], "parquet": []}
        cpu = {k: [] for k in times}
        for r in range(rounds):
            sides = ["raw", "webdataset", "parquet"]
            for side in sides[r % 3:] + sides[:r % 3]:  # the order rotates, so no side always goes first
                if side == "raw":
                    torch.set_num_threads(1)
                    dt, dc, _ = timed(raw_encode, tok, blobs, kind)
                else:
                    dt, dc, (_, m) = timed(run_pretokenize, bundle, paths[side], work / "out" / f"{kind}-{side}",
                                           docs_per_shard)
                    assert m["docs"] == n and m["skipped"]["total"] == 0, (side, m["docs"], m["skipped"])
                times[side].append(dt)
                cpu[side].append(dc)
        unit = "images_per_s" if kind == "image" else "audio_seconds_per_s"
        row = {"items": n, "units": units, "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
               "cpu_seconds": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
               f"raw_{unit}": round(units / statistics.median(times["raw"]), 1)}
        for side in ("webdataset", "parquet"):
            ratios = [raw / dt for raw, dt in zip(times["raw"], times[side])]
            row[f"{side}_{unit}"] = round(units / statistics.median(times[side]), 1)
            row[f"{side}_ratio"] = round(statistics.median(ratios), 3)
            row[f"{side}_cpu_ratio"] = round(statistics.median([a / b for a, b in zip(cpu["raw"], cpu[side])]), 3)
            # the same without loading the bundle, a fixed cost of every run (and of every pool worker)
            steady = [a / (b - load_cpu) for a, b in zip(cpu["raw"], cpu[side])]
            row[f"{side}_cpu_ratio_without_bundle_load"] = round(statistics.median(steady), 3)
            row[f"{side}_goal_met"] = row[f"{side}_ratio"] >= GOAL
            row[f"{side}_goal_met_cpu"] = row[f"{side}_cpu_ratio"] >= GOAL
        out[kind] = row
        print(kind, json.dumps(row), flush=True)
    torch.set_num_threads(threads)
    return out


# --------------------------------------------------------------------------------------- 2. processes
def cli_pretokenize(bundle: Path, inp: Path, out: Path, docs_per_shard: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tessera", "data", "pretokenize", "--tokenizer", str(bundle), "--input", str(inp),
            "--out", str(out), "--workers", "1", "--docs-per-shard", str(docs_per_shard), "--device", "cpu", *extra]


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))


def run_ranks(bundle: Path, inp: Path, out: Path, docs_per_shard: int, world: int) -> float:
    """Wall seconds of `world` processes started together, from start to the merged shard set."""
    if out.exists():
        shutil.rmtree(out)
    ranks = [] if world == 1 else ["--rank", None, "--world-size", str(world)]
    t = time.perf_counter()
    procs = [subprocess.Popen([a if a is not None else str(r) for a in cli_pretokenize(bundle, inp, out, docs_per_shard,
                                                                                      *ranks)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate()[0] for p in procs]
    dt = time.perf_counter() - t
    for p, log in zip(procs, logs):
        if p.returncode:
            raise SystemExit(f"pretokenize failed ({p.returncode}):\n{log[-2000:]}")
    return dt


def time_merge(out: Path) -> float:
    """Seconds of `merge_parts` over the parts in `out`, its merged files removed first."""
    from tessera.train.pretokenize import merge_parts

    for f in [*out.glob("shard_*"), *out.glob("source_*.docs"), out / "manifest.json"]:
        f.unlink()
    t = time.perf_counter()
    merge_parts(out, progress=False)
    return time.perf_counter() - t


def bench_processes(bundle: Path, inp: Path, n: int, rounds: int, docs_per_shard: int, work: Path) -> dict:
    from tessera.train.shards import read_manifest

    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(rounds):
        for world in ((1, 2) if r % 2 == 0 else (2, 1)):
            out = work / "out" / f"ranks-{world}"
            times[world].append(run_ranks(bundle, inp, out, docs_per_shard, world))
            assert read_manifest(out)["docs"] == n
    merge = time_merge(work / "out" / "ranks-2")
    speedups = [a / b for a, b in zip(times[1], times[2])]
    row = {"items": n, "seconds_1_process": [round(x, 2) for x in times[1]],
           "seconds_2_ranks": [round(x, 2) for x in times[2]],
           "images_per_s_1_process": round(n / statistics.median(times[1]), 1),
           "images_per_s_2_ranks": round(n / statistics.median(times[2]), 1),
           "speedup": round(statistics.median(speedups), 3), "merge_seconds": round(merge, 3)}
    print("processes", json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------------ 3. memory
def measure_memory(bundle: str, inp: str, out: str, docs_per_shard: int, workers: int) -> dict:
    """Run in a fresh process: pretokenize, then the peak resident memory of this process and its workers."""
    dt, m = run_pretokenize(Path(bundle), Path(inp), Path(out), docs_per_shard, workers)
    kb = 1024  # ru_maxrss is in KiB on Linux
    return {"docs": m["docs"], "seconds": round(dt, 2),
            "main_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb, 1),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb, 1)}


def bench_memory(bundle: Path, sizes: dict[int, Path], docs_per_shard: int, work: Path, workers: int = 2) -> dict:
    runs = {}
    for n, inp in sizes.items():
        cmd = [sys.executable, __file__, "--measure-memory", str(inp), "--bundle", str(bundle), "--work", str(work),
               "--docs-per-shard", str(docs_per_shard), "--workers", str(workers)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
        if r.returncode:
            raise SystemExit(f"memory run failed:\n{r.stderr[-2000:]}")
        runs[str(n)] = json.loads(r.stdout.strip().splitlines()[-1])
        assert runs[str(n)]["docs"] == n
        print("memory", n, json.dumps(runs[str(n)]), flush=True)
    small, large = runs[str(min(sizes))], runs[str(max(sizes))]
    return {"workers": workers, "runs": runs,
            "main_growth_mb": round(large["main_peak_rss_mb"] - small["main_peak_rss_mb"], 1),
            "worker_growth_mb": round(large["worker_peak_rss_mb"] - small["worker_peak_rss_mb"], 1)}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="images of the rate and process runs (memory: also 10x)")
    p.add_argument("--clips", type=int, default=1024, help="1-second clips of the audio rate")
    p.add_argument("--process-images", type=int, default=4096,
                   help="images of the 1- vs 2-process runs (at most 10x --images)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--docs-per-shard", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="64 images, 16 clips, one round: a check that it runs")
    p.add_argument("--work", default="/tmp/tessera-pretokenize-bench")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--measure-memory", metavar="INPUT", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work)
    if args.measure_memory:  # child process of the memory runs
        out = work / "out" / f"memory-{Path(args.measure_memory).parent.name}"
        print(json.dumps(measure_memory(args.bundle, args.measure_memory, str(out), args.docs_per_shard,
                                        args.workers)))
        return
    if args.quick:
        args.images, args.clips, args.rounds, args.docs_per_shard, args.process_images = 64, 16, 1, 16, 64
    for flag in ("images", "clips", "rounds", "docs_per_shard", "process_images"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    bundle_root = work / "bundle"
    if not (bundle_root / "bundle" / "tokenizer.json").exists():
        if bundle_root.exists():
            shutil.rmtree(bundle_root)
        bundle_root.mkdir(parents=True)
        demo_bundle(bundle_root)
    bundle = bundle_root / "bundle"
    pngs = digit_pngs(10 * args.images)
    if args.process_images > 10 * args.images:
        raise SystemExit(f"--process-images must be at most 10x --images ({10 * args.images})")
    images = {n: write_corpus(work / f"images-{n}", "image", pngs[:n])
              for n in sorted({args.images, args.process_images, 10 * args.images})}
    clips = write_corpus(work / f"audio-{args.clips}", "audio", speech_wavs(args.clips, CLIP_SECONDS))
    print(f"corpus and bundle ready in {time.perf_counter() - t0:.0f}s", flush=True)

    result = {
        "benchmark": "pretokenize",
        "machine": machine(loadavg_start=[round(x, 2) for x in load0]),
        "settings": {"images": args.images, "image_side": IMAGE_SIDE, "clips": args.clips,
                     "clip_seconds": CLIP_SECONDS, "process_images": args.process_images, "rounds": args.rounds,
                     "docs_per_shard": args.docs_per_shard,
                     "codecs": "tiny image and audio codecs, untrained", "goal_ratio": GOAL},
    }
    corpora = {"image": (images[args.images], args.images, args.images),
               "audio": (clips, args.clips, args.clips * CLIP_SECONDS)}
    result["rates"] = bench_rates(bundle, corpora, args.rounds, args.docs_per_shard, work)
    result["processes"] = bench_processes(bundle, images[args.process_images]["webdataset"], args.process_images,
                                          args.rounds, args.docs_per_shard, work)
    result["memory"] = bench_memory(bundle, {n: images[n]["webdataset"] for n in (args.images, 10 * args.images)},
                                    args.docs_per_shard, work)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
