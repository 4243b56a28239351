"""How learnable a codec's codes are: the held-out cross-entropy of a small code prior, next to code entropy.

A codec is chosen for the decoder that will model its codes, not only for how well it reconstructs. Two
codecs with the same PSNR can differ widely in how predictable their code sequences are, and a decoder
trained on a few thousand images memorizes codes that no small model can predict. This module measures
that before any GPU time is spent on the decoder:

- `unigram_entropy`: the entropy of the training codes' histogram (nats per code). A prior that knows only
  code frequencies reaches this cross-entropy; `log(codebook size)` is chance.
- `prior_train_ce` / `prior_heldout_ce`: a small causal transformer (tessera's decoder at a tiny size) is
  trained for a fixed number of steps on the training sequences (raster order for image grids, frames with
  their levels interleaved for audio), then scored on the training and the held-out sequences. The
  held-out number is how far context helps on unseen data; the gap to the training number is how much of
  what it learned is memorization.

Both numbers depend on the prior's budget, so they compare codecs at one budget, not across budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tessera.runtime.schedule import lr_factor

PRIOR_STEPS = 300
PRIOR_SEQ_LEN = 128
PRIOR_BATCH = 16


def unigram_entropy(seqs: Sequence[np.ndarray], vocab: int) -> float:
    counts = np.zeros(vocab, dtype=np.float64)
    for s in seqs:
        counts += np.bincount(np.asarray(s, dtype=np.int64).ravel(), minlength=vocab)[:vocab]
    p = counts / max(1.0, counts.sum())
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def _stream(seqs: Sequence[np.ndarray], bos: int) -> torch.Tensor:
    """One long stream of `bos, codes..., bos, codes...`; the targets after each `bos` are the codes."""
    parts = []
    for s in seqs:
        parts.append(np.array([bos], dtype=np.int64))
        parts.append(np.asarray(s, dtype=np.int64).ravel())
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def _stream_ce(model, stream: torch.Tensor, seq_len: int, bos: int, batch: int = 32) -> float:
    """Mean cross-entropy (nats) over the non-`bos` targets of `stream`, cut into windows of `seq_len`."""
    n = (len(stream) - 1) // seq_len
    if n == 0:
        return float("nan")
    x = stream[: n * seq_len].view(n, seq_len)
    y = stream[1 : n * seq_len + 1].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        logits = model(x[i : i + batch]).float()
        t = y[i : i + batch]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="none")
        keep = t.reshape(-1) != bos
        total += float(ce[keep].sum())
        count += int(keep.sum())
    return total / max(1, count)


def code_learnability(train: Sequence[np.ndarray], heldout: Sequence[np.ndarray], vocab: int, *,
                      steps: int = PRIOR_STEPS, seq_len: int = PRIOR_SEQ_LEN, batch: int = PRIOR_BATCH,
                      dim: int = 64, n_layers: int = 2, lr: float = 3e-3, seed: int = 0) -> dict:
    """The learnability numbers of the module docstring, for code sequences with ids in [0, vocab)."""
    from tessera.model.transformer import ModelConfig, Transformer

    bos = vocab
    tr, te = _stream(train, bos), _stream(heldout, bos)
    seq_len = max(8, min(seq_len, len(tr) - 1))
    if len(tr) < seq_len + 2 or len(te) < 2:
        raise ValueError("too few codes for a learnability estimate")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64 * math.ceil((vocab + 1) / 64), dim=dim, n_layers=n_layers, n_heads=4,
                      max_seq_len=seq_len, qk_norm=True)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(tr) - seq_len - 1, (batch,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        w = tr[idx]
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for grp in opt.param_groups:  # linear decay: the estimate should not depend on where the lr stopped
            grp["lr"] = lr * lr_factor(step, step / steps, 0, "wsd", decay_fraction=1.0)
        opt.step()
    model.eval()
    train_ce = _stream_ce(model, tr[: len(te) * 4 + seq_len + 1], seq_len, bos)
    heldout_ce = _stream_ce(model, te, seq_len, bos)
    return {
        "codebook_size": vocab,
        "uniform": round(math.log(vocab), 4),
        "unigram_entropy": round(unigram_entropy(train, vocab), 4),
        "prior_train_ce": round(train_ce, 4),
        "prior_heldout_ce": round(heldout_ce, 4),
        "prior_gap": round(heldout_ce - train_ce, 4),
        "prior": {"steps": steps, "seq_len": seq_len, "batch": batch, "dim": dim, "n_layers": n_layers},
        "n_train_codes": int(sum(np.asarray(s).size for s in train)),
        "n_heldout_codes": int(sum(np.asarray(s).size for s in heldout)),
    }


def format_learnability(r: dict) -> str:
    return (f"learnability (nats/code; chance {r['uniform']:.2f}): unigram entropy {r['unigram_entropy']:.2f}, "
            f"prior held-out {r['prior_heldout_ce']:.2f} (train {r['prior_train_ce']:.2f}, gap "
            f"{r['prior_gap']:+.2f}) after {r['prior']['steps']} steps")
