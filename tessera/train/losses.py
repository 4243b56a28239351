"""The decoder's loss, summed per modality, and the held-out loss over a shard set: what the trainer
optimizes and logs, and what `tessera eval` reports as perplexity.

Logged losses are means over tokens, so they are kept as a sum and a count per name (`LossMeter`) and
divided only when read: micro-batches, steps and ranks then combine exactly (a sum of sums).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tessera.runtime.distributed import all_reduce
from tessera.tokenizers.layout import MODALITIES, VocabLayout
from tessera.train.loader import IGNORE, LoaderConfig, PackedLoader


def token_losses(logits: torch.Tensor, targets: torch.Tensor, modality: torch.Tensor, z_loss: float = 0.0) -> dict:
    """Sums (not means) over the target tokens of a micro-batch: CE, z-loss, CE/counts per modality, and CE/counts
    per row (`ce_row`, `n_row`)."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V).float()
    ce = F.cross_entropy(flat, targets.reshape(-1).clamp(min=0), reduction="none")
    return losses_from_ce(ce, torch.logsumexp(flat, dim=-1) if z_loss else None, targets, modality)


def losses_from_ce(ce: torch.Tensor, lse: torch.Tensor | None, targets: torch.Tensor, modality: torch.Tensor) -> dict:
    """`token_losses`' sums from every token's cross-entropy `ce` (and log-sum-exp `lse`, for the z-loss; None:
    no z-loss), each of the targets' shape or flat: what the chunked head (`Transformer(..., loss_targets=,
    loss_chunk=)`) returns instead of logits."""
    tgt = targets.reshape(-1)
    valid = tgt != IGNORE
    ce = ce.reshape(-1) * valid
    out = {"ce": ce.sum(), "count": valid.sum()}
    # per row (window) of the batch: what a mixture's per-set loss sums (train/mixture.py)
    out["ce_row"], out["n_row"] = ce.detach().reshape(targets.shape).sum(-1), valid.reshape(targets.shape).sum(-1)
    if lse is not None:
        out["z"] = (lse.reshape(-1).pow(2) * valid).sum()
    mod = torch.where(valid, modality[tgt.clamp(min=0)], len(MODALITIES))
    out["ce_mod"] = torch.zeros(len(MODALITIES) + 1, device=ce.device).index_add_(0, mod, ce.detach())[:-1]
    # an index_add, not a bincount: bincount's output size depends on the data, which splits a compiled graph
    out["n_mod"] = torch.zeros(len(MODALITIES) + 1, dtype=torch.long, device=ce.device).index_add_(
        0, mod, valid.long())[:-1]
    return out


def batch_losses(model, b: dict, modality: torch.Tensor, dtype: torch.dtype, z_loss: float = 0.0,
                 loss_chunk: int = 0, losses_fn=token_losses) -> dict:
    """`token_losses`' sums for a loader batch `b`: the model under autocast to `dtype` (fp32: none), then the
    loss in fp32, from the logits (`losses_fn`) or, with `loss_chunk` > 0, from the chunked head's per-token
    cross-entropy and log-sum-exp (no whole-batch logits)."""
    device_type = b["input_ids"].device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        if loss_chunk:
            ce, lse = model(b["input_ids"], b["positions"], b["doc_ids"], loss_targets=b["targets"].clamp(min=0),
                            loss_chunk=loss_chunk)
        else:
            logits = model(b["input_ids"], b["positions"], b["doc_ids"])
    if loss_chunk:
        return losses_from_ce(ce, lse if z_loss else None, b["targets"], modality)
    return losses_fn(logits, b["targets"], modality, z_loss)


class LossMeter:
    """Sums and token counts per name (the metric's name: `loss`, `loss_text`, ...); the mean is sum / count.

    `update` takes tensors or numbers and does not synchronize with the device; `all_reduce` sums every name
    across ranks in one collective and leaves Python floats. Every rank must hold the same names (update a
    name with zeros where a rank saw none of it): the names are reduced in sorted order."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, torch.Tensor | float] = {}

    def update(self, name: str, total, count) -> None:
        if isinstance(total, torch.Tensor):
            total, count = total.detach().double(), torch.as_tensor(count, device=total.device).double()
        self.sums[name] = self.sums.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + count

    def merge(self, other: LossMeter) -> None:
        for name in other.sums:
            self.update(name, other.sums[name], other.counts[name])

    def all_reduce(self) -> LossMeter:
        names = sorted(self.sums)
        if names:
            values = [self.sums[n] for n in names] + [self.counts[n] for n in names]
            device = next((v.device for v in values if isinstance(v, torch.Tensor)), "cpu")
            flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
            totals = all_reduce(flat).tolist()
            self.sums = dict(zip(names, totals[: len(names)]))
            self.counts = dict(zip(names, totals[len(names):]))
        return self

    def count(self, name: str) -> float:
        return float(self.counts.get(name, 0.0))

    def mean(self, name: str, empty: float = math.nan) -> float:
        """sum / count, or `empty` when the count is 0 (or the name was never updated)."""
        n = self.count(name)
        return float(self.sums[name]) / n if n > 0 else empty

    def means(self) -> dict[str, float]:
        """The mean of every name with a count > 0."""
        return {name: self.mean(name) for name in self.sums if self.count(name) > 0}


def add_token_losses(meter: LossMeter, r: dict, prefix: str = "") -> None:
    """Record `token_losses`' sums under their metric names: `loss`, `z_loss` (with z-loss on) and
    `loss_<modality>` for every modality, each after `prefix` (`eval_` for held-out losses)."""
    meter.update(f"{prefix}loss", r["ce"], r["count"])
    if "z" in r:
        meter.update(f"{prefix}z_loss", r["z"], r["count"])
    for i, m in enumerate(MODALITIES):
        meter.update(f"{prefix}loss_{m}", r["ce_mod"][i], r["n_mod"][i])


# The loss compiled (lazily, at its first call): log-softmax, the gather and the per-modality sums fused,
# instead of several passes over the (tokens x vocab) logits. `--compile` uses it beside the compiled blocks.
compiled_token_losses = torch.compile(token_losses, dynamic=False)


@torch.no_grad()
def evaluate(model, shards, layout: VocabLayout, seq_len: int, batch_size: int, max_batches: int, env,
             dtype: torch.dtype, loss_chunk: int = 0) -> dict:
    """Mean loss per modality over held-out shards (one sequential pass, at most `max_batches`); with
    `loss_chunk` > 0, through the chunked head, as training with it (no whole-batch logits)."""
    model.eval()
    loader = PackedLoader(shards, LoaderConfig(seq_len=seq_len, batch_size=batch_size), layout,
                          rank=env.rank, world_size=env.world_size, sequential=True)
    modality = torch.as_tensor(layout.modality_table(), device=env.device)
    meter = LossMeter()
    for i, b in enumerate(loader):
        if i >= max_batches:
            break
        b = {k: v.to(env.device) for k, v in b.items()}
        add_token_losses(meter, batch_losses(model, b, modality, dtype, loss_chunk=loss_chunk), prefix="eval_")
    if not meter.sums:  # no batch at all: the same names on every rank, so the reduction lines up
        add_token_losses(meter, {"ce": 0.0, "count": 0, "ce_mod": [0.0] * len(MODALITIES),
                                 "n_mod": [0] * len(MODALITIES)}, prefix="eval_")
    meter.all_reduce()
    model.train()
    return {"eval_loss": math.nan, **meter.means(), "eval_tokens": int(meter.count("eval_loss"))}
