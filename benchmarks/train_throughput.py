"""Training throughput: tessera's decoder next to transformers.LlamaForCausalLM, in one run.

Both models get the same dimensions (the Llama architecture: tessera with QK-norm off), the same weights
(one seed), the same random batches, the same fused AdamW, sequence length, batch and dtype. Each side runs
in its own process, as a user runs it, started and warmed up (`--warmup` steps) one at a time; then the
sides take turns, `--steps` steps each, for `--rounds` rounds, so drift on a noisy machine hits all.
Reported: tokens/s of each (median over rounds), ratios, and each side's peak resident memory.

The sides: tessera as `pretrain` runs it by default (`--compile on`: blocks and loss compiled, as
compile=auto does on a long run; on a CPU, freed memory kept for reuse, `keep_freed_memory`); the same
with activation checkpointing; HF's default eager path (glibc's allocator as it comes); HF under
torch.compile (on by default; `--no-hf-compile` leaves it out); and on a CPU, HF with tessera's allocator
setting, for honesty.

    python benchmarks/train_throughput.py                        # CPU: demo and small presets
    python benchmarks/train_throughput.py --gpu-1b               # CUDA: also the 1b preset, seq 4096, bf16, MFU
    python benchmarks/train_throughput.py --presets demo --dtypes fp32,bf16   # both sides in each dtype
    # the table in benchmarks/README.md: both presets, 1 and 2 threads, fp32 and bf16, into one file
    python benchmarks/train_throughput.py --presets demo --threads 1,2 --dtypes fp32,bf16
    python benchmarks/train_throughput.py --presets small --threads 1,2 --dtypes fp32,bf16 --steps 2 --append

Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from common import machine, peak_rss_mb, reset_peak_rss, write_result

from tessera.model.hf_export import to_hf_model
from tessera.model.transformer import Transformer, model_preset
from tessera.runtime.inductor import pin_cpu_threads
from tessera.train.losses import compiled_token_losses, token_losses
from tessera.train.mfu import peak_flops
from tessera.train.parallel import apply_activation_checkpointing, apply_compile

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


def bench_config(preset: str, vocab: int):
    cfg = model_preset(preset)
    cfg.vocab_size = vocab
    cfg.qk_norm = False  # the Llama architecture on both sides
    return cfg


def make_models(preset: str, vocab: int, device, seed: int = 0, hf: bool = True):
    """tessera's model from `seed`, and (with `hf`) its LlamaForCausalLM copy: the same weights on both sides."""
    cfg = bench_config(preset, vocab)
    ours = Transformer(cfg)
    ours.init_weights(seed=seed)
    copy = to_hf_model(ours).train().to(device) if hf else None
    return ours.to(device).train(), copy, cfg


def time_steps(step, n: int, sync) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t) / n


SIDES = {  # name: (model, compiled, activation checkpointing, keep freed memory)
    "tessera": ("tessera", None, False, True),  # compiled: the --compile setting of the run
    "tessera_ac": ("tessera", None, True, True),
    "hf": ("hf", False, False, False),
    "hf_compiled": ("hf", True, False, False),
    "hf_same_allocator": ("hf", False, False, True),
}


