"""Attention behind one function, with interchangeable backends.

    attention(q, k, v, doc_ids=..., backend=...)      q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, Hq, T, D)

`BACKENDS` is the one table from a backend's name to its function, all with the signature
`fn(q, k, v, doc_ids) -> out`; `ModelConfig` refuses a name that is not in it. Backends (all causal, all
grouped-query, all document-aware):
- "sdpa" (default): PyTorch scaled_dot_product_attention. Packed sequences get an explicit boolean mask,
  causal AND same-document; unpacked ones use the fused causal path.
- "flex": FlexAttention with a document-causal block mask, so fully masked blocks are skipped. Fused when
  compiled (the trainer compiles it on GPU); eager on CPU, where it is a reference.
- "flash": flash-attn's varlen kernel over the documents of the batch (cu_seqlens); CUDA only, used where
  the `flash-attn` package is installed (`pip install tessera[gpu]`).

`doc_ids` (B, T) gives each token's document index within its row; tokens attend only to earlier tokens of
the same document. With a KV cache (generation), the caller passes an explicit `mask` instead.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F


@functools.cache
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) boolean mask: causal and within the same document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return causal[None, None] & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])


def _sdpa(q, k, v, doc_ids, mask=None, causal=True):
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc_ids), enable_gqa=gqa)


_flex_fns: dict[bool, object] = {}


def _flex(q, k, v, doc_ids):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, _, T, _ = q.shape
    if doc_ids is None:
        doc_ids = torch.zeros(B, T, dtype=torch.long, device=q.device)

    def doc_causal(b, h, qi, ki):
        return (qi >= ki) & (doc_ids[b, qi] == doc_ids[b, ki])

    block_mask = create_block_mask(doc_causal, B, None, T, T, device=q.device)
    if q.is_cuda not in _flex_fns:
        # Compiled on CUDA (the fused kernel); on CPU the eager reference is exact and needs no compiler.
        _flex_fns[q.is_cuda] = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex_fns[q.is_cuda](q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _flash(q, k, v, doc_ids):
    if q.dtype not in (torch.float16, torch.bfloat16):
        # flash-attn computes in half precision only; run it under bf16 and return the caller's dtype.
        return _flash(q.bfloat16(), k.bfloat16(), v.bfloat16(), doc_ids).to(q.dtype)
    if not flash_attn_available():
        raise RuntimeError("attention backend 'flash' needs CUDA and the flash-attn package (pip install tessera[gpu])")
    from flash_attn import flash_attn_varlen_func

    B, Hq, T, D = q.shape
    if doc_ids is None:
        doc_ids = torch.zeros(B, T, dtype=torch.long, device=q.device)
    # A segment starts at each row start and wherever the document id changes.
    starts = torch.ones(B, T, dtype=torch.bool, device=q.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat_starts = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([flat_starts, flat_starts.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())

    def flat(x):  # (B, H, T, D) -> (B*T, H, D)
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D)

    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, max_len, max_len, causal=True)
    return out.reshape(B, T, Hq, D).transpose(1, 2)


BACKENDS = {
    "sdpa": _sdpa,
    "flex": _flex,
    "flash": _flash,
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "sdpa",
    causal: bool = True,
) -> torch.Tensor:
    """Causal, document-aware, grouped-query attention. See the module docstring.

    `causal=False` (KV-cache decoding: queries that follow every cached key) attends over all keys, or as
    `mask` says."""
    if mask is not None or not causal:
        return _sdpa(q, k, v, doc_ids, mask, causal)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[backend](q, k, v, doc_ids)
