"""Loader speed and memory: packed windows per second next to what training consumes, and memory that does
not grow with the corpus.

1. Synthetic text-only shard sets of 10 MB and 1 GB of tokens (uint32; documents of 20 to 400 tokens, two
   sources) are written under --work.
2. For each, a fresh process iterates the loader (mixture weights, conditioning dropout, packing) and reports
   tokens/s and its anonymous resident memory (RssAnon: the memory the process holds, not the page cache
   that the memory maps read through) before and after.
3. The demo preset's training step is timed on the same machine (batch 16 x 256, as the demo trains), so the
   loader's rate can be put next to what training consumes.

    python benchmarks/loader.py [--work /tmp/tessera-loader-bench] [--sizes 10MB,1GB]

Writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import machine, write_result

RESULTS = Path(__file__).parent / "results" / "loader.json"
SIZES = {"10MB": 10 * 2**20, "100MB": 100 * 2**20, "1GB": 2**30}


def layout():
    from tessera.tokenizers.layout import VocabLayout

    return VocabLayout(text_size=512, image_codebook_size=1000, audio_codebook_size=1024, audio_levels=4, max_grid=16)


def write_corpus(out: Path, nbytes: int, docs_per_shard: int = 200_000) -> None:
    """Random documents straight to shard files, one shard at a time (bounded memory)."""
    from tessera.train.shards import (
        SHARDS_FORMAT,
        SHARDS_VERSION,
        write_manifest,
        write_shard,
        write_source_index,
    )

    if (out / "manifest.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    L = layout()
    rng = np.random.default_rng(0)
    manifest = {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "tokenizer_hash": "synthetic",
                "layout": L.to_dict(), "inputs": [], "config": {}, "shards": [], "sources": ["a", "b"], "docs": 0,
                "tokens": {"total": 0}, "skipped": {"total": 0, "counts": {}, "examples": {}}, "complete": False}
    total, k = nbytes // 4, 0
    while manifest["tokens"]["total"] < total:
        lengths = rng.integers(20, 400, docs_per_shard)
        cum = np.cumsum(lengths)
        lengths = lengths[: max(1, int(np.searchsorted(cum, total - manifest["tokens"]["total"])) + 1)]
        n = int(lengths.sum())
        tokens = rng.integers(3, 512, n, dtype=np.uint32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64)
        tokens[offsets[:-1].astype(np.int64)] = 1  # <s>
        tokens[(offsets[1:] - 1).astype(np.int64)] = 2  # </s>
        name = f"shard_{k:05d}"
        write_shard(out, name, tokens, offsets, np.ones(n, np.uint8), rng.integers(0, 2, len(lengths)).astype(np.uint16))
        manifest["shards"].append({"name": name, "docs": len(lengths), "tokens": n})
        manifest["docs"] += len(lengths)
        manifest["tokens"]["total"] += n
        k += 1
    write_source_index(out, manifest)
    manifest["complete"] = True
    write_manifest(out, manifest)


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_loader(shards: str, seconds: float) -> dict:
    """Run in a fresh process: iterate for `seconds`, report tokens/s and memory."""
    from tessera.train.loader import LoaderConfig, PackedLoader

    before = rss_anon_mb()
    ld = PackedLoader(shards, LoaderConfig(seq_len=256, batch_size=16, seed=0, mix={"a": 3, "b": 1},
                                          cond_dropout=0.1), layout())
    ld.next_batch()
    opened = rss_anon_mb()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        b = ld.next_batch()
        n += b["input_ids"].numel()
    dt = time.perf_counter() - t
    return {"tokens_per_s": round(n / dt), "rss_anon_mb_start": round(before, 1), "rss_anon_mb_opened": round(opened, 1),
            "rss_anon_mb_end": round(rss_anon_mb(), 1), "tokens_served": n, "docs": ld.reader.n_docs}


def training_tokens_per_s(steps: int = 6) -> float:
    import torch

    from tessera.model.transformer import Transformer, model_preset
    from tessera.train.losses import token_losses

    cfg = model_preset("demo")
    cfg.vocab_size = layout().padded_vocab_size
    m = Transformer(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 512, (16, 257))
    mod = torch.zeros(cfg.vocab_size, dtype=torch.long)

    def step():
        r = token_losses(m(x[:, :-1]), x[:, 1:], mod)
        (r["ce"] / r["count"]).backward()
        opt.step()
        opt.zero_grad()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return 16 * 256 * steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/tessera-loader-bench")
    p.add_argument("--sizes", default="10MB,1GB")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    if args.measure:  # child process
        print(json.dumps(measure_loader(args.measure, args.seconds)))
        return
    runs = {}
    for size in args.sizes.split(","):
        d = Path(args.work) / size
        t = time.perf_counter()
        write_corpus(d, SIZES[size])
        print(f"{size}: corpus ready in {time.perf_counter() - t:.0f}s", flush=True)
        r = subprocess.run([sys.executable, __file__, "--measure", str(d), "--seconds", str(args.seconds)],
                           capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        runs[size] = json.loads(r.stdout.strip().splitlines()[-1])
        print(size, runs[size], flush=True)
    train = training_tokens_per_s()
    result = {"benchmark": "loader", "machine": machine(), "runs": runs, "demo_training_tokens_per_s": round(train),
              "loader_over_training": {k: round(v["tokens_per_s"] / train, 1) for k, v in runs.items()}}
    sizes = list(runs)
    if len(sizes) > 1:
        result["rss_anon_growth_mb"] = round(runs[sizes[-1]]["rss_anon_mb_end"] - runs[sizes[0]]["rss_anon_mb_end"], 1)
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
