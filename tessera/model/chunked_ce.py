"""The output projection and the cross-entropy together, a chunk of tokens at a time.

The plain training path materializes the logits of every token, (tokens, vocab), and the loss reads them in
fp32: at sequence 4096 and a 64k vocabulary that is 1 GiB per sequence in fp32, and as much again for its
gradient, more than the rest of a small model's activations. `linear_cross_entropy` computes, for `chunk`
tokens at a time, the logits, their log-sum-exp and the target's cross-entropy, and keeps only the two
per-token numbers; the backward pass computes each chunk's logits again (one more matrix product of the
output head) and turns them into the chunk's gradients at once. Peak memory for the logits is `chunk x
vocab` instead of `tokens x vocab`.

The numbers are the plain path's up to float rounding: the matrix products run in the dtype autocast gives
the head (bf16 under bf16 autocast, as `F.linear` would), and the log-softmax in fp32 (fp64 for fp64 inputs,
so that `torch.autograd.gradcheck` can check the gradients). The backward pass runs its matrix products in
the forward's dtype whatever autocast is active around it, and is not itself differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        n = h.shape[0]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        ce = torch.empty(n, dtype=acc, device=h.device)
        lse = torch.empty(n, dtype=acc, device=h.device)
        mm_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        for s in range(0, n, chunk):
            logits = F.linear(h[s : s + chunk], weight)  # autocast picks the dtype, as in the plain head
            mm_dtype = logits.dtype
            logits = logits.to(acc)
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            ce[s : s + chunk] = lse[s : s + chunk] - logits.gather(1, targets[s : s + chunk, None])[:, 0]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.mm_dtype = chunk, mm_dtype
        return ce, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, grad_lse):
        h, weight, targets, lse = ctx.saved_tensors
        dt, acc = ctx.mm_dtype, lse.dtype
        with torch.autocast(h.device.type, enabled=False):  # the forward's dtype, not the caller's autocast
            w = weight.to(dt)
            grad_ce = torch.zeros_like(lse) if grad_ce is None else grad_ce.to(acc)
            grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(acc)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            for s in range(0, h.shape[0], ctx.chunk):
                hc = h[s : s + ctx.chunk].to(dt)
                # d ce / d logits = softmax - onehot(target); d lse / d logits = softmax. In place: one
                # (chunk, vocab) fp32 buffer at a time; under bf16 also the matmul's bf16 output and the
                # gradient's bf16 copy for the two products (half a buffer each)
                g = F.linear(hc, w).to(acc).sub_(lse[s : s + ctx.chunk, None]).exp_()
                g.mul_((grad_ce[s : s + ctx.chunk] + grad_lse[s : s + ctx.chunk])[:, None])
                g.scatter_add_(1, targets[s : s + ctx.chunk, None], -grad_ce[s : s + ctx.chunk, None])
                g = g.to(dt)
                grad_h[s : s + ctx.chunk] = (g @ w).to(h.dtype)
                grad_w += (g.t() @ hc).to(acc)
        return grad_h, grad_w.to(weight.dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h (N, D) final hidden states, weight (V, D) the output head, targets (N,) in [0, V) -> (ce, lse), each
    (N,) fp32 (fp64 for fp64 inputs): each token's cross-entropy and the log-sum-exp of its logits (for
    z-loss), computed `chunk` tokens at a time. Targets to ignore must be mapped into range by the caller and
    their losses masked."""
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    return _LinearCrossEntropy.apply(h, weight, targets, chunk)
