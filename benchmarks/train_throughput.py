"""Training throughput: tessera's decoder next to transformers.LlamaForCausalLM, in one run.

Both models get the same dimensions (the Llama architecture: tessera with QK-norm off), the same random
batches, the same fused AdamW, sequence length, batch and dtype. Each model trains `--steps` steps after
`--warmup` steps; the runs alternate (tessera, HF, tessera, HF, ...) so drift on a noisy machine hits both.
Reported: tokens/s of each (median over rounds) and their ratio. `--compile on` times tessera's side as
`pretrain` runs it by default on a long run (compile=auto: blocks and loss compiled); `--hf-compile` adds
HF under torch.compile.

    python benchmarks/train_throughput.py                        # CPU: demo and small presets
    python benchmarks/train_throughput.py --gpu-1b               # CUDA: also the 1b preset, seq 4096, bf16, MFU
    python benchmarks/train_throughput.py --presets demo --dtypes fp32,bf16   # both sides in each dtype
    python benchmarks/train_throughput.py --presets demo --threads 1,2 --dtypes fp32,bf16 --compile on --hf-compile

Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tessera.model.hf_export import to_hf_model
from tessera.model.transformer import Transformer, model_preset
from tessera.train.mfu import peak_flops
from tessera.train.parallel import apply_compile
from tessera.train.losses import compiled_token_losses, token_losses

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


def make_models(preset: str, vocab: int, device, seed: int = 0):
    cfg = model_preset(preset)
    cfg.vocab_size = vocab
    cfg.qk_norm = False  # the Llama architecture on both sides
    ours = Transformer(cfg)
    ours.init_weights(seed=seed)
    hf = to_hf_model(ours).train()
    return ours.to(device).train(), hf.to(device), cfg


def time_steps(step, n: int, sync) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t) / n


def bench_preset(preset: str, vocab: int, batch: int, seq: int, steps: int, warmup: int, rounds: int,
                 device: torch.device, dtype: torch.dtype, compile: bool = False, hf_compile: bool = False) -> dict:
    ours, hf, cfg = make_models(preset, vocab, device)
    hf_c = torch.compile(make_models(preset, vocab, device)[1]) if hf_compile else None
    if compile:  # what `pretrain --compile` does: each block compiled, and the loss
        apply_compile(ours)
    losses = compiled_token_losses if compile else token_losses
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device) for _ in range(4)]
    modality = torch.zeros(vocab, dtype=torch.long, device=device)
    opt_a = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_b = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    opt_c = torch.optim.AdamW(hf_c.parameters(), lr=1e-4, fused=True) if hf_c is not None else None
    amp = dtype != torch.float32
    k = {"i": 0}

    def batch_():
        k["i"] += 1
        x = data[k["i"] % len(data)]
        return x[:, :-1], x[:, 1:]

    def step_ours():
        x, y = batch_()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            logits = ours(x)
        r = losses(logits, y, modality)
        (r["ce"] / r["count"]).backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)

    def hf_step(model, opt):
        def step():
            x, y = batch_()
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    step_hf = hf_step(hf, opt_b)
    step_hf_c = hf_step(hf_c, opt_c) if hf_c is not None else None

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step_ours()
    sync()
    warm_ours = time.perf_counter() - t0
    for _ in range(warmup):
        step_hf()
        if step_hf_c:
            step_hf_c()
    a, b, c = [], [], []
    for _ in range(rounds):
        a.append(time_steps(step_ours, steps, sync))
        b.append(time_steps(step_hf, steps, sync))
        if step_hf_c:
            c.append(time_steps(step_hf_c, steps, sync))
    tok = batch * seq
    ours_tps, hf_tps = tok / statistics.median(a), tok / statistics.median(b)
    hf_c_tps = tok / statistics.median(c) if c else None
    peak, src = peak_flops(device, dtype)
    fpt = ours.flops_per_token(seq)
    return {
        "preset": preset, "threads": torch.get_num_threads(), "params": ours.num_params(False), "vocab": vocab,
        "batch": batch, "seq_len": seq,
        "dtype": str(dtype).replace("torch.", ""), "steps_per_round": steps, "rounds": rounds,
        "tessera_tokens_per_s": round(ours_tps, 1), "hf_tokens_per_s": round(hf_tps, 1),
        "ratio": round(ours_tps / hf_tps, 3), "compile": compile,
        "hf_compiled_tokens_per_s": round(hf_c_tps, 1) if hf_c_tps else None,
        "ratio_vs_hf_compiled": round(ours_tps / hf_c_tps, 3) if hf_c_tps else None,
        # the warm-up steps' time beyond steady steps: mostly compilation when `compile` is on
        "tessera_warmup_overhead_s": round(warm_ours - warmup * statistics.median(a), 2),
        "tessera_mfu": round(fpt * ours_tps / peak, 4) if peak else None,
        "hf_mfu": round(fpt * hf_tps / peak, 4) if peak else None, "peak_flops": peak, "peak_source": src,
    }


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
    p.add_argument("--compile", default="off", choices=["off", "on", "both"],
                   help="tessera's side compiled per block with its loss (HF stays eager, its default path)")
    p.add_argument("--threads", default=None,
                   help="comma-separated CPU thread counts, e.g. 1,2 (default: torch's current count)")
    p.add_argument("--hf-compile", action="store_true", help="also time HF under torch.compile")
    p.add_argument("--gpu-1b", action="store_true", help="also the 1b preset at seq 4096 in bf16 (CUDA)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "cpus": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": __import__("transformers").__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "train_throughput", "machine": machine, "runs": runs}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
