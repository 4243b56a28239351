"""Memory of the output head and the loss at a large vocabulary: tessera's chunked head (`loss_chunk`) next to
its logits path and HF's default path, one training step each, in one run.

Each side runs in its own process (peak resident memory is per process) on the same weights and batches:
- `tessera`: the logits path (`pretrain` with `loss_chunk=0`): the whole batch's logits, then the loss
  (compiled, as a long run compiles it; `--no-compile-loss`: eager), z-loss 1e-4 (pretrain's default);
- `tessera_chunked`: `loss_chunk=N`: the head and the loss N tokens at a time (`tessera/model/chunked_ce.py`),
  z-loss 1e-4;
- `hf`: `transformers.LlamaForCausalLM` with its default loss (logits, upcast to fp32 in the loss).
The sides take turns, `--steps` steps each, for `--rounds` rounds; the JSON has each side's step time and
peak RSS, and the peak above the process's resident memory once the model and the optimizer's state exist
(what the step adds: activations, logits and gradients).

    python benchmarks/loss_memory.py [--preset demo] [--vocab 65536] [--batch 8] [--seq 512] [--chunk 1024]
        [--dtypes float32,bfloat16]

Writes benchmarks/results/loss_memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, peak_rss_mb, reset_peak_rss, rss_mb, write_result
from train_throughput import make_models, recv_side

RESULTS = Path(__file__).parent / "results" / "loss_memory.json"


def worker(conn, side: str, preset: str, vocab: int, batch: int, seq: int, chunk: int, dtype: str,
           compile_loss: bool) -> None:
    from tessera.runtime.host_memory import keep_freed_memory
    from tessera.train.losses import compiled_token_losses, losses_from_ce, token_losses

    if compile_loss:  # what `pretrain` runs on a long run (compile=auto): the loss compiled, its passes fused
        from tessera.runtime.inductor import pin_cpu_threads

        pin_cpu_threads()
        token_losses = compiled_token_losses

    dt = getattr(torch, dtype)
    ours, hf, _ = make_models(preset, vocab, torch.device("cpu"), hf=side == "hf")  # the same weights on every side
    model = hf if side == "hf" else ours
    del ours, hf
    gc.collect()  # the other model's large blocks go back to the OS before freed memory is kept
    keep_freed_memory()  # what pretrain does on a CPU, every side alike
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=g) for _ in range(2)]
    modality = torch.zeros(vocab, dtype=torch.long)
    k = {"i": 0}

    def step():
        k["i"] += 1
        x = data[k["i"] % 2]
        with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
            if side == "hf":
                loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # HF shifts the labels itself
            elif side == "tessera_chunked":
                ce, lse = model(x[:, :-1], loss_targets=x[:, 1:], loss_chunk=chunk)
            else:
                logits = model(x[:, :-1])
        if side == "tessera_chunked":
            r = losses_from_ce(ce, lse, x[:, 1:], modality)
            loss = r["ce"] / r["count"] + 1e-4 * r["z"] / r["count"]
        elif side == "tessera":
            r = token_losses(logits, x[:, 1:], modality, z_loss=1e-4)
            loss = r["ce"] / r["count"] + 1e-4 * r["z"] / r["count"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # the optimizer's state exists from the first step on: count it in the base, not in the step
    for p in model.parameters():
        opt.state[p]["exp_avg"] = torch.zeros_like(p)
        opt.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        opt.state[p]["step"] = torch.tensor(0.0)
    base = rss_mb()
    reset_peak_rss()  # the peak from here: the model, its optimizer state and the steps
    step()
    conn.send({"base_rss_mb": base})
    while (n := conn.recv()) is not None:
        t = time.perf_counter()
        for _ in range(n):
            step()
        conn.send((time.perf_counter() - t) / n)
    conn.send({"peak_rss_mb": peak_rss_mb()})


def run_row(args, dtype: str) -> dict:
    """One dtype: every side in its own process, taking turns."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    sides = ["tessera", "tessera_chunked", "hf"]
    procs, conns, info = {}, {}, {}

    def recv(side):
        return recv_side(procs, conns, side, f"the {side} side of the {dtype} row")

    for side in sides:  # built and warmed up one at a time
        parent, child = ctx.Pipe()
        procs[side] = ctx.Process(target=worker, args=(child, side, args.preset, args.vocab, args.batch, args.seq,
                                                       args.chunk, dtype, args.compile_loss))
        procs[side].start()
        conns[side] = parent
        info[side] = recv(side)
    times = {s: [] for s in sides}
    for _ in range(args.rounds):
        for side in sides:
            conns[side].send(args.steps)
            times[side].append(recv(side))
    for side in sides:
        conns[side].send(None)
        info[side].update(recv(side))
        procs[side].join()
    tokens = args.batch * args.seq
    row = {"preset": args.preset, "vocab": args.vocab, "batch": args.batch, "seq_len": args.seq, "chunk": args.chunk,
           "dtype": dtype, "compiled_loss": args.compile_loss,
           "logits_mb_fp32": round(tokens * args.vocab * 4 / 2**20, 1)}
    for side in sides:
        t = statistics.median(times[side])
        row[f"{side}_seconds_per_step"] = round(t, 3)
        row[f"{side}_tokens_per_s"] = round(tokens / t, 1)
        row[f"{side}_peak_rss_mb"] = round(info[side]["peak_rss_mb"], 1)
        row[f"{side}_step_rss_mb"] = round(info[side]["peak_rss_mb"] - info[side]["base_rss_mb"], 1)
    row["chunked_step_memory_vs_tessera"] = round(row["tessera_chunked_step_rss_mb"] / row["tessera_step_rss_mb"], 3)
    row["chunked_step_memory_vs_hf"] = round(row["tessera_chunked_step_rss_mb"] / row["hf_step_rss_mb"], 3)
    row["chunked_speed_vs_tessera"] = round(row["tessera_chunked_tokens_per_s"] / row["tessera_tokens_per_s"], 3)
    row["chunked_speed_vs_hf"] = round(row["tessera_chunked_tokens_per_s"] / row["hf_tokens_per_s"], 3)
    print(json.dumps(row, indent=1), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16 (autocast)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--compile-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="the logits side's loss compiled, as pretrain's long runs (default on)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    rows = [run_row(args, dtype) for dtype in args.dtypes.split(",")]
    write_result(args.out, {"benchmark": "loss_memory", "machine": machine(), "runs": rows})


if __name__ == "__main__":
    main()