def side_worker(conn, side: str, preset: str, vocab: int, batch: int, seq: int, warmup: int, device: str,
                dtype: str, threads: int, compile: bool) -> None:
    """One side of a row in its own process, as a user runs it: build, warm up, then time `steps` steps per
    request from the parent; last, the process's peak resident memory from the end of the build on (the HF
    side converts from a tessera model it then drops; that copy is not the step's memory)."""
    torch.set_num_threads(threads)
    pin_cpu_threads()  # compiled sides: kernels for this thread count, not a cached row's (runtime/inductor.py)
    kind, compiled, ac, keep = SIDES[side]
    compiled = compile if compiled is None else compiled
    dev, dt = torch.device(device), getattr(torch, dtype)
    ours, hf, _ = make_models(preset, vocab, dev, hf=kind == "hf")
    if kind == "hf":
        del ours
    gc.collect()  # the dropped model's blocks go back to the OS before freed memory is kept
    if keep and device == "cpu":  # what `pretrain` does on a CPU by default (tessera/runtime/host_memory.py)
        from tessera.runtime.host_memory import keep_freed_memory

        keep_freed_memory()
    from_build = reset_peak_rss()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=g).to(dev) for _ in range(4)]
    amp = dt != torch.float32
    k = {"i": 0}

    def batch_():
        k["i"] += 1
        x = data[k["i"] % len(data)]
        return x[:, :-1], x[:, 1:]

    if kind == "tessera":
        if ac:
            apply_activation_checkpointing(ours)
        if compiled:  # what `pretrain --compile` does: each block compiled, and the loss
            apply_compile(ours)
        losses = compiled_token_losses if compiled else token_losses
        modality = torch.zeros(vocab, dtype=torch.long, device=dev)
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)

        def step():
            x, y = batch_()
            with torch.autocast(dev.type, dtype=dt, enabled=amp):
                logits = ours(x)
            r = losses(logits, y, modality)
            (r["ce"] / r["count"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model = torch.compile(hf) if compiled else hf
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

        def step():
            x, y = batch_()
            with torch.autocast(dev.type, dtype=dt, enabled=amp):
                logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    conn.send({"warmup_s": time.perf_counter() - t0})
    while True:
        msg = conn.recv()
        if msg is None:
            break
        conn.send(time_steps(step, msg, sync))
    conn.send({"peak_rss_mb": round(peak_rss_mb(), 1), "from_build": from_build,
               "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda" else None})


def recv_side(procs: dict, conns: dict, side: str, what: str):
    """A side process's next answer; one that died (out of memory, a compile error) kills every side and ends
    the run, instead of leaving the parent waiting on a pipe nobody writes to."""
    while not conns[side].poll(1.0):
        if not procs[side].is_alive():
            for p in procs.values():
                p.kill()
            raise SystemExit(f"{what} died (exit code {procs[side].exitcode})")
    return conns[side].recv()


def bench_preset(preset: str, vocab: int, batch: int, seq: int, steps: int, warmup: int, rounds: int,
                 device: torch.device, dtype: torch.dtype, compile: bool = False, hf_compile: bool = False) -> dict:
    """One row: every side in its own (spawned) process, built from the same seed (the same weights) and fed
    the same batches; the sides take turns, one at a time, `steps` steps per turn, for `rounds` rounds."""
    import multiprocessing as mp

    sides = ["tessera", "tessera_ac", "hf"] + (["hf_compiled"] if hf_compile else []) + (
        ["hf_same_allocator"] if device.type == "cpu" else [])
    ctx = mp.get_context("spawn")
    procs, conns, warm = {}, {}, {}

    def recv(side):
        return recv_side(procs, conns, side, f"the {side} side of the {preset} row")

    for side in sides:  # started and warmed up one at a time, so compilation does not share the cores
        parent, child = ctx.Pipe()
        procs[side] = ctx.Process(target=side_worker, args=(child, side, preset, vocab, batch, seq, warmup,
                                                            device.type, str(dtype).replace("torch.", ""),
                                                            torch.get_num_threads(), compile))
        procs[side].start()
        conns[side] = parent
        warm[side] = recv(side)["warmup_s"]
    times: dict[str, list[float]] = {s: [] for s in sides}
    for _ in range(rounds):
        for side in sides:
            conns[side].send(steps)
            times[side].append(recv(side))
    mem = {}
    for side in sides:
        conns[side].send(None)
        mem[side] = recv(side)
        procs[side].join()
    tok = batch * seq
    tps = {s: tok / statistics.median(t) for s, t in times.items()}
    ours_tps, hf_tps = tps["tessera"], tps["hf"]
    fpt = flops_per_token(preset, vocab, seq)
    peak, src = peak_flops(device, dtype)
    opt = lambda s, key: (round(tps[s], 1) if key == "tps" else round(ours_tps / tps[s], 3)) if s in tps else None
    return {
        "preset": preset, "threads": torch.get_num_threads(), "params": params_of(preset, vocab), "vocab": vocab,
        "batch": batch, "seq_len": seq,
        "dtype": str(dtype).replace("torch.", ""), "steps_per_round": steps, "rounds": rounds,
        "tessera_tokens_per_s": round(ours_tps, 1), "hf_tokens_per_s": round(hf_tps, 1),
        "ratio": round(ours_tps / hf_tps, 3), "compile": compile,
        "hf_compiled_tokens_per_s": opt("hf_compiled", "tps"), "ratio_vs_hf_compiled": opt("hf_compiled", "ratio"),
        "hf_same_allocator_tokens_per_s": opt("hf_same_allocator", "tps"),
        "ratio_vs_hf_same_allocator": opt("hf_same_allocator", "ratio"),
        "tessera_activation_checkpointing_tokens_per_s": round(tps["tessera_ac"], 1),
        # the warm-up steps' time beyond steady steps: mostly compilation when `compile` is on
        "tessera_warmup_overhead_s": round(warm["tessera"] - warmup * statistics.median(times["tessera"]), 2),
        "seconds_per_step": {s: [round(x, 4) for x in t] for s, t in times.items()},
        "peak_rss_mb": {s: m["peak_rss_mb"] for s, m in mem.items()},
        "peak_rss_counted_from": "end of build" if all(m["from_build"] for m in mem.values()) else "process start",
        "peak_cuda_mb": {s: m["peak_cuda_mb"] for s, m in mem.items()} if device.type == "cuda" else None,
        "tessera_mfu": round(fpt * ours_tps / peak, 4) if peak else None,
        "hf_mfu": round(fpt * hf_tps / peak, 4) if peak else None, "peak_flops": peak, "peak_source": src,
    }


def flops_per_token(preset: str, vocab: int, seq: int) -> float:
    with torch.device("meta"):
        return Transformer(bench_config(preset, vocab)).flops_per_token(seq)


def params_of(preset: str, vocab: int) -> int:
    with torch.device("meta"):
        return Transformer(bench_config(preset, vocab)).num_params(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="demo,small")
    p.add_argument("--vocab", type=int, default=5632, help="rows of the embedding table (the demo bundle's)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtypes", default=None,
                   help="comma-separated fp32,bf16 (autocast, both sides); default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", default="on", choices=["off", "on", "both"],
                   help="tessera's side compiled per block with its loss, as `pretrain` runs a long run by default "
                        "(compile=auto); HF's default side stays eager, its default path")
    p.add_argument("--threads", default=None,
                   help="comma-separated CPU thread counts, e.g. 1,2 (default: torch's current count)")
    p.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time HF under torch.compile (default on; --no-hf-compile skips it)")
    p.add_argument("--gpu-1b", action="store_true", help="also the 1b preset at seq 4096 in bf16 (CUDA)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out, replacing those of the same preset, threads, dtype and "
                        "compile setting (to run presets with different --steps into one file)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, old = Path(args.out), None
    if args.append and out.exists():  # one machine per file: its rows must come from this one
        old, here = json.loads(out.read_text()), machine(device)
        same = ("processor", "cpu_count", "cuda", "libraries")
        if any(old.get("machine", {}).get(f) != here[f] for f in same):
            raise SystemExit(f"--append: {out} holds rows from another machine or other library versions "
                             f"({', '.join(same)} differ); write to another --out")
    names = args.dtypes.split(",") if args.dtypes else ["bf16" if device.type == "cuda" else "fp32"]
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16}[n] for n in names]
    runs = []
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for preset in args.presets.split(","):
            for dtype in dtypes:
                for comp in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
                    torch._dynamo.reset()
                    r = bench_preset(preset, args.vocab, args.batch, args.seq, args.steps, args.warmup, args.rounds,
                                     device, dtype, comp, args.hf_compile)
                    print(json.dumps(r), flush=True)
                    runs.append(r)
    if args.gpu_1b:
        if device.type != "cuda":
            raise SystemExit("--gpu-1b needs CUDA")
        r = bench_preset("1b", 32768, 2, 4096, 5, 2, 3, device, torch.bfloat16, args.compile != "off",
                         args.hf_compile)  # target: MFU >= 0.45
        print(json.dumps(r))
        runs.append(r)
    if old is not None:
        key = lambda r: (r["preset"], r["threads"], r["dtype"], r["compile"])
        new = {key(r) for r in runs}
        runs = sorted([r for r in old["runs"] if key(r) not in new] + runs, key=key)
        threads = sorted(set(threads) | set(old["machine"].get("threads", [])))
    write_result(out, {"benchmark": "train_throughput", "machine": machine(device, threads=threads), "runs": runs})


if __name__ == "__main__":
    main()
