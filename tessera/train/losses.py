"""The decoder's loss, summed per modality, and the held-out loss over a shard set: what the trainer
optimizes and logs, and what `tessera eval` reports as perplexity."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.runtime.distributed import all_reduce
from tessera.tokenizers.layout import MODALITIES, VocabLayout
from tessera.train.loader import IGNORE, LoaderConfig, PackedLoader


def token_losses(logits: torch.Tensor, targets: torch.Tensor, modality: torch.Tensor, z_loss: float = 0.0) -> dict:
    """Sums (not means) over the target tokens of a micro-batch: CE, z-loss, CE/counts per modality, and CE/counts
    per row (`ce_row`, `n_row`)."""
    V = logits.shape[-1]
    flat, tgt = logits.reshape(-1, V).float(), targets.reshape(-1)
    valid = tgt != IGNORE
    ce = F.cross_entropy(flat, tgt.clamp(min=0), reduction="none") * valid
    out = {"ce": ce.sum(), "count": valid.sum()}
    # per row (window) of the batch: what a mixture's per-set loss sums (train/mixture.py)
    out["ce_row"], out["n_row"] = ce.detach().reshape(targets.shape).sum(-1), valid.reshape(targets.shape).sum(-1)
    if z_loss:
        out["z"] = (torch.logsumexp(flat, dim=-1).pow(2) * valid).sum()
    mod = torch.where(valid, modality[tgt.clamp(min=0)], len(MODALITIES))
    out["ce_mod"] = torch.zeros(len(MODALITIES) + 1, device=ce.device).index_add_(0, mod, ce.detach())[:-1]
    out["n_mod"] = torch.bincount(mod, minlength=len(MODALITIES) + 1)[:-1]
    return out


# The loss compiled (lazily, at its first call): log-softmax, the gather and the per-modality sums fused,
# instead of several passes over the (tokens x vocab) logits. `--compile` uses it beside the compiled blocks.
compiled_token_losses = torch.compile(token_losses, dynamic=False)


@torch.no_grad()
def evaluate(model, shards, layout: VocabLayout, seq_len: int, batch_size: int, max_batches: int, env,
             dtype: torch.dtype) -> dict:
    """Mean loss per modality over held-out shards (one sequential pass, at most `max_batches`)."""
    model.eval()
    loader = PackedLoader(shards, LoaderConfig(seq_len=seq_len, batch_size=batch_size), layout,
                          rank=env.rank, world_size=env.world_size, sequential=True)
    modality = torch.as_tensor(layout.modality_table(), device=env.device)
    sums = torch.zeros(2 + 2 * len(MODALITIES), dtype=torch.float64, device=env.device)
    for i, b in enumerate(loader):
        if i >= max_batches:
            break
        b = {k: v.to(env.device) for k, v in b.items()}
        with torch.autocast(env.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(b["input_ids"], b["positions"], b["doc_ids"])
        r = token_losses(logits, b["targets"], modality)
        sums += torch.cat([r["ce"][None], r["count"][None], r["ce_mod"], r["n_mod"]]).double()
    all_reduce(sums)
    model.train()
    n = len(MODALITIES)
    out = {"eval_loss": (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan"), "eval_tokens": int(sums[1])}
    for i, m in enumerate(MODALITIES):
        if sums[2 + n + i] > 0:
            out[f"eval_loss_{m}"] = (sums[2 + i] / sums[2 + n + i]).item()
    return out
