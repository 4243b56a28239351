"""What bf16 and int8 weights cost in quality: held-out loss per modality of a trained run, fp32 vs bf16 vs int8.

    python benchmarks/low_memory_quality.py --model run/ --data test_shards/ [--max-batches 200]

Every dtype reads the same held-out batches (one sequential pass). Writes
benchmarks/results/low_memory_quality.json; the digits task accuracies come from
`tessera eval --model run/ --tasks digits --dtype int8` (and bf16, fp32).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import machine, write_result

RESULTS = Path(__file__).parent / "results" / "low_memory_quality.json"


def main() -> None:
    import tessera
    from tessera.runtime.distributed import DistEnv
    from tessera.storage import read_json
    from tessera.train.losses import evaluate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="held-out token shards of the run's bundle")
    p.add_argument("--max-batches", type=int, default=200)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    cfg = read_json(Path(args.model) / "config.json")["train"]
    rows = []
    for dtype in ("fp32", "bf16", "int8"):
        m = tessera.load(args.model, device="cpu", dtype=dtype)
        r = evaluate(m.model, args.data, m.tokenizer.layout, cfg["seq_len"], cfg["batch_size"], args.max_batches,
                     DistEnv(device=m.device), torch.float32)
        m.model.eval()
        weights = sum(b.numel() * b.element_size() for b in list(m.model.parameters()) + list(m.model.buffers()))
        rows.append({"dtype": dtype, "weight_bytes": weights, **{k: round(v, 5) if isinstance(v, float) else v
                                                                   for k, v in r.items()}})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows[1:]:
        r["delta"] = {k: round(r[k] - base[k], 5) for k in r if k.startswith("eval_loss")}
    write_result(args.out, {"benchmark": "low_memory_quality", "model": args.model, "data": args.data,
                            "machine": machine(), "runs": rows})


if __name__ == "__main__":
    main()
